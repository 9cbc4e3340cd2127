// Requests that cannot be answered as they are parsed: reads (and unaligned writes,
// zeroes, cache hints) waiting for blocks from the store, and FLUSH or FUA waiting for
// fdatasync. Each holds its header, a closure and, for a write, its payload until it is
// served. They are bounded per connection and per host (DESIGN.md invariant 7): at the
// bound a connection stops parsing and its socket stops being read, so a client that
// pipelines without limit is held back by TCP, never queued in memory.

/** Deferred requests one connection may have before its socket is no longer read. */
export const MAX_DEFERRED_PER_CONNECTION = 64;
/** Deferred requests of every connection on the host together. */
export const MAX_DEFERRED_PER_HOST = 1024;

/** The host-wide count of deferred requests, with the connections waiting for room. */
export class DeferredRequests {
  /** Deferred now, every connection together. */
  count = 0;
  /** The highest `count` seen. */
  peak = 0;
  /** The most any one connection had deferred at once. */
  connectionPeak = 0;
  /** Connections held back by the host bound, woken when a request anywhere finishes. */
  private readonly waiting = new Set<() => void>();

  constructor(
    readonly perConnection = MAX_DEFERRED_PER_CONNECTION,
    readonly perHost = MAX_DEFERRED_PER_HOST,
  ) {
    if (perConnection < 1 || perHost < perConnection) {
      throw new Error(`deferred request bounds: ${perConnection} per connection, ${perHost} per host (need 1 <= per connection <= per host)`);
    }
  }

  /** Whether a connection with `mine` deferred requests may parse another request. */
  hasRoom(mine: number): boolean {
    return mine < this.perConnection && this.count < this.perHost;
  }

  /** A connection that now has `mine` deferred requests took one more. */
  take(mine: number): void {
    this.count++;
    if (this.count > this.perHost || mine > this.perConnection) {
      throw new Error(`deferred requests past their bound: ${mine} on a connection (max ${this.perConnection}), ${this.count} on the host (max ${this.perHost})`);
    }
    if (this.count > this.peak) this.peak = this.count;
    if (mine > this.connectionPeak) this.connectionPeak = mine;
  }

  /** A deferred request was answered (or its connection closed). */
  release(): void {
    this.count--;
    if (this.waiting.size === 0) return;
    const woken = [...this.waiting];
    this.waiting.clear();
    for (const wake of woken) wake();
  }

  /** Call `wake` once the next deferred request anywhere finishes. */
  waitForRoom(wake: () => void): void {
    this.waiting.add(wake);
  }

  forget(wake: () => void): void {
    this.waiting.delete(wake);
  }
}
