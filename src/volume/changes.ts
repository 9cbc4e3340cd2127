// The sectors of a volume written, trimmed or zeroed since a point (a durable volume's last
// logged point): one presence mask per chunk touched, as the overlay keeps. Bounded by the
// chunks changed, never by the disk size.
import { SECTOR, SECTOR_SHIFT, maskBytesOf, popcount, sectorPresent, sectorRunEnd } from './sectors.js';

/** Longest extent handed out: a log extent's length is a u32. */
const MAX_EXTENT_BYTES = 1 << 30;

export class ChangedSectors {
  private masks = new Map<number, Uint8Array>();
  private readonly sectorsPerChunk: number;
  private readonly maskBytes: number;
  /** Sectors marked (a sector marked twice counts once). */
  private sectors = 0;

  constructor(readonly blockSize: number) {
    this.sectorsPerChunk = blockSize >>> SECTOR_SHIFT;
    this.maskBytes = maskBytesOf(blockSize);
  }

  get size(): number {
    return this.masks.size;
  }

  /** Bytes of the sectors marked. */
  get bytes(): number {
    return this.sectors * SECTOR;
  }

  /** Mark every sector [offset, offset + length) touches. */
  add(offset: number, length: number): void {
    if (length <= 0) return;
    const first = Math.floor(offset / SECTOR);
    const last = Math.floor((offset + length - 1) / SECTOR);
    for (let sector = first; sector <= last; ) {
      const chunk = Math.floor(sector / this.sectorsPerChunk);
      let mask = this.masks.get(chunk);
      if (mask === undefined) this.masks.set(chunk, (mask = new Uint8Array(this.maskBytes)));
      const end = Math.min(last + 1, (chunk + 1) * this.sectorsPerChunk);
      for (let s = sector - chunk * this.sectorsPerChunk; sector < end; s++, sector++) {
        const bit = 1 << (s & 7);
        if ((mask[s >>> 3] & bit) === 0) {
          mask[s >>> 3] |= bit;
          this.sectors++;
        }
      }
    }
  }

  /** Hand the marks over (to a commit) and start empty. */
  take(): ChangedSectors {
    const taken = new ChangedSectors(this.blockSize);
    taken.masks = this.masks;
    taken.sectors = this.sectors;
    this.masks = new Map();
    this.sectors = 0;
    return taken;
  }

  /** Mark again what `other` marked (a commit that failed gives its marks back). */
  merge(other: ChangedSectors): void {
    for (const [chunk, theirs] of other.masks) {
      const mine = this.masks.get(chunk);
      if (mine === undefined) {
        this.masks.set(chunk, theirs);
        this.sectors += popcount(theirs);
        continue;
      }
      const before = popcount(mine);
      for (let i = 0; i < mine.length; i++) mine[i] |= theirs[i];
      this.sectors += popcount(mine) - before;
    }
  }

  /** The marked ranges by ascending offset, adjacent sectors joined (across chunks), cut at `size`. */
  extents(size: number): Array<{ offset: number; length: number }> {
    const out: Array<{ offset: number; length: number }> = [];
    for (const chunk of [...this.masks.keys()].sort((a, b) => a - b)) {
      const mask = this.masks.get(chunk)!;
      for (let s = 0; s < this.sectorsPerChunk; ) {
        const end = sectorRunEnd(mask, s, this.sectorsPerChunk);
        if (sectorPresent(mask, s)) {
          const offset = chunk * this.blockSize + s * SECTOR;
          const length = Math.min(size, chunk * this.blockSize + end * SECTOR) - offset;
          const last = out[out.length - 1];
          if (length <= 0) break;
          if (last !== undefined && last.offset + last.length === offset && last.length + length <= MAX_EXTENT_BYTES) last.length += length;
          else out.push({ offset, length });
        }
        s = end;
      }
    }
    return out;
  }
}
