// The block cache's memory tier (DESIGN.md: blocks/): whole blocks copied into an arena
// of block_size slots (blocks/arena.ts), S3-FIFO, never more than memory_size_gb.
import { BlockArena } from './arena.js';
import type { BlockKey } from './block-key.js';
import { S3Fifo } from './s3fifo.js';

export class MemoryTier {
  /** Block → its slot in `arena`. */
  private readonly blocks = new Map<BlockKey, number>();
  private readonly policy: S3Fifo<BlockKey>;
  /** The tier's buffers: at most maxBytes, in block_size slots. */
  private readonly arena: BlockArena;

  constructor(
    private readonly blockSize: number,
    maxBytes: number,
    /** Called for each block evicted to make room. */
    private readonly onEvict: () => void,
  ) {
    this.policy = new S3Fifo(maxBytes);
    this.arena = new BlockArena(blockSize, maxBytes);
  }

  /** Fault the tier's whole arena in on a thread of its own (BlockArena.pretouch). */
  pretouch(): Promise<boolean> {
    return this.arena.pretouch();
  }
  stopTouching(): Promise<void> {
    return this.arena.stopTouching();
  }

  /** Bytes of the blocks in the tier. */
  get bytes(): number {
    return this.policy.size;
  }
  /** Bytes of the buffers the tier keeps alive: its arena's, at most its setting. */
  get heldBytes(): number {
    return this.arena.heldBytes;
  }

  has(key: BlockKey): boolean {
    return this.blocks.has(key);
  }

  /** Copy `length` bytes at `offset` of block `key` into `dst` (a hit); false when it is not here. */
  readInto(key: BlockKey, offset: number, length: number, dst: Buffer, dstOffset: number): boolean {
    const slot = this.blocks.get(key);
    if (slot === undefined) return false;
    this.policy.hit(key);
    this.arena.copyOut(slot, offset, length, dst, dstOffset);
    return true;
  }

  /** The block in place: valid until the caller next yields (its slot may then take another block). */
  view(key: BlockKey): Buffer | undefined {
    const slot = this.blocks.get(key);
    return slot === undefined ? undefined : this.arena.view(slot);
  }

  /** A copy of the block in a buffer of its own. */
  copy(key: BlockKey): Buffer | undefined {
    const slot = this.blocks.get(key);
    return slot === undefined ? undefined : this.arena.copy(slot);
  }

  /**
   * Copy `block` into the tier (an arena slot: the caller keeps its buffer), evicting
   * blocks `evictable` allows as needed, and return the copy there; undefined when the
   * tier cannot take it (with it full of blocks that may not be evicted, it does not).
   * `expectedReads`: reads already expected of it (see S3Fifo.insert).
   */
  admit(key: BlockKey, block: Buffer, evictable: (victim: BlockKey) => boolean, expectedReads = 0): Buffer | undefined {
    if (this.arena.capacity === 0 || block.length > this.blockSize) return undefined;
    const present = this.blocks.get(key);
    if (present !== undefined) return this.arena.view(present);
    let slot = this.arena.allocate();
    while (slot === undefined) {
      const victim = this.policy.evict(evictable);
      if (victim === undefined) return undefined;
      this.onEvict();
      this.drop(victim);
      slot = this.arena.allocate();
    }
    this.arena.fill(slot, block);
    this.blocks.set(key, slot);
    this.policy.insert(key, this.blockSize, expectedReads);
    while (this.policy.overBudget()) {
      const victim = this.policy.evict(evictable);
      if (victim === undefined) break;
      this.onEvict();
      this.drop(victim);
    }
    // Over budget with every other block one that may not be evicted: this one goes instead.
    if (!this.blocks.has(key)) return undefined;
    return this.arena.view(slot);
  }

  /** Take `key` out of the tier. */
  remove(key: BlockKey): void {
    this.drop(key);
    this.policy.remove(key);
  }

  /** Take `key` out of the map and arena (its policy entry is the caller's). */
  private drop(key: BlockKey): void {
    const slot = this.blocks.get(key);
    if (slot === undefined) return;
    this.blocks.delete(key);
    this.arena.release(slot);
  }
}
