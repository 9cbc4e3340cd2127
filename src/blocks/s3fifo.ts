// S3-FIFO eviction (Yang et al., SOSP'23): a small FIFO that filters one-hit
// wonders, a main FIFO with lazy promotion (a frequency counter, reinsertion instead
// of reordering on hit) and a ghost FIFO of recently evicted keys. O(1) per
// operation; a hit only bumps a counter, so the read path never reorders a list.

interface Entry {
  size: number;
  freq: number;
  inMain: boolean;
}

/** A FIFO of keys with lazy deletion: removed keys stay queued and are skipped on pop. */
export class KeyQueue<K> {
  private items: (K | undefined)[] = [];
  private head = 0;
  push(key: K): void {
    this.items.push(key);
  }
  pop(): K | undefined {
    while (this.head < this.items.length) {
      const key = this.items[this.head];
      this.items[this.head++] = undefined;
      if (this.head > 4096 && this.head * 2 > this.items.length) {
        this.items = this.items.slice(this.head);
        this.head = 0;
      }
      if (key !== undefined) return key;
    }
    return undefined;
  }
  get length(): number {
    return this.items.length - this.head;
  }
}

export class S3Fifo<K> {
  private readonly entries = new Map<K, Entry>();
  private readonly small = new KeyQueue<K>();
  private readonly main = new KeyQueue<K>();
  private readonly ghost = new Set<K>();
  private readonly ghostOrder = new KeyQueue<K>();
  private smallSize = 0;
  private mainSize = 0;

  /** capacity in the caller's units (bytes or slots). */
  constructor(readonly capacity: number) {}

  get size(): number {
    return this.smallSize + this.mainSize;
  }
  get count(): number {
    return this.entries.size;
  }
  has(key: K): boolean {
    return this.entries.has(key);
  }

  /** Record a hit on a cached key; returns false when the key is not cached. */
  hit(key: K): boolean {
    const entry = this.entries.get(key);
    if (!entry) return false;
    if (entry.freq < 3) entry.freq++;
    return true;
  }

  /**
   * Admit a key (not already present). The caller then evicts while `overBudget()`.
   * `freq`: hits already expected (a block read-ahead fetched for a reader), so that it is
   * not taken for a one-hit wonder before the reader gets to it.
   */
  insert(key: K, size: number, freq = 0): void {
    if (this.entries.has(key)) return;
    const toMain = this.ghost.delete(key);
    this.entries.set(key, { size, freq: Math.min(3, freq), inMain: toMain });
    if (toMain) {
      this.main.push(key);
      this.mainSize += size;
    } else {
      this.small.push(key);
      this.smallSize += size;
    }
  }

  remove(key: K): void {
    const entry = this.entries.get(key);
    if (!entry) return;
    this.entries.delete(key);
    if (entry.inMain) this.mainSize -= entry.size;
    else this.smallSize -= entry.size;
    // The key stays queued and is skipped when popped (lazy deletion).
  }

  overBudget(extra = 0): boolean {
    return this.size + extra > this.capacity;
  }

  /**
   * Choose a victim and remove it, or return undefined when nothing may be evicted.
   * `evictable` vetoes keys that must stay (pinned blocks); vetoed keys go back to main.
   */
  evict(evictable: (key: K) => boolean = () => true): K | undefined {
    // Each key can be examined a bounded number of times (freq ≤ 3, one veto per pass).
    let budget = 4 * (this.entries.size + 1);
    while (budget-- > 0 && this.entries.size > 0) {
      const fromSmall = this.smallSize > this.capacity / 10 || this.mainSize === 0;
      const key = fromSmall ? this.small.pop() : this.main.pop();
      if (key === undefined) {
        if (fromSmall && this.mainSize === 0 && this.smallSize === 0) return undefined;
        continue;
      }
      const entry = this.entries.get(key);
      if (!entry || entry.inMain !== !fromSmall) continue; // stale queue slot
      if (fromSmall) {
        this.smallSize -= entry.size;
        if (entry.freq > 0 || !evictable(key)) {
          entry.inMain = true;
          entry.freq = 0;
          this.main.push(key);
          this.mainSize += entry.size;
          continue;
        }
        this.entries.delete(key);
        this.remember(key);
        return key;
      }
      if (entry.freq > 0 || !evictable(key)) {
        if (entry.freq > 0) entry.freq--;
        this.main.push(key);
        continue;
      }
      this.mainSize -= entry.size;
      this.entries.delete(key);
      return key;
    }
    return undefined;
  }

  private remember(key: K): void {
    this.ghost.add(key);
    this.ghostOrder.push(key);
    // The ghost remembers about as many keys as main holds.
    const limit = Math.max(64, this.entries.size);
    while (this.ghost.size > limit) {
      const old = this.ghostOrder.pop();
      if (old === undefined) break;
      this.ghost.delete(old);
    }
  }
}
