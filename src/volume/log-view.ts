// A replica's view of its writer's durable log (DESIGN.md: replica; host/follow-log.ts):
// the sectors that the log entries newer than the served manifest wrote, laid over the
// block map when a read copies its bytes. A view never changes once built: a newer one
// replaces it in one assignment, so a read sees one view or the next, never a mix.
import { SECTOR, SECTOR_SHIFT } from './sectors.js';

/** One log entry as a view takes it: its sequence, and its extents in the order written. */
export interface ViewEntry {
  readonly sequence: number;
  readonly extents: ReadonlyArray<{ readonly offset: number; readonly length: number; readonly zero: boolean; readonly data?: Buffer }>;
}

export class LogView {
  /** The last entry's sequence: the state the view serves. */
  readonly sequence: number;
  /** Entries laid over the block map. */
  readonly entries: number;
  /** Sector data the view holds (zeroed sectors take none). */
  readonly bytes: number;
  /** chunk → sector in chunk → its newest data (null: zeros). A partial last sector of the volume is shorter. */
  private readonly chunks = new Map<number, Map<number, Buffer | null>>();
  private readonly sectorsPerChunk: number;

  /**
   * The view of `entries` (ascending sequence, none empty) on a volume of `blockSize`
   * chunks; later entries overwrite earlier ones sector by sector. Extents start on a
   * sector and cover whole sectors but at the volume's end (as a log commit cuts them).
   */
  constructor(entries: readonly ViewEntry[], blockSize: number) {
    if (entries.length === 0) throw new Error('a log view needs at least one entry');
    this.sectorsPerChunk = blockSize >>> SECTOR_SHIFT;
    let previous = -Infinity;
    for (const entry of entries) {
      if (entry.sequence < previous) throw new Error(`log view: entry of sequence ${entry.sequence} after ${previous} (entries must ascend)`);
      previous = entry.sequence;
      for (const extent of entry.extents) {
        if (extent.offset % SECTOR !== 0) throw new Error(`log view: an extent at ${extent.offset} does not start on a ${SECTOR}-byte sector`);
        for (let at = 0; at < extent.length; at += SECTOR) {
          const sector = (extent.offset + at) / SECTOR;
          const chunk = Math.floor(sector / this.sectorsPerChunk);
          let sectors = this.chunks.get(chunk);
          if (sectors === undefined) this.chunks.set(chunk, (sectors = new Map()));
          sectors.set(sector - chunk * this.sectorsPerChunk, extent.zero ? null : extent.data!.subarray(at, Math.min(extent.length, at + SECTOR)));
        }
      }
    }
    let bytes = 0;
    for (const sectors of this.chunks.values()) for (const data of sectors.values()) bytes += data === null ? 0 : data.length;
    this.sequence = previous;
    this.entries = entries.length;
    this.bytes = bytes;
  }

  /** Whether the view holds a sector of `chunk`. */
  has(chunk: number): boolean {
    return this.chunks.has(chunk);
  }

  /** Lay the view over [offset, offset + length) of the volume, already read into dst at dstOffset. */
  patch(offset: number, length: number, dst: Buffer, dstOffset: number): void {
    const end = offset + length;
    const chunkBytes = this.sectorsPerChunk * SECTOR;
    for (let chunk = Math.floor(offset / chunkBytes); chunk * chunkBytes < end; chunk++) {
      const sectors = this.chunks.get(chunk);
      if (sectors === undefined) continue;
      for (const [inChunk, data] of sectors) {
        const from = chunk * chunkBytes + inChunk * SECTOR;
        const sectorEnd = from + (data === null ? SECTOR : data.length);
        const lo = Math.max(from, offset);
        const hi = Math.min(sectorEnd, end);
        if (lo >= hi) continue;
        const to = dstOffset + (lo - offset);
        if (data === null) dst.fill(0, to, to + (hi - lo));
        else data.copy(dst, to, lo - from, hi - from);
      }
    }
  }
}
