// A chunk's sectors (DESIGN.md: overlay): 4 KiB each, and the presence mask that says
// which of them the overlay holds, one bit per sector.

export const SECTOR = 4096;
export const SECTOR_SHIFT = 12;

/** Bytes of a chunk's sector presence mask: one bit per 4 KiB sector, at least one byte. */
export function maskBytesOf(blockSize: number): number {
  return Math.max(1, (blockSize >>> SECTOR_SHIFT) >>> 3);
}

/** Whether sector `sector` of the chunk is present in its mask. */
export function sectorPresent(mask: Uint8Array, sector: number): boolean {
  return (mask[sector >>> 3] & (1 << (sector & 7))) !== 0;
}

/**
 * The end (exclusive) of the run of sectors from `first` that are all present or all
 * absent, as `first` is, stopping at `limit`: the one walk of a mask by runs.
 */
export function sectorRunEnd(mask: Uint8Array, first: number, limit: number): number {
  const present = sectorPresent(mask, first);
  let end = first + 1;
  while (end < limit && sectorPresent(mask, end) === present) end++;
  return end;
}

/** Sectors present in a mask. */
export function popcount(mask: Uint8Array): number {
  let n = 0;
  for (let i = 0; i < mask.length; i++) {
    let b = mask[i];
    while (b) {
      b &= b - 1;
      n++;
    }
  }
  return n;
}

/** Whether every byte is zero (a mask with no sector, a hash naming no block). */
export function isEmpty(bytes: Uint8Array): boolean {
  for (let i = 0; i < bytes.length; i++) if (bytes[i] !== 0) return false;
  return true;
}
