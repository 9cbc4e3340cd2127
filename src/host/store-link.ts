// A volume's link to the object store (DESIGN.md: Paths, Snapshot / Wake; Formats:
// manifest): drain, forks and checkpoints, promotion and release. The lease lives in
// lease-holder.ts, the packs held for uploads in uploads-set.ts, the manifest layout in
// capture.ts, and the state saved beside the volume (`store.json`) in store-state.ts.
//
// Fencing (invariant 4): every manifest write is conditional on the ETag this host last
// wrote or read, and is preceded (after the snapshot is cut) by a read of the lease that
// must still name this host and generation (LeaseHolder.checkWriter says why that order
// closes the race). A host that takes the lease with a new generation rewrites the
// manifest at once (refence), so the previous holder's next conditional write fails and
// it stops writing.
import { onBehalfOf } from '../objectstore/metered.js';
import { isPreconditionFailed, ObjectStoreError } from '../objectstore/types.js';
import { encodeLease, leaseBody } from '../store/lease.js';
import { sameSet } from '../gc/pack-sets.js';
import { IF_NONE_MATCH, packsOf, PacksGoneError, putCounted, putCountedThen, putOptionsOf, type CountedManifest, type PutCondition } from '../store/counted.js';
import { createObject, indexManifest, manifestChunks } from '../store/catalog.js';
import { checkpointKey, leaseKey, manifestKey, type ManifestMeta } from '../store/manifest.js';
import { bodyCounts, bodyPacks } from '../store/manifest-body.js';
import { decodeManifest, decodeManifestBody } from '../store/manifest-decode.js';
import { encodeManifest, sealManifest, type StoredTables } from '../store/manifest-seal.js';
import type { BlockMap } from '../volume/blockmap.js';
import { Volume, VolumeError } from '../volume/volume.js';
import { injected } from '../faults/injected.js';
import { crashPoint } from '../faults/crash-points.js';
import { captureManifest, type CapturedManifest, type ManifestBase } from './capture.js';
import { LeaseHolder } from './lease-holder.js';
import { replayLog, type Replayed } from './replay.js';
import { storedManifestMeta, sweepLogObjects } from '../store/log.js';
import { errorMessage } from '../log.js';
import { FencedError, loadStoreState, saveStoreState, type DrainResult, type FlushMode, type StoreContext, type StoreState } from './store-state.js';
import { UploadsSet } from './uploads-set.js';

/**
 * The manifest a conditional PUT lost to is this host's own earlier write (its etag was
 * not recorded): write again, conditional on it. Nothing of the lost PUT landed.
 */
/** Sequences reserved for durable log records at a time (one store.json write per this many writes). */
const RESERVE_STEP = 2 ** 20;

class OwnWriteFoundError extends ObjectStoreError {
  constructor(volume: string, key: string) {
    super('PreconditionFailed', `volume ${volume}: put ${key}: the manifest there is this host's own unrecorded write; writing again over it`);
  }
}


export class StoreLink {
  /** Serializes drain, promotion, release and uploads of this volume. */
  private tail: Promise<unknown> = Promise.resolve();
  /** The lease that keeps this host the volume's one writer. */
  readonly lease: LeaseHolder;
  /** The packs this volume's uploads and seals hold until a manifest names them. */
  readonly uploadsSet: UploadsSet;
  busy = false;
  sequenceAtUpload = -1;
  lastUploadAt = Date.now();
  lastUploadMs = 0;
  lastManifestAt = Date.now();
  /** The last drain of this process: when it wrote the manifest, at which sequence. */
  lastDrain: { at: number; sequence: number } | undefined;
  /** The base of incremental manifests (see setBase); none after a restart until the first full one. */
  base: ManifestBase | undefined;
  /**
   * The lease generation under which this host wrote the volume's manifest in the store
   * (drain, refence); undefined after a restart, or when the manifest was loaded (a
   * released lease taken): a durable log record is only written on top of one's own.
   */
  private manifestGeneration: number | undefined;
  /** The packs counted for this volume's manifest as of its etag (saves reading them back per write). */
  private counted: CountedManifest | undefined;

  constructor(
    readonly volume: Volume,
    readonly state: StoreState,
    readonly ctx: StoreContext,
  ) {
    volume.readOnly = state.readOnly;
    this.uploadsSet = new UploadsSet(volume.name, ctx);
    this.lease = new LeaseHolder(volume, state, ctx, { save: () => this.save(), refence: () => this.refence(), release: () => this.release() });
    if (ctx.refcounts !== undefined) volume.onSealedBlock = (key) => this.uploadsSet.holdSealed(key);
  }

  /** The link of a volume opened from local state (defaults when it never touched the store). */
  static load(volume: Volume, ctx: StoreContext, defaults: { flushMode: FlushMode; dirtyBudgetBytes: number }): StoreLink {
    const state = loadStoreState(volume.name, volume.dir) ?? { format: 1, ...defaults, readOnly: false, generation: 0, manifestSequence: -1 };
    const link = new StoreLink(volume, state, ctx);
    // The cache forgot at the restart which volumes sealed its pinned blocks: one with changes
    // since its last manifest notes itself on those it names (O(chunks mapped), as the journal's replay).
    if (ctx.refcounts !== undefined && volume.sequence !== state.manifestSequence) {
      for (const [, key] of volume.cloneMap().entries()) ctx.cache.noteSealer(key, link.uploadsSet.sealer);
    }
    return link;
  }

  get name(): string {
    return this.volume.name;
  }

  /** The refcount key that holds the packs this volume's uploads on this host made (invariant 6). */
  get uploads(): string {
    return this.uploadsSet.uploads;
  }

  /** This link no longer speaks for the volume: see UploadsSet.leave. */
  leave(): Promise<void> {
    return this.uploadsSet.leave();
  }

  /** Persist the state (atomic: temp file, fsync, rename). */
  save(): void {
    saveStoreState(this.volume.dir, this.state);
  }

  /** Renew the held lease when due (see LeaseHolder.renewIfDue). */
  renewIfDue(): Promise<void> {
    return this.lease.renewIfDue();
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
    await this.lease.checkBeforeUpload('drain', true);
    const captured = await captureManifest(this, async (snapshot) => {
      await this.lease.checkWriter('drain', true);
      return { name: this.name, generation: this.state.generation, sequence: snapshot.sequence };
    });
    try {
      const etag = await this.writeCaptured(captured, manifestKey(this.name), () => this.state.manifestEtag ?? IF_NONE_MATCH, (body, condition) => this.putManifest(body, condition), true);
      // Every upload of this volume came before the snapshot (they take turns): the manifest names what is still needed.
      await this.uploadsSet.settle();
      this.base = { map: captured.map, raw: captured.raw, tables: captured.tables, appended: captured.appended, etag };
      this.state.manifestSequence = captured.sequence;
      this.manifestGeneration = this.state.generation;
      this.lastManifestAt = Date.now();
      this.lastDrain = { at: this.lastManifestAt, sequence: captured.sequence };
      captured.stored();
      this.save();
      this.ctx.onManifest?.(this.name, captured.sequence);
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
      await this.lease.checkBeforeUpload('consistent fork', false);
      const captured = await captureManifest(this, async (snapshot) => {
        await this.lease.checkWriter('consistent fork', false);
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
      await this.lease.checkBeforeUpload('checkpoint', false);
      const captured = await captureManifest(this, async (snapshot) => {
        await this.lease.checkWriter('checkpoint', false);
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
        this.uploadsSet.holdsUploads = true;
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
        this.uploadsSet.holdsUploads = true;
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
    if (this.state.readOnly || this.lease.releasing) return false;
    return this.state.generation === 0 || this.lease.leftMs() > 0;
  }

  noteUpload(sequence: number, ms: number): void {
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
    captured: CapturedManifest,
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
    captured: CapturedManifest,
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
      this.lease.fence('another host wrote its manifest');
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
      this.lease.releasing = true;
      try {
        this.lease.applyReadOnly();
        // A renewal in flight settles first: it may change the lease's etag the release puts over.
        await this.lease.renewal?.catch(() => undefined);
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
        this.lease.forget();
        this.save();
        // The final drain's manifest names everything: the next holder needs nothing held here.
        if (this.volume.sequence === this.state.manifestSequence) await this.uploadsSet.settle();
        this.ctx.log.info('released volume lease', { volume: this.name, generation, final_drain_sequence: drained?.sequence });
        return { generation, ...(drained === undefined ? {} : { drained }) };
      } finally {
        this.lease.releasing = false;
        this.lease.applyReadOnly();
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
  promote(fresh = false): Promise<{ generation: number; sequence: number; replayed?: Replayed }> {
    return this.serial(async () => {
      if (!this.state.readOnly && this.state.generation > 0) {
        // Held here by this host's own reckoning (a restart keeps it): another host may have
        // taken the lease meanwhile, and this copy is then stale. Ask the store first.
        try {
          await this.lease.checkWriter('promotion', false);
          return { generation: this.state.generation, sequence: this.volume.sequence };
        } catch (err) {
          if (!(err instanceof FencedError)) throw err;
        }
      }
      if (this.volume.dirtyChunks > 0) {
        throw new VolumeError('EINVAL', `volume ${this.name}: has local writes that are in no manifest; cannot promote over them`);
      }
      // A failed volume's memory can be ahead of its disk (a manifest taken, its journal not
      // synced): as the writer, a restart would bring back the older state under the lease.
      const failure = this.volume.failed;
      if (failure !== undefined) {
        throw new VolumeError('EIO', `volume ${this.name}: cannot promote: it has failed (${failure}); reopen it first`);
      }
      // The very first lease of a volume (a new fork, a blessed image) has no previous
      // holder to fence, and the manifest was just read: no rewrite needed. Nor does a
      // lease its holder released (a live migration): that host refuses writes and gave
      // up its generation, so only the latest manifest is loaded; the rewrite (a PUT, and
      // counting every pack of the volume in this host's refcounts) stays out of the pause.
      const { first, released } = await this.lease.acquire(fresh);
      let replayed: Replayed | undefined;
      if (released) {
        const latest = await this.loadLatest();
        this.state.manifestEtag = latest?.current.etag;
        this.state.manifestSequence = latest?.manifest.meta.sequence ?? -1;
      } else if (!first) {
        replayed = await this.replay();
        if (replayed === undefined) await this.refence();
      }
      // A writer serves its own writes: no view of a previous writer's log stays over them.
      if (!injected.has('replica-keep-log-view')) this.volume.setLogView(undefined);
      this.state.readOnly = false;
      this.state.lostLease = undefined;
      this.lease.applyReadOnly();
      this.save();
      this.ctx.log.info('promoted: this host now writes the volume', { volume: this.name, generation: this.state.generation, sequence: this.volume.sequence, replayed_records: replayed?.records });
      return { generation: this.state.generation, sequence: this.volume.sequence, ...(replayed === undefined ? {} : { replayed }) };
    });
  }

  /**
   * A durable holder that did not release the volume may have logged writes after its last
   * manifest (host/replay.ts): apply them, then write a manifest of the result under this
   * host's generation, conditional on the one loaded, before the volume takes a write (the
   * previous holder is fenced by it as by refence). Undefined when there was nothing to replay.
   */
  private async replay(): Promise<Replayed | undefined> {
    const latest = await this.loadLatest();
    if (latest === undefined) return undefined;
    this.state.manifestEtag = latest.current.etag;
    this.state.manifestSequence = latest.manifest.meta.sequence;
    // No client write before the manifest of the replay is in the store (or before the
    // refence, when there is nothing to replay): one taken meanwhile would be in no manifest.
    this.lease.promoting = true;
    this.lease.applyReadOnly();
    const asWriter = <T>(call: () => T): T => {
      this.volume.readOnly = false;
      try {
        return call();
      } finally {
        this.lease.applyReadOnly();
      }
    };
    let found: Awaited<ReturnType<typeof replayLog>>;
    try {
      found = await replayLog(this.ctx.store, this.ctx.cipher, this.volume, latest.manifest.meta, asWriter);
      // What a replica served of the log is in the overlay now (replay read it and any newer entry).
      if (!injected.has('replica-keep-log-view')) this.volume.setLogView(undefined);
      if (found === undefined) return undefined;
      this.state.readOnly = false;
      await this.drainNow();
    } catch (err) {
      // A promotion tried again replays again.
      this.state.readOnly = true;
      throw err;
    } finally {
      this.lease.promoting = false;
      this.lease.applyReadOnly();
    }
    const { replayed, keys } = found;
    this.ctx.log.info('replayed the durable log of the previous holder', { volume: this.name, records: replayed.records, objects: replayed.objects, sequence: replayed.sequence });
    // The manifest covers them now: those of the previous holder's objects with nothing else to replay go.
    sweepLogObjects(this.ctx.store, this.ctx.cipher, storedManifestMeta(this.ctx.store, this.ctx.cipher), keys).then(
      (swept) => this.ctx.log.info('deleted the replayed log objects a manifest covers', { volume: this.name, deleted: swept.deleted.length, of: keys.length }),
      (err: unknown) => this.ctx.log.warn('cannot delete replayed log objects; reconciliation will', { volume: this.name, error: errorMessage(err) }),
    );
    return replayed;
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
      manifest.meta.flushMode = this.state.flushMode;
      const body = encodeManifest(key, manifest, this.ctx.manifestCompression, this.ctx.cipher);
      try {
        const written = await putCounted(this.ctx.refcounts, key, packsOf(manifest.blocks), body, current.etag, () => this.ctx.store.put(key, body, { ifMatch: current.etag }), this.counted);
        this.state.manifestEtag = written.etag;
        this.counted = written.counted;
        // The same tables under the new generation: the base (if it was this manifest's) follows.
        if (base !== undefined && (base.etag === undefined || base.etag === current.etag)) base.etag = written.etag;
        this.state.manifestSequence = manifest.meta.sequence;
        this.manifestGeneration = this.state.generation;
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

  /** Lease generation held here (0: none). */
  get generation(): number {
    return this.state.generation;
  }

  /** Sequence of the volume's last manifest this host wrote or loaded (-1: none). */
  get manifestSequence(): number {
    return this.state.manifestSequence;
  }

  /**
   * Whether this host may put the volume's log records now: it holds the lease, by its own
   * reckoning its deadline has not passed, and no release runs (as for background uploads).
   */
  mayLog(): boolean {
    return !this.state.readOnly && !this.lease.releasing && this.state.generation > 0 && this.lease.leftMs() > 0;
  }

  /**
   * Whether the volume's manifest in the store is one this host wrote under the lease it
   * holds: replay reads the log of the manifest's writer and generation, so records go on
   * top of no other manifest (a first FLUSH otherwise drains).
   */
  get ownsManifest(): boolean {
    return this.state.generation > 0 && this.manifestGeneration === this.state.generation;
  }

  /**
   * Sequences up to this may be in log records this host put: after a restart the volume
   * continues above it, so that a sequence a lost local write had is never reused by
   * another write (replay would take the old record for the new history). 0: none.
   */
  get reservedSequence(): number {
    return this.state.durableReserved ?? 0;
  }

  /** Make sequences up to `sequence` reserved (durable on return), in steps of RESERVE_STEP. */
  reserveSequence(sequence: number): void {
    if (sequence <= this.reservedSequence) return;
    this.state.durableReserved = sequence + RESERVE_STEP;
    this.save();
  }
}
