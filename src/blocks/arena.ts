// The memory tier's storage (blocks/cache.ts): a fixed number of block_size slots in a
// few large buffers, allocated when the cache opens (untouched memory: the process grows
// only as the tier fills, unless pretouch() faults it in ahead) and never freed. A block admitted
// to the tier is copied into a slot; an evicted block's slot takes the next one. So the
// tier holds at most memory_size_gb of buffers whatever passes through it, and a cold read
// of a GiB allocates nothing per block (no garbage for V8 to chase, no buffer awaiting a
// collection while the process grows).

import { Worker } from 'node:worker_threads';

/** Slots per buffer: large enough that a GiB tier is a few dozen buffers, small enough that a small tier allocates little. */
const SLOTS_PER_SEGMENT = 64;

export class BlockArena {
  /** Most slots: the tier's setting in whole blocks. */
  readonly capacity: number;
  private readonly segments: Buffer[] = [];
  /** Bytes each slot holds now (a short last block of a volume holds fewer than block_size). */
  private readonly lengths: Uint32Array;
  private readonly free: number[] = [];
  private highWater = 0;

  /** The buffer pretouch() has on its thread, whose slots allocate() does not hand out meanwhile; -1 for none. */
  private away = -1;
  /** The pretouch() running, and whether it was asked to stop. */
  private touching: Promise<boolean> | undefined;
  private stopTouch = false;

  constructor(
    readonly blockSize: number,
    maxBytes: number,
  ) {
    this.capacity = Math.max(0, Math.floor(maxBytes / blockSize));
    this.lengths = new Uint32Array(this.capacity);
    // All at once: the collector hears of the tier's memory once, not at every step as it fills.
    for (let first = 0; first < this.capacity; first += SLOTS_PER_SEGMENT) {
      this.segments.push(Buffer.allocUnsafeSlow(Math.min(SLOTS_PER_SEGMENT, this.capacity - first) * blockSize));
    }
  }

  /**
   * Fault the arena's pages in on a thread of its own, so that filling the tier later
   * (a cold read, a seal) pays no page faults on the event loop. Its buffers go to the
   * thread one at a time (moved, not shared: copies between shared buffers are slow in V8)
   * from the last down, and only those with no slot handed out yet. Resolves true when every
   * page is in, or false at the next buffer's turn once stopTouching() asks.
   */
  pretouch(): Promise<boolean> {
    if (this.touching !== undefined) throw new Error('block arena: pretouch is already running');
    this.stopTouch = false;
    const touching = this.touchAll().finally(() => {
      this.touching = undefined;
    });
    this.touching = touching;
    return touching;
  }

  /** Stop a pretouch() that is running, once its buffer on the thread is back. */
  async stopTouching(): Promise<void> {
    this.stopTouch = true;
    await this.touching?.catch(() => undefined);
  }

  private async touchAll(): Promise<boolean> {
    const toucher = new Worker(new URL('./arena-touch-worker.js', import.meta.url), {
      resourceLimits: { maxOldGenerationSizeMb: 8, maxYoungGenerationSizeMb: 2 },
    });
    toucher.unref();
    try {
      for (let s = this.segments.length - 1; s >= 0; s--) {
        if (this.stopTouch) return false;
        // Slots of it are handed out: they, and all below, faulted in as they filled.
        if (s * SLOTS_PER_SEGMENT < this.highWater) break;
        this.away = s;
        const size = this.segments[s].length;
        try {
          const buffer = this.segments[s].buffer as ArrayBuffer; // allocUnsafeSlow: an ArrayBuffer of its own
          const back = new Promise<ArrayBuffer>((resolve, reject) => {
            // An error ends the thread too: 'exit' follows it.
            const exited = (code: number) => reject(new Error(`block arena: the thread touching the arena exited (code ${code})`));
            toucher.once('exit', exited);
            toucher.once('message', (touched: ArrayBuffer) => {
              toucher.off('exit', exited);
              resolve(touched);
            });
          });
          toucher.postMessage(buffer, [buffer]);
          this.segments[s] = Buffer.from(await back);
        } catch (err) {
          // The thread kept it: a fresh buffer takes its place (no slot of it was in use).
          if (this.segments[s].length !== size) this.segments[s] = Buffer.allocUnsafeSlow(size);
          throw err;
        } finally {
          this.away = -1;
        }
      }
      return true;
    } finally {
      await toucher.terminate();
    }
  }

  /** Bytes of the tier's buffers: capacity × block_size (resident as far as they were filled or faulted in). */
  get heldBytes(): number {
    // Not the buffers' lengths: the one pretouch() has on its thread reads as empty meanwhile.
    return this.capacity * this.blockSize;
  }

  /**
   * A free slot, or undefined when all `capacity` are taken, or the rest are on
   * pretouch()'s thread for a moment (the caller evicts one and releases it).
   */
  allocate(): number | undefined {
    const slot = this.free.pop();
    if (slot !== undefined) return slot;
    if (this.highWater >= this.capacity) return undefined;
    if (Math.floor(this.highWater / SLOTS_PER_SEGMENT) === this.away) return undefined;
    return this.highWater++;
  }

  release(slot: number): void {
    this.lengths[slot] = 0;
    this.free.push(slot);
  }

  /** Copy `block` (at most block_size bytes) into `slot`. */
  fill(slot: number, block: Buffer): void {
    if (block.length > this.blockSize) throw new Error(`block arena: a ${block.length}-byte block for ${this.blockSize}-byte slots`);
    const [segment, at] = this.locate(slot);
    block.copy(segment, at);
    this.lengths[slot] = block.length;
  }

  /** Copy `length` bytes at `offset` of the block in `slot` into `dst` at `dstOffset` (fewer past a short block's end). */
  copyOut(slot: number, offset: number, length: number, dst: Buffer, dstOffset: number): void {
    // Past a short block's end nothing is copied, as Buffer.copy of the block itself would.
    const end = Math.min(offset + length, this.lengths[slot]);
    if (end <= offset) return;
    const [segment, at] = this.locate(slot);
    segment.copy(dst, dstOffset, at + offset, at + end);
  }

  /** The block in `slot`, in place: valid until the slot is released. */
  view(slot: number): Buffer {
    const [segment, at] = this.locate(slot);
    return segment.subarray(at, at + this.lengths[slot]);
  }

  /** A copy of the block in `slot`, in a buffer of its own (the slot may take another block once the caller awaits anything). */
  copy(slot: number): Buffer {
    const out = Buffer.allocUnsafe(this.lengths[slot]);
    this.copyOut(slot, 0, out.length, out, 0);
    return out;
  }

  private locate(slot: number): [Buffer, number] {
    return [this.segments[Math.floor(slot / SLOTS_PER_SEGMENT)], (slot % SLOTS_PER_SEGMENT) * this.blockSize];
  }
}
