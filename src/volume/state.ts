// A volume's state (DESIGN.md: volume/): what it is (name, block size, size, sequence),
// its block map and overlay, what is dirty towards the journal and the store, and the
// changes and checks every path shares. The paths build on it, one file each:
// read.ts, write.ts, seal.ts, flush.ts; volume.ts ties them into the Volume.
import path from 'node:path';
import type { BlockCache, BlockKey, LocalSpace } from '../blocks/cache.js';
import type { BlockHasher } from '../crypto/hash.js';
import type { Logger } from '../log.js';
import { BlockMap, ZERO_ALLOCATED_KEY } from './blockmap.js';
import type { ChangedSectors } from './changes.js';
import type { Journal } from './journal.js';
import type { LogView } from './log-view.js';
import { LoggedWrites } from './logged-writes.js';
import { Overlay } from './overlay.js';
import { maskBytesOf, SECTOR_SHIFT } from './sectors.js';
import { SyncFailureCounts, VolumeStats } from './stats.js';

/** base:allocation meanings of an extent, valued as the NBD flags (hole=1, zero=2). */
export const EXTENT_DATA = 0;
export const EXTENT_ZERO = 2;
export const EXTENT_HOLE = 3;

export type VolumeErrorCode = 'EIO' | 'EPERM' | 'EINVAL' | 'ENOSPC' | 'ENOTSUP' | 'ESHUTDOWN';

/** An error a client can be told about, with the NBD error it maps to. */
export class VolumeError extends Error {
  constructor(
    readonly code: VolumeErrorCode,
    message: string,
  ) {
    super(message);
    this.name = 'VolumeError';
  }
}

export interface VolumeIdentity {
  format: 1;
  name: string;
  blockSize: number;
  created: string;
}

/**
 * Where blocks that are not on this host come from (the object store's packs). The
 * volume asks for blocks by name; it never sees a pack or the store.
 */
export interface BlockFetcher {
  /**
   * Fetch these blocks into the block cache; throws an Error naming the block and pack on
   * failure. `reason` only labels the fetch for metrics (a read waiting, or a boot hot set).
   * A demand fetch keeps the blocks on the host until the event loop's next turn, so a read
   * that copies them in a continuation of the promise finds them.
   */
  fetch(keys: readonly BlockKey[], reason?: 'demand' | 'hotset'): Promise<void>;
  /** Start fetching in the background (read-ahead); failures are logged, not thrown. */
  prefetch(keys: readonly BlockKey[]): void;
  /** Whether the store holds this block (the host pack index names its pack). */
  knows(key: BlockKey): boolean;
  /** Chunks a sequential reader keeps fetched ahead of itself; 0: no read-ahead. */
  readonly readAheadChunks: number;
}

/** A volume's block map at one sequence, with references held until release(). */
export interface VolumeSnapshot {
  sequence: number;
  size: number;
  blockSize: number;
  /** chunk → block, ascending by chunk; ZERO_ALLOCATED_KEY for allocated zeros, holes absent (computed when first read). */
  readonly chunks: Array<[number, BlockKey]>;
  /** The block map at the cut, sharing its pages with the volume's (never written: a same-host fork's map, an incremental manifest's base). */
  map: BlockMap;
  /** With a `base`: the chunks changed since it, ascending (undefined block: a hole now). */
  changes?: Array<[number, BlockKey | undefined]>;
  /**
   * Drop the references that kept the snapshot's local blocks from being freed.
   * `stored`: the snapshot reached the store, so its changes no longer count as dirty.
   */
  release(stored: boolean): void;
}

export interface VolumeContext {
  cache: BlockCache;
  /** Names a sealed block: the store's block hash (plain or keyed BLAKE3, crypto/cipher.ts). */
  blockHash: BlockHasher;
  log: Logger;
  fetcher?: BlockFetcher;
  /** Shared buffer of block_size bytes for unaligned writes (synchronous, so one suffices). */
  scratch: Buffer;
  /** Host-wide count of failed syncs of volumes' overlays and journals (metrics). */
  syncFailures?: SyncFailureCounts;
}

/** One volume's state, and the changes and checks every path shares; the paths extend it. */
export abstract class VolumeState {
  readonly blockSize: number;
  readonly sectorsPerChunk: number;
  readonly maskBytes: number;
  size: number;
  /** Bumped by every write, zero and trim (DESIGN.md: sequence). */
  sequence: number;
  readOnly = false;
  clients = 0;
  lastWriteAt = 0;
  readonly stats = new VolumeStats();

  protected map = new BlockMap();
  /** Overlay chunks and their sector presence masks. */
  protected readonly overlay: Overlay;
  /** Chunks whose state changed since the last journal commit. */
  protected journalDirty = new Set<number>();
  /**
   * Chunks changed since the last snapshot that went to the store (the dirty budget's
   * measure), least recently changed first, each with the stamp of its last change.
   */
  protected storeDirty = new Map<number, number>();
  protected storeDirtyClock = 0;
  /** Blocks replaced in the map; released once the replacement is durable. */
  protected pendingUnref: BlockKey[] = [];
  protected sizeDirty = false;
  /**
   * The sequence the journal holds. A change that touches no chunk's record (a trim of a
   * hole) still bumps the sequence: a flush commits it, or after a crash the volume could
   * come back below a manifest's sequence and reuse its numbers (a release would skip the
   * drain of a later write).
   */
  protected journalSequence: number;
  /**
   * Writes, zeroes and trims done since the last flush began syncing the overlay: a client's
   * FLUSH with none to cover and no record to commit returns at once.
   */
  protected writesSinceDataSync = 0;
  /** Copies of the writes since the last flush began, while few enough to log in a FLUSH's batch. */
  protected readonly logged = new LoggedWrites();
  /**
   * The journal holds BLOG batches whose writes the overlay may not hold durably: until a
   * flush syncs the overlay and commits another batch, no FLUSH may sync the overlay alone
   * (replay would lay an older logged copy over the rewrite it made durable).
   */
  protected logDebt = false;
  /** Set when a full flush (one that commits the sequence) joins a queued flush. */
  protected flushQueuedFull = false;
  /** Loaded from a folder a killed process may have left in the page cache: the next FLUSH syncs it all. */
  protected recoveredUnsynced = false;
  /** Chunks being sealed: the sectors written meanwhile, and whether a trim/zero voided the seal. */
  protected readonly sealing = new Map<number, { written: Uint8Array; invalid: boolean }>();
  protected readonly sealsInFlight = new Set<Promise<unknown>>();
  /** Overlay reads and writes on the thread pool (readLater, writeLarge); close and destroy wait for them before the fd goes. */
  protected readonly ioInFlight = new Set<Promise<unknown>>();
  protected flushTail: Promise<void> = Promise.resolve();
  protected flushQueued: Promise<void> | undefined;
  protected closed = false;
  /**
   * Why the volume failed: a sync of its local state failed, so data it acknowledged may be
   * gone from the disk while the page cache still shows it, and a later sync would succeed
   * without it. Writes, flushes and snapshots get EIO until the volume is reopened (its
   * journal then gives the last state a FLUSH acknowledged); reads go on.
   */
  protected failure: string | undefined;
  protected readonly syncFailures: SyncFailureCounts;
  /** Set when close or destroy begins: no new seal starts. */
  protected closing = false;
  /**
   * Hears of each block a seal puts into the cache, at once (nothing can evict it before):
   * the store link holds the pack of one the store already has (invariant 6).
   */
  onSealedBlock: ((key: BlockKey) => void) | undefined;
  /** The sectors changed since the store last took them (a durable volume's log); undefined when not tracked. */
  changes: ChangedSectors | undefined;
  /**
   * A durable volume's second half of a client's FLUSH: resolves once the store holds every
   * write up to `sequence` (the sequence when the FLUSH arrived); undefined otherwise.
   */
  durableFlush: ((sequence: number) => Promise<void>) | undefined;
  protected readonly cache: BlockCache;
  protected readonly space: LocalSpace;
  protected readonly log: Logger;
  protected readonly scratch: Buffer;
  protected readonly blockHash: BlockHasher;
  protected readonly emptyMask: Uint8Array;
  protected readonly fetcher: BlockFetcher | undefined;
  /** Read-ahead: where a sequential reader would read next, and the chunk fetched up to. */
  protected nextReadOffset = -1;
  /** A boot recording: the chunks read within windowMs of the first read after it was armed. */
  protected bootRecord: { windowMs: number; started: number; chunks: Set<number>; done: (chunks: number[]) => void } | undefined;
  protected prefetchedUntil = -1;
  /**
   * A replica of a durable volume: its writer's log entries newer than the served manifest,
   * laid over the block map by every read (log-view.ts). Set only while the overlay is empty.
   */
  protected logView: LogView | undefined;

  protected constructor(
    readonly name: string,
    readonly dir: string,
    identity: VolumeIdentity,
    protected readonly overlayFd: number,
    protected readonly journal: Journal,
    size: number,
    sequence: number,
    ctx: VolumeContext,
  ) {
    this.blockSize = identity.blockSize;
    this.sectorsPerChunk = this.blockSize >>> SECTOR_SHIFT;
    this.maskBytes = maskBytesOf(this.blockSize);
    this.size = size;
    this.sequence = sequence;
    this.journalSequence = sequence;
    this.cache = ctx.cache;
    this.space = ctx.cache.space;
    this.log = ctx.log;
    this.scratch = ctx.scratch;
    this.blockHash = ctx.blockHash;
    this.fetcher = ctx.fetcher;
    this.syncFailures = ctx.syncFailures ?? new SyncFailureCounts();
    this.emptyMask = new Uint8Array(this.maskBytes);
    this.overlay = new Overlay(this.space, this.maskBytes);
  }

  /** A whole-chunk trim or zero: the chunk's seal in progress (if any) no longer applies. */
  protected discardChunk(chunk: number, key: BlockKey | undefined): void {
    const seal = this.sealing.get(chunk);
    if (seal !== undefined) seal.invalid = true;
    this.overlay.drop(chunk);
    this.remap(chunk, key);
    this.markStoreDirty(chunk);
  }

  /**
   * Point a chunk at a block (undefined: hole), releasing the old one after the next
   * commit. A seal's remap is not a new change: a chunk already dirty keeps its place in
   * the dirty budget's order.
   */
  protected remap(chunk: number, key: BlockKey | undefined): void {
    const previous = this.map.set(chunk, key);
    if (previous !== undefined && previous !== ZERO_ALLOCATED_KEY) this.pendingUnref.push(previous);
    this.journalDirty.add(chunk);
    if (!this.storeDirty.has(chunk)) this.storeDirty.set(chunk, ++this.storeDirtyClock);
  }

  /** A change of `chunk`: it moves to the newest end of the dirty budget's order. */
  protected markStoreDirty(chunk: number): void {
    this.storeDirty.delete(chunk);
    this.storeDirty.set(chunk, ++this.storeDirtyClock);
  }

  // ---- checks at the edge -----------------------------------------------------------

  /**
   * Await overlay I/O on the thread pool (`what`: "read of N bytes at X from"), counted in
   * ioInFlight meanwhile so close and destroy wait for it; its failure is an EIO naming the file.
   */
  protected async overlayIo(work: Promise<unknown>, what: string): Promise<void> {
    this.ioInFlight.add(work);
    try {
      await work;
    } catch (err) {
      throw new VolumeError('EIO', `volume ${this.name}: ${what} ${path.join(this.dir, 'overlay')}: ${(err as Error).message}`);
    } finally {
      this.ioInFlight.delete(work);
    }
  }

  protected checkOpen(): void {
    if (this.closed) throw new VolumeError('ESHUTDOWN', `volume ${this.name} is closed`);
  }
  protected checkWritable(): void {
    this.checkOpen();
    if (this.failure !== undefined) throw this.failedError();
    if (this.readOnly) throw new VolumeError('EPERM', `volume ${this.name} is read-only on this host`);
  }

  /** Why the volume failed (see `failure`); undefined while it is healthy. */
  get failed(): string | undefined {
    return this.failure;
  }

  protected failedError(): VolumeError {
    return new VolumeError('EIO', `volume ${this.name} has failed (${this.failure}); writes and flushes are refused until it is reopened`);
  }

  /** Enter the failed state (once) and return the error for the request that found it. */
  protected fail(reason: string): VolumeError {
    if (this.failure === undefined) {
      this.failure = reason;
      this.log.error('volume failed: a sync of its local state failed; writes and flushes get EIO until it is reopened', { volume: this.name, reason });
    }
    return this.failedError();
  }
}
