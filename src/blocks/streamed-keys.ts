// Which blocks fetched for a sequential reader were kept in the memory tier only
// (blocks/cache.ts: putPackFromStore). A stream reads most blocks once, so writing each into
// the slab on first touch costs a slab write per block fetched for nothing; the store holds
// them, so not writing them loses nothing. A block streamed again after it left the memory
// tier is written to the slab then: it is read more than once, beyond the memory tier's reach.
import { KeyQueue } from './s3fifo.js';
import type { BlockKey } from './block-key.js';

export class StreamedKeys {
  private readonly keys = new Set<BlockKey>();
  private readonly order = new KeyQueue<BlockKey>();

  /** `limit`: the most keys remembered; the oldest are forgotten first. */
  constructor(readonly limit: number) {}

  get size(): number {
    return this.keys.size;
  }

  /** Whether `key` was streamed into memory only before (and forget it: its next admission writes the slab). */
  take(key: BlockKey): boolean {
    return this.keys.delete(key);
  }

  /** Remember that `key` was streamed into the memory tier without a slab write. */
  add(key: BlockKey): void {
    if (this.keys.has(key)) return;
    this.keys.add(key);
    this.order.push(key);
    // A key taken and added again is queued twice: the queue too stays within 2 × limit
    // (forgetting a key early only means one more memory-only admission).
    while (this.keys.size > this.limit || this.order.length > 2 * this.limit) {
      const old = this.order.pop();
      if (old === undefined) break;
      this.keys.delete(old);
    }
  }
}
