// The memory tier's storage (blocks/cache.ts): a fixed number of block_size slots in a
// few large buffers, allocated when the cache opens (untouched memory: the process grows
// only as the tier fills) and never freed. A block admitted
// to the tier is copied into a slot; an evicted block's slot takes the next one. So the
// tier holds at most memory_size_gb of buffers whatever passes through it, and a cold read
// of a GiB allocates nothing per block (no garbage for V8 to chase, no buffer awaiting a
// collection while the process grows).

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

  /** Bytes of the tier's buffers: capacity × block_size (resident only as far as they were filled). */
  get heldBytes(): number {
    let bytes = 0;
    for (const segment of this.segments) bytes += segment.length;
    return bytes;
  }

  /** A free slot, or undefined when all `capacity` are taken (the caller evicts one and releases it). */
  allocate(): number | undefined {
    const slot = this.free.pop();
    if (slot !== undefined) return slot;
    if (this.highWater >= this.capacity) return undefined;
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
