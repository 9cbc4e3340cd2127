// A volume's link to the object store (DESIGN.md: Paths, Snapshot / Wake; Formats: lease,
// manifest): drain, promotion and release, the lease that keeps one writer per volume,
// and the state that says where this host stands, persisted beside the volume as
// `store.json` so a restart needs no store request.
//
// Fencing (invariant 4): every manifest write is conditional on the ETag this host last
// wrote or read, and is preceded (after the snapshot is cut) by a read of the lease that
// must still name this host and generation (checkWriter says why that order closes the
// race). A host that takes the lease with a new generation rewrites the manifest at once,
// so the previous holder's next conditional write fails and it stops writing. Lease
// expiry is judged on the store's clock by takers and on the monotonic clock, less
// `clock_skew_margin_s`, by the holder; no host's wall clock decides anything.
import { disk, replaceFileSync } from '../disk/disk.js';
import path from 'node:path';
import { keyHex, type BlockCache, type BlockKey, type BlockSealer } from '../blocks/cache.js';
import type { StoreCipher } from '../crypto/cipher.js';
import type { Compression } from '../crypto/compress.js';
import { errorMessage, type Logger } from '../log.js';
import type { StoreClock } from '../objectstore/clock.js';
import { onBehalfOf } from '../objectstore/metered.js';
import { isPreconditionFailed, ObjectStoreError, type ObjectStore } from '../objectstore/types.js';
import { decodeLease, encodeLease, leaseBody, leaseIsLiveAt, type Lease } from '../store/lease.js';
import { sameSet } from '../gc/pack-sets.js';
import type { PackRefcounts } from '../gc/refcounts.js';
import { uploadsKey } from '../gc/uploads.js';
import {
  IF_NONE_MATCH, packsOf, PacksGoneError, putCounted, putCountedThen, putOptionsOf, type CountedManifest, type PutCondition,
} from '../store/counted.js';
import { createObject, indexManifest, manifestChunks, manifestOfChunks } from '../store/catalog.js';
import { checkpointKey, leaseKey, manifestKey, type ManifestMeta } from '../store/manifest.js';
import { bodyCounts, bodyPacks, manifestBody } from '../store/manifest-body.js';
import { decodeManifest, decodeManifestBody } from '../store/manifest-decode.js';
import { patchManifestBody } from '../store/manifest-patch.js';
import { encodeManifest, sealManifest, type StoredTables } from '../store/manifest-seal.js';
import type { PackIndex } from '../store/pack-index.js';
import type { PackUploader, UploadResult } from '../store/upload.js';
import type { BlockMap } from '../volume/blockmap.js';
import { Volume, VolumeError, type VolumeSnapshot } from '../volume/volume.js';
import { injected } from '../faults/injected.js';
import { crashPoint } from '../faults/crash-points.js';

export type FlushMode = 'demand' | 'continuous';

/** Where this host stands with a volume's objects in the store. */
export interface StoreState {
  format: 1;
  flushMode: FlushMode;
  dirtyBudgetBytes: number;
  /** Not the writer here: leased elsewhere, released, or fenced. */
  readOnly: boolean;
  /** Lease generation this host holds; 0 when it holds none. */
  generation: number;
  leaseEtag?: string;
  /** When the held lease expires, ms since the epoch. */
  leaseExpires?: number;
  /** ETag of the manifest this host last wrote or loaded. */
  manifestEtag?: string;
  /** A release put (or is about to put) the released lease; set until it finished. */
  releasing?: boolean;
  /** Why this host stopped writing the volume, when it lost the lease or was fenced (until promoted again). */
  lostLease?: string;
  /** Sequence of that manifest; -1 before the first. */
  manifestSequence: number;
}

/** What the host shares with every link. */
export interface StoreContext {
  store: ObjectStore;
  packIndex: PackIndex;
  uploader: PackUploader;
  /** The host's block cache: a block sealed while the store has it stays pinned until its pack is held. */
  cache: BlockCache;
  hostId: string;
  leaseTtlMs: number;
  /**
   * How much earlier than a taker may judge the lease expired its holder stops writing
   * (`[host] clock_skew_margin_s`): covers the store tick that notices, event-loop stalls
   * and the rate difference between the holder's clock and the store's over one TTL.
   */
  clockSkewMarginMs: number;
  /** The store's clock: a taker judges another host's lease on it (leaseIsLiveAt). */
  clock: StoreClock;
  /** Compression of manifest bodies. */
  manifestCompression: Compression;
  /** Sealing of manifests (crypto/cipher.ts). */
  cipher: StoreCipher;
  /** Pack refcounts (GC); every manifest write goes through them when set. */
  refcounts?: PackRefcounts;
  log: Logger;
}

export interface DrainResult {
  sequence: number;
  manifest_etag: string;
  packs_uploaded: number;
  bytes_uploaded: number;
  blocks_uploaded: number;
  duration_ms: number;
}

/** The lease is live and another host holds it. */
export class LeaseHeldError extends Error {
  constructor(
    readonly volume: string,
    readonly lease: Lease,
  ) {
    super(`volume ${volume} is leased by host ${lease.owner} (generation ${lease.generation}) until ${lease.expires}`);
    this.name = 'LeaseHeldError';
  }
}

/** This host lost the right to write the volume's manifest: another host wrote it. */
export class FencedError extends Error {
  constructor(volume: string, why: string) {
    super(`volume ${volume}: ${why}; this host no longer writes it (read-only here until promoted)`);
    this.name = 'FencedError';
  }
}

const STATE_FILE = 'store.json';

/**
 * The manifest a conditional PUT lost to is this host's own earlier write (its etag was
 * not recorded): write again, conditional on it. Nothing of the lost PUT landed.
 */
class OwnWriteFoundError extends ObjectStoreError {
  constructor(volume: string, key: string) {
    super('PreconditionFailed', `volume ${volume}: put ${key}: the manifest there is this host's own unrecorded write; writing again over it`);
  }
}

/**
 * Test-only pause hook: with UPDRAFT_PAUSE_AT=NAME the process stops itself (SIGSTOP) the
 * first time it reaches pause point NAME, as a host frozen at that step would; the test
 * resumes it with SIGCONT. Lets a test order two hosts' lease requests exactly.
 */
const pauseSpec = process.env.UPDRAFT_PAUSE_AT;
let pausedOnce = false;
function pausePoint(name: string): void {
  if (pauseSpec !== name || pausedOnce) return;
  pausedOnce = true;
  process.stderr.write(`UPDRAFT_PAUSE_AT: stopping at ${name}\n`);
  process.kill(process.pid, 'SIGSTOP');
}

/** A hold of a pack a block sealed by this volume is in (see StoreLink.holdSealed). */
interface SealHold {
  pack: string;
  /** Committed in the volume's uploads set. */
  held: boolean;
  /** The pins of the blocks waiting for it (BlockCache.pinUntilHeld). */
  settles: Array<(held: boolean) => void>;
}

/** Seal holds remembered since a cut (one per pack); past it the next settle keeps every pack. */
const MAX_SEAL_HOLDS = 4096;

/** A block the manifest would name is in no pack the pack index knows (GC removed it). */
class LocationGoneError extends Error {
  override name = 'LocationGoneError';
}

/**
 * Whether an incremental manifest is worth it: the changes, and the blocks earlier patches
 * left in the block table that no chunk may name any more, stay under a quarter of the
 * base's blocks (or MIN_PATCHED_BLOCKS); past that a full layout drops the leftovers.
 */
function worthPatching(base: { raw: Buffer; appended: number }, changes: number): boolean {
  return base.appended + changes <= Math.max(MIN_PATCHED_BLOCKS, bodyCounts(base.raw).blocks / 4);
}
const MIN_PATCHED_BLOCKS = 4096;

export class StoreLink {
  /** Serializes drain, promotion, release and uploads of this volume. */
  private tail: Promise<unknown> = Promise.resolve();
  private renewing = false;
  /** The lease renewal in flight (putRenewal). */
  private renewal: Promise<boolean> | undefined;
  /** A release is under way: writes are refused even though the state still says writable. */
  private releasing = false;
  /** The holder's own deadline passed without a renewal: writes are refused until one lands. */
  private expired = false;
  /**
   * When the PUT of the lease this host holds was sent (performance.now(), a monotonic
   * clock that no wall-clock step moves); undefined after a restart, until the first
   * renewal. The store stamped the lease after this instant, so the lease cannot expire in
   * the store's clock before this + TTL.
   */
  private leaseSentAt: number | undefined;
  busy = false;
  sequenceAtUpload = -1;
  lastUploadAt = Date.now();
  lastUploadMs = 0;
  lastManifestAt = Date.now();
  /** The last drain of this process: when it wrote the manifest, at which sequence. */
  lastDrain: { at: number; sequence: number } | undefined;
  /** The base of incremental manifests (see setBase); none after a restart until the first full one. */
  private base: { map: BlockMap; raw: Buffer; tables?: StoredTables; appended: number; etag: string | undefined } | undefined;
  /** The packs counted for this volume's manifest as of its etag (saves reading them back per write). */
  private counted: CountedManifest | undefined;
  /**
   * Whether the volume's uploads key may hold packs (see uploads): set by every upload, and
   * at start (a previous run may have left some), cleared once a manifest names them all.
   */
  private holdsUploads = true;
  /**
   * Packs this volume's seals hold (or are about to) in its uploads set since its last
   * snapshot cut: the drain of that cut keeps them held, as its manifest does not name the
   * blocks sealed after it. At most MAX_SEAL_HOLDS.
   */
  private sealHolds = new Map<string, SealHold>();
  /** Seal holds forgotten past MAX_SEAL_HOLDS since the cut: the next settle lets go of nothing. */
  private sealHoldsDropped = false;
  /** Seal holds waiting for the next transaction (at most one per pack), and whether one is scheduled or running. */
  private sealHoldQueue: SealHold[] = [];
  private sealHolding: Promise<void> | undefined;
  /** The holdUploads transaction of the seal holds running now, and a settle running (seal holds wait for it). */
  private sealBatch: Promise<unknown> | undefined;
  private settling: Promise<void> | undefined;
  /** This volume to the cache: an upload of a block it sealed while no pack held it holds the pack for it too. */
  private readonly sealer: BlockSealer;

  constructor(
    readonly volume: Volume,
    readonly state: StoreState,
    private readonly ctx: StoreContext,
  ) {
    volume.readOnly = state.readOnly;
    this.sealer = { hold: uploadsKey(ctx.hostId, volume.name), left: false, holding: (pack) => this.noteSealHold(pack, true) };
    if (ctx.refcounts !== undefined) volume.onSealedBlock = (key) => this.holdSealed(key);
  }

  /** Writes are refused while the volume is not this host's, a release runs, or the lease lapsed here. */
  private applyReadOnly(): void {
    this.volume.readOnly = this.state.readOnly || this.releasing || this.expired;
  }

  /**
   * Ms left of the held lease by this host's reckoning, margin taken off. After a restart,
   * until its first renewal, it goes by the expiry it saved (its own wall clock when it
   * sent that lease PUT, read again by the same clock); -Infinity when it saved none.
   */
  private leaseLeftMs(now = performance.now()): number {
    if (this.leaseSentAt === undefined) return (this.state.leaseExpires ?? -Infinity) - this.ctx.clockSkewMarginMs - Date.now();
    return this.leaseSentAt + this.ctx.leaseTtlMs - this.ctx.clockSkewMarginMs - now;
  }

  /** The link of a volume opened from local state (defaults when it never touched the store). */
  static load(volume: Volume, ctx: StoreContext, defaults: { flushMode: FlushMode; dirtyBudgetBytes: number }): StoreLink {
    const file = path.join(volume.dir, STATE_FILE);
    let state: StoreState;
    if (disk.existsSync(file)) {
      try {
        state = JSON.parse(disk.readFileSync(file, 'utf8')) as StoreState;
        if (state.format !== 1) throw new Error(`format ${String(state.format)} is not 1`);
      } catch (err) {
        throw new Error(`volume ${volume.name}: ${file} is not a store state: ${errorMessage(err)}`);
      }
    } else {
      state = { format: 1, ...defaults, readOnly: false, generation: 0, manifestSequence: -1 };
    }
    const link = new StoreLink(volume, state, ctx);
    // The cache forgot at the restart which volumes sealed its pinned blocks: one with changes
    // since its last manifest notes itself on those it names (O(chunks mapped), as the journal's replay).
    if (ctx.refcounts !== undefined && volume.sequence !== state.manifestSequence) {
      for (const [, key] of volume.cloneMap().entries()) ctx.cache.noteSealer(key, link.sealer);
    }
    return link;
  }

  get name(): string {
    return this.volume.name;
  }

  /**
   * The refcount key that holds the packs this volume's uploads on this host made (or,
   * for the dirty budget, found) until its own manifest names them (invariant 6).
   */
  get uploads(): string {
    return uploadsKey(this.ctx.hostId, this.name);
  }

  /**
   * A manifest of the volume naming every block it had at its snapshot is committed: what
   * its uploads held goes (the manifest holds what is still named), but for the packs
   * blocks sealed since the cut rely on. A failure only over-counts.
   */
  private async settleUploads(): Promise<void> {
    const refcounts = this.ctx.refcounts;
    if (!this.holdsUploads || refcounts === undefined || this.sealHoldsDropped) return;
    const settle = async () => {
      // The seal holds being committed go in first; those queued meanwhile wait for the settle.
      await this.sealBatch?.catch(() => undefined);
      const keep = new Set(this.sealHolds.keys());
      await refcounts.settleUploads(this.uploads, [...keep]);
      // Another volume's upload may have held a pack for this one while the settle ran: hold it again.
      const since = [...this.sealHolds.keys()].filter((pack) => !keep.has(pack));
      if (since.length > 0) await refcounts.holdUploads(this.uploads, since);
    };
    const run = settle();
    this.settling = run;
    try {
      await run;
      this.holdsUploads = false;
    } catch (err) {
      this.ctx.log.warn('cannot let go of the packs held for uploads a manifest now names; they stay held until the next drain', { volume: this.name, key: this.uploads, error: errorMessage(err) });
    } finally {
      this.settling = undefined;
    }
  }

  /**
   * A seal put block `key` into the cache. When the store already has it (the pack index
   * names its pack: a dedup hit against another volume's, a manifest's or another host's
   * upload), nothing of this volume holds that pack yet: it joins the volume's uploads set
   * (one transaction for the holds waiting), and the block stays pinned until the hold is
   * committed. A pack being deleted cannot be held: it leaves the pack index and the block,
   * pinned, is uploaded again by the next upload. Once held, a restart keeps the hold (it is
   * in the refcount database; the volume's journal names the block) until a manifest of the
   * volume names it; a crash before that leaves the block pinned (the cache's slot table).
   *
   * Blocks a volume did not seal need no hold: a volume woken from a manifest, and a fork
   * on this host sharing its parent's cached blocks, name only blocks of a manifest that is
   * counted (the fork's own, written before it is served, or the one a lazy fork copies).
   */
  private holdSealed(key: BlockKey): void {
    const location = this.ctx.packIndex.get(key);
    // In no pack: the block is pinned until an upload puts it in one, which holds it for this volume too.
    if (location === undefined) {
      this.ctx.cache.noteSealer(key, this.sealer);
      return;
    }
    let hold = this.sealHolds.get(location.pack);
    if (hold?.held) return;
    const settle = this.ctx.cache.pinUntilHeld(key, this.sealer);
    if (hold === undefined) {
      hold = this.noteSealHold(location.pack, false);
      this.sealHoldQueue.push(hold);
      this.holdsUploads = true;
      this.sealHolding ??= new Promise(setImmediate).then(() => this.commitSealHolds()).catch((err: unknown) => {
        this.ctx.log.error('seal holds failed', { volume: this.name, key: this.uploads, error: errorMessage(err) });
      });
    }
    if (settle !== undefined) hold.settles.push(settle);
  }

  /**
   * Pack `pack` is (`held`: by an upload of a block this volume sealed while in no pack) or
   * is about to be held for a block sealed since the cut: the next settle keeps it.
   */
  private noteSealHold(pack: string, held: boolean): SealHold {
    if (this.sealHolds.size >= MAX_SEAL_HOLDS) {
      // Forget committed ones (the next settle then keeps every pack): the map stays bounded.
      for (const [p, h] of this.sealHolds) if (h.held) this.sealHolds.delete(p);
      this.sealHoldsDropped = true;
    }
    const hold: SealHold = { pack, held, settles: [] };
    this.sealHolds.set(pack, hold);
    this.holdsUploads = true;
    return hold;
  }

  /** One holdUploads transaction for the seal holds waiting; then again while more came meanwhile. */
  private async commitSealHolds(): Promise<void> {
    try {
      await this.commitSealHoldBatches();
    } finally {
      this.sealHolding = undefined;
    }
  }

  private async commitSealHoldBatches(): Promise<void> {
    while (this.sealHoldQueue.length > 0) {
      // A settle computed what it keeps: these go in after it.
      while (this.settling !== undefined) await this.settling.catch(() => undefined);
      const batch = this.sealHoldQueue;
      this.sealHoldQueue = [];
      let gone: Set<string> | undefined;
      try {
        const holding = this.ctx.refcounts!.holdUploads(this.uploads, batch.map((h) => h.pack));
        this.sealBatch = holding;
        gone = new Set(await holding);
      } catch (err) {
        this.ctx.log.warn('cannot hold the packs of blocks sealed while the store had them; the blocks stay pinned', {
          volume: this.name, key: this.uploads, packs: batch.length, error: errorMessage(err),
        });
      }
      if (gone !== undefined && gone.size > 0) {
        this.ctx.log.warn('packs holding sealed blocks are being deleted by GC; the blocks stay pinned and are uploaded again', { volume: this.name, packs: gone.size });
      }
      for (const hold of batch) {
        hold.held = gone !== undefined && !gone.has(hold.pack);
        if (!hold.held && this.sealHolds.get(hold.pack) === hold) this.sealHolds.delete(hold.pack);
        if (gone?.has(hold.pack)) this.ctx.packIndex.removePack(hold.pack);
        for (const settle of hold.settles) settle(hold.held);
        hold.settles = [];
      }
    }
  }

  /**
   * This link no longer speaks for the volume (it leaves the host, or a reopen replaced the
   * link): uploads of blocks it sealed hold nothing more for it, and this resolves once the
   * seal holds queued so far are committed, so that its uploads set is let go of after them.
   */
  async leave(): Promise<void> {
    this.sealer.left = true;
    while (this.sealHolding !== undefined) await this.sealHolding;
  }

  /** Persist the state (atomic: temp file, fsync, rename). */
  save(): void {
    replaceFileSync(path.join(this.volume.dir, STATE_FILE), JSON.stringify(this.state, null, 2) + '\n');
  }

  /** Run `work` after every earlier operation on this link. */
  serial<T>(work: () => Promise<T>): Promise<T> {
    // Its store requests are this volume's (objectstore/metered.ts: per-volume cost).
    const run = this.tail.then(() => onBehalfOf(this.name, async () => {
      this.busy = true;
      try {
        return await work();
      } finally {
        this.busy = false;
      }
    }));
    this.tail = run.catch(() => undefined);
    return run;
  }

  // ---- drain -------------------------------------------------------------------------

  /**
   * Snapshot at the current sequence, upload the blocks no pack holds, write the
   * manifest. Writers go on meanwhile; their later writes are not in this manifest.
   */
  drain(): Promise<DrainResult> {
    return this.serial(() => this.drainNow());
  }

  private async drainNow(): Promise<DrainResult> {
    await this.checkBeforeUpload('drain', true);
    const captured = await this.capture(async (snapshot) => {
      await this.checkWriter('drain', true);
      return { name: this.name, generation: this.state.generation, sequence: snapshot.sequence };
    });
    try {
      const etag = await this.writeCaptured(captured, manifestKey(this.name), () => this.state.manifestEtag ?? IF_NONE_MATCH, (body, condition) => this.putManifest(body, condition), true);
      // Every upload of this volume came before the snapshot (they take turns): the manifest names what is still needed.
      await this.settleUploads();
      this.base = { map: captured.map, raw: captured.raw, tables: captured.tables, appended: captured.appended, etag };
      this.state.manifestSequence = captured.sequence;
      this.lastManifestAt = Date.now();
      this.lastDrain = { at: this.lastManifestAt, sequence: captured.sequence };
      captured.stored();
      this.save();
      const ms = performance.now() - captured.started;
      this.ctx.log.info('drained volume', {
        volume: this.name, sequence: captured.sequence, chunks: bodyCounts(captured.raw).chunks, changes: captured.changes, incremental: captured.incremental, packs: captured.uploaded.packs,
        bytes: captured.uploaded.bytes, snapshot_ms: Math.round(captured.snapshotMs), upload_ms: Math.round(captured.uploadMs),
        manifest_ms: Math.round(ms - captured.snapshotMs - captured.uploadMs),
      });
      return {
        sequence: captured.sequence,
        manifest_etag: etag,
        packs_uploaded: captured.uploaded.packs,
        bytes_uploaded: captured.uploaded.bytes,
        blocks_uploaded: captured.uploaded.blocks,
        duration_ms: Math.round(ms),
      };
    } finally {
      captured.release();
    }
  }

  /**
   * Snapshot at the current sequence, upload the blocks no pack holds (the local journal
   * flushed meanwhile) and lay out a manifest body of it. `identity` names the manifest
   * (the volume itself, a fork or a checkpoint) once the blocks are up. The caller writes
   * the manifest, then calls stored() if it reached the store, and release() in any case.
   *
   * With a base (the volume's last manifest this host wrote or loaded) and few enough
   * changes since, the body is incremental: the base's tables with the changed chunks
   * patched in, so the work follows the chunks changed, not the chunks mapped.
   */
  private async capture(identity: (snapshot: VolumeSnapshot) => Promise<{ name: string; generation: number; sequence: number; parent?: { name: string; sequence: number } }>) {
    const started = performance.now();
    const base = this.base;
    // Blocks the snapshot seals go up while it seals the rest; upload() below then puts
    // only what is left (and waits for packs still in flight), so the manifest still
    // names only blocks in uploaded packs (invariant 2).
    this.holdsUploads = true;
    const early = this.ctx.uploader.early(this.uploads);
    let snapshot: VolumeSnapshot;
    try {
      snapshot = await this.volume.snapshot({ base: base?.map, onSealed: (key) => early.add(key) });
    } catch (err) {
      await early.finish();
      throw err;
    }
    // The cut: blocks sealed before it are in this snapshot, so a manifest of it names them.
    this.sealHolds = new Map();
    this.sealHoldsDropped = false;
    const snapshotMs = performance.now() - started;
    let stored = false;
    try {
      let patch = base !== undefined && snapshot.changes !== undefined && worthPatching(base, snapshot.changes.length);
      const keysToUpload = () => (patch ? snapshot.changes!.map(([, key]) => key).filter((key) => key !== undefined) : snapshot.chunks.map(([, key]) => key));
      // The local journal must not fall behind what the store is told: flush it (disk)
      // while the blocks go up (CPU and network), and both before the manifest.
      const [earlyUploaded, uploaded] = await Promise.all([early.finish(), this.ctx.uploader.upload(keysToUpload(), this.uploads), this.volume.flush()]);
      const count = (more: UploadResult) => {
        uploaded.packs += more.packs;
        uploaded.blocks += more.blocks;
        uploaded.bytes += more.bytes;
      };
      count(earlyUploaded);
      const uploadMs = performance.now() - started - snapshotMs;
      this.noteUpload(snapshot.sequence, uploadMs);
      const id = await identity(snapshot);
      const meta: ManifestMeta = {
        format: 1, name: id.name, size: snapshot.size, blockSize: snapshot.blockSize, sequence: id.sequence,
        generation: id.generation, host: this.ctx.hostId, created: new Date().toISOString(), ...(id.parent ? { parent: id.parent } : {}),
      };
      const locate = (key: BlockKey, chunk: number) => {
        const location = this.ctx.packIndex.get(key);
        // Invariant 2: the upload above put every block the manifest names into a pack.
        if (location === undefined) throw new LocationGoneError(`volume ${this.name}: block ${keyHex(key)} of chunk ${chunk} is in no pack after the upload`);
        return location;
      };
      const build = (): { raw: Buffer; appended: number } =>
        patch
          ? patchManifestBody(base!.raw, meta, snapshot.changes!, locate, this.ctx.cipher.overhead)
          : { raw: manifestBody(manifestOfChunks(meta, snapshot.chunks, locate), this.ctx.cipher.overhead), appended: 0 };
      let built: { raw: Buffer; appended: number };
      for (let attempt = 1; ; attempt++) {
        try {
          built = build();
          break;
        } catch (err) {
          // GC took a pack the upload deduplicated against out of the pack index meanwhile
          // (it is being deleted): upload what no pack holds now, and lay out again.
          if (!(err instanceof LocationGoneError) || attempt >= 3) throw err;
          this.ctx.log.warn('a block left the pack index during the drain (GC deleted its pack); uploading it again', { volume: this.name, error: err.message });
          count(await this.ctx.uploader.upload(keysToUpload(), this.uploads));
        }
      }
      const captured = {
        meta, raw: built.raw, tables: undefined as StoredTables | undefined, lend: base?.tables, appended: (patch ? base!.appended : 0) + built.appended, incremental: patch,
        map: snapshot.map, sequence: snapshot.sequence, changes: snapshot.changes?.length, uploaded, started, snapshotMs, uploadMs,
        stored: () => {
          stored = true;
        },
        release: () => snapshot.release(stored),
        /**
         * GC deleted these packs after the upload relied on them (the pack index still
         * named them): forget them, upload their blocks again, lay out the whole manifest
         * anew (the base may name the deleted packs too).
         */
        rebuild: async (gone: readonly string[]) => {
          for (const pack of gone) this.ctx.packIndex.removePack(pack);
          this.base = undefined;
          patch = false;
          count(await this.ctx.uploader.upload(keysToUpload(), this.uploads));
          const rebuilt = build();
          captured.raw = rebuilt.raw;
          captured.appended = 0;
          captured.incremental = false;
        },
      };
      return captured;
    } catch (err) {
      snapshot.release(false);
      throw err;
    }
  }

  /**
   * The last manifest of this volume this host wrote or loaded, with the block map it
   * records (a clone sharing the volume's pages): the base of incremental manifests.
   */
  setBase(map: BlockMap, raw: Buffer, etag: string | undefined, tables?: StoredTables): void {
    this.base = { map, raw, tables, appended: 0, etag };
  }

  /**
   * The opened body and block map of this volume's manifest with `etag`, when it is the
   * base this host holds (a same-host lazy fork copies it without decoding).
   */
  baseOf(etag: string): { raw: Buffer; tables?: StoredTables; map: BlockMap } | undefined {
    const base = this.base;
    return base !== undefined && base.etag === etag ? { raw: base.raw, tables: base.tables, map: base.map } : undefined;
  }

  /**
   * Consistent fork: the volume at its current sequence (writers not paused) becomes a new
   * volume `target` in the store. Fails with ExistsError if the target exists.
   */
  fork(
    target: string,
    /** Called with the target's content just before its manifest is written (the caller sets up its copy meanwhile). */
    beside?: (content: { meta: ManifestMeta; map: BlockMap }) => void,
  ): Promise<{ sequence: number; etag: string; meta: ManifestMeta; raw: Buffer; tables?: StoredTables; map: BlockMap; commit: () => Promise<unknown> }> {
    return this.serial(async () => {
      await this.checkBeforeUpload('consistent fork', false);
      const captured = await this.capture(async (snapshot) => {
        await this.checkWriter('consistent fork', false);
        return { name: target, generation: 0, sequence: snapshot.sequence, parent: { name: this.name, sequence: snapshot.sequence } };
      });
      try {
        beside?.({ meta: captured.meta, map: captured.map });
        const key = manifestKey(target);
        const { etag, commit } = await this.writeCapturedThen(captured, key, () => IF_NONE_MATCH, (body) => createObject(this.ctx.store, key, body), false);
        return { sequence: captured.sequence, etag, meta: captured.meta, raw: captured.raw, tables: captured.tables, map: captured.map, commit };
      } finally {
        // The source's own manifest did not move: its changes still count as dirty.
        captured.release();
      }
    });
  }

  /** An immutable checkpoint of the volume at its current sequence. ExistsError if the name is taken. */
  checkpoint(checkpoint: string): Promise<{ checkpoint: string; sequence: number }> {
    return this.serial(async () => {
      await this.checkBeforeUpload('checkpoint', false);
      const captured = await this.capture(async (snapshot) => {
        await this.checkWriter('checkpoint', false);
        return { name: this.name, generation: this.state.generation, sequence: snapshot.sequence };
      });
      try {
        const key = checkpointKey(this.name, checkpoint);
        await this.writeCaptured(captured, key, () => IF_NONE_MATCH, (body) => createObject(this.ctx.store, key, body), false);
        return { checkpoint, sequence: captured.sequence };
      } finally {
        captured.release();
      }
    });
  }

  /** Upload the blocks of a fresh snapshot without writing a manifest (continuous mode). */
  uploadBlocks(): Promise<void> {
    return this.serial(async () => {
      if (!this.mayUpload()) return;
      const started = performance.now();
      // With a base, only the chunks changed since the last manifest can name blocks no pack holds.
      const snapshot = await this.volume.snapshot({ base: this.base?.map });
      let stored = false;
      try {
        const keys = snapshot.changes !== undefined ? snapshot.changes.map(([, key]) => key).filter((key) => key !== undefined) : snapshot.chunks.map(([, key]) => key);
        this.holdsUploads = true;
        // Only the changes' packs found in the store are held too (all chunks' would be O(volume)); the next manifest names the rest.
        await this.ctx.uploader.upload(keys, this.uploads, { holdFound: snapshot.changes !== undefined });
        this.noteUpload(snapshot.sequence, performance.now() - started);
        stored = true;
      } finally {
        snapshot.release(stored);
      }
    });
  }

  /**
   * The dirty budget (demand mode too): upload the blocks of the chunks changed longest
   * ago, until half the budget is left dirty, with no manifest. What is written most
   * recently (and so most likely to be written again) stays local.
   */
  uploadOldest(): Promise<{ chunks: number; packs: number } | undefined> {
    return this.serial(async () => {
      if (!this.mayUpload()) return undefined;
      const keep = Math.floor(this.state.dirtyBudgetBytes / 2 / this.volume.blockSize);
      const excess = this.volume.storeDirtyBytes / this.volume.blockSize - keep;
      if (excess <= 0) return undefined;
      const oldest = await this.volume.oldestChanges(excess);
      try {
        this.holdsUploads = true;
        // The chunks stop counting as dirty: every pack their blocks are in is held until a manifest names it.
        const uploaded = await this.ctx.uploader.upload(oldest.keys, this.uploads, { holdFound: true });
        oldest.stored();
        return { chunks: oldest.chunks, packs: uploaded.packs };
      } finally {
        oldest.release();
      }
    });
  }

  /**
   * Whether background uploads (continuous blocks, the dirty budget) may run: the volume
   * is writable here and, once leased, the lease has time left by this host's reckoning.
   * Packs never change what a holder serves, but a host that lost the lease (or may have:
   * paused past its deadline) puts nothing more until a renewal says it still holds it.
   */
  private mayUpload(): boolean {
    if (this.state.readOnly || this.releasing) return false;
    return this.state.generation === 0 || this.leaseLeftMs() > 0;
  }

  private noteUpload(sequence: number, ms: number): void {
    this.sequenceAtUpload = sequence;
    this.lastUploadAt = Date.now();
    this.lastUploadMs = ms;
  }

  /**
   * Write a captured manifest at `key` with its packs counted (`own`: the volume's own
   * manifest, whose counted packs this link remembers). When GC deleted a pack the upload
   * relied on, its blocks go up again and the manifest is rebuilt (invariant 2).
   * `condition` says what each attempt's PUT is conditional on, and `put` sends exactly that.
   */
  private async writeCaptured(
    captured: Awaited<ReturnType<StoreLink['capture']>>,
    key: string,
    condition: () => PutCondition,
    put: (body: Buffer, condition: PutCondition) => Promise<string>,
    own: boolean,
  ): Promise<string> {
    const { etag, commit } = await this.writeCapturedThen(captured, key, condition, put, own);
    const counted = await commit();
    if (own) this.counted = counted;
    return etag;
  }

  /** writeCaptured up to the landed PUT, with the refcount commit left to the caller (putCountedThen). */
  private async writeCapturedThen(
    captured: Awaited<ReturnType<StoreLink['capture']>>,
    key: string,
    condition: () => PutCondition,
    put: (body: Buffer, condition: PutCondition) => Promise<string>,
    own: boolean,
  ): Promise<{ etag: string; commit: () => Promise<CountedManifest | undefined> }> {
    for (let attempt = 1, moved = 0; ; attempt++) {
      // The base's frames are lent: only the segments the changes touched are compressed.
      const { body, tables } = sealManifest(key, captured.raw, this.ctx.manifestCompression, this.ctx.cipher, captured.lend);
      captured.tables = tables;
      const packs = bodyPacks(captured.raw);
      // A fork or checkpoint that names exactly the packs counted for this volume's manifest
      // (nothing new was uploaded for it) shares their pack set: no pack is counted again.
      const counted = this.counted;
      const share = !own && counted !== undefined && counted.etag === this.state.manifestEtag && sameSet(packs, counted.packs)
        ? { key: manifestKey(this.name), etag: counted.etag }
        : undefined;
      const on = condition();
      try {
        return await putCountedThen(this.ctx.refcounts, key, packs, body, on, () => put(body, on), own ? counted : undefined, share);
      } catch (err) {
        // Our own earlier write is there: a new write, conditional on its etag (its intent is resolved first).
        if (err instanceof OwnWriteFoundError && ++moved <= 3) continue;
        if (!(err instanceof PacksGoneError) || attempt >= 3) throw err;
        this.ctx.log.warn('packs were deleted by GC while the manifest was written; uploading their blocks again', { volume: this.name, key, packs: err.packs.length });
        await captured.rebuild(err.packs);
      }
    }
  }

  /**
   * Write the manifest, conditional on `condition`: the last ETag this host knows
   * (fencing). OwnWriteFoundError when the manifest is our own unrecorded write instead.
   */
  private async putManifest(body: Buffer, condition: PutCondition): Promise<string> {
    const key = manifestKey(this.name);
    try {
      const etag = await this.ctx.store.put(key, body, putOptionsOf(condition));
      this.state.manifestEtag = etag;
      return etag;
    } catch (err) {
      if (!isPreconditionFailed(err)) throw err;
      // A retried put whose first attempt landed (the response was lost) also ends here:
      // the object is then exactly what was sent.
      const current = await this.ctx.store.get(key);
      if (current !== undefined && current.body.equals(body)) {
        this.state.manifestEtag = current.etag;
        return current.etag;
      }
      // Our own earlier write under this very lease generation, whose etag the state file
      // did not get (the daemon died between the PUT and saving it, or every reply to it
      // was lost): nobody else writes with this generation, so it is safe to write over
      // it. That PUT carries another condition, so it is a new write (see putCountedThen).
      if (current !== undefined && this.state.generation > 0) {
        const meta = decodeManifest(key, current.body, this.ctx.cipher).meta;
        if (meta.host === this.ctx.hostId && meta.generation === this.state.generation) {
          this.ctx.log.warn('the manifest in the store is our own unrecorded write (a crash after its PUT, or its reply lost); writing over it', { volume: this.name, sequence: meta.sequence });
          this.state.manifestEtag = current.etag;
          throw new OwnWriteFoundError(this.name, key);
        }
      }
      this.fence('another host wrote its manifest');
    }
  }

  /** Another host writes the manifest now: stop writing and say so. */
  private fence(why: string): never {
    this.stopWriting('fenced: volume is read-only on this host', why);
    throw new FencedError(this.name, why);
  }

  /** The volume is read-only here from now on (until promoted again). */
  private stopWriting(message: string, why: string): void {
    this.state.readOnly = true;
    this.state.generation = 0;
    this.state.leaseEtag = undefined;
    this.state.lostLease = why;
    this.leaseSentAt = undefined;
    this.applyReadOnly();
    this.save();
    this.ctx.log.error(message, { volume: this.name, why });
  }

  // ---- lease -------------------------------------------------------------------------

  /**
   * Before this host writes the volume's manifest, or a snapshot of it (a checkpoint, a
   * consistent fork), after the snapshot is cut: take or renew the lease when it is due,
   * then read the lease object and require that it still names this host with its
   * generation. Otherwise the volume becomes read-only here and FencedError is thrown.
   *
   * S3 has no write conditional on another object, so this check cannot be atomic with the
   * write after it; what closes the race is its order with the manifest's If-Match. The
   * check passing means no host took the lease before it, so the snapshot (cut earlier) is
   * of the volume while this host was its only writer. A host that takes the lease after the
   * check rewrites the manifest (refence) conditionally on the latest ETag before it accepts
   * a write, so this host's If-Match write either lands first (and is what the new holder
   * loads and builds on) or fails. A released lease is taken without that rewrite, but its
   * releaser wrote `released` in the lease and saved read-only first, so its check fails
   * from then on, across restarts. A checkpoint or fork is a new immutable name
   * (If-None-Match): landing late, it holds the volume as this host held it, and overwrites
   * nothing of the new holder.
   */
  private async checkWriter(op: string, take: boolean): Promise<void> {
    if (this.state.readOnly) throw new FencedError(this.name, `${op}: the volume is read-only on this host`);
    const key = leaseKey(this.name);
    if (this.state.generation === 0) {
      if (take) {
        // The volume's first manifest from this host: take the lease (read, then a conditional put).
        const { bumped, first } = await this.acquire();
        if (bumped && !first && this.state.manifestEtag !== undefined) await this.refence();
        return;
      }
      // Never leased here: nobody else may have leased the volume either.
      const current = await this.ctx.store.get(key);
      if (current === undefined) return;
      const lease = decodeLease(key, current.body);
      this.loseLease(op, `the lease names host ${lease.owner} generation ${lease.generation}`);
    }
    const current = await this.ctx.store.get(key);
    const lease = current === undefined ? undefined : decodeLease(key, current.body);
    if (current === undefined || lease === undefined) this.loseLease(op, 'the lease is gone from the store');
    if (lease.owner !== this.ctx.hostId || lease.generation !== this.state.generation || lease.released === true) {
      this.loseLease(op, lease.released === true && lease.owner === this.ctx.hostId
        ? `this host released generation ${lease.generation}`
        : `another host took the lease: host ${lease.owner} generation ${lease.generation}`);
    }
    // Still ours; renew it now if a third of it is left, so it outlives the write.
    if (this.leaseLeftMs() <= this.ctx.leaseTtlMs / 3 && !(await this.putRenewal(current.etag))) {
      this.loseLease(op, 'the lease changed while this host renewed it');
    }
  }

  /**
   * Before the blocks of a snapshot go up: a host whose lease time ran out by its own
   * reckoning (it may have been paused past it) checks the lease first, so a host that
   * lost it puts no packs either. checkWriter after the snapshot is what fences.
   */
  private async checkBeforeUpload(op: string, take: boolean): Promise<void> {
    if (this.state.readOnly) throw new FencedError(this.name, `${op}: the volume is read-only on this host`);
    if (this.state.generation > 0 && this.leaseLeftMs() <= 0) await this.checkWriter(op, take);
  }

  /** The lease is not this host's any more: stop writing, say so, and refuse `op`. */
  private loseLease(op: string, why: string): never {
    this.stopWriting('lost the lease: volume is read-only on this host', why);
    throw new FencedError(this.name, `${op}: ${why}`);
  }

  /**
   * Take or renew the lease with a conditional put. Returns whether the generation
   * changed hands (a new holder must fence the previous one) and whether this is the
   * volume's first lease ever (nobody to fence). Throws LeaseHeldError
   * when another host holds a live lease.
   */
  private async acquire(fresh = false): Promise<{ bumped: boolean; first: boolean; released: boolean }> {
    const key = leaseKey(this.name);
    for (let attempt = 0; attempt < 3; attempt++) {
      // A volume this host just made (a fork) has no lease yet: the first try puts one
      // with If-None-Match and no GET before it; a lease left there by an earlier volume of
      // the name fails the condition and the next try reads it.
      const current = fresh && attempt === 0 ? undefined : await this.ctx.store.get(key);
      const lease = current === undefined ? undefined : decodeLease(key, current.body);
      const now = Date.now();
      let generation: number;
      if (lease === undefined) generation = 1;
      else if (lease.owner === this.ctx.hostId && lease.generation === this.state.generation && !lease.released) generation = lease.generation;
      else if (lease.owner !== this.ctx.hostId && !lease.released && leaseIsLiveAt(lease, current!.lastModified, (await this.ctx.clock.now()).earliest)) {
        throw new LeaseHeldError(this.name, lease);
      }
      else generation = lease.generation + 1;
      const body = encodeLease(leaseBody(this.name, this.ctx.hostId, generation, now, this.ctx.leaseTtlMs));
      pausePoint('lease-acquire-put');
      const sent = performance.now();
      try {
        const etag = await this.ctx.store.put(key, body, current === undefined ? { ifNoneMatch: '*' } : { ifMatch: current.etag });
        return { bumped: this.adopt(generation, etag, now, sent), first: current === undefined, released: lease?.released === true };
      } catch (err) {
        if (!isPreconditionFailed(err)) throw err;
        const after = await this.ctx.store.get(key);
        if (after !== undefined && after.body.equals(body)) {
          return { bumped: this.adopt(generation, after.etag, now, sent), first: current === undefined, released: lease?.released === true };
        }
        // Someone else wrote the lease meanwhile: look again.
      }
    }
    throw new Error(`volume ${this.name}: the lease keeps changing under this host; try again`);
  }

  private adopt(generation: number, etag: string, now: number, sent: number): boolean {
    const bumped = generation !== this.state.generation;
    this.state.generation = generation;
    this.state.leaseEtag = etag;
    this.state.leaseExpires = now + this.ctx.leaseTtlMs;
    this.leaseSentAt = sent;
    this.expired = false;
    this.applyReadOnly();
    this.save();
    return bumped;
  }

  /**
   * Put the held lease again (same generation, a fresh expiry), conditional on `ifMatch`.
   * False when the lease in the store is no longer this host's generation. One at a time:
   * a caller that finds a renewal in flight gets its outcome.
   */
  private putRenewal(ifMatch: string | undefined): Promise<boolean> {
    this.renewal ??= this.renewOnce(ifMatch).finally(() => {
      this.renewal = undefined;
    });
    return this.renewal;
  }

  private async renewOnce(ifMatch: string | undefined): Promise<boolean> {
    const key = leaseKey(this.name);
    for (let attempt = 0; ; attempt++) {
      const now = Date.now();
      const generation = this.state.generation;
      const body = encodeLease(leaseBody(this.name, this.ctx.hostId, generation, now, this.ctx.leaseTtlMs));
      pausePoint('lease-renew-put');
      const sent = performance.now();
      let etag: string;
      try {
        etag = await this.ctx.store.put(key, body, ifMatch === undefined ? { ifNoneMatch: '*' } : { ifMatch });
      } catch (err) {
        if (!isPreconditionFailed(err)) throw err;
        const current = await this.ctx.store.get(key);
        if (current === undefined) return false;
        // A retried put whose first attempt landed ends here too: the lease is then exactly ours.
        if (!current.body.equals(body)) {
          // Still this host's generation (only this host writes it: a taker bumps it), put by
          // a renewal whose ETag a crash kept from the state file: renew over it, once.
          const lease = decodeLease(key, current.body);
          if (attempt > 0 || lease.owner !== this.ctx.hostId || lease.generation !== this.state.generation || lease.released === true) return false;
          ifMatch = current.etag;
          continue;
        }
        etag = current.etag;
      }
      // Fenced or released meanwhile: that stands.
      if (this.state.generation !== generation) return false;
      this.state.leaseEtag = etag;
      this.state.leaseExpires = now + this.ctx.leaseTtlMs;
      this.leaseSentAt = sent;
      this.expired = false;
      this.applyReadOnly();
      this.save();
      return true;
    }
  }

  /**
   * Renew a held lease once a third of its time has passed; losing it makes the volume
   * read-only. Past this host's own deadline (the TTL less the skew margin, from when its
   * last lease PUT was sent) writes are refused until a renewal lands. A release that
   * stopped between its steps (a crash) is finished.
   */
  async renewIfDue(): Promise<void> {
    const state = this.state;
    if (state.generation === 0 || this.releasing) return;
    // Checked on every tick, also while a renewal hangs in retries.
    const left = this.leaseLeftMs();
    if (left <= 0 && !this.expired && !state.readOnly && left !== -Infinity) {
      this.expired = true;
      this.applyReadOnly();
      this.ctx.log.error('lease not renewed in time; writes are refused until it is renewed', { volume: this.name });
    }
    if (this.renewing) return;
    this.renewing = true;
    try {
      if (state.releasing === true) {
        await this.release();
        return;
      }
      // Read-only with a generation: a promotion is between taking the lease and its manifest.
      if (state.readOnly) return;
      // A third of the TTL after the last lease PUT was sent (before the deadline: the margin is under a third).
      if (left > (this.ctx.leaseTtlMs * 2) / 3 - this.ctx.clockSkewMarginMs) return;
      if (!(await this.putRenewal(state.leaseEtag))) {
        const key = leaseKey(this.name);
        const current = await this.ctx.store.get(key);
        const lease = current === undefined ? undefined : decodeLease(key, current.body);
        this.stopWriting('lost the lease: volume is read-only on this host', lease === undefined ? 'the lease is gone from the store' : `another host took the lease: host ${lease.owner} generation ${lease.generation}`);
      }
    } catch (err) {
      this.ctx.log.warn('lease renewal failed; retrying', { volume: this.name, error: errorMessage(err) });
    } finally {
      this.renewing = false;
    }
  }

  /**
   * Give the volume up so another host can promote it: refuse writes from now on, drain
   * what changed since the last manifest (so no acknowledged write stays behind), then
   * release the lease. If the final drain fails the volume stays writable here.
   */
  release(): Promise<{ generation: number; drained?: DrainResult }> {
    return this.serial(async () => {
      let drained: DrainResult | undefined;
      this.releasing = true;
      try {
        this.applyReadOnly();
        // A renewal in flight settles first: it may change the lease's etag the release puts over.
        await this.renewal?.catch(() => undefined);
        const generation = this.state.generation;
        if (generation > 0 && !this.state.readOnly && this.volume.sequence !== this.state.manifestSequence) drained = await this.drainNow();
        // Read-only on disk before the lease says released: a crash after the lease PUT must
        // not bring this host back as the writer of a generation the next holder took over.
        const saveAfterPut = injected.has('release-save-after-lease-put');
        if (!saveAfterPut) {
          this.state.readOnly = true;
          this.state.releasing = true;
          this.save();
        }
        if (generation > 0 && this.state.leaseEtag !== undefined) {
          const released = leaseBody(this.name, this.ctx.hostId, generation, Date.now(), 0, true);
          try {
            await this.ctx.store.put(leaseKey(this.name), encodeLease(released), { ifMatch: this.state.leaseEtag });
          } catch (err) {
            if (!isPreconditionFailed(err)) throw err;
            // Already someone else's: nothing to give up.
          }
          await crashPoint('lease-released');
        }
        if (saveAfterPut) {
          this.state.readOnly = true;
          this.save();
        }
        this.state.generation = 0;
        this.state.leaseEtag = undefined;
        this.state.releasing = undefined;
        this.leaseSentAt = undefined;
        this.save();
        // The final drain's manifest names everything: the next holder needs nothing held here.
        if (this.volume.sequence === this.state.manifestSequence) await this.settleUploads();
        this.ctx.log.info('released volume lease', { volume: this.name, generation, final_drain_sequence: drained?.sequence });
        return { generation, ...(drained === undefined ? {} : { drained }) };
      } finally {
        this.releasing = false;
        this.applyReadOnly();
      }
    });
  }

  // ---- promotion -----------------------------------------------------------------------

  /**
   * Become the writer: take the lease (once its holder released it or it expired), load
   * the latest manifest, fence the previous holder, make the volume writable. Clients
   * stay connected. `fresh`: the volume was just made here (a fork) and most likely has
   * no lease in the store yet.
   */
  promote(fresh = false): Promise<{ generation: number; sequence: number }> {
    return this.serial(async () => {
      if (!this.state.readOnly && this.state.generation > 0) {
        // Held here by this host's own reckoning (a restart keeps it): another host may have
        // taken the lease meanwhile, and this copy is then stale. Ask the store first.
        try {
          await this.checkWriter('promotion', false);
          return { generation: this.state.generation, sequence: this.volume.sequence };
        } catch (err) {
          if (!(err instanceof FencedError)) throw err;
        }
      }
      if (this.volume.dirtyChunks > 0) {
        throw new VolumeError('EINVAL', `volume ${this.name}: has local writes that are in no manifest; cannot promote over them`);
      }
      // The very first lease of a volume (a new fork, a blessed image) has no previous
      // holder to fence, and the manifest was just read: no rewrite needed. Nor does a
      // lease its holder released (a live migration): that host refuses writes and gave
      // up its generation, so only the latest manifest is loaded; the rewrite (a PUT, and
      // counting every pack of the volume in this host's refcounts) stays out of the pause.
      const { first, released } = await this.acquire(fresh);
      if (released) {
        const latest = await this.loadLatest();
        this.state.manifestEtag = latest?.current.etag;
        this.state.manifestSequence = latest?.manifest.meta.sequence ?? -1;
      } else if (!first) await this.refence();
      this.state.readOnly = false;
      this.state.lostLease = undefined;
      this.applyReadOnly();
      this.save();
      this.ctx.log.info('promoted: this host now writes the volume', { volume: this.name, generation: this.state.generation, sequence: this.volume.sequence });
      return { generation: this.state.generation, sequence: this.volume.sequence };
    });
  }

  /**
   * Load the volume's manifest in the store, if it moved on from what this host holds
   * (the volume takes its content); undefined when there is none.
   */
  private async loadLatest() {
    const key = manifestKey(this.name);
    const current = await this.ctx.store.get(key);
    if (current === undefined) {
      this.state.manifestEtag = undefined;
      return undefined;
    }
    const { manifest, raw } = decodeManifestBody(key, current.body, this.ctx.cipher);
    if (current.etag !== this.state.manifestEtag || manifest.meta.sequence !== this.volume.sequence) {
      await indexManifest(this.ctx.packIndex, manifest);
      await this.volume.replaceContent({ size: manifest.meta.size, sequence: manifest.meta.sequence, chunks: manifestChunks(manifest) });
      this.setBase(this.volume.cloneMap(), raw, current.etag);
      this.counted = undefined;
    }
    return { current, manifest };
  }

  /**
   * After taking the lease with a new generation: load the latest manifest (if it moved
   * on, the volume takes its content) and rewrite it under the new generation, so the
   * previous holder's next conditional write fails.
   */
  private async refence(): Promise<void> {
    const key = manifestKey(this.name);
    for (let attempt = 0; attempt < 5; attempt++) {
      const latest = await this.loadLatest();
      if (latest === undefined) return;
      const { current, manifest } = latest;
      const base = this.base;
      manifest.meta.generation = this.state.generation;
      manifest.meta.host = this.ctx.hostId;
      const body = encodeManifest(key, manifest, this.ctx.manifestCompression, this.ctx.cipher);
      try {
        const written = await putCounted(this.ctx.refcounts, key, packsOf(manifest.blocks), body, current.etag, () => this.ctx.store.put(key, body, { ifMatch: current.etag }), this.counted);
        this.state.manifestEtag = written.etag;
        this.counted = written.counted;
        // The same tables under the new generation: the base (if it was this manifest's) follows.
        if (base !== undefined && (base.etag === undefined || base.etag === current.etag)) base.etag = written.etag;
        this.state.manifestSequence = manifest.meta.sequence;
        this.save();
        return;
      } catch (err) {
        if (!isPreconditionFailed(err)) throw err;
        // The previous holder wrote once more before it noticed: load that one.
      }
    }
    throw new Error(`volume ${this.name}: the manifest keeps changing; the previous holder is still writing`);
  }

  /**
   * ETag of the volume's manifest this host last wrote or loaded; every block it names is
   * in the host pack index.
   */
  get manifestEtag(): string | undefined {
    return this.state.manifestEtag;
  }

  /** Whether the lease is held here (the volume may write). */
  get holdsLease(): boolean {
    return this.state.generation > 0;
  }
}
