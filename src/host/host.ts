// The daemon's inventory (DESIGN.md: host/): which volumes are open here, their links to
// the object store (leases, flush modes), the shared block cache and pack index, and the
// background sealer and flush scheduler. Volumes are recovered from local state at
// start-up without a store request; a volume this host does not have is woken from its
// manifest in the store.
import crypto from 'node:crypto';
import { disk } from '../disk/disk.js';
import os from 'node:os';
import path from 'node:path';
import { BlockCache } from '../blocks/cache.js';
import type { StoreCipher } from '../crypto/cipher.js';
import type { Compression } from '../crypto/compress.js';
import { errorMessage, type Logger } from '../log.js';
import { crashPoint } from '../faults/crash-points.js';
import { uploadsKey, type PackRefcounts } from '../gc/refcounts.js';
import { isPreconditionFailed, storeUnreachable, type ObjectStore } from '../objectstore/types.js';
import { PackFetcher } from '../store/fetch.js';
import { decodeLease, leaseIsLiveAt } from '../store/lease.js';
import { clockKey, StoreClock } from '../objectstore/clock.js';
import { decodeManifestBody, leaseKey, manifestKey, storedTables, type Manifest, type ManifestMeta, type StoredTables } from '../store/manifest.js';
import { PackIndex } from '../store/pack-index.js';
import { PackUploader } from '../store/upload.js';
import type { BlockMap } from '../volume/blockmap.js';
import { checkpointNameProblem, splitCheckpointExport, volumeNameProblem } from '../volume/names.js';
import {
  deleteCheckpoint, ExistsError, indexManifest, lazyFork, listCheckpoints, manifestBlockMap, MissingError, purgeVolume, readBootSet,
  readManifest, writeBootSet, type CheckpointInfo,
} from '../store/catalog.js';
import { SyncFailureCounts } from '../volume/stats.js';
import { Volume, VolumeError, type VolumeContext } from '../volume/volume.js';
import { LeaseHeldError, StoreLink, type DrainResult, type FlushMode, type StoreContext } from './store-link.js';
import { HostEvents, recordingErrors } from './events.js';

export interface HostOptions {
  /** Folder for the block cache and the volumes' local state. */
  cacheDir: string;
  blockSize: number;
  diskBytes: number;
  memoryBytes: number;
  /** Size of a volume created on first connect; 0 disables auto-create. */
  autoCreateBytes: number;
  /** Seal a volume's overlay after it has been idle this long. */
  sealIdleMs: number;
  /** Seal in the background once a volume has this much unsealed overlay data. */
  sealDirtyBytes: number;
  store: ObjectStore;
  compression: Compression;
  manifestCompression: Compression;
  /** The store's block names and sealing (crypto/cipher.ts: PLAINTEXT or the unwrapped data key's). */
  cipher: StoreCipher;
  blocksPerPack: number;
  /** Packs fetched ahead of a sequential reader; 0 turns read-ahead off. */
  readAheadPacks: number;
  /** This host's id in leases; "" generates one and keeps it in the cache dir. */
  hostId: string;
  leaseTtlMs: number;
  /** How much earlier than a taker the holder of a lease considers it gone (StoreContext). */
  clockSkewMarginMs: number;
  flushMode: FlushMode;
  dirtyBudgetBytes: number;
  continuousBlockIntervalMs: number;
  continuousManifestIntervalMs: number;
  /** Pack refcounts (GC); undefined runs without them. */
  refcounts?: PackRefcounts;
  /** The store's clock, shared with the refcounts (one sample for both); one of the host's own when absent. */
  storeClock?: StoreClock;
  /** Background scrub of the disk cache: blocks re-hashed per second; 0 turns it off. */
  scrubBlocksPerSecond?: number;
}

export interface VolumeSettings {
  flushMode?: FlushMode;
  dirtyBudgetBytes?: number;
}

export interface VolumeSummary {
  name: string;
  size: number;
  clients: number;
  readOnly: boolean;
  sequence: number;
  dirtyBytes: number;
  mappedChunks: number;
  flushMode: FlushMode;
  dirtyBudgetBytes: number;
  /** Bytes of chunks changed since they last went to the store: what the dirty budget bounds. */
  storeDirtyBytes: number;
  leaseGeneration: number;
  manifestSequence: number;
  /** Why the volume refuses writes and flushes until it is reopened (a failed sync); undefined while healthy. */
  failed: string | undefined;
  /** Why this host stopped writing the volume (it lost the lease or was fenced); undefined while it may write. */
  leaseLost?: string;
}

/** The folder holding a volume's local state: one folder per name segment, then '@'. */
function volumeDir(root: string, name: string): string {
  // '@' cannot appear in a volume name, so it never collides with a segment.
  return path.join(root, ...name.split('/'), '@');
}

const SEAL_TICK_MS = 100;
const SEAL_CHUNKS_PER_STEP = 32;
/** A volume idle this long with unflushed writes is flushed in the background. */
const WRITEBACK_IDLE_MS = 1000;
const STORE_TICK_MS = 250;

/** This host's lease identity: configured, or generated once and kept in the cache dir. */
export function hostIdentity(cacheDir: string, configured: string): string {
  if (configured !== '') return configured;
  const file = path.join(cacheDir, 'host-id');
  if (disk.existsSync(file)) return disk.readFileSync(file, 'utf8').trim();
  const id = `${os.hostname().replace(/[^A-Za-z0-9._-]/g, '-').slice(0, 40)}-${crypto.randomBytes(4).toString('hex')}`;
  disk.mkdirSync(cacheDir, { recursive: true });
  disk.writeFileSync(file, id + '\n');
  return id;
}

/**
 * A manifest this host has in hand (written by a fork, or just read): its meta and ETag,
 * its opened body (the base of the volume's incremental manifests), and the decoded
 * manifest where its blocks still need indexing (`indexed` false) or its block map
 * building (no `map`).
 */
interface WrittenManifest {
  meta: ManifestMeta;
  etag: string;
  raw: Buffer;
  /** The tables' zstd frame of the stored body, when known (see sealManifest). */
  tables?: StoredTables;
  manifest?: Manifest;
  indexed?: boolean;
  map?: BlockMap;
  /** The volume's folder on this host, already being made from it (a fork, while its PUT was in flight). */
  local?: Promise<Volume>;
  /** The refcount commit of the manifest's write, still to run (a fork: beside its lease PUT). */
  commit?: () => Promise<unknown>;
}

/** In a volume folder made before its manifest was written (a fork in flight). */
const UNPUBLISHED = 'unpublished';

export class Host {
  readonly cache: BlockCache;
  readonly packIndex: PackIndex;
  readonly fetcher: PackFetcher;
  /** Failed syncs of volumes' overlays and journals on this host (the cache counts the slab's). */
  readonly syncFailures = new SyncFailureCounts();
  readonly uploader: PackUploader;
  readonly hostId: string;
  /** Recent drains, forks, checkpoints, migrations, promotions, fencing and errors (the dashboard's timeline). */
  readonly events = new HostEvents();
  private readonly storeCtx: StoreContext;
  private readonly links = new Map<string, StoreLink>();
  private storeTimer: NodeJS.Timeout | undefined;
  private readonly volumes = new Map<string, Volume>();
  private readonly opening = new Map<string, Promise<Volume | undefined>>();
  private readonly ctx: VolumeContext;
  private readonly volumesRoot: string;
  private sealTimer: NodeJS.Timeout | undefined;
  private scrubTimer: NodeJS.Timeout | undefined;
  private sealing = false;
  private readonly writingBack = new Set<Volume>();
  private closed = false;

  private constructor(
    readonly options: HostOptions,
    private readonly log: Logger,
  ) {
    log = this.log = recordingErrors(log, this.events);
    this.volumesRoot = path.join(options.cacheDir, 'volumes');
    this.cache = BlockCache.open(
      path.join(options.cacheDir, 'blocks'),
      { blockSize: options.blockSize, namesId: options.cipher.namesId, blockHash: options.cipher.blockHash, diskBytes: options.diskBytes, memoryBytes: options.memoryBytes },
      log.child('cache'),
    );
    this.packIndex = PackIndex.open(path.join(options.cacheDir, 'packs.index'));
    this.fetcher = new PackFetcher(options.store, this.packIndex, this.cache, options.cipher, options.readAheadPacks * options.blocksPerPack, log.child('fetch'));
    this.uploader = new PackUploader(options.store, this.packIndex, this.cache, options.compression, options.cipher, options.blocksPerPack, log.child('upload'), options.refcounts);
    this.hostId = hostIdentity(options.cacheDir, options.hostId);
    this.storeCtx = {
      store: options.store, packIndex: this.packIndex, uploader: this.uploader, cache: this.cache, hostId: this.hostId,
      leaseTtlMs: options.leaseTtlMs, clockSkewMarginMs: options.clockSkewMarginMs, clock: options.storeClock ?? new StoreClock(options.store, clockKey(this.hostId)), manifestCompression: options.manifestCompression, cipher: options.cipher, refcounts: options.refcounts, log: log.child('store'),
    };
    this.ctx = {
      cache: this.cache, blockHash: options.cipher.blockHash, log: log.child('volume'), scratch: Buffer.alloc(options.blockSize), fetcher: this.fetcher,
      syncFailures: this.syncFailures,
    };
  }

  private get defaults(): { flushMode: FlushMode; dirtyBudgetBytes: number } {
    return { flushMode: this.options.flushMode, dirtyBudgetBytes: this.options.dirtyBudgetBytes };
  }

  /** Open the cache and recover every volume found under the cache dir. */
  static open(options: HostOptions, log: Logger): Host {
    const host = new Host(options, log);
    const started = performance.now();
    disk.mkdirSync(host.volumesRoot, { recursive: true });
    // Checkpoint exports are opened again on demand; what a previous run left is stale.
    disk.rmSync(path.join(options.cacheDir, 'checkpoints'), { recursive: true, force: true });
    for (const dir of findVolumeDirs(host.volumesRoot)) {
      const t0 = performance.now();
      try {
        if (!disk.existsSync(path.join(dir, 'journal'))) {
          log.warn('removing an unfinished volume create', { dir });
          disk.rmSync(dir, { recursive: true, force: true });
          continue;
        }
        if (disk.existsSync(path.join(dir, UNPUBLISHED))) {
          // Nothing was served from it; if its manifest landed, the fork wakes from the store.
          log.warn('removing the folder of a fork that stopped before it was registered', { dir });
          disk.rmSync(dir, { recursive: true, force: true });
          continue;
        }
        const volume = Volume.load(dir, host.ctx);
        host.links.set(volume.name, StoreLink.load(volume, host.storeCtx, host.defaults));
        host.volumes.set(volume.name, volume);
        log.info('recovered volume', {
          volume: volume.name, size: volume.size, chunks: volume.mappedChunks, dirty_bytes: volume.dirtyBytes,
          sequence: volume.sequence, ms: (performance.now() - t0).toFixed(1),
        });
      } catch (err) {
        log.error('cannot recover volume; it is not served', { dir, error: errorMessage(err) });
      }
    }
    const { blocks, freed } = host.cache.finishStartup();
    log.info('host ready', {
      volumes: host.volumes.size, cached_blocks: blocks, freed_blocks: freed, ms: (performance.now() - started).toFixed(1),
    });
    host.sealTimer = setInterval(() => host.sealTick(), SEAL_TICK_MS);
    host.sealTimer.unref();
    host.storeTimer = setInterval(() => host.storeTick(), STORE_TICK_MS);
    host.storeTimer.unref();
    const scrubRate = options.scrubBlocksPerSecond ?? 0;
    if (scrubRate > 0) {
      // A few blocks at a time, spread over the second: the scrub must never be felt by readers.
      const steps = Math.min(10, scrubRate);
      let scrubbing = false;
      host.scrubTimer = setInterval(() => {
        if (scrubbing || host.closed) return;
        scrubbing = true;
        host.cache
          .scrubStep(Math.ceil(scrubRate / steps))
          .catch((err) => log.error('cache scrub failed', { error: errorMessage(err) }))
          .finally(() => {
            scrubbing = false;
          });
      }, 1000 / steps);
      host.scrubTimer.unref();
    }
    return host;
  }

  /**
   * At start-up, before serving: let go of what this host's uploads held for volumes it no
   * longer has (removed while the daemon was down, or a crash between a removal's two
   * steps). Those of the volumes it has stay held: their blocks may live only there; so do
   * those of a volume whose folder is still here but could not be recovered.
   */
  async releaseStrayUploads(): Promise<number> {
    const refcounts = this.options.refcounts;
    if (refcounts === undefined) return 0;
    let released = 0;
    for (const name of await refcounts.heldUploads(this.hostId)) {
      if (this.volumes.has(name) || this.opening.has(name) || disk.existsSync(volumeDir(this.volumesRoot, name))) continue;
      const packs = await refcounts.releaseUploads(uploadsKey(this.hostId, name));
      this.log.info('let go of packs held for the uploads of a volume this host no longer has', { volume: name, packs });
      released += packs;
    }
    return released;
  }

  list(): VolumeSummary[] {
    return [...this.volumes.values()]
      .sort((a, b) => a.name.localeCompare(b.name))
      .map((v) => this.summary(v));
  }

  summary(v: Volume): VolumeSummary {
    const state = this.links.get(v.name)!.state;
    return {
      name: v.name, size: v.size, clients: v.clients, readOnly: v.readOnly, sequence: v.sequence,
      dirtyBytes: v.dirtyBytes, mappedChunks: v.mappedChunks, flushMode: state.flushMode,
      dirtyBudgetBytes: state.dirtyBudgetBytes, storeDirtyBytes: v.storeDirtyBytes, leaseGeneration: state.generation, manifestSequence: state.manifestSequence,
      failed: v.failed,
      ...(state.lostLease === undefined ? {} : { leaseLost: state.lostLease }),
    };
  }

  link(name: string): StoreLink | undefined {
    return this.links.get(name);
  }

  get(name: string): Volume | undefined {
    return this.volumes.get(name);
  }

  /** An open volume by a client-supplied name, which is checked first. */
  peek(name: string): Volume | undefined {
    if (this.volumes.has(name)) return this.volumes.get(name);
    if (splitCheckpointExport(name)) return undefined;
    const problem = volumeNameProblem(name);
    if (problem) throw new VolumeError('EINVAL', problem);
    return this.volumes.get(name);
  }

  all(): Volume[] {
    return [...this.volumes.values()];
  }

  /**
   * The volume to serve for an export name: an open one, or a new one when auto-create
   * is on. Undefined when the name is unknown and auto-create is off. A name this host
   * does not have is looked up in the store: when the store does not answer, this throws
   * 'Unavailable' saying so (within [storage] request_deadline_s per store request).
   */
  async openForClient(name: string): Promise<Volume | undefined> {
    const open = this.volumes.get(name);
    if (open) return open;
    const checkpoint = splitCheckpointExport(name);
    const problem = checkpoint ? undefined : volumeNameProblem(name);
    if (problem) throw new VolumeError('EINVAL', problem);
    return this.needingStore(`volume ${name}: cannot open it on this host`, async () => {
      if (checkpoint) return this.openCheckpoint(name, checkpoint.volume, checkpoint.checkpoint);
      const woken = await this.wake(name);
      if (woken) return woken;
      if (this.options.autoCreateBytes <= 0) return undefined;
      return (await this.create(name, this.options.autoCreateBytes)).volume;
    });
  }

  /** `work`, with a failure to reach the store restated as "WHAT: the object store URL is unreachable: …". */
  private async needingStore<T>(what: string, work: () => Promise<T>): Promise<T> {
    try {
      return await work();
    } catch (err) {
      throw storeUnreachable(what, this.options.store.description, err);
    }
  }

  /**
   * Create a volume, or wake it when the store has it; concurrent calls for one name
   * share the work. `created` says which.
   */
  async create(name: string, size: number, settings: VolumeSettings = {}): Promise<{ volume: Volume; created: boolean }> {
    this.checkOpen();
    const problem = volumeNameProblem(name);
    if (problem) throw new VolumeError('EINVAL', problem);
    checkSize(size);
    const existing = this.volumes.get(name);
    if (existing) return { volume: existing, created: false };
    const woken = await this.wake(name, settings);
    if (woken) return { volume: woken, created: false };
    return { volume: await this.once(name, async () => {
      const dir = volumeDir(this.volumesRoot, name);
      if (disk.existsSync(path.join(dir, 'journal'))) throw new Error(`volume ${name}: local state exists but is not open`);
      const volume = await Volume.create(dir, name, size, this.options.blockSize, this.ctx);
      const link = new StoreLink(volume, { format: 1, ...this.defaults, ...settings, readOnly: false, generation: 0, manifestSequence: -1 }, this.storeCtx);
      link.save();
      this.links.set(name, link);
      this.volumes.set(name, volume);
      this.log.info('created volume', { volume: name, size, flush_mode: link.state.flushMode });
      return volume;
    }), created: true };
  }

  /** Run `open` unless another call for the name is already opening it; share its result. */
  private async once(name: string, open: () => Promise<Volume | undefined>): Promise<Volume> {
    const pending = this.opening.get(name);
    if (pending) {
      const volume = await pending;
      if (volume) return volume;
    }
    const existing = this.volumes.get(name);
    if (existing) return existing;
    const work = open();
    this.opening.set(name, work);
    try {
      const volume = await work;
      if (!volume) throw new Error(`volume ${name} vanished while opening`);
      return volume;
    } finally {
      this.opening.delete(name);
    }
  }

  /**
   * Wake a volume this host does not have from its manifest in the store: serve it at
   * once, blocks come lazily. Writable when the lease is free (or expired), read-only
   * while another host holds it. Undefined when the store has no such volume.
   * `written` is a manifest this host has just written (a fork): no GET, no decode; and
   * when `indexed`, its blocks are all in the host pack index already (a consistent fork
   * built it from the index).
   */
  async wake(
    name: string,
    settings: VolumeSettings = {},
    written?: WrittenManifest,
  ): Promise<Volume | undefined> {
    const pending = this.opening.get(name);
    if (pending) return pending;
    return this.opened(name, this.wakeFrom(name, settings, written));
  }

  /** The work of wake(), for a caller that registered its opening itself (see opened). */
  private async wakeFrom(name: string, settings: VolumeSettings, written?: WrittenManifest): Promise<Volume | undefined> {
    const key = manifestKey(name);
    const started = performance.now();
    let found: WrittenManifest;
    if (written) found = written;
    else {
      const object = await this.options.store.get(key);
      if (object === undefined) return undefined;
      const decoded = decodeManifestBody(key, object.body, this.options.cipher);
      const { manifest, raw } = decoded;
      found = { meta: manifest.meta, manifest, raw, tables: storedTables(decoded, this.options.manifestCompression), etag: object.etag };
    }
    const { meta, etag } = found;
    if (!found.indexed) await indexManifest(this.packIndex, found.manifest!);
    const volume = await (found.local ?? this.createLocal(name, meta, found.map ?? manifestBlockMap(found.manifest!)));
    const link = new StoreLink(
      volume,
      { format: 1, ...this.defaults, ...settings, readOnly: true, generation: 0, manifestEtag: etag, manifestSequence: meta.sequence },
      this.storeCtx,
    );
    link.save();
    if (found.local !== undefined) {
      await crashPoint('fork-unmark');
      // The fork's manifest is in the store now: its folder is a volume like any other.
      disk.rmSync(path.join(volume.dir, UNPUBLISHED), { force: true });
    }
    link.setBase(volume.cloneMap(), found.raw, etag, found.tables);
    this.links.set(name, link);
    this.volumes.set(name, volume);
    const promoted = link.promote(found.local !== undefined).then(
      () => true,
      (err: unknown) => {
        if (!(err instanceof LeaseHeldError)) throw err;
        this.log.info('volume is leased by another host; serving it read-only', { volume: name, holder: err.lease.owner });
        return false;
      },
    );
    // A fork's refcount commit (a row per pack of the volume: 4-6 ms at 2,623 packs, on
    // the event loop with SQLite) runs once the lease PUT (a fork's first and only lease
    // request) is on its way, not before it.
    const committed = found.commit && new Promise(setImmediate).then(found.commit);
    const [writable] = await Promise.all([promoted, committed]);
    this.log.info('woke volume from the store', {
      volume: name, size: meta.size, chunks: volume.mappedChunks, sequence: meta.sequence, writable,
      ms: Math.round(performance.now() - started),
    });
    void this.fetchBootSet(volume, meta);
    return volume;
  }

  /**
   * A volume's folder on this host, made from the content of its manifest (its block map
   * taken over): what wake() serves. A folder left by an unfinished wake is replaced.
   * `unpublished`: made before the manifest is written (a fork), so it is marked,
   * and a restart before wake() takes the mark off removes it instead of serving a volume
   * the store may not have.
   */
  private async createLocal(name: string, meta: ManifestMeta, map: BlockMap, unpublished = false): Promise<Volume> {
    const key = manifestKey(name);
    if (meta.name !== name) throw new Error(`manifest ${key} names volume ${meta.name}, not ${name}`);
    if (meta.blockSize !== this.options.blockSize) {
      throw new Error(`manifest ${key} has block size ${meta.blockSize}; this host uses ${this.options.blockSize}`);
    }
    const dir = volumeDir(this.volumesRoot, name);
    if (disk.existsSync(dir)) disk.rmSync(dir, { recursive: true, force: true });
    if (unpublished) {
      // Before the journal, which makes the folder a volume; the directory sync after it covers both.
      disk.mkdirSync(dir, { recursive: true });
      disk.writeFileSync(path.join(dir, UNPUBLISHED), '');
    }
    return Volume.createFrom(dir, name, { size: meta.size, blockSize: meta.blockSize, sequence: meta.sequence, map }, this.ctx);
  }

  /**
   * Register `work`, which opens volume `name`, so that every wake of the name meanwhile
   * shares it; when it fails, undo the volume it registered.
   */
  private async opened(name: string, work: Promise<Volume | undefined>): Promise<Volume | undefined> {
    this.opening.set(name, work);
    try {
      return await work;
    } catch (err) {
      this.links.delete(name);
      const volume = this.volumes.get(name);
      if (volume) {
        this.volumes.delete(name);
        await volume.destroy().catch(() => undefined);
      }
      throw err;
    } finally {
      this.opening.delete(name);
    }
  }

  private linkOf(name: string): StoreLink {
    const link = this.links.get(name);
    if (!link) throw new VolumeError('EINVAL', `no volume ${name}`);
    return link;
  }

  /** Drain a volume; when the store does not answer, it fails saying so and the volume keeps its changes, writable. */
  drain(name: string): Promise<DrainResult> {
    this.checkOpen();
    const link = this.linkOf(name);
    const drained = this.needingStore(`volume ${name}: drain failed (its changes stay on this host; drain again once the store answers)`, () => link.drain());
    return this.events.track('drain', name, drained, (r) => `drained at sequence ${r.sequence}: ${r.packs_uploaded} packs, ${r.bytes_uploaded} bytes uploaded`);
  }

  promote(name: string): Promise<{ generation: number; sequence: number }> {
    this.checkOpen();
    const link = this.linkOf(name);
    return this.events.track('promotion', name, this.needingStore(`volume ${name}: promotion failed`, () => link.promote()), (r) => `promoted: this host writes it, generation ${r.generation}`);
  }

  release(name: string): Promise<{ generation: number; drained?: DrainResult }> {
    this.checkOpen();
    const link = this.linkOf(name);
    return this.events.track('migration', name, this.needingStore(`volume ${name}: release failed`, () => link.release()), (r) => `released the lease of generation ${r.generation} for another host to promote`);
  }

  /**
   * Fork `source` to a new volume `target` (DESIGN.md: Fork). Consistent: a snapshot of
   * the open source at its current sequence. Lazy: a copy of the source's last manifest
   * (or of a checkpoint) in the store, without the source's host. The target then opens
   * here at once, sharing every cached block with its parent.
   */
  async fork(
    source: string,
    target: string,
    opts: { mode: 'consistent' | 'lazy'; checkpoint?: string },
  ): Promise<{ target: string; sequence: number; mode: string; duration_ms: number }> {
    this.checkOpen();
    const started = performance.now();
    for (const name of [source, target]) {
      const problem = volumeNameProblem(name);
      if (problem) throw new VolumeError('EINVAL', problem);
    }
    if (this.volumes.has(target) || this.opening.has(target) || (await this.options.store.head(manifestKey(target))) !== undefined) {
      throw new ExistsError(`volume ${target} already exists`);
    }
    let sequence = 0;
    // Registered as opening from the start: a client that connects to the target meanwhile waits for it.
    await this.opened(target, (async () => {
      // The target's folder is made (its block map journaled and synced) while its manifest is written.
      let local: Promise<Volume> | undefined;
      const makeLocal = (meta: ManifestMeta, map: BlockMap) => {
        local = this.createLocal(target, meta, map, true);
        local.catch(() => undefined); // awaited by wakeFrom or below; not an unhandled rejection meanwhile
      };
      try {
        if (opts.mode === 'consistent' && opts.checkpoint === undefined) {
          const link = this.links.get(source);
          if (!link) throw new MissingError(`no volume ${source} is open on this host (a lazy fork works from the store)`);
          const forked = await link.fork(target, ({ meta, map }) => makeLocal(meta, map));
          sequence = forked.sequence;
          return await this.wakeFrom(target, {}, { ...forked, indexed: true, local });
        }
        const sourceLink = opts.checkpoint === undefined ? this.links.get(source) : undefined;
        let known: { raw: Buffer; tables?: StoredTables; map: BlockMap } | undefined;
        const copied = await lazyFork(
          this.options.store, source, target, this.options.manifestCompression, this.options.cipher, opts.checkpoint, this.options.refcounts,
          sourceLink && ((etag) => (known = sourceLink.baseOf(etag))),
          ({ meta, manifest }) => makeLocal(meta, known?.map.clone() ?? manifestBlockMap(manifest!)),
        );
        sequence = copied.sequence;
        // The source's current manifest, open here: its blocks are in the pack index already,
        // and its block map is at hand (shared copy-on-write, like a consistent fork's).
        const indexed = known !== undefined || (sourceLink !== undefined && copied.sourceEtag === sourceLink.manifestEtag);
        return await this.wakeFrom(target, {}, { ...copied, indexed, local });
      } catch (err) {
        // A folder made for a fork that failed before the volume was registered (opened() undoes a registered one).
        const made = await local?.catch(() => undefined);
        if (made !== undefined && this.volumes.get(target) !== made) await made.destroy().catch(() => undefined);
        throw err;
      }
    })());
    const result = { target, sequence, mode: opts.checkpoint === undefined ? opts.mode : 'checkpoint', duration_ms: Math.round(performance.now() - started) };
    this.log.info('forked volume', { source, ...result, checkpoint: opts.checkpoint });
    this.events.record('fork', source, `forked to ${target} (${result.mode}) at sequence ${sequence}`);
    return result;
  }

  /**
   * While the client boots: fetch the blocks of the volume's boot hot set (or its
   * parent's) in parallel, before the guest asks for them. When the set is a recording
   * request (`updraft bless --boot-record`), record this boot and answer the request.
   */
  private async fetchBootSet(volume: Volume, meta: ManifestMeta): Promise<void> {
    try {
      const found = await readBootSet(this.options.store, meta, this.options.cipher);
      if (found === undefined) return;
      const { set, etag } = found;
      if (set.recording) {
        this.recordBootInto(volume, set.volume, set.seconds, etag);
        this.log.info('recording the boot hot set requested at bless', { volume: volume.name, for: set.volume, seconds: set.seconds });
        return;
      }
      const keys = volume.missingBlocksOf(set.chunks);
      const started = performance.now();
      await this.fetcher.fetch(keys, 'hotset');
      this.log.info('fetched the boot hot set', { volume: volume.name, from: set.volume, chunks: set.chunks.length, blocks: keys.length, ms: Math.round(performance.now() - started) });
    } catch (err) {
      this.log.warn('boot hot set fetch failed; blocks come on demand', { volume: volume.name, error: errorMessage(err) });
    }
  }

  /**
   * Record the chunks read in the `seconds` after the next read (the guest's boot) and
   * store them beside the manifest as the volume's boot hot set.
   */
  recordBoot(name: string, seconds: number): { volume: string; seconds: number } {
    const volume = this.volumes.get(name);
    if (!volume) throw new MissingError(`no volume ${name} on this host`);
    this.recordBootInto(volume, name, seconds);
    return { volume: name, seconds };
  }

  /** Record `volume`'s next boot as the boot set of `owner` (itself, or the image it was forked from). */
  private recordBootInto(volume: Volume, owner: string, seconds: number, replacing?: string): void {
    volume.recordBoot(seconds, (chunks) => {
      writeBootSet(this.options.store, { format: 1, volume: owner, blockSize: volume.blockSize, seconds, chunks }, this.options.cipher, replacing)
        .then(() => this.log.info('stored the boot hot set', { volume: owner, recorded_on: volume.name, chunks: chunks.length }))
        .catch((err) => {
          if (isPreconditionFailed(err)) this.log.info('another host answered the boot recording request first', { volume: owner });
          else this.log.error('cannot store the boot hot set', { volume: owner, error: errorMessage(err) });
        });
    });
  }

  /** Take an immutable checkpoint of an open volume. */
  async createCheckpoint(volume: string, checkpoint: string): Promise<{ checkpoint: string; sequence: number }> {
    this.checkOpen();
    const problem = checkpointNameProblem(checkpoint);
    if (problem) throw new VolumeError('EINVAL', problem);
    return this.events.track('checkpoint', volume, this.linkOf(volume).checkpoint(checkpoint), (r) => `checkpoint ${r.checkpoint} at sequence ${r.sequence}`);
  }

  listCheckpoints(volume: string): Promise<CheckpointInfo[]> {
    return listCheckpoints(this.options.store, volume);
  }

  async deleteCheckpoint(volume: string, checkpoint: string): Promise<boolean> {
    const problem = checkpointNameProblem(checkpoint);
    if (problem) throw new VolumeError('EINVAL', problem);
    return deleteCheckpoint(this.options.store, volume, checkpoint, this.options.refcounts);
  }

  /**
   * Serve checkpoint CHECKPOINT of VOLUME read-only as the export VOLUME@CHECKPOINT. Kept
   * under its own folder; it is not recovered at start-up (it is opened again on demand).
   */
  private async openCheckpoint(exportName: string, volume: string, checkpoint: string): Promise<Volume | undefined> {
    const problem = volumeNameProblem(volume) ?? checkpointNameProblem(checkpoint);
    if (problem) throw new VolumeError('EINVAL', problem);
    return this.once(exportName, async () => {
      let manifest;
      try {
        manifest = (await readManifest(this.options.store, this.options.cipher, volume, checkpoint)).manifest;
      } catch (err) {
        if (err instanceof MissingError) return undefined;
        throw err;
      }
      await indexManifest(this.packIndex, manifest);
      const dir = path.join(this.options.cacheDir, 'checkpoints', ...volume.split('/'), checkpoint, '@');
      disk.rmSync(dir, { recursive: true, force: true });
      const meta = manifest.meta;
      const served = await Volume.createFrom(dir, exportName, { size: meta.size, blockSize: meta.blockSize, sequence: meta.sequence, map: manifestBlockMap(manifest) }, this.ctx);
      const link = new StoreLink(served, { format: 1, ...this.defaults, readOnly: true, generation: 0, manifestSequence: meta.sequence }, this.storeCtx);
      this.links.set(exportName, link);
      this.volumes.set(exportName, served);
      this.log.info('serving checkpoint read-only', { volume, checkpoint, sequence: meta.sequence });
      return served;
    }).catch((err) => {
      if (err instanceof Error && /vanished while opening/.test(err.message)) return undefined;
      throw err;
    });
  }

  setVolumeSettings(name: string, settings: VolumeSettings): void {
    const link = this.linkOf(name);
    Object.assign(link.state, settings);
    link.save();
    this.log.info('volume settings changed', { volume: name, flush_mode: link.state.flushMode, dirty_budget_bytes: link.state.dirtyBudgetBytes });
  }

  /** Drain every writable volume (shutdown); failures are logged and returned. */
  async drainAll(): Promise<Array<{ volume: string; error?: string; result?: DrainResult }>> {
    const out = await Promise.all(
      [...this.links.values()]
        .filter((link) => !link.state.readOnly && (link.volume.sequence !== link.state.manifestSequence))
        .map(async (link) => {
          try {
            return { volume: link.name, result: await link.drain() };
          } catch (err) {
            this.log.error('drain at shutdown failed', { volume: link.name, error: errorMessage(err) });
            return { volume: link.name, error: errorMessage(err) };
          }
        }),
    );
    return out;
  }

  /** Lease renewals, continuous flushing and the dirty budget. */
  private storeTick(): void {
    if (this.closed) return;
    const now = Date.now();
    for (const link of this.links.values()) {
      void link.renewIfDue();
      if (link.busy || link.state.readOnly) continue;
      const volume = link.volume;
      const changed = volume.sequence !== link.state.manifestSequence;
      if (link.state.flushMode === 'continuous' && changed) {
        const interval = Math.max(this.options.continuousBlockIntervalMs, 2 * link.lastUploadMs);
        const idle = now - volume.lastWriteAt >= Math.min(interval, 1000);
        const manifestDue = now - link.lastManifestAt >= this.options.continuousManifestIntervalMs;
        if ((idle && now - link.lastUploadAt >= Math.min(interval, 1000)) || manifestDue) {
          // Writes stopped (or the manifest interval passed): catch the store up.
          link.drain().catch((err) => this.log.error('continuous flush: drain failed', { volume: link.name, error: errorMessage(err) }));
          continue;
        }
        if (now - link.lastUploadAt >= interval && volume.sequence !== link.sequenceAtUpload) {
          link.uploadBlocks().catch((err) => this.log.error('continuous flush: block upload failed', { volume: link.name, error: errorMessage(err) }));
          continue;
        }
      }
      if (volume.storeDirtyBytes > link.state.dirtyBudgetBytes) {
        const dirty = volume.storeDirtyBytes;
        link.uploadOldest().then(
          (r) => r && this.log.info('dirty budget exceeded: uploaded the oldest changed chunks', { volume: link.name, budget: link.state.dirtyBudgetBytes, dirty, chunks: r.chunks, packs: r.packs }),
          (err) => this.log.error('dirty budget: block upload failed', { volume: link.name, error: errorMessage(err) }),
        );
      }
    }
  }

  /**
   * Close a volume and load it again from its folder, as a restart would: a failed volume
   * (a sync of its local state failed) comes back at the last state a FLUSH acknowledged
   * and takes writes again. Its clients must be gone (they would hold the closed volume).
   */
  async reopen(name: string): Promise<Volume> {
    this.checkOpen();
    const volume = this.volumes.get(name);
    const link = this.links.get(name);
    if (!volume || !link) throw new VolumeError('EINVAL', `no volume ${name}`);
    if (volume.clients > 0) throw new VolumeError('EINVAL', `volume ${name}: cannot reopen with ${volume.clients} client(s) attached`);
    return link.serial(async () => {
      await volume.close();
      // The new link speaks for the volume from now on (it notes itself on the blocks it names).
      await link.leave();
      const reopened = Volume.load(volume.dir, this.ctx);
      volume.releaseHeld();
      this.links.set(name, StoreLink.load(reopened, this.storeCtx, this.defaults));
      this.volumes.set(name, reopened);
      this.log.info('reopened volume', { volume: name, was_failed: volume.failed ?? false, sequence: reopened.sequence });
      return reopened;
    });
  }

  async resize(name: string, size: number): Promise<Volume> {
    const volume = this.volumes.get(name);
    if (!volume) throw new VolumeError('EINVAL', `no volume ${name}`);
    checkSize(size);
    await volume.resize(size);
    this.log.info('resized volume', { volume: name, size });
    return volume;
  }

  /**
   * Stop serving a volume here and remove its local state; the store keeps what was
   * drained. A held lease is released so another host can take the volume at once.
   */
  async remove(name: string): Promise<void> {
    const volume = this.volumes.get(name);
    if (!volume) return;
    const link = this.links.get(name);
    if (link?.holdsLease) await link.release();
    this.volumes.delete(name);
    this.links.delete(name);
    // A drain or upload in flight finishes first, so nothing is held for the volume after this.
    await link?.serial(async () => undefined);
    await volume.destroy();
    // No seal runs after destroy: the holds the last seals queued go in before the set is let go.
    await link?.leave();
    // After the local copy is gone (a crash between the two: the next start lets go, see releaseStrayUploads).
    await crashPoint('volume-removed');
    await this.options.refcounts?.releaseUploads(uploadsKey(this.hostId, name));
    this.log.info('removed volume', { volume: name });
  }

  /**
   * Remove a volume from the store and from this host: stop serving it (no final drain:
   * its content is being thrown away), then delete its manifest, checkpoints, lease and
   * boot hot set and release its refcounts. Refused while another host holds its lease.
   */
  async purge(name: string): Promise<{ name: string; purged: true; local: boolean; checkpoints: number; packs_released: number }> {
    this.checkOpen();
    const problem = volumeNameProblem(name);
    if (problem) throw new VolumeError('EINVAL', problem);
    const key = leaseKey(name);
    const leased = await this.options.store.get(key);
    if (leased !== undefined) {
      const lease = decodeLease(key, leased.body);
      if (lease.owner !== this.hostId && !lease.released && leaseIsLiveAt(lease, leased.lastModified, (await this.storeCtx.clock.now()).earliest)) {
        throw new LeaseHeldError(name, lease);
      }
    }
    const volume = this.volumes.get(name);
    const link = this.links.get(name);
    if (volume) {
      this.volumes.delete(name);
      this.links.delete(name);
      // A drain or fork in flight finishes first, so no manifest write lands after the purge.
      await link?.serial(async () => undefined);
      await volume.destroy();
      await link?.leave();
    }
    const { found, checkpoints, packsReleased } = await purgeVolume(this.options.store, name, this.options.refcounts);
    if (!volume && !found) throw new MissingError(`no volume ${name} on this host or in the store ${this.options.store.description}`);
    this.log.info('purged volume', { volume: name, local: volume !== undefined, checkpoints, packs_released: packsReleased });
    return { name, purged: true, local: volume !== undefined, checkpoints, packs_released: packsReleased };
  }

  private sealTick(): void {
    if (this.closed) return;
    const now = Date.now();
    this.writeBackIdle(now);
    if (this.sealing) return;
    const due = this.all().filter(
      (v) => v.dirtyChunks > 0 && !v.readOnly &&
        (v.dirtyBytes >= this.options.sealDirtyBytes || now - v.lastWriteAt >= this.options.sealIdleMs),
    );
    if (due.length === 0) return;
    this.sealing = true;
    void this.sealVolumes(due).finally(() => {
      this.sealing = false;
    });
  }

  /**
   * Flush volumes that went quiet with unflushed writes. The guest's next FLUSH (a sync,
   * a snapshot) then finds little left to write back, and a crash loses less. Never
   * while a volume is being written: forcing writeback mid-stream would cap the writer
   * at the disk's speed instead of the page cache's.
   */
  private writeBackIdle(now: number): void {
    for (const volume of this.volumes.values()) {
      if (!volume.unflushed || volume.failed !== undefined || now - volume.lastWriteAt < WRITEBACK_IDLE_MS || this.writingBack.has(volume)) continue;
      this.writingBack.add(volume);
      volume
        .flush()
        .catch((err) => this.log.error('background flush failed', { volume: volume.name, error: errorMessage(err) }))
        .finally(() => this.writingBack.delete(volume));
    }
  }

  /** Seal in small steps, yielding to the event loop between them so requests keep flowing. */
  private async sealVolumes(volumes: Volume[]): Promise<void> {
    for (const volume of volumes) {
      let sealed = 0;
      for (;;) {
        if (this.closed) return;
        const idle = Date.now() - volume.lastWriteAt >= this.options.sealIdleMs;
        if (!idle && volume.dirtyBytes < this.options.sealDirtyBytes / 2) break;
        const n = await volume.seal(SEAL_CHUNKS_PER_STEP);
        sealed += n;
        if (n < SEAL_CHUNKS_PER_STEP) break;
      }
      // Commit the new map once the volume is idle, so replaced blocks are released and the
      // journal stays short. Not while it is busy: the commit's fdatasync would force the
      // writer's whole overlay to disk mid-stream; its own FLUSH commits the seal anyway.
      if (sealed > 0 && (Date.now() - volume.lastWriteAt >= this.options.sealIdleMs || volume.pendingReleases > 4096)) {
        try {
          await volume.flush();
        } catch (err) {
          this.log.error('flush after seal failed', { volume: volume.name, error: errorMessage(err) });
        }
      }
    }
  }

  private checkOpen(): void {
    if (this.closed) throw new VolumeError('ESHUTDOWN', 'the host is shutting down');
  }

  /** Flush and close every volume. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    if (this.sealTimer) clearInterval(this.sealTimer);
    if (this.storeTimer) clearInterval(this.storeTimer);
    if (this.scrubTimer) clearInterval(this.scrubTimer);
    await Promise.allSettled([...this.links.values()].map((link) => link.serial(async () => undefined)));
    const results = await Promise.allSettled(this.all().map((v) => v.close()));
    for (const r of results) if (r.status === 'rejected') this.log.error('close failed', { error: errorMessage(r.reason) });
    await this.cache.close();
    await this.packIndex.sync();
    this.packIndex.close();
    await this.options.store.close();
  }
}

function checkSize(size: number): void {
  if (!Number.isSafeInteger(size) || size <= 0) throw new VolumeError('EINVAL', `volume size ${size} is not a positive whole number of bytes`);
  if (size % 512 !== 0) throw new VolumeError('EINVAL', `volume size ${size} is not a multiple of 512 bytes`);
  if (size > 2 ** 50) throw new VolumeError('EINVAL', `volume size ${size} is larger than 1 PiB`);
}

/** Every '@' folder below root: one per volume. */
function findVolumeDirs(root: string): string[] {
  const out: string[] = [];
  const walk = (dir: string, depth: number) => {
    if (depth > 100) return;
    for (const entry of disk.readdirSync(dir, { withFileTypes: true })) {
      if (!entry.isDirectory()) continue;
      const full = path.join(dir, entry.name);
      if (entry.name === '@') out.push(full);
      else walk(full, depth + 1);
    }
  };
  walk(root, 0);
  return out;
}
