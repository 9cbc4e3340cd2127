// Deliberate bugs ("buggify" points) that the simulation turns on to prove it catches
// them. All are off unless a test adds their name; production code never does.
export type InjectedFault =
  /** FLUSH returns without the overlay's fdatasync. */
  | 'flush-skip-fdatasync'
  /** Every flush that changes no chunk's record leaves the journal's sequence behind, a drain's too (only a client's FLUSH may). */
  | 'flush-sequence-lazy'
  /** A FLUSH may sync the overlay alone while the journal holds logged writes the overlay may not have durably. */
  | 'flush-log-debt-ignored'
  /** Recovery does not lay the journal's logged writes over the overlay. */
  | 'replay-skip-logged'
  /** A drain writes its manifest before the packs holding its blocks are in the store. */
  | 'manifest-before-packs'
  /** Recovery serves what a killed process left in the page cache without syncing it first. */
  | 'recover-without-sync'
  /** Recovery syncs the overlay and journal a killed process left without writing them again (pages a failed fdatasync dropped stay unwritten). */
  | 'recover-without-rewrite'
  /** Uploaded packs are registered without the volume's uploads hold (GC may delete them before a manifest names them). */
  | 'gc-unheld-uploads'
  /** A release saves the volume read-only only after its released-lease PUT. */
  | 'release-save-after-lease-put'
  /** A failed fdatasync of the overlay leaves the volume healthy: its chunks stay dirty and the next FLUSH tries again. */
  | 'fsync-retry-succeeds'
  /** A promotion finds no log to replay (a durable volume's flushed writes after its manifest are not applied). */
  | 'durable-skip-replay'
  /** A replica of a durable volume serves its writer's log without the first entry past the manifest (a gap in the history). */
  | 'replica-log-gap'
  /** A promoted replica keeps serving the old writer's log over its own writes. */
  | 'replica-keep-log-view';

/** The faults switched on (the simulation only). */
export const injected = new Set<InjectedFault>();
