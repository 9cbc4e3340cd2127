// A volume's overlay (DESIGN.md: overlay): which sectors of which chunks hold data in the
// overlay file, and the bytes they count against the host's disk budget. The data itself
// is in the overlay file, at chunk index × block size (the volume reads and writes it).
import type { LocalSpace } from '../blocks/cache.js';
import { popcount, SECTOR } from './sectors.js';

export class Overlay {
  /** Overlay chunks: chunk index -> sector presence mask, in the order they entered. */
  private readonly masks = new Map<number, Uint8Array>();
  /** Sectors present over all chunks. */
  private sectors = 0;

  constructor(
    private readonly space: LocalSpace,
    private readonly maskBytes: number,
  ) {}

  /** Chunks in the overlay. */
  get size(): number {
    return this.masks.size;
  }
  /** Bytes of overlay data (not yet sealed into blocks). */
  get bytes(): number {
    return this.sectors * SECTOR;
  }
  get(chunk: number): Uint8Array | undefined {
    return this.masks.get(chunk);
  }
  has(chunk: number): boolean {
    return this.masks.has(chunk);
  }
  keys(): IterableIterator<number> {
    return this.masks.keys();
  }
  [Symbol.iterator](): IterableIterator<[number, Uint8Array]> {
    return this.masks.entries();
  }

  /** A chunk enters the overlay with the sectors of `mask` (which it takes over). */
  add(chunk: number, mask: Uint8Array): void {
    this.masks.set(chunk, mask);
    const sectors = popcount(mask);
    this.sectors += sectors;
    this.space.overlayBytes += sectors * SECTOR;
  }

  /** A chunk leaves the overlay (sealed, trimmed, zeroed, or the volume let go). */
  drop(chunk: number): void {
    const mask = this.masks.get(chunk);
    if (mask === undefined) return;
    this.masks.delete(chunk);
    const sectors = popcount(mask);
    this.sectors -= sectors;
    this.space.overlayBytes -= sectors * SECTOR;
  }

  /** Sectors first..last of a chunk now hold their data in the overlay; returns how many were not present before. */
  setPresent(chunk: number, first: number, last: number): number {
    let mask = this.masks.get(chunk);
    if (mask === undefined) {
      mask = new Uint8Array(this.maskBytes);
      this.masks.set(chunk, mask);
    }
    let added = 0;
    for (let s = first; s <= last; s++) {
      const bit = 1 << (s & 7);
      if ((mask[s >>> 3] & bit) === 0) {
        mask[s >>> 3] |= bit;
        added++;
      }
    }
    if (added > 0) {
      this.sectors += added;
      this.space.overlayBytes += added * SECTOR;
    }
    return added;
  }
}
