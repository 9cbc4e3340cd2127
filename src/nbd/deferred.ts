// Requests that cannot be answered as they are parsed: reads (and unaligned writes,
// zeroes, cache hints) waiting for blocks from the store, and FLUSH or FUA waiting for
// fdatasync. Each holds its header, a closure and, for a write, its payload until it is
// served. They are bounded per connection and per host (DESIGN.md invariant 7): at the
// bound a connection stops parsing and its socket stops being read, so a client that
// pipelines without limit is held back by TCP, never queued in memory.
import { MAX_PAYLOAD } from './protocol.js';

/** Deferred requests one connection may have before its socket is no longer read. */
export const MAX_DEFERRED_PER_CONNECTION = 64;
/** Deferred requests of every connection on the host together. */
export const MAX_DEFERRED_PER_HOST = 1024;
/**
 * Bytes deferred requests hold (write payloads, large reads' reply buffers), per connection and per host. Checked
 * before a request is parsed, so one request's payload (MAX_PAYLOAD) may go past it.
 */
export const MAX_DEFERRED_BYTES_PER_CONNECTION = 64 * 1024 * 1024;
export const MAX_DEFERRED_BYTES_PER_HOST = 512 * 1024 * 1024;

/** The host-wide count of deferred requests, with the connections waiting for room. */
export class DeferredRequests {
  /** Deferred now, every connection together. */
  count = 0;
  /** The highest `count` seen. */
  peak = 0;
  /** The most any one connection had deferred at once. */
  connectionPeak = 0;
  /** Bytes (write payloads, read replies) deferred now, every connection together, and the most at once (host; one connection). */
  bytes = 0;
  bytesPeak = 0;
  connectionBytesPeak = 0;
  /** Connections held back by the host bound, woken when a request anywhere finishes. */
  private readonly waiting = new Set<() => void>();

  constructor(
    readonly perConnection = MAX_DEFERRED_PER_CONNECTION,
    readonly perHost = MAX_DEFERRED_PER_HOST,
    readonly bytesPerConnection = MAX_DEFERRED_BYTES_PER_CONNECTION,
    readonly bytesPerHost = MAX_DEFERRED_BYTES_PER_HOST,
  ) {
    if (perConnection < 1 || perHost < perConnection) {
      throw new Error(`deferred request bounds: ${perConnection} per connection, ${perHost} per host (need 1 <= per connection <= per host)`);
    }
  }

  /** Whether a connection with `mine` deferred requests holding `mineBytes` may parse another request. */
  hasRoom(mine: number, mineBytes: number): boolean {
    return mine < this.perConnection && this.count < this.perHost && mineBytes < this.bytesPerConnection && this.bytes < this.bytesPerHost;
  }

  /** A connection that now has `mine` deferred requests holding `mineBytes` took one more, holding `bytes`. */
  take(mine: number, mineBytes: number, bytes: number): void {
    this.count++;
    this.bytes += bytes;
    if (this.count > this.perHost || mine > this.perConnection || this.bytes > this.bytesPerHost + MAX_PAYLOAD || mineBytes > this.bytesPerConnection + MAX_PAYLOAD) {
      throw new Error(
        `deferred requests past their bound: ${mine} holding ${mineBytes} bytes on a connection (max ${this.perConnection}, ${this.bytesPerConnection} bytes), ` +
          `${this.count} holding ${this.bytes} bytes on the host (max ${this.perHost}, ${this.bytesPerHost} bytes)`,
      );
    }
    if (this.count > this.peak) this.peak = this.count;
    if (mine > this.connectionPeak) this.connectionPeak = mine;
    if (this.bytes > this.bytesPeak) this.bytesPeak = this.bytes;
    if (mineBytes > this.connectionBytesPeak) this.connectionBytesPeak = mineBytes;
  }

  /** A deferred request holding `bytes` was answered (or its connection closed). */
  release(bytes: number): void {
    this.count--;
    this.bytes -= bytes;
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
