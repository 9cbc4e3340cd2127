// The daemon's host (DESIGN.md: host/): the inventory of volumes open here (inventory.ts),
// the background sealer and flush scheduler (schedulers.ts), and what the API asks of
// volumes through their store links: drain, promotion, release, fork, checkpoints and
// boot hot sets (boot-set.ts). Volumes are recovered from local state at start-up without
// a store request; a volume this host does not have is woken from its manifest in the store.
import path from 'node:path';
import { disk } from '../disk/disk.js';
import { errorMessage, type Logger } from '../log.js';
import { ExistsError, lazyFork, listCheckpoints, manifestBlockMap, MissingError, deleteCheckpoint, type CheckpointInfo } from '../store/catalog.js';
import { manifestKey, type ManifestMeta } from '../store/manifest.js';
import type { StoredTables } from '../store/manifest-seal.js';
import { ZERO_ALLOCATED_KEY, type BlockMap } from '../volume/blockmap.js';
import { checkpointNameProblem, volumeNameProblem } from '../volume/names.js';
import { Volume, VolumeError } from '../volume/volume.js';
import { recordBootInto } from './boot-set.js';
import { findVolumeDirs, HostInventory, UNPUBLISHED, type HostOptions, type VolumeSettings } from './inventory.js';
import { HostSchedulers } from './schedulers.js';
import { ReplicaFollowers, type ReplicaLag } from './follow.js';
import type { Replayed } from './replay.js';
import { StoreLink } from './store-link.js';
import type { DrainResult } from './store-state.js';
export { hostIdentity, type HostOptions, type VolumeSettings, type VolumeSummary } from './inventory.js';

export class Host extends HostInventory {
  /** The sealer, writeback, store tick and cache scrub. */
  private readonly schedulers: HostSchedulers;
  /** Read-only replicas following their writers' manifests. */
  private readonly followers: ReplicaFollowers;

  private constructor(options: HostOptions, log: Logger) {
    super(options, log);
    this.schedulers = new HostSchedulers(options, this.log, this.volumes, this.links, this.cache, (name) => this.durableLog.loggedBytes(name));
    this.followers = new ReplicaFollowers(
      { store: options.store, cipher: options.cipher, manifestCompression: options.manifestCompression, packIndex: this.packIndex, intervalMs: options.replicaFollowIntervalMs ?? 0 },
      this.links,
      this.log.child('replica'),
    );
  }

  protected override replicaLag(link: StoreLink): ReplicaLag | undefined {
    return this.followers.lagOf(link);
  }

  /** As HostInventory.create; a volume woken with its own follow interval starts the followers. */
  override async create(name: string, size: number, settings: VolumeSettings = {}): Promise<{ volume: Volume; created: boolean }> {
    const made = await super.create(name, size, settings);
    this.followers.start();
    return made;
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
        const link = StoreLink.load(volume, host.storeCtx, host.defaults);
        host.links.set(volume.name, link);
        host.volumes.set(volume.name, volume);
        host.trackFlushMode(link);
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
    host.schedulers.start(log);
    host.followers.start();
    return host;
  }

  /** Drain a volume; when the store does not answer, it fails saying so and the volume keeps its changes, writable. */
  drain(name: string): Promise<DrainResult> {
    this.checkOpen();
    const link = this.linkOf(name);
    const drained = this.needingStore(`volume ${name}: drain failed (its changes stay on this host; drain again once the store answers)`, () => link.drain());
    return this.events.track('drain', name, drained, (r) => `drained at sequence ${r.sequence}: ${r.packs_uploaded} packs, ${r.bytes_uploaded} bytes uploaded`);
  }

  promote(name: string): Promise<{ generation: number; sequence: number; replayed?: Replayed }> {
    this.checkOpen();
    const link = this.linkOf(name);
    const promoted = this.needingStore(`volume ${name}: promotion failed`, async () => {
      const result = await link.promote();
      this.trackFlushMode(link, true);
      return result;
    });
    return this.events.track('promotion', name, promoted, (r) =>
      `promoted: this host writes it, generation ${r.generation}` + (r.replayed === undefined ? '' : `; replayed ${r.replayed.records} log records up to sequence ${r.replayed.sequence}`));
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
    opts: { mode: 'consistent' | 'lazy' | 'local'; checkpoint?: string },
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
    if (opts.mode === 'local') {
      if (opts.checkpoint !== undefined) throw new VolumeError('EINVAL', `fork of ${source}: a local fork copies this host's copy, not a checkpoint`);
      const sequence = await this.forkLocal(source, target);
      const result = { target, sequence, mode: 'local', duration_ms: Math.round(performance.now() - started) };
      this.log.info('forked volume', { source, ...result });
      this.events.record('fork', source, `forked this host's copy to ${target} (local) at sequence ${sequence}`);
      return result;
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
   * Local fork: this host's copy of `source` as it is here (its block map and the writes
   * its overlay holds, sealed into blocks first) becomes a new volume `target` on this host,
   * with no store request: how an operator inspects the writes of a copy out of service
   * (follow.ts), which no manifest carries. The target is a new volume that never went to
   * the store (writable, the host's default settings); a drain puts it there.
   */
  private async forkLocal(source: string, target: string): Promise<number> {
    const volume = this.volumes.get(source);
    const sourceLink = this.links.get(source);
    if (!volume || !sourceLink) throw new MissingError(`no volume ${source} is open on this host (a local fork copies this host's copy)`);
    let sequence = 0;
    await this.opened(target, sourceLink.serial(async () => {
      // Sealing is local: the source keeps its content, its overlay becomes blocks (pinned while no pack holds them).
      const snapshot = await volume.snapshot();
      try {
        sequence = snapshot.sequence;
        const dir = this.volumeDirOf(target);
        if (disk.existsSync(dir)) throw new Error(`volume ${target}: local state exists but is not open`);
        const map = snapshot.map.clone();
        const forked = await Volume.createFrom(dir, target, { size: snapshot.size, blockSize: snapshot.blockSize, sequence, map }, this.ctx);
        // Its blocks may exist on this host alone (sealed, never uploaded): the fork holds them as any volume does.
        for (const [, key] of forked.blockNames()) if (key !== ZERO_ALLOCATED_KEY) this.cache.ref(key);
        const link = new StoreLink(forked, { format: 1, ...this.defaults, readOnly: false, generation: 0, manifestSequence: -1 }, this.storeCtx);
        link.save();
        this.links.set(target, link);
        this.volumes.set(target, forked);
        return forked;
      } finally {
        snapshot.release(false);
      }
    }));
    return sequence;
  }

  /**
   * Record the chunks read in the `seconds` after the next read (the guest's boot) and
   * store them beside the manifest as the volume's boot hot set.
   */
  recordBoot(name: string, seconds: number): { volume: string; seconds: number } {
    const volume = this.volumes.get(name);
    if (!volume) throw new MissingError(`no volume ${name} on this host`);
    recordBootInto(this.bootSets, volume, name, seconds);
    return { volume: name, seconds };
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

  /** Change a volume's settings. When they cannot be saved, none of them changes here, and the error says so. */
  setVolumeSettings(name: string, settings: VolumeSettings): void {
    const link = this.linkOf(name);
    const state = link.state as unknown as Record<string, unknown>;
    // The values the call replaces; undefined for a setting the state did not hold.
    const before = Object.keys(settings).map((key) => [key, state[key]] as const);
    Object.assign(link.state, settings);
    try {
      link.save();
    } catch (err) {
      // Otherwise the volume would report the new settings while it runs on the old ones.
      for (const [key, value] of before) {
        if (value === undefined) delete state[key];
        else state[key] = value;
      }
      throw new Error(`volume ${name}: its settings could not be saved, so they are unchanged: ${errorMessage(err)}`);
    }
    this.followers.start();
    this.trackFlushMode(link);
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

  /** Flush and close every volume. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.schedulers.stop();
    this.followers.stop();
    this.durableLog.close();
    await Promise.allSettled([...this.links.values()].map((link) => link.serial(async () => undefined)));
    const results = await Promise.allSettled(this.all().map((v) => v.close()));
    for (const r of results) if (r.status === 'rejected') this.log.error('close failed', { error: errorMessage(r.reason) });
    await this.cache.close();
    await this.packIndex.sync();
    this.packIndex.close();
    await this.options.store.close();
  }
}
