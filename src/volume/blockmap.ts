// A volume's block map: chunk index -> 16-byte block name. Sparse and paged: pages of
// 1024 entries (16 KiB) exist only where something was written, so memory grows with
// written chunks, not with the disk size, and a lookup is two array steps. An all-zero
// entry means "no block" (reads as zeros). Pages are shared copy-on-write between a map
// and its clones (a same-host fork), so a fork costs memory only for what it writes.
import { HASH_BYTES, ZERO_ALLOCATED_HASH } from '../crypto/hash.js';
import type { BlockKey } from '../blocks/cache.js';

const PAGE_SHIFT = 10;
const PAGE_CHUNKS = 1 << PAGE_SHIFT;
const PAGE_MASK = PAGE_CHUNKS - 1;
const PAGE_BYTES = PAGE_CHUNKS * HASH_BYTES;

export const ZERO_ALLOCATED_KEY: BlockKey = ZERO_ALLOCATED_HASH.toString('latin1');

function isEmptyEntry(page: Buffer, at: number): boolean {
  for (let i = 0; i < HASH_BYTES; i++) if (page[at + i] !== 0) return false;
  return true;
}

export class BlockMap {
  private readonly pages = new Map<number, Buffer>();
  private readonly pageCounts = new Map<number, number>();
  /**
   * Pages this map shares with a clone (or the map it was cloned from): copied before
   * this map changes them, so a fork holds only the pages it has written.
   */
  private readonly shared = new Set<number>();
  /** Chunks that name a block (or the allocated-zero sentinel). */
  count = 0;

  /**
   * A copy that shares every page with this map until either side writes it: O(pages)
   * (64 for 8 GiB mapped), not O(chunks). A same-host fork's map.
   */
  clone(): BlockMap {
    const copy = new BlockMap();
    for (const [pageIndex, page] of this.pages) {
      copy.pages.set(pageIndex, page);
      this.shared.add(pageIndex);
      copy.shared.add(pageIndex);
    }
    for (const [pageIndex, n] of this.pageCounts) copy.pageCounts.set(pageIndex, n);
    copy.count = this.count;
    return copy;
  }

  /** The page `pageIndex` (which exists), this map's own: copied first if it is shared. */
  private ownPage(pageIndex: number): Buffer {
    const page = this.pages.get(pageIndex)!;
    if (!this.shared.has(pageIndex)) return page;
    const own = Buffer.from(page);
    this.pages.set(pageIndex, own);
    this.shared.delete(pageIndex);
    return own;
  }

  /**
   * The chunks whose block differs from `base` (a clone this map was made from, or that
   * was made from it), ascending, with their block here (undefined: a hole here). Pages
   * still shared with `base` are skipped unread: a shared page is never changed in place,
   * so the work is the pages written since the clone.
   */
  changesSince(base: BlockMap): Array<[number, BlockKey | undefined]> {
    const indexes = new Set<number>([...this.pages.keys(), ...base.pages.keys()]);
    const changes: Array<[number, BlockKey | undefined]> = [];
    for (const pageIndex of [...indexes].sort((a, b) => a - b)) {
      const mine = this.pages.get(pageIndex);
      const theirs = base.pages.get(pageIndex);
      if (mine === theirs) continue;
      for (let i = 0; i < PAGE_CHUNKS; i++) {
        const at = i * HASH_BYTES;
        const here = mine !== undefined && !isEmptyEntry(mine, at);
        const there = theirs !== undefined && !isEmptyEntry(theirs, at);
        if (!here && !there) continue;
        if (here && there && mine.compare(theirs, at, at + HASH_BYTES, at, at + HASH_BYTES) === 0) continue;
        changes.push([pageIndex * PAGE_CHUNKS + i, here ? mine.toString('latin1', at, at + HASH_BYTES) : undefined]);
      }
    }
    return changes;
  }

  /** Pages in memory (16 KiB each), and how many of them are shared with clones. */
  get pageCount(): number {
    return this.pages.size;
  }
  get sharedPages(): number {
    return this.shared.size;
  }

  /** The block named by `chunk`, or undefined for a hole. */
  get(chunk: number): BlockKey | undefined {
    const page = this.pages.get(chunk >>> PAGE_SHIFT);
    if (page === undefined) return undefined;
    const at = (chunk & PAGE_MASK) * HASH_BYTES;
    if (isEmptyEntry(page, at)) return undefined;
    return page.toString('latin1', at, at + HASH_BYTES);
  }

  /** Point `chunk` at a block; undefined makes it a hole. Returns the previous name. */
  set(chunk: number, key: BlockKey | undefined): BlockKey | undefined {
    const pageIndex = chunk >>> PAGE_SHIFT;
    let page = this.pages.get(pageIndex);
    const at = (chunk & PAGE_MASK) * HASH_BYTES;
    let previous: BlockKey | undefined;
    if (page !== undefined && !isEmptyEntry(page, at)) previous = page.toString('latin1', at, at + HASH_BYTES);
    if (key === undefined) {
      if (previous === undefined) return undefined;
      this.count--;
      const left = this.pageCounts.get(pageIndex)! - 1;
      if (left === 0) {
        this.pages.delete(pageIndex);
        this.pageCounts.delete(pageIndex);
        this.shared.delete(pageIndex);
      } else {
        this.ownPage(pageIndex).fill(0, at, at + HASH_BYTES);
        this.pageCounts.set(pageIndex, left);
      }
      return previous;
    }
    if (page === undefined) {
      page = Buffer.alloc(PAGE_BYTES);
      this.pages.set(pageIndex, page);
      this.pageCounts.set(pageIndex, 0);
    } else page = this.ownPage(pageIndex);
    page.write(key, at, HASH_BYTES, 'latin1');
    if (previous === undefined) {
      this.count++;
      this.pageCounts.set(pageIndex, this.pageCounts.get(pageIndex)! + 1);
    }
    return previous;
  }

  /**
   * Point `chunk` at the block named by the 16 bytes at `bytes[offset..]`, which must not
   * be all zero, on a chunk that is a hole: the fast fill of a new map (no key string is made).
   */
  fillBytes(chunk: number, bytes: Uint8Array, offset: number): void {
    const pageIndex = chunk >>> PAGE_SHIFT;
    let page = this.pages.get(pageIndex);
    if (page === undefined) {
      page = Buffer.alloc(PAGE_BYTES);
      this.pages.set(pageIndex, page);
      this.pageCounts.set(pageIndex, 0);
    }
    const at = (chunk & PAGE_MASK) * HASH_BYTES;
    if (!isEmptyEntry(page, at)) throw new Error(`BlockMap.fillBytes: chunk ${chunk} is mapped already`);
    page = this.ownPage(pageIndex);
    for (let i = 0; i < HASH_BYTES; i++) page[at + i] = bytes[offset + i];
    this.count++;
    this.pageCounts.set(pageIndex, this.pageCounts.get(pageIndex)! + 1);
  }

  /** Whether any chunk in [first, first + PAGE_CHUNKS) aligned page names a block. */
  pageHasBlocks(chunk: number): boolean {
    return this.pages.has(chunk >>> PAGE_SHIFT);
  }

  static readonly PAGE_CHUNKS = PAGE_CHUNKS;

  /** Every (chunk, name) pair, by ascending chunk. */
  *entries(): IterableIterator<[number, BlockKey]> {
    for (const [pageIndex, page] of this.pagesInOrder()) {
      for (let i = 0; i < PAGE_CHUNKS; i++) {
        const at = i * HASH_BYTES;
        if (!isEmptyEntry(page, at)) yield [pageIndex * PAGE_CHUNKS + i, page.toString('latin1', at, at + HASH_BYTES)];
      }
    }
  }

  /**
   * The pages, by ascending chunk: [page index, 16 bytes per chunk of the page, all zero
   * for a hole]. The buffers are the map's own: read them before the map changes.
   */
  pagesInOrder(): Array<[number, Buffer]> {
    return [...this.pages].sort((a, b) => a[0] - b[0]);
  }
}
