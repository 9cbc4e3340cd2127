// The host's background work: the sealer (volumes' overlays into blocks under the seal
// thresholds), writeback of volumes gone idle with unflushed writes, the store tick (lease
// renewals, continuous flushing, folding durable volumes' logs into manifests, the dirty
// budget) and the scrub of the disk cache.
import type { BlockCache } from '../blocks/cache.js';
import { errorMessage, type Logger } from '../log.js';
import type { Volume } from '../volume/volume.js';
import type { HostOptions } from './inventory.js';
import type { StoreLink } from './store-link.js';

const SEAL_TICK_MS = 100;
const SEAL_CHUNKS_PER_STEP = 32;
/** A volume idle this long with unflushed writes is flushed in the background. */
const WRITEBACK_IDLE_MS = 1000;
const STORE_TICK_MS = 250;
/** A durable volume whose log since its manifest holds this much is drained (its log objects then go). */
const FOLD_LOGGED_BYTES = 64 << 20;

/** The timers of the host's background work, over the host's volumes and their store links. */
export class HostSchedulers {
  private sealTimer: NodeJS.Timeout | undefined;
  private storeTimer: NodeJS.Timeout | undefined;
  private scrubTimer: NodeJS.Timeout | undefined;
  private sealing = false;
  private readonly writingBack = new Set<Volume>();
  /** Set by stop(): no tick does anything, and a seal in progress stops at its next step. */
  private stopped = false;

  constructor(
    private readonly options: HostOptions,
    private readonly log: Logger,
    private readonly volumes: ReadonlyMap<string, Volume>,
    private readonly links: ReadonlyMap<string, StoreLink>,
    private readonly cache: BlockCache,
    /** Bytes a durable volume logged since its last manifest (DurableLog.loggedBytes). */
    private readonly loggedBytes: (name: string) => number = () => 0,
  ) {}

  /** Start the timers (the host has recovered its volumes); `log` is the scrub's (the daemon's, not the host's event-recording one). */
  start(log: Logger): void {
    this.sealTimer = setInterval(() => this.sealTick(), SEAL_TICK_MS);
    this.sealTimer.unref();
    this.storeTimer = setInterval(() => this.storeTick(), STORE_TICK_MS);
    this.storeTimer.unref();
    const scrubRate = this.options.scrubBlocksPerSecond ?? 0;
    if (scrubRate > 0) {
      // A few blocks at a time, spread over the second: the scrub must never be felt by readers.
      const steps = Math.min(10, scrubRate);
      let scrubbing = false;
      this.scrubTimer = setInterval(() => {
        if (scrubbing || this.stopped) return;
        scrubbing = true;
        this.cache
          .scrubStep(Math.ceil(scrubRate / steps))
          .catch((err) => log.error('cache scrub failed', { error: errorMessage(err) }))
          .finally(() => {
            scrubbing = false;
          });
      }, 1000 / steps);
      this.scrubTimer.unref();
    }
  }

  /** Stop the timers (the host is closing). */
  stop(): void {
    this.stopped = true;
    if (this.sealTimer) clearInterval(this.sealTimer);
    if (this.storeTimer) clearInterval(this.storeTimer);
    if (this.scrubTimer) clearInterval(this.scrubTimer);
  }

  /** Lease renewals, continuous flushing and the dirty budget. */
  private storeTick(): void {
    if (this.stopped) return;
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
      if (link.state.flushMode === 'durable' && changed && link.holdsLease &&
        (now - link.lastManifestAt >= this.options.continuousManifestIntervalMs || this.loggedBytes(link.name) >= FOLD_LOGGED_BYTES)) {
        // Fold the log into packs and a manifest: the log objects it covers are deleted.
        link.drain().catch((err) => this.log.error('durable mode: drain of the log failed', { volume: link.name, error: errorMessage(err) }));
        continue;
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

  private sealTick(): void {
    if (this.stopped) return;
    const now = Date.now();
    this.writeBackIdle(now);
    if (this.sealing) return;
    const due = [...this.volumes.values()].filter(
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
        if (this.stopped) return;
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
}
