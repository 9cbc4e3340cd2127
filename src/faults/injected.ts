// Deliberate bugs ("buggify" points) that the simulation turns on to prove it catches
// them. All are off unless a test adds their name; production code never does.
export type InjectedFault =
  /** FLUSH returns without the overlay's fdatasync. */
  | 'flush-skip-fdatasync'
  /** A drain writes its manifest before the packs holding its blocks are in the store. */
  | 'manifest-before-packs';

/** The faults switched on (the simulation only). */
export const injected = new Set<InjectedFault>();
