// Reused buffers for cold reads (store/fetch.ts): a pack's GET body is read into one, and
// its blocks are opened into another, which the block cache's slab write reads from until
// it lands. Both are on shared memory, so the pack threads (store/pack-threads.ts) read
// and write them in place: no transfer, no copy, and no fresh buffer per pack for the
// garbage collector to chase.

/** New buffers are made in multiples of this, so that packs of slightly different sizes share them. */
const SIZE_STEP = 256 * 1024;

export class PackBufferPool {
  private readonly idle: Buffer[] = [];
  /** The size new buffers are made: the largest asked for so far, rounded up. */
  private size = 0;

  constructor(
    /** Named in errors. */
    private readonly what: string,
    /** Idle buffers kept for reuse; more in use at once are allocated and left to the collector. */
    readonly maxIdle: number,
    /** Larger requests get a buffer of their own that is never kept (a corrupt length asks for anything). */
    readonly maxBytes: number,
  ) {}

  /** A buffer of at least `bytes` bytes on shared memory; give() it back when done with it. */
  take(bytes: number): Buffer {
    if (!Number.isInteger(bytes) || bytes < 0) throw new Error(`${this.what}: a buffer of ${bytes} bytes`);
    // Buffers too small for this request (made for smaller packs) are dropped.
    for (let buffer = this.idle.pop(); buffer !== undefined; buffer = this.idle.pop()) if (buffer.length >= bytes) return buffer;
    if (bytes > this.maxBytes) return Buffer.from(new SharedArrayBuffer(bytes));
    this.size = Math.min(this.maxBytes, Math.max(this.size, Math.ceil(bytes / SIZE_STEP) * SIZE_STEP));
    return Buffer.from(new SharedArrayBuffer(this.size));
  }

  /** A buffer take() returned, no longer read or written by anyone. */
  give(buffer: Buffer): void {
    if (buffer.length <= this.maxBytes && this.idle.length < this.maxIdle) this.idle.push(buffer);
  }

  /** Bytes of the idle buffers kept. */
  get idleBytes(): number {
    let bytes = 0;
    for (const buffer of this.idle) bytes += buffer.length;
    return bytes;
  }
}
