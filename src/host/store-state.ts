// Where this host stands with a volume's objects in the store (`store.json` beside the
// volume), what the host shares with every StoreLink, and the errors a link throws.
import { disk, replaceFileSync } from '../disk/disk.js';
import path from 'node:path';
import type { BlockCache } from '../blocks/cache.js';
import type { StoreCipher } from '../crypto/cipher.js';
import type { Compression } from '../crypto/compress.js';
import { errorMessage, type Logger } from '../log.js';
import type { StoreClock } from '../objectstore/clock.js';
import type { ObjectStore } from '../objectstore/types.js';
import type { Lease } from '../store/lease.js';
import type { PackRefcounts } from '../gc/refcounts.js';
import type { PackIndex } from '../store/pack-index.js';
import type { PackUploader } from '../store/upload.js';

export type FlushMode = 'demand' | 'continuous' | 'durable';

/** Where this host stands with a volume's objects in the store. */
export interface StoreState {
  format: 1;
  flushMode: FlushMode;
  dirtyBudgetBytes: number;
  /** Not the writer here: leased elsewhere, released, or fenced. */
  readOnly: boolean;
  /** Lease generation this host holds; 0 when it holds none. */
  generation: number;
  leaseEtag?: string;
  /** When the held lease expires, ms since the epoch. */
  leaseExpires?: number;
  /** ETag of the manifest this host last wrote or loaded. */
  manifestEtag?: string;
  /** A release put (or is about to put) the released lease; set until it finished. */
  releasing?: boolean;
  /** Why this host stopped writing the volume, when it lost the lease or was fenced (until promoted again). */
  lostLease?: string;
  /** Sequence of that manifest; -1 before the first. */
  manifestSequence: number;
  /** As a replica, how often to check the manifest in the store, when not the host's `replica_follow_interval_ms`; 0: it does not follow. */
  replicaFollowIntervalMs?: number;
  /** Durable mode: sequences up to this may be in log records this host put (see StoreLink.reserveSequence). */
  durableReserved?: number;
}

/** What the host shares with every link. */
export interface StoreContext {
  store: ObjectStore;
  packIndex: PackIndex;
  uploader: PackUploader;
  /** The host's block cache: a block sealed while the store has it stays pinned until its pack is held. */
  cache: BlockCache;
  hostId: string;
  leaseTtlMs: number;
  /**
   * How much earlier than a taker may judge the lease expired its holder stops writing
   * (`[host] clock_skew_margin_s`): covers the store tick that notices, event-loop stalls
   * and the rate difference between the holder's clock and the store's over one TTL.
   */
  clockSkewMarginMs: number;
  /** The store's clock: a taker judges another host's lease on it (leaseIsLiveAt). */
  clock: StoreClock;
  /** Compression of manifest bodies. */
  manifestCompression: Compression;
  /** Sealing of manifests (crypto/cipher.ts). */
  cipher: StoreCipher;
  /** Pack refcounts (GC); every manifest write goes through them when set. */
  refcounts?: PackRefcounts;
  /** Hears of every manifest of a volume this host writes (a drain), with its sequence: the durable log lets go of what it covers. */
  onManifest?: (volume: string, sequence: number) => void;
  log: Logger;
}

export interface DrainResult {
  sequence: number;
  manifest_etag: string;
  packs_uploaded: number;
  bytes_uploaded: number;
  blocks_uploaded: number;
  duration_ms: number;
}

/** The lease is live and another host holds it. */
export class LeaseHeldError extends Error {
  constructor(
    readonly volume: string,
    readonly lease: Lease,
  ) {
    super(`volume ${volume} is leased by host ${lease.owner} (generation ${lease.generation}) until ${lease.expires}`);
    this.name = 'LeaseHeldError';
  }
}

/** This host lost the right to write the volume's manifest: another host wrote it. */
export class FencedError extends Error {
  constructor(volume: string, why: string) {
    super(`volume ${volume}: ${why}; this host no longer writes it (read-only here until promoted)`);
    this.name = 'FencedError';
  }
}

const STATE_FILE = 'store.json';

/** The state saved beside the volume in `dir`, or undefined when it never touched the store. */
export function loadStoreState(volume: string, dir: string): StoreState | undefined {
  const file = path.join(dir, STATE_FILE);
  if (!disk.existsSync(file)) return undefined;
  try {
    const state = JSON.parse(disk.readFileSync(file, 'utf8')) as StoreState;
    if (state.format !== 1) throw new Error(`format ${String(state.format)} is not 1`);
    return state;
  } catch (err) {
    throw new Error(`volume ${volume}: ${file} is not a store state: ${errorMessage(err)}`);
  }
}

/** Persist the state (atomic: temp file, fsync, rename). */
export function saveStoreState(dir: string, state: StoreState): void {
  replaceFileSync(path.join(dir, STATE_FILE), JSON.stringify(state, null, 2) + '\n');
}
