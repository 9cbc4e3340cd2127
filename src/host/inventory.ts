// The daemon's inventory of volumes (DESIGN.md: host/): which volumes are open here and
// their links to the object store; recovering them from local state, creating them, waking
// them from their manifests in the store, serving checkpoints read-only, reopening,
// resizing, removing and purging them. Host (host.ts) builds on it.
import crypto from 'node:crypto';
import { disk, replaceFileSync } from '../disk/disk.js';
import os from 'node:os';
import path from 'node:path';
import { BlockCache } from '../blocks/cache.js';
import type { StoreCipher } from '../crypto/cipher.js';
import type { Compression } from '../crypto/compress.js';
import type { Logger } from '../log.js';
import { crashPoint } from '../faults/crash-points.js';
import type { PackRefcounts } from '../gc/refcounts.js';
import { uploadsKey } from '../gc/uploads.js';
import { storeUnreachable, type ObjectStore } from '../objectstore/types.js';
import { PackFetcher } from '../store/fetch.js';
import { decodeLease, leaseIsLiveAt } from '../store/lease.js';
import { clockKey, StoreClock } from '../objectstore/clock.js';
import { leaseKey, manifestKey, type Manifest, type ManifestMeta } from '../store/manifest.js';
import { decodeManifestBody } from '../store/manifest-decode.js';
import { storedTables, type StoredTables } from '../store/manifest-seal.js';
import { PackIndex } from '../store/pack-index.js';
import { PackUploader } from '../store/upload.js';
import type { BlockMap } from '../volume/blockmap.js';
import { checkpointNameProblem, splitCheckpointExport, volumeNameProblem } from '../volume/names.js';
import { indexManifest, manifestBlockMap, MissingError, purgeVolume, readManifest } from '../store/catalog.js';
import { SyncFailureCounts } from '../volume/stats.js';
import { Volume, VolumeError, type VolumeContext } from '../volume/volume.js';
import { StoreLink } from './store-link.js';
import { LeaseHeldError, type FlushMode, type StoreContext } from './store-state.js';
import { fetchBootSet, type BootSetContext } from './boot-set.js';
import { outOfService, type ReplicaLag } from './follow.js';
import { DEFAULT_DURABLE_FLUSH_TIMEOUT_MS, DurableLog } from './durable-log.js';
import { HostEvents, recordingErrors } from './events.js';

export interface HostOptions {
  /** Folder for the block cache and the volumes' local state. */
  cacheDir: string;
  blockSize: number;
  diskBytes: number;
  memoryBytes: number;
  /** Write blocks to the disk tier past the page cache where the filesystem allows (default true). */
  directWrites?: boolean;
  /** Fault the memory tier in at start-up, on a thread of its own (default false). */
  memoryPretouch?: boolean;
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
  /** A durable volume's FLUSH fails (EIO) when the store has not taken its writes this long after it arrived. */
  durableFlushTimeoutMs?: number;
  dirtyBudgetBytes: number;
  continuousBlockIntervalMs: number;
  continuousManifestIntervalMs: number;
  /** How often a read-only replica checks its manifest in the store (follow.ts); 0 or absent: it does not follow. */
  replicaFollowIntervalMs?: number;
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
  /** As a replica, how often to check the manifest in the store (follow.ts); 0: it does not follow. */
  replicaFollowIntervalMs?: number;
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
  /** Why the local copy serves no new client (follow.ts: outOfService); undefined while in service. */
  outOfService?: string;
  /** How far behind the writer a replica following it is (follow.ts); undefined for any other volume. */
  replica?: ReplicaLag;
  /** A durable volume: the last sequence the store holds (logged or in a manifest). */
  durableSequence?: number;
}

/** The folder holding a volume's local state: one folder per name segment, then '@'. */
function volumeDir(root: string, name: string): string {
  // '@' cannot appear in a volume name, so it never collides with a segment.
  return path.join(root, ...name.split('/'), '@');
}

/** This host's lease identity: configured, or generated once and kept in the cache dir. */
export function hostIdentity(cacheDir: string, configured: string): string {
  if (configured !== '') return configured;
  const file = path.join(cacheDir, 'host-id');
  const kept = disk.existsSync(file) ? disk.readFileSync(file, 'utf8').trim() : '';
  if (kept !== '') return kept;
  const id = `${os.hostname().replace(/[^A-Za-z0-9._-]/g, '-').slice(0, 40)}-${crypto.randomBytes(4).toString('hex')}`;
  disk.mkdirSync(cacheDir, { recursive: true });
  // Durable before any lease names it: a power cut must not leave the file empty.
  replaceFileSync(file, id + '\n');
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
export const UNPUBLISHED = 'unpublished';

/** The host's shared parts (block cache, pack index, store context) and its volumes. */
export abstract class HostInventory {
  readonly cache: BlockCache;
  readonly packIndex: PackIndex;
  readonly fetcher: PackFetcher;
  /** Failed syncs of volumes' overlays and journals on this host (the cache counts the slab's). */
  readonly syncFailures = new SyncFailureCounts();
  readonly uploader: PackUploader;
  readonly hostId: string;
  /** Recent drains, forks, checkpoints, migrations, promotions, fencing and errors (the dashboard's timeline). */
  readonly events = new HostEvents();
  /** The group-committed log of the durable volumes (durable-log.ts). */
  readonly durableLog: DurableLog;
  protected readonly storeCtx: StoreContext;
  protected readonly links = new Map<string, StoreLink>();
  protected readonly volumes = new Map<string, Volume>();
  protected readonly opening = new Map<string, Promise<Volume | undefined>>();
  protected readonly ctx: VolumeContext;
  /** Where boot hot sets are read, written and fetched (boot-set.ts). */
  protected readonly bootSets: BootSetContext;
  protected readonly volumesRoot: string;
  protected closed = false;

  protected constructor(
    readonly options: HostOptions,
    protected readonly log: Logger,
  ) {
    log = this.log = recordingErrors(log, this.events);
    this.volumesRoot = path.join(options.cacheDir, 'volumes');
    this.cache = BlockCache.open(
      path.join(options.cacheDir, 'blocks'),
      { blockSize: options.blockSize, namesId: options.cipher.namesId, blockHash: options.cipher.blockHash, diskBytes: options.diskBytes, memoryBytes: options.memoryBytes, directWrites: options.directWrites, memoryPretouch: options.memoryPretouch },
      log.child('cache'),
    );
    this.packIndex = PackIndex.open(path.join(options.cacheDir, 'packs.index'));
    this.fetcher = new PackFetcher(options.store, this.packIndex, this.cache, options.cipher, options.readAheadPacks * options.blocksPerPack, log.child('fetch'));
    this.uploader = new PackUploader(options.store, this.packIndex, this.cache, options.compression, options.cipher, options.blocksPerPack, log.child('upload'), options.refcounts);
    this.hostId = hostIdentity(options.cacheDir, options.hostId);
    this.storeCtx = {
      store: options.store, packIndex: this.packIndex, uploader: this.uploader, cache: this.cache, hostId: this.hostId,
      leaseTtlMs: options.leaseTtlMs, clockSkewMarginMs: options.clockSkewMarginMs, clock: options.storeClock ?? new StoreClock(options.store, clockKey(this.hostId)), manifestCompression: options.manifestCompression, cipher: options.cipher, refcounts: options.refcounts, log: log.child('store'),
      onManifest: (volume, sequence) => this.durableLog.manifestWritten(volume, sequence),
    };
    this.durableLog = new DurableLog({
      store: options.store, hostId: this.hostId, compression: options.compression, cipher: options.cipher,
      flushTimeoutMs: options.durableFlushTimeoutMs ?? DEFAULT_DURABLE_FLUSH_TIMEOUT_MS, log: log.child('durable'),
    });
    this.ctx = {
      cache: this.cache, blockHash: options.cipher.blockHash, log: log.child('volume'), scratch: Buffer.alloc(options.blockSize), fetcher: this.fetcher,
      syncFailures: this.syncFailures,
    };
    this.bootSets = { store: options.store, cipher: options.cipher, fetcher: this.fetcher, log };
  }

  /** A durable volume's FLUSHes wait for the store (its changes are tracked); any other's do not. `reset`: its content was replaced (a promotion). */
  protected trackFlushMode(link: StoreLink, reset = false): void {
    if (link.state.flushMode === 'durable') this.durableLog.attach(link, reset);
    else this.durableLog.detach(link, 'the volume is not in durable flush mode any more');
  }

  protected get defaults(): { flushMode: FlushMode; dirtyBudgetBytes: number } {
    return { flushMode: this.options.flushMode, dirtyBudgetBytes: this.options.dirtyBudgetBytes };
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
    const summary: VolumeSummary = {
      name: v.name, size: v.size, clients: v.clients, readOnly: v.readOnly, sequence: v.servedSequence,
      dirtyBytes: v.dirtyBytes, mappedChunks: v.mappedChunks, flushMode: state.flushMode,
      dirtyBudgetBytes: state.dirtyBudgetBytes, storeDirtyBytes: v.storeDirtyBytes, leaseGeneration: state.generation, manifestSequence: state.manifestSequence,
      failed: v.failed,
      ...(state.lostLease === undefined ? {} : { leaseLost: state.lostLease }),
      ...(state.flushMode === 'durable' ? { durableSequence: this.durableLog.loggedSequence(v.name) } : {}),
    };
    const link = this.links.get(v.name)!;
    const unserved = outOfService(link);
    const replica = this.replicaLag(link);
    return {
      ...summary,
      ...(unserved === undefined ? {} : { outOfService: unserved }),
      ...(replica === undefined ? {} : { replica }),
    };
  }

  /** How far behind its writer a replica is (the host's followers know); undefined here. */
  protected replicaLag(_link: StoreLink): ReplicaLag | undefined {
    return undefined;
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
    if (open) return this.inService(open);
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

  /**
   * An open volume a new client may have: a lease held here whose time ran out by this
   * host's reckoning (a restart after a long stop) is settled first, renewed or found
   * lost, so the client is never served a copy as writable that another host took over;
   * a copy out of service (follow.ts) is refused with EPERM, saying why.
   */
  private async inService(volume: Volume): Promise<Volume> {
    const link = this.links.get(volume.name);
    if (link === undefined) return volume;
    if (link.holdsLease && !link.state.readOnly) await link.renewIfDue();
    const why = outOfService(link);
    if (why !== undefined) {
      this.log.warn('refused a client: the volume is out of service on this host', { volume: volume.name, why });
      throw new VolumeError('EPERM', `volume ${volume.name} is out of service on this host: ${why}`);
    }
    return volume;
  }

  /** `work`, with a failure to reach the store restated as "WHAT: the object store URL is unreachable: …". */
  protected async needingStore<T>(what: string, work: () => Promise<T>): Promise<T> {
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
      this.trackFlushMode(link);
      this.log.info('created volume', { volume: name, size, flush_mode: link.state.flushMode });
      return volume;
    }), created: true };
  }

  /** Run `open` unless another call for the name is already opening it; share its result. */
  protected async once(name: string, open: () => Promise<Volume | undefined>): Promise<Volume> {
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
  protected async wakeFrom(name: string, settings: VolumeSettings, written?: WrittenManifest): Promise<Volume | undefined> {
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
      // The manifest's flush mode travels with the volume (a durable volume stays durable on its next host).
      { format: 1, ...this.defaults, ...(meta.flushMode === undefined ? {} : { flushMode: meta.flushMode }), ...settings, readOnly: true, generation: 0, manifestEtag: etag, manifestSequence: meta.sequence },
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
    this.trackFlushMode(link, true);
    this.log.info('woke volume from the store', {
      volume: name, size: meta.size, chunks: volume.mappedChunks, sequence: meta.sequence, writable,
      ms: Math.round(performance.now() - started),
    });
    void fetchBootSet(this.bootSets, volume, meta);
    return volume;
  }

  /**
   * A volume's folder on this host, made from the content of its manifest (its block map
   * taken over): what wake() serves. A folder left by an unfinished wake is replaced.
   * `unpublished`: made before the manifest is written (a fork), so it is marked,
   * and a restart before wake() takes the mark off removes it instead of serving a volume
   * the store may not have.
   */
  protected async createLocal(name: string, meta: ManifestMeta, map: BlockMap, unpublished = false): Promise<Volume> {
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
  protected async opened(name: string, work: Promise<Volume | undefined>): Promise<Volume | undefined> {
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

  /** The folder of volume `name`'s local state on this host. */
  protected volumeDirOf(name: string): string {
    return volumeDir(this.volumesRoot, name);
  }

  protected linkOf(name: string): StoreLink {
    const link = this.links.get(name);
    if (!link) throw new VolumeError('EINVAL', `no volume ${name}`);
    return link;
  }

  /**
   * Serve checkpoint CHECKPOINT of VOLUME read-only as the export VOLUME@CHECKPOINT. Kept
   * under its own folder; it is not recovered at start-up (it is opened again on demand).
   */
  protected async openCheckpoint(exportName: string, volume: string, checkpoint: string): Promise<Volume | undefined> {
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
      this.durableLog.detach(link, 'the volume was reopened');
      const relinked = StoreLink.load(reopened, this.storeCtx, this.defaults);
      this.links.set(name, relinked);
      this.trackFlushMode(relinked);
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
    // A durable volume's new size is in the store before the answer, as a FLUSH's writes are.
    await volume.durableFlush?.(volume.sequence);
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
    if (link) this.durableLog.detach(link, 'the volume left this host');
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
      if (link) this.durableLog.detach(link, 'the volume was purged');
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

  protected checkOpen(): void {
    if (this.closed) throw new VolumeError('ESHUTDOWN', 'the host is shutting down');
  }
}

function checkSize(size: number): void {
  if (!Number.isSafeInteger(size) || size <= 0) throw new VolumeError('EINVAL', `volume size ${size} is not a positive whole number of bytes`);
  if (size % 512 !== 0) throw new VolumeError('EINVAL', `volume size ${size} is not a multiple of 512 bytes`);
  if (size > 2 ** 50) throw new VolumeError('EINVAL', `volume size ${size} is larger than 1 PiB`);
}

/** Every '@' folder below root: one per volume. */
export function findVolumeDirs(root: string): string[] {
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
