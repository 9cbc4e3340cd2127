// The object store's clock: the one clock every host agrees on. Lease expiry and the
// settle time of refcount intents are judged on it, never on a host's own wall clock,
// which may be minutes off without anyone noticing (invariant 4, invariant 6).
//
// Why the store's and not the refcount database's: every host that decides about a lease
// has the store (the lease lives there), while refcounts are optional; and the store
// stamps every object it writes (Last-Modified), so a lease carries the time it was put
// in that clock without any host writing a time into it.
//
// Reading it: put a small object of this host's (`clock/HOST`) and HEAD it; its
// Last-Modified is the store's time at some instant between sending the put and the
// answer. Between samples the host's monotonic clock (performance.now, which no
// wall-clock step moves) carries the reading forward, giving bounds rather than a point.
import type { ObjectStore } from './types.js';

/** Last-Modified over HTTP is whole seconds (truncated): a stamp S means [S, S + 1 s). */
export const STAMP_RESOLUTION_MS = 1000;

/**
 * A sample older than this is taken again. The monotonic clock drifts from the store's by
 * parts per million, so an hour costs milliseconds, well inside the bounds' second.
 */
const MAX_SAMPLE_AGE_MS = 3_600_000;
/**
 * The monotonic clock stops while the machine is suspended: when the host's wall clock
 * moved this much more (or less) than it since the sample, the sample is taken again. The
 * wall clock only triggers a new reading here; it never enters one.
 */
const MAX_CLOCK_DISAGREEMENT_MS = 1000;

/** The store's time now, ms since the epoch, as bounds: it is at least `earliest` and below `latest`. */
export interface StoreTime {
  earliest: number;
  latest: number;
}

export class StoreClock {
  private sample: { stamp: number; sentAt: number; answeredAt: number; wallAt: number } | undefined;
  private sampling: Promise<void> | undefined;

  /** `key`: this reader's own object (one per host or command), e.g. clockKey(hostId). */
  constructor(
    private readonly store: ObjectStore,
    private readonly key: string,
  ) {}

  /** The store's time now; one put and one head when the last sample is missing or old. */
  async now(): Promise<StoreTime> {
    if (this.stale()) {
      this.sampling ??= this.take().finally(() => {
        this.sampling = undefined;
      });
      await this.sampling;
    }
    const { stamp, sentAt, answeredAt } = this.sample!;
    const now = performance.now();
    // The put landed after sentAt and before answeredAt, at a store time in [stamp, stamp + resolution).
    return { earliest: stamp + (now - answeredAt), latest: stamp + STAMP_RESOLUTION_MS + (now - sentAt) };
  }

  private stale(): boolean {
    const sample = this.sample;
    if (sample === undefined) return true;
    const monotonic = performance.now() - sample.answeredAt;
    return monotonic > MAX_SAMPLE_AGE_MS || Math.abs(Date.now() - sample.wallAt - monotonic) > MAX_CLOCK_DISAGREEMENT_MS;
  }

  private async take(): Promise<void> {
    const sentAt = performance.now();
    await this.store.put(this.key, Buffer.from(JSON.stringify({ format: 1, purpose: 'reads the store clock' }) + '\n'));
    const info = await this.store.head(this.key);
    const answeredAt = performance.now();
    if (info === undefined) throw new Error(`store clock: ${this.key} in ${this.store.description} is gone right after its put`);
    this.sample = { stamp: info.lastModified.getTime(), sentAt, answeredAt, wallAt: Date.now() };
  }
}

/** The object a host (or a command, `host/cli-PID`) reads the store clock with. */
export function clockKey(writer: string): string {
  return `clock/${writer}`;
}
