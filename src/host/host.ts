// The daemon's inventory (DESIGN.md: host/): which volumes are open here, the shared
// block cache, and the background sealer. Volumes are recovered from local state at
// start-up; nothing here talks to the object store yet.
import fs from 'node:fs';
import path from 'node:path';
import { BlockCache } from '../blocks/cache.js';
import { errorMessage, type Logger } from '../log.js';
import { volumeNameProblem } from '../volume/names.js';
import { Volume, VolumeError, type VolumeContext } from '../volume/volume.js';

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
}

export interface VolumeSummary {
  name: string;
  size: number;
  clients: number;
  readOnly: boolean;
  sequence: number;
  dirtyBytes: number;
  mappedChunks: number;
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

export class Host {
  readonly cache: BlockCache;
  private readonly volumes = new Map<string, Volume>();
  private readonly opening = new Map<string, Promise<Volume | undefined>>();
  private readonly ctx: VolumeContext;
  private readonly volumesRoot: string;
  private sealTimer: NodeJS.Timeout | undefined;
  private sealing = false;
  private readonly writingBack = new Set<Volume>();
  private closed = false;

  private constructor(
    readonly options: HostOptions,
    private readonly log: Logger,
  ) {
    this.volumesRoot = path.join(options.cacheDir, 'volumes');
    this.cache = BlockCache.open(
      path.join(options.cacheDir, 'blocks'),
      { blockSize: options.blockSize, diskBytes: options.diskBytes, memoryBytes: options.memoryBytes },
      log.child('cache'),
    );
    this.ctx = { cache: this.cache, log: log.child('volume'), scratch: Buffer.alloc(options.blockSize) };
  }

  /** Open the cache and recover every volume found under the cache dir. */
  static open(options: HostOptions, log: Logger): Host {
    const host = new Host(options, log);
    const started = performance.now();
    fs.mkdirSync(host.volumesRoot, { recursive: true });
    for (const dir of findVolumeDirs(host.volumesRoot)) {
      const t0 = performance.now();
      try {
        if (!fs.existsSync(path.join(dir, 'journal'))) {
          log.warn('removing an unfinished volume create', { dir });
          fs.rmSync(dir, { recursive: true, force: true });
          continue;
        }
        const volume = Volume.load(dir, host.ctx);
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
    return host;
  }

  list(): VolumeSummary[] {
    return [...this.volumes.values()]
      .sort((a, b) => a.name.localeCompare(b.name))
      .map((v) => ({
        name: v.name, size: v.size, clients: v.clients, readOnly: v.readOnly, sequence: v.sequence,
        dirtyBytes: v.dirtyBytes, mappedChunks: v.mappedChunks,
      }));
  }

  get(name: string): Volume | undefined {
    return this.volumes.get(name);
  }

  /** An open volume by a client-supplied name, which is checked first. */
  peek(name: string): Volume | undefined {
    const problem = volumeNameProblem(name);
    if (problem) throw new VolumeError('EINVAL', problem);
    return this.volumes.get(name);
  }

  all(): Volume[] {
    return [...this.volumes.values()];
  }

  /**
   * The volume to serve for an export name: an open one, or a new one when auto-create
   * is on. Undefined when the name is unknown and auto-create is off.
   */
  async openForClient(name: string): Promise<Volume | undefined> {
    const problem = volumeNameProblem(name);
    if (problem) throw new VolumeError('EINVAL', problem);
    const open = this.volumes.get(name);
    if (open) return open;
    if (this.options.autoCreateBytes <= 0) return undefined;
    return this.create(name, this.options.autoCreateBytes);
  }

  /** Create a volume; concurrent creates of one name share the work. */
  async create(name: string, size: number): Promise<Volume> {
    this.checkOpen();
    const problem = volumeNameProblem(name);
    if (problem) throw new VolumeError('EINVAL', problem);
    checkSize(size);
    const existing = this.volumes.get(name);
    if (existing) return existing;
    const pending = this.opening.get(name);
    if (pending) return (await pending)!;
    const work = (async () => {
      const dir = volumeDir(this.volumesRoot, name);
      if (fs.existsSync(path.join(dir, 'journal'))) throw new Error(`volume ${name}: local state exists but is not open`);
      const volume = Volume.create(dir, name, size, this.options.blockSize, this.ctx);
      this.volumes.set(name, volume);
      this.log.info('created volume', { volume: name, size });
      return volume;
    })();
    this.opening.set(name, work);
    try {
      return (await work)!;
    } finally {
      this.opening.delete(name);
    }
  }

  async resize(name: string, size: number): Promise<Volume> {
    const volume = this.volumes.get(name);
    if (!volume) throw new VolumeError('EINVAL', `no volume ${name}`);
    checkSize(size);
    await volume.resize(size);
    this.log.info('resized volume', { volume: name, size });
    return volume;
  }

  /** Stop serving a volume here and remove its local state. */
  async remove(name: string): Promise<void> {
    const volume = this.volumes.get(name);
    if (!volume) return;
    this.volumes.delete(name);
    await volume.destroy();
    this.log.info('removed volume', { volume: name });
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
      if (!volume.unflushed || now - volume.lastWriteAt < WRITEBACK_IDLE_MS || this.writingBack.has(volume)) continue;
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
    const results = await Promise.allSettled(this.all().map((v) => v.close()));
    for (const r of results) if (r.status === 'rejected') this.log.error('close failed', { error: errorMessage(r.reason) });
    await this.cache.close();
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
    for (const entry of fs.readdirSync(dir, { withFileTypes: true })) {
      if (!entry.isDirectory()) continue;
      const full = path.join(dir, entry.name);
      if (entry.name === '@') out.push(full);
      else walk(full, depth + 1);
    }
  };
  walk(root, 0);
  return out;
}
