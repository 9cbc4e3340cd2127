// A volume's read path (DESIGN.md: Read): sectors present in the overlay come from the
// overlay file, the rest from the block the block map names (zeros for a hole), fetched
// from the store first when it is not on this host; read-ahead for a sequential reader,
// boot recording, and base:allocation extents.
import { keyHex, type BlockKey, type LaterRead } from '../blocks/cache.js';
import { disk } from '../disk/disk.js';
import { addRun } from '../disk/runs.js';
import { BlockMap, ZERO_ALLOCATED_KEY } from './blockmap.js';
import { readAt } from './overlay-file.js';
import { SECTOR, SECTOR_SHIFT, sectorPresent, sectorRunEnd } from './sectors.js';
import { EXTENT_DATA, EXTENT_HOLE, EXTENT_ZERO, VolumeError, VolumeState } from './state.js';

/**
 * How a read takes bytes from the overlay file and the slab: with a pread that may wait for
 * the device ('wait'), only if the page cache holds them ('now'), or later through the
 * thread pool (the overlay's runs and the slab's reads are gathered, then read together).
 */
type FileReads = 'wait' | 'now' | { runs: number[]; blocks: LaterRead[] };

/** Fetches a waiting read makes before it gives up on blocks that keep leaving the cache. */
const READ_FETCH_ROUNDS = 8;

/** The read path of a volume, on its state. */
export abstract class VolumeReads extends VolumeState {
  /**
   * Before a read: undefined when every block the range needs is on this host (the
   * common case, checked without allocating), else a promise that fetches the missing
   * ones from the store. Also drives read-ahead for a sequential reader.
   *
   * The fetched blocks stay on the host until the event loop's next turn (BlockFetcher.fetch),
   * so the caller asks again with `round` (1, 2, ...) in a continuation of the promise and
   * reads in the same tick as an undefined answer; a new round fetches what the block map
   * named meanwhile. A round past READ_FETCH_ROUNDS is an EIO.
   *
   * A slot loaded at start-up and not read since is checked against its name first: on
   * the event loop, or with `checkLater` through the thread pool, the promise waiting for
   * it (a client's read: a device read on the event loop would hold every volume).
   */
  readReady(offset: number, length: number, round = 0, checkLater = false): Promise<void> | undefined {
    if (round > 0) {
      const missing = this.fetcher === undefined ? undefined : this.missingBlocks(offset, length, false, checkLater);
      if (missing === undefined) return undefined;
      if (round >= READ_FETCH_ROUNDS) {
        throw new VolumeError('EIO', `volume ${this.name}: read at ${offset}+${length}: block ${keyHex(missing[0])} left the cache again after ${round} fetches`);
      }
      return this.fetchBlocks(missing);
    }
    if (this.bootRecord !== undefined) this.recordBootRead(offset, length);
    if (this.fetcher === undefined) return undefined;
    const sequential = offset === this.nextReadOffset;
    this.nextReadOffset = offset + length;
    const missing = this.missingBlocks(offset, length, false, checkLater);
    if (sequential) this.readAhead(offset + length);
    else this.prefetchedUntil = -1;
    return missing === undefined ? undefined : this.fetchBlocks(missing);
  }

  /**
   * Before an unaligned write (or a partial zero): the sectors it widens into come from
   * the base block, which must be on this host.
   */
  writeReady(offset: number, length: number): Promise<void> | undefined {
    if (this.fetcher === undefined || ((offset | length) & (SECTOR - 1)) === 0) return undefined;
    const bs = this.blockSize;
    const first = Math.floor(offset / bs);
    const last = Math.floor((offset + length - 1) / bs);
    const missing = this.missingBlocks(first * bs, bs);
    const missingLast = last !== first ? this.missingBlocks(last * bs, bs) : undefined;
    if (missing === undefined && missingLast === undefined) return undefined;
    return this.fetchBlocks([...(missing ?? []), ...(missingLast ?? [])]);
  }

  /**
   * Record which chunks are read during the `seconds` after the next read (the guest's
   * boot), then hand the list to `done`. One recording at a time.
   */
  recordBoot(seconds: number, done: (chunks: number[]) => void): void {
    if (this.bootRecord !== undefined) throw new VolumeError('EINVAL', `volume ${this.name}: a boot recording is already running`);
    this.bootRecord = { windowMs: seconds * 1000, started: 0, chunks: new Set(), done };
  }

  private recordBootRead(offset: number, length: number): void {
    const record = this.bootRecord!;
    const now = Date.now();
    if (record.started === 0) {
      record.started = now;
      setTimeout(() => this.finishBootRecord(record), record.windowMs).unref();
    } else if (now - record.started > record.windowMs) {
      this.finishBootRecord(record);
      return;
    }
    const last = Math.floor((offset + length - 1) / this.blockSize);
    for (let chunk = Math.floor(offset / this.blockSize); chunk <= last; chunk++) record.chunks.add(chunk);
  }

  private finishBootRecord(record: NonNullable<VolumeState['bootRecord']>): void {
    if (this.bootRecord !== record) return;
    this.bootRecord = undefined;
    record.done([...record.chunks].sort((a, b) => a - b));
  }

  /** The blocks of these chunks that are not on this host (for a boot hot set fetch). */
  missingBlocksOf(chunks: readonly number[]): BlockKey[] {
    const out = new Set<BlockKey>();
    for (const chunk of chunks) {
      const key = this.map.get(chunk);
      if (key !== undefined && key !== ZERO_ALLOCATED_KEY && !this.cache.has(key)) out.add(key);
    }
    return [...out];
  }

  /** Blocks of the range's chunks that are neither local nor shadowed by the overlay. */
  private missingBlocks(offset: number, length: number, ahead = false, checkLater = false): BlockKey[] | undefined {
    let missing: BlockKey[] | undefined;
    const bs = this.blockSize;
    const last = Math.floor((offset + length - 1) / bs);
    for (let chunk = Math.floor(offset / bs); chunk <= last; chunk++) {
      const key = this.map.get(chunk);
      // A block about to be read that was loaded at start-up is checked now, or with
      // `checkLater` through the thread pool (fetchBlocks); read-ahead only asks.
      if (key === undefined || key === ZERO_ALLOCATED_KEY) continue;
      if (ahead ? this.cache.has(key) : checkLater ? this.cache.ready(key) : this.cache.usable(key)) continue;
      (missing ??= []).push(key);
    }
    return missing;
  }

  /** Keep `read_ahead_packs` packs' worth of chunks ahead of a sequential reader fetched. */
  private readAhead(end: number): void {
    const window = this.fetcher!.readAheadChunks;
    if (window === 0) return;
    const chunk = Math.floor(end / this.blockSize);
    if (chunk + window / 2 < this.prefetchedUntil) return;
    const from = Math.max(chunk, this.prefetchedUntil + 1);
    const to = Math.min(chunk + window, Math.ceil(this.size / this.blockSize) - 1);
    this.prefetchedUntil = to;
    if (from > to) return;
    const ahead = this.missingBlocks(from * this.blockSize, (to - from + 1) * this.blockSize, true);
    if (ahead !== undefined) this.fetcher!.prefetch(ahead);
  }

  /**
   * Bring these blocks onto this host: those in slots loaded at start-up and not yet read
   * are checked against their names where they are; the rest, and any a check found
   * corrupt, are fetched from the store.
   */
  protected async fetchBlocks(keys: readonly BlockKey[]): Promise<void> {
    let absent = keys;
    const unchecked = keys.filter((key) => this.cache.unchecked(key));
    if (unchecked.length > 0) {
      try {
        await this.cache.check(unchecked);
      } catch (err) {
        throw new VolumeError('EIO', `volume ${this.name}: ${(err as Error).message}`);
      }
      absent = keys.filter((key) => !this.cache.ready(key));
    }
    if (absent.length === 0) return;
    if (this.fetcher === undefined) {
      throw new VolumeError('EIO', `volume ${this.name}: block ${keyHex(absent[0])} is not on this host`);
    }
    try {
      await this.fetcher.fetch(absent);
    } catch (err) {
      throw new VolumeError('EIO', `volume ${this.name}: ${(err as Error).message}`);
    }
  }

  /** Copy [offset, offset + length) into dst at dstOffset. The caller checked the range. */
  read(offset: number, length: number, dst: Buffer, dstOffset: number): void {
    this.checkOpen();
    this.readRange(offset, length, dst, dstOffset, 'wait');
    this.logView?.patch(offset, length, dst, dstOffset);
  }

  /**
   * read(), unless bytes of the overlay or the slab it needs are not all in the page cache
   * (the host dropped them): then false, with `dst` partly written, and the caller reads
   * with readLater instead of holding the event loop for the device.
   */
  readNow(offset: number, length: number, dst: Buffer, dstOffset: number): boolean {
    this.checkOpen();
    if (!this.readRange(offset, length, dst, dstOffset, 'now')) return false;
    this.logView?.patch(offset, length, dst, dstOffset);
    return true;
  }

  /**
   * As read(), with the overlay's and the slab's preads through the thread pool, so the
   * copies out of the page cache, or the waits for the device, leave the event loop free: a
   * large read, or one readNow found would wait. Which sectors come from where is decided
   * now and memory copies are made now; the overlay file's bytes of a sector never move,
   * and a block's bytes never change while its slot holds it. A block that leaves the
   * cache meanwhile makes the answer false (the caller asks readReady again and reads
   * once more).
   */
  async readLater(offset: number, length: number, dst: Buffer, dstOffset: number): Promise<boolean> {
    this.checkOpen();
    // The view the map was read under, laid over the file's bytes once they are in.
    const view = this.logView;
    const later = { runs: [] as number[], blocks: [] as LaterRead[] };
    this.readRange(offset, length, dst, dstOffset, later);
    // Every read settles before a failure is thrown: none writes into `dst` after that.
    const [overlay, slab] = await Promise.allSettled([
      this.readRuns(later.runs, dst, `read of ${length} bytes at ${offset} from`),
      later.blocks.length === 0 ? true : this.cache.readIntoLater(dst, later.blocks),
    ]);
    if (overlay.status === 'rejected') throw overlay.reason;
    if (slab.status === 'rejected') throw new VolumeError('EIO', `volume ${this.name}: ${(slab.reason as Error).message}`);
    if (!slab.value) return false;
    view?.patch(offset, length, dst, dstOffset);
    return true;
  }

  /** The overlay runs readRange noted ([file position, dst offset, length]), through the thread pool. */
  private async readRuns(runs: readonly number[], dst: Buffer, what: string): Promise<void> {
    if (runs.length === 0) return;
    const preads: Array<Promise<void>> = [];
    for (let i = 0; i < runs.length; i += 3) preads.push(readAt(this.overlayFd, dst, runs[i + 1], runs[i + 2], runs[i]));
    await this.overlayIo(Promise.all(preads), what);
  }

  /**
   * The reads' common walk: overlay sectors and base blocks are read as `how` says. False
   * when it is 'now' and a pread would wait for the device.
   */
  private readRange(offset: number, length: number, dst: Buffer, dstOffset: number, how: FileReads): boolean {
    const bs = this.blockSize;
    while (length > 0) {
      const chunk = Math.floor(offset / bs);
      const inChunk = offset - chunk * bs;
      const n = Math.min(length, bs - inChunk);
      const mask = this.overlay.get(chunk);
      if (!(mask === undefined ? this.readSlab(chunk, inChunk, n, dst, dstOffset, how) : this.readMixed(chunk, mask, inChunk, n, dst, dstOffset, how))) return false;
      offset += n;
      dstOffset += n;
      length -= n;
    }
    return true;
  }

  /** Read part of a chunk whose overlay holds some sectors: runs of present / absent. */
  private readMixed(chunk: number, mask: Uint8Array, inChunk: number, n: number, dst: Buffer, dstOffset: number, how: FileReads): boolean {
    const end = inChunk + n;
    const endSector = (end + SECTOR - 1) >>> SECTOR_SHIFT;
    let at = inChunk;
    while (at < end) {
      const sector = at >>> SECTOR_SHIFT;
      const present = sectorPresent(mask, sector);
      let runEnd = sectorRunEnd(mask, sector, endSector) << SECTOR_SHIFT;
      if (runEnd > end) runEnd = end;
      const len = runEnd - at;
      const to = dstOffset + (at - inChunk);
      if (!present) {
        if (!this.readSlab(chunk, at, len, dst, to, how)) return false;
      } else if (typeof how === 'string') {
        if (!this.readOverlay(chunk, at, len, dst, to, how === 'now')) return false;
      } else addRun(how.runs, chunk * this.blockSize + at, to, len);
      at = runEnd;
    }
    return true;
  }

  /** Read from the chunk's sealed block (zeros for a hole) as `how` says. */
  private readSlab(chunk: number, inChunk: number, len: number, dst: Buffer, dstOffset: number, how: FileReads): boolean {
    const key = this.map.get(chunk);
    if (key === undefined || key === ZERO_ALLOCATED_KEY) {
      dst.fill(0, dstOffset, dstOffset + len);
      return true;
    }
    if (typeof how !== 'string') {
      how.blocks.push({ key, offset: inChunk, length: len, dstOffset });
      return true;
    }
    const found = how === 'wait' ? this.cache.readInto(key, inChunk, len, dst, dstOffset) : this.cache.readIntoNow(key, inChunk, len, dst, dstOffset);
    if (found === false) throw new VolumeError('EIO', `volume ${this.name}: block ${keyHex(key)} of chunk ${chunk} is not on this host`);
    return found === true;
  }

  /** Read overlay sectors; with `now`, false instead when they are not all in the page cache. */
  protected readOverlay(chunk: number, inChunk: number, len: number, dst: Buffer, dstOffset: number, now = false): boolean {
    const position = chunk * this.blockSize + inChunk;
    const n = now ? disk.readNowSync(this.overlayFd, dst, dstOffset, len, position) : disk.readSync(this.overlayFd, dst, dstOffset, len, position);
    if (n === undefined) return false;
    if (n !== len) {
      throw new VolumeError('EIO', `volume ${this.name}: overlay short read at chunk ${chunk} (${n} of ${len} bytes)`);
    }
    return true;
  }

  /** Read from the chunk's sealed block (zeros for a hole). */
  protected readBase(chunk: number, inChunk: number, len: number, dst: Buffer, dstOffset: number): void {
    this.readSlab(chunk, inChunk, len, dst, dstOffset, 'wait');
  }

  // ---- extents ------------------------------------------------------------------------

  /**
   * base:allocation extents from `offset`, merged, at most `maxExtents` of them and at
   * most `maxChunks` chunks examined (the spec lets a reply cover less than asked).
   */
  extents(offset: number, length: number, maxExtents = 1024, maxChunks = 1 << 16): Array<{ length: number; flags: number }> {
    this.checkOpen();
    const bs = this.blockSize;
    const out: Array<{ length: number; flags: number }> = [];
    const end = offset + length;
    let examined = 0;
    while (offset < end && examined < maxChunks) {
      const chunk = Math.floor(offset / bs);
      let stop: number;
      let flags: number;
      if (this.overlay.size === 0 && this.logView === undefined && !this.map.pageHasBlocks(chunk)) {
        // A whole page of holes: skip it in one step.
        const pageEnd = (Math.floor(chunk / BlockMap.PAGE_CHUNKS) + 1) * BlockMap.PAGE_CHUNKS;
        stop = Math.min(end, pageEnd * bs);
        flags = EXTENT_HOLE;
      } else {
        stop = Math.min(end, (chunk + 1) * bs);
        if (this.overlay.has(chunk) || this.logView?.has(chunk) === true) flags = EXTENT_DATA;
        else {
          const key = this.map.get(chunk);
          flags = key === undefined ? EXTENT_HOLE : key === ZERO_ALLOCATED_KEY ? EXTENT_ZERO : EXTENT_DATA;
        }
      }
      examined++;
      const last = out[out.length - 1];
      if (last !== undefined && last.flags === flags) last.length += stop - offset;
      else {
        if (out.length >= maxExtents) break;
        out.push({ length: stop - offset, flags });
      }
      offset = stop;
    }
    return out;
  }
}
