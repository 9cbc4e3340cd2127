// The disk budget of what exists only on this host (DESIGN.md: blocks/, disk_size_gb):
// overlay sectors and pinned blocks, with a reserve for rewrites.

/** Share of the disk budget kept for rewrites of data that already has a block. */
const REWRITE_RESERVE = 0.05;

/**
 * Bytes of local disk that only exist here: overlay sectors plus pinned blocks, against
 * the disk budget. Rewrites of data that already has a block may also use a reserve
 * above the budget: a full disk must not stop a guest rewriting its own journal, and the
 * seal that follows releases the old block, giving the room back.
 */
export class LocalSpace {
  overlayBytes = 0;
  pinnedBytes = 0;
  /** Overlay bytes of writes in flight on the thread pool, counted until their sectors are present. */
  writingBytes = 0;
  readonly reserve: number;
  constructor(
    readonly capacity: number,
    blockSize: number,
  ) {
    this.reserve = Math.max(capacity * REWRITE_RESERVE, 4 * blockSize);
  }
  get used(): number {
    return this.overlayBytes + this.pinnedBytes + this.writingBytes;
  }
  /** Whether `extra` bytes of new local-only data fit; `rewrite` may use the reserve. */
  fits(extra: number, rewrite = false): boolean {
    return this.used + extra <= this.capacity + (rewrite ? this.reserve : 0);
  }
}
