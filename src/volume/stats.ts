// Per-volume I/O counters and latency histograms, kept as plain numbers so the NBD
// request loop pays an array increment, not a metrics-library lookup. api/metrics
// turns them into Prometheus series when scraped.

export type OpKind = 'read' | 'write' | 'flush' | 'trim' | 'zero' | 'cache' | 'block_status';
export const OP_KINDS: readonly OpKind[] = ['read', 'write', 'flush', 'trim', 'zero', 'cache', 'block_status'];

/** Upper bounds in seconds of the latency histogram buckets (+Inf is implied). */
export const LATENCY_BUCKETS = [0.00001, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5];

export class OpStats {
  count = 0;
  errors = 0;
  bytes = 0;
  seconds = 0;
  readonly buckets = new Float64Array(LATENCY_BUCKETS.length + 1);

  observe(seconds: number, bytes: number): void {
    this.count++;
    this.bytes += bytes;
    this.seconds += seconds;
    let i = 0;
    while (i < LATENCY_BUCKETS.length && seconds > LATENCY_BUCKETS[i]) i++;
    this.buckets[i]++;
  }
}

export class VolumeStats {
  readonly ops: Record<OpKind, OpStats> = {
    read: new OpStats(), write: new OpStats(), flush: new OpStats(), trim: new OpStats(),
    zero: new OpStats(), cache: new OpStats(), block_status: new OpStats(),
  };
  chunksSealed = 0;
  /** Flushes that committed a journal batch (chunk records, size or sequence) after syncing the data. */
  journalCommits = 0;
  /** Client FLUSHes that synced the overlay alone: only sectors already in it were rewritten. */
  overlayOnlyFlushes = 0;
  /** Client FLUSHes that wrote their few writes into the journal batch and synced the journal alone. */
  loggedFlushes = 0;
}

/** Failed fdatasync calls of volumes' local files, host-wide (the block cache counts its own). */
export class SyncFailureCounts {
  overlay = 0;
  journal = 0;
}
