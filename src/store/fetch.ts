// Cold reads (DESIGN.md: Paths, Read): a block that is not on this host is fetched with
// its whole pack, one GET; every block of the pack is verified against its name and put
// into the cache, so the neighbours a reader wants next are already here. Concurrent
// requests for one pack share one GET; read-ahead runs a bounded number of packs ahead.
// Packs are opened on worker threads (store/pack-threads.ts), off the event loop, from a
// reused body buffer into a reused block buffer (store/pack-buffers.ts).
import { blockKey, keyHex, type BlockCache, type BlockKey } from '../blocks/cache.js';
import type { StoreCipher } from '../crypto/cipher.js';
import { errorMessage, type Logger } from '../log.js';
import { storeUnreachable, type ObjectStore } from '../objectstore/types.js';
import type { BlockFetcher } from '../volume/volume.js';
import { FormatError } from './errors.js';
import { PackBufferPool } from './pack-buffers.js';
import { packThreads, type PackThreads } from './pack-threads.js';
import { packKey, PACK_HEADER_BYTES } from './pack.js';
import type { PackIndex } from './pack-index.js';

/** GETs of a pack that fails verification (a truncated or corrupted body) before giving up. */
const VERIFY_ATTEMPTS = 3;
/** Packs fetched ahead of sequential readers at once, host-wide. */
const MAX_PREFETCH_PACKS = 16;
/**
 * Packs loaded at once, host-wide, each from its GET until its blocks' slab writes land:
 * what bounds the GET body and opened-block buffers in use (one of each per load).
 */
const MAX_PACK_LOADS = 16;
/** Idle GET body buffers, and idle opened-block buffers, kept for reuse: all the loads at once can use. */
const MAX_IDLE_PACK_BUFFERS = MAX_PACK_LOADS;
/** A pack (or its opened blocks) larger than this gets a buffer of its own, not a reused one. */
const MAX_POOLED_PACK_BYTES = 64 * 1024 * 1024;

export interface FetchCounters {
  packsFetched: number;
  /** Pack GETs a read (or an unaligned write) had to wait for. */
  demandPacks: number;
  /** Pack GETs started from a volume's boot hot set. */
  hotsetPacks: number;
  /** Reads (and unaligned writes) that had to wait for blocks from the store. */
  readWaits: number;
  blocksFetched: number;
  bytesFetched: number;
  verifyFailures: number;
  prefetchedPacks: number;
}

export class PackFetcher implements BlockFetcher {
  readonly counters: FetchCounters = {
    packsFetched: 0, demandPacks: 0, hotsetPacks: 0, readWaits: 0, blocksFetched: 0, bytesFetched: 0, verifyFailures: 0, prefetchedPacks: 0,
  };
  private readonly inflight = new Map<string, Promise<void>>();
  /** Per pack in flight, the blocks a fetch waits for (none for read-ahead): at most the keys asked for. */
  private readonly wanted = new Map<string, Set<BlockKey>>();
  private prefetching = 0;
  /** Pack loads running (at most MAX_PACK_LOADS), and the ones waiting for a turn. */
  private loads = 0;
  private readonly loadQueue: Array<() => void> = [];
  private readonly threads: PackThreads;
  /** GET bodies: at most MAX_IDLE_PACK_BUFFERS idle, each at most MAX_POOLED_PACK_BYTES. */
  private readonly bodies = new PackBufferPool('pack body buffers', MAX_IDLE_PACK_BUFFERS, MAX_POOLED_PACK_BYTES);
  /** Opened blocks, until their slab write lands: the same bounds. */
  private readonly opened = new PackBufferPool('opened block buffers', MAX_IDLE_PACK_BUFFERS, MAX_POOLED_PACK_BYTES);

  constructor(
    private readonly store: ObjectStore,
    private readonly index: PackIndex,
    private readonly cache: BlockCache,
    cipher: StoreCipher,
    /** Chunks kept fetched ahead of a sequential reader: read_ahead_packs × blocks_per_pack. */
    readonly readAheadChunks: number,
    private readonly log: Logger,
  ) {
    this.threads = packThreads(cipher);
  }

  knows(key: BlockKey): boolean {
    return this.index.has(key);
  }

  async fetch(keys: readonly BlockKey[], reason: 'demand' | 'hotset' = 'demand'): Promise<void> {
    if (reason === 'demand') this.counters.readWaits++;
    const packs = new Set<string>();
    for (const key of keys) {
      const location = this.index.get(key);
      if (location === undefined) throw new Error(`block ${keyHex(key)} is neither on this host nor in any pack it knows of`);
      packs.add(location.pack);
    }
    for (const key of keys) {
      const pack = this.index.get(key)!.pack;
      const wanted = this.wanted.get(pack);
      if (wanted === undefined) this.wanted.set(pack, new Set([key]));
      else wanted.add(key);
    }
    // A read's blocks stay on the host until it has them all and has copied them: it reads in
    // a continuation of this promise (Volume.readReady), before the event loop's next turn.
    // A hot set is no read: it holds nothing.
    const release = reason === 'demand' ? this.cache.awaitBlocks(keys) : undefined;
    try {
      await Promise.all(
        [...packs].map((id) => {
          if (!this.inflight.has(id)) {
            if (reason === 'demand') this.counters.demandPacks++;
            else this.counters.hotsetPacks++;
          }
          return this.fetchPack(id);
        }),
      );
    } catch (err) {
      release?.();
      throw err;
    }
    if (release !== undefined) setImmediate(release);
  }

  prefetch(keys: readonly BlockKey[]): void {
    const packs = new Set<string>();
    for (const key of keys) {
      const location = this.index.get(key);
      if (location !== undefined && !this.inflight.has(location.pack)) packs.add(location.pack);
    }
    for (const id of packs) {
      if (this.prefetching >= MAX_PREFETCH_PACKS) return;
      this.prefetching++;
      this.counters.prefetchedPacks++;
      this.fetchPack(id, true)
        .catch((err) => this.log.warn('read-ahead fetch failed', { pack: packKey(id), error: errorMessage(err) }))
        .finally(() => this.prefetching--);
    }
  }

  /** `stream`: for a sequential reader's read-ahead (its blocks go to the memory tier first: BlockCache.putPackFromStore). */
  private fetchPack(id: string, stream = false): Promise<void> {
    let work = this.inflight.get(id);
    if (work === undefined) {
      work = this.load(id, stream).finally(() => {
        this.inflight.delete(id);
        this.wanted.delete(id);
      });
      this.inflight.set(id, work);
    }
    return work;
  }

  /** Wait for one of the MAX_PACK_LOADS turns. */
  private async startLoad(): Promise<void> {
    if (this.loads < MAX_PACK_LOADS) {
      this.loads++;
      return;
    }
    // A turn is handed over by endLoad without dropping the count.
    await new Promise<void>((resolve) => this.loadQueue.push(resolve));
  }

  private endLoad(): void {
    const next = this.loadQueue.shift();
    if (next !== undefined) next();
    else this.loads--;
  }

  private async load(id: string, stream: boolean): Promise<void> {
    await this.startLoad();
    // Whether the turn ends when the blocks' slab writes land, rather than here.
    let handedOff = false;
    try {
      await this.loadTurn(id, () => (handedOff = true), stream);
    } finally {
      if (!handedOff) this.endLoad();
    }
  }

  /** The body of load(), within a turn; `handOff` passes the end of the turn to the slab writes. */
  private async loadTurn(id: string, handOff: () => void, stream: boolean): Promise<void> {
    const key = packKey(id);
    for (let attempt = 1; ; attempt++) {
      let object;
      // The reused buffer the body is read into (the last attempt's, when the store retries).
      let bodyBuffer: Buffer | undefined;
      const into = (length: number): Buffer => {
        if (length > MAX_POOLED_PACK_BYTES) return Buffer.allocUnsafe(length);
        bodyBuffer = this.bodies.take(length);
        return bodyBuffer.subarray(0, length);
      };
      try {
        object = await this.store.get(key, { into });
      } catch (err) {
        // Bounded by [storage] request_deadline_s: the read waiting for it fails with EIO.
        throw storeUnreachable(`cold read of pack ${key}`, this.store.description, err);
      }
      if (object === undefined) throw new Error(`pack ${key} is missing from the store ${this.store.description}`);
      const bytes = object.body.length;
      // The header's block count sizes the buffer the blocks are opened into (a wrong count
      // only means they are opened into a buffer of their own).
      const count = bytes >= PACK_HEADER_BYTES ? object.body.readUInt32LE(12) : 0;
      let out = count * this.cache.blockSize <= MAX_POOLED_PACK_BYTES ? this.opened.take(count * this.cache.blockSize) : undefined;
      try {
        // Every block is verified (opened) before any is cached: a pack is used whole or not at all.
        let blocks;
        try {
          blocks = await this.threads.open(key, object.body, out);
        } finally {
          if (bodyBuffer !== undefined) this.bodies.give(bodyBuffer);
        }
        if (out !== undefined && blocks.length > 0 && blocks[0].data.buffer !== out.buffer) {
          this.opened.give(out); // the blocks did not fit: they came back in a buffer of their own
          out = undefined;
        }
        const opened = blocks.map((block) => ({ key: blockKey(block.hash), data: block.data }));
        // A body at this key that is another pack (its blocks each check out) lacks what the pack index placed in it.
        const wanted = this.wanted.get(id);
        if (wanted !== undefined && wanted.size > 0) {
          const held = new Set(opened.map((block) => block.key));
          for (const want of wanted) if (!held.has(want)) throw new FormatError(key, `pack ${key} does not hold block ${keyHex(want)}, which the pack index places there`);
        }
        // From here the cache's slab writes read the opened blocks until they land (`written`).
        const lent = out;
        out = undefined;
        handOff();
        let written: Promise<void>;
        try {
          // A fetch someone waits for admits to memory only what they wait for (read-ahead: all).
          written = this.cache.putPackFromStore(opened, wanted, stream);
        } catch (err) {
          this.endLoad(); // `lent` is not reused: a slab write may have begun to read it
          throw err;
        }
        void written.then(() => {
          if (lent !== undefined) this.opened.give(lent);
          this.endLoad();
        });
        this.counters.packsFetched++;
        this.counters.blocksFetched += blocks.length;
        this.counters.bytesFetched += bytes;
        return;
      } catch (err) {
        if (out !== undefined) this.opened.give(out);
        if (!(err instanceof FormatError)) throw err;
        this.counters.verifyFailures++;
        if (attempt >= VERIFY_ATTEMPTS) throw new Error(`${err.message} (after ${attempt} GETs)`);
        this.log.warn('pack failed verification; fetching it again', { key, attempt, error: err.message });
      }
    }
  }
}
