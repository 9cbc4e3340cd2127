// One volume (DESIGN.md: volume/): block map, overlay, sequence; read, write, flush,
// trim, zero, extents; sealing; local persistence and recovery.
//
// Local state lives in one folder:
//   volume.json  identity: name, block size, creation time (never rewritten)
//   overlay      sparse file; chunk i's written sectors at i × block_size
//   journal      durable block map + overlay masks + size + sequence (journal.ts)
//
// Small requests are synchronous: pread/pwrite of a few sectors into the page cache take
// microseconds, less than a trip through the libuv thread pool. Large aligned writes
// (writeLarge) go through the pool, so the kernel's copy runs on another core while the
// event loop reads the next request. FLUSH (fdatasync) and FUA wait.
//
// The Volume is built up by its paths, each extending the one before: state.ts (its state
// and the changes every path shares), read.ts, write.ts, seal.ts (seal, snapshot),
// flush.ts (flush, recovery); this file creates, loads and closes it.
import { disk, fsyncPath } from '../disk/disk.js';
import { injected } from '../faults/injected.js';
import path from 'node:path';
import { blockKey, type BlockKey } from '../blocks/cache.js';
import { BlockMap, ZERO_ALLOCATED_KEY } from './blockmap.js';
import { VolumeFlushes } from './flush.js';
import { Journal, loggedBytesOf, type JournalStats } from './journal.js';
import type { LogView } from './log-view.js';
import { isEmpty, maskBytesOf } from './sectors.js';
import { VolumeError, type VolumeContext, type VolumeIdentity } from './state.js';

export { SECTOR } from './sectors.js';
export {
  EXTENT_DATA, EXTENT_HOLE, EXTENT_ZERO, VolumeError, type BlockFetcher, type VolumeContext, type VolumeErrorCode, type VolumeSnapshot,
} from './state.js';

export class Volume extends VolumeFlushes {
  private constructor(
    name: string,
    dir: string,
    identity: VolumeIdentity,
    overlayFd: number,
    journal: Journal,
    size: number,
    sequence: number,
    ctx: VolumeContext,
  ) {
    super(name, dir, identity, overlayFd, journal, size, sequence, ctx);
  }

  /** Create a new, empty volume in `dir` (which must not hold one). Durable on return. */
  static async create(dir: string, name: string, size: number, blockSize: number, ctx: VolumeContext, initial?: { map: BlockMap; sequence: number }): Promise<Volume> {
    disk.mkdirSync(dir, { recursive: true });
    const identity: VolumeIdentity = { format: 1, name, blockSize, created: new Date().toISOString() };
    // The journal is written last: a folder without a valid journal is an unfinished create.
    const identityPath = path.join(dir, 'volume.json');
    disk.writeFileSync(identityPath + '.tmp', JSON.stringify(identity, null, 2) + '\n');
    await fsyncPath(identityPath + '.tmp');
    disk.renameSync(identityPath + '.tmp', identityPath);
    const overlayFd = disk.openSync(path.join(dir, 'overlay'), 'w+');
    const journal = await Journal.create(path.join(dir, 'journal'), blockSize, maskBytesOf(blockSize), size, initial);
    await fsyncPath(dir);
    const volume = new Volume(name, dir, identity, overlayFd, journal, size, initial?.sequence ?? 0, ctx);
    if (initial !== undefined) volume.map = initial.map;
    return volume;
  }

  /**
   * Create a volume on this host from the block map of a manifest in the store (the
   * volume takes `map` over): the map is journaled, the blocks stay in the store until
   * read. Durable on return.
   *
   * No block references are taken: they only keep pinned blocks (held by no pack) alive,
   * and every block a manifest names is in a pack (invariant 2), so a local copy freed
   * early is fetched again. A fork of a volume with 8 GiB written opens without touching
   * the cache for each of its 65,536 blocks. (A restart takes references as for any volume.)
   */
  static createFrom(
    dir: string,
    name: string,
    content: { size: number; blockSize: number; sequence: number; map: BlockMap },
    ctx: VolumeContext,
  ): Promise<Volume> {
    return Volume.create(dir, name, content.size, content.blockSize, ctx, { map: content.map, sequence: content.sequence });
  }

  private fill(chunks: Iterable<[number, BlockKey]>): void {
    for (const [chunk, key] of chunks) {
      this.map.set(chunk, key);
      if (key !== ZERO_ALLOCATED_KEY) this.cache.ref(key);
    }
  }

  /**
   * Replace a read-only volume's content with a newer block map (promotion: the data of
   * the latest manifest). Clients stay connected and read the new content at once.
   */
  async replaceContent(content: { size: number; sequence: number; chunks: Iterable<[number, BlockKey]> }): Promise<void> {
    this.checkOpen();
    if (this.overlay.size > 0 || this.sealing.size > 0) {
      throw new VolumeError('EINVAL', `volume ${this.name}: cannot replace content with local writes pending`);
    }
    for (const [chunk, key] of [...this.map.entries()]) {
      this.map.set(chunk, undefined);
      if (key !== ZERO_ALLOCATED_KEY) this.pendingUnref.push(key);
    }
    this.fill(content.chunks);
    this.size = Math.max(this.size, content.size);
    this.sequence = content.sequence;
    this.prefetchedUntil = -1;
    await this.flushTail;
    const unrefs = this.pendingUnref;
    this.pendingUnref = [];
    this.journalDirty.clear();
    const frozen = this.frozenState();
    try {
      await this.journal.rewrite(frozen.map, frozen.overlay, this.sequence, this.size, this.blockSize);
    } catch (err) {
      // Memory holds the new content and the disk the old: the volume fails, as at any failed sync.
      this.pendingUnref.push(...unrefs);
      throw this.fail(`replacing its content: ${(err as Error).message}`);
    }
    this.journalSequence = content.sequence;
    for (const key of unrefs) this.cache.unref(key);
  }

  /**
   * A replica takes a newer manifest of its writer (host/follow.ts): `content.map` (taken
   * over) replaces the block map in one assignment, so a read, which takes all its bytes
   * in one tick, sees the old map or the new one, never a mix. Only the chunks whose block
   * changed are journaled; the blocks they no longer name are released once that is durable.
   */
  async followManifest(content: { size: number; sequence: number; map: BlockMap }, logView?: LogView): Promise<void> {
    this.checkOpen();
    // A failed volume cannot journal the new map: it keeps serving the one its disk holds.
    if (this.failure !== undefined) throw this.failedError();
    if (this.overlay.size > 0 || this.sealing.size > 0) {
      throw new VolumeError('EINVAL', `volume ${this.name}: cannot take a newer manifest with local writes pending`);
    }
    const previous = this.map;
    const changes = content.map.changesSince(previous);
    // The writer's log entries past the new manifest (if any) come with it, in the same step.
    this.map = content.map;
    this.logView = logView;
    if (content.size > this.size) {
      this.size = content.size;
      this.sizeDirty = true;
    }
    this.sequence = content.sequence;
    this.prefetchedUntil = -1;
    for (const [chunk, key] of changes) {
      const old = previous.get(chunk);
      if (old !== undefined && old !== ZERO_ALLOCATED_KEY) this.pendingUnref.push(old);
      if (key !== undefined && key !== ZERO_ALLOCATED_KEY) this.cache.ref(key);
      this.journalDirty.add(chunk);
    }
    await this.flush();
  }

  /**
   * Serve a replica's view of its writer's log over the block map (undefined: none), in one
   * assignment. Only a volume with no local write takes one; a promotion drops it once the
   * same entries are replayed into the overlay.
   */
  setLogView(view: LogView | undefined): void {
    this.checkOpen();
    if (view !== undefined && (this.overlay.size > 0 || this.sealing.size > 0)) {
      throw new VolumeError('EINVAL', `volume ${this.name}: cannot serve its writer's log with local writes pending`);
    }
    this.logView = view;
  }

  /** The view of the writer's log served over the block map (a durable volume's replica), if any. */
  get servedLog(): LogView | undefined {
    return this.logView;
  }

  /** The sequence of the state served: the block map's, or the writer's log entry laid over it. */
  get servedSequence(): number {
    return Math.max(this.sequence, this.logView?.sequence ?? -1);
  }

  /** Recover a volume from its folder: replay the journal, take block references. */
  static load(dir: string, ctx: VolumeContext): Volume {
    const identityPath = path.join(dir, 'volume.json');
    let identity: VolumeIdentity;
    try {
      identity = JSON.parse(disk.readFileSync(identityPath, 'utf8'));
    } catch (err) {
      throw new Error(`volume folder ${dir}: cannot read volume.json: ${(err as Error).message}`);
    }
    if (identity.format !== 1 || typeof identity.name !== 'string' || typeof identity.blockSize !== 'number') {
      throw new Error(`volume folder ${dir}: volume.json is not a format 1 volume identity`);
    }
    const { journal, state } = Journal.open(path.join(dir, 'journal'), identity.blockSize, maskBytesOf(identity.blockSize));
    const overlayFd = disk.openSync(path.join(dir, 'overlay'), 'r+');
    const volume = new Volume(identity.name, dir, identity, overlayFd, journal, state.size, state.sequence, ctx);
    // A killed process may have left overlay writes and journal batches in the page cache
    // only: the next FLUSH makes what was loaded durable, even with nothing dirty since.
    volume.recoveredUnsynced = !injected.has('recover-without-sync');
    let missing = 0;
    for (const record of state.chunks.values()) {
      if (!isEmpty(record.hash)) {
        const key = blockKey(record.hash);
        volume.map.set(record.chunk, key);
        if (key !== ZERO_ALLOCATED_KEY && !ctx.cache.ref(key) && !ctx.fetcher?.knows(key)) missing++;
      }
      if (!isEmpty(record.mask)) volume.overlay.add(record.chunk, record.mask);
    }
    if (state.logged.length > 0 && !injected.has('replay-skip-logged')) {
      // The journal's reserve past its last batch is at least the logged bytes: freed, it
      // holds the overlay space they take again, whatever a power cut left of it.
      journal.releaseReserve();
      volume.applyLogged(state.logged);
      ctx.log.info('laid logged writes over the overlay (FLUSHes that synced the journal alone)', {
        volume: identity.name, writes: state.logged.length, bytes: loggedBytesOf(state.logged),
      });
    }
    if (volume.recoveredUnsynced && !injected.has('recover-without-rewrite')) volume.redirtyOverlay();
    if (missing > 0) {
      ctx.log.error('volume names blocks that neither the local cache nor the store holds; reads of those chunks fail with EIO', {
        volume: identity.name, missing,
      });
    }
    if (state.truncatedBytes > 0) {
      ctx.log.warn('cut a torn batch off the journal tail (writes after the last FLUSH)', {
        volume: identity.name, bytes: state.truncatedBytes,
      });
    }
    return volume;
  }

  // ---- accounting -----------------------------------------------------------------

  /** Bytes of overlay data not yet sealed into blocks. */
  get dirtyBytes(): number {
    return this.overlay.bytes;
  }
  get dirtyChunks(): number {
    return this.overlay.size;
  }
  /** Whether anything changed since the last journal commit, or logged writes wait for the overlay's sync (a full flush would have work). */
  get unflushed(): boolean {
    return this.journalDirty.size > 0 || this.sizeDirty || this.recoveredUnsynced || this.logDebt || this.sequence !== this.journalSequence;
  }
  /** Replaced blocks waiting for a journal commit before they can be released. */
  get pendingReleases(): number {
    return this.pendingUnref.length;
  }
  get mappedChunks(): number {
    return this.map.count;
  }
  /** Records handed to the journal and its rewrites (the work of flushes and compaction). */
  get journalStats(): Readonly<JournalStats> {
    return this.journal.stats;
  }
  /** The block map now, sharing its pages copy-on-write: the base of the next incremental manifest. */
  cloneMap(): BlockMap {
    return this.map.clone();
  }

  /**
   * Every (chunk, block name) of the block map, by ascending chunk, read as the iteration
   * goes (no copy): a walk spread over time sees a mix of old and new (usage estimates only).
   */
  blockNames(): IterableIterator<[number, BlockKey]> {
    return this.map.entries();
  }

  /** Block map pages in memory, and those shared copy-on-write with a same-host fork or its parent. */
  get mapPages(): { total: number; shared: number } {
    return { total: this.map.pageCount, shared: this.map.sharedPages };
  }
  /** Bytes of chunks changed since the last snapshot that reached the store (at most). */
  get storeDirtyBytes(): number {
    return this.storeDirty.size * this.blockSize;
  }

  // ---- lifecycle ------------------------------------------------------------------------

  /** Grow the volume; durable on return. Shrinking is refused. */
  async resize(size: number): Promise<void> {
    this.checkWritable();
    if (size < this.size) throw new VolumeError('EINVAL', `volume ${this.name}: cannot shrink from ${this.size} to ${size} bytes`);
    if (size === this.size) return;
    // A resize is a change like a write: the next drain or release must write a manifest.
    this.size = size;
    this.sequence++;
    this.sizeDirty = true;
    await this.flush();
  }

  /** Flush and release the files. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closing = true;
    // Seals and large reads and writes in progress use the overlay file: they finish before it is closed.
    await Promise.allSettled([...this.sealsInFlight, ...this.ioInFlight]);
    // A failed volume keeps its last good journal: what changed since is not written.
    if (this.failure === undefined) await this.flush();
    this.closed = true;
    disk.closeSync(this.overlayFd);
    this.journal.close();
  }

  /** Forget the volume on this host: drop its block references and remove its folder. */
  async destroy(): Promise<void> {
    this.closing = true;
    await Promise.allSettled([...this.sealsInFlight, ...this.ioInFlight]);
    if (!this.closed) {
      this.closed = true;
      disk.closeSync(this.overlayFd);
      this.journal.close();
    }
    // The folder goes first: once it is gone nothing can name these blocks again. Its
    // removal is made durable: a power cut must not bring back a folder whose disk space
    // a later recovery counts on (laying logged writes over an overlay takes space).
    disk.rmSync(this.dir, { recursive: true, force: true });
    await fsyncPath(path.dirname(this.dir));
    this.releaseHeld();
  }

  /**
   * After close, once the folder was loaded again (a reopen): drop the block references
   * and overlay bytes this instance held; the new one took its own from the journal.
   */
  releaseHeld(): void {
    if (!this.closed) throw new Error(`volume ${this.name}: releaseHeld before close`);
    for (const [, key] of this.map.entries()) if (key !== ZERO_ALLOCATED_KEY) this.cache.unref(key);
    for (const key of this.pendingUnref) this.cache.unref(key);
    this.pendingUnref = [];
    for (const chunk of [...this.overlay.keys()]) this.overlay.drop(chunk);
  }
}
