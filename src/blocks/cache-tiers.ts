// The block cache's state (blocks/cache.ts builds the cache on it): the memory tier
// (blocks/memory-tier.ts), the disk tier's slots in the slab and slot table
// (blocks/slab.ts) with its eviction policy, loading the table at start-up, checking a
// loaded block against its name, and making the slab durable (sync, lost blocks).
import path from 'node:path';
import { disk } from '../disk/disk.js';
import { addRun } from '../disk/runs.js';
import type { BlockHasher } from '../crypto/hash.js';
import type { Logger } from '../log.js';
import { keyHex, type BlockKey } from './block-key.js';
import { hostMemory } from './host-memory.js';
import { LocalSpace } from './local-space.js';
import { MemoryTier } from './memory-tier.js';
import { S3Fifo } from './s3fifo.js';
import { StreamedKeys } from './streamed-keys.js';
import { SLOT_IN_STORE, SLOT_USED, DirectWrites, FileWriteQueue, SlotTable, type Slot } from './slab.js';

const fdatasync = (...args: Parameters<typeof disk.fdatasync>) => disk.fdatasync(...args);
const read = (...args: Parameters<typeof disk.read>) => disk.read(...args);

/**
 * Bytes of fetched blocks held for waiting reads outside both tiers (CacheTiers.held): a
 * read of the largest payload NBD allows (32 MiB) fits whole.
 */
const MAX_HELD_BYTES = 32 * 1024 * 1024;

function shortRead(slot: Slot, n: number, length: number): Error {
  return new Error(`block cache: short read of slot ${slot.index} (${n} of ${length} bytes)`);
}

/** A part of block `key` that a read wants at `dstOffset` of its buffer (CacheTiers.readIntoLater). */
export interface LaterRead {
  key: BlockKey;
  offset: number;
  length: number;
  dstOffset: number;
}

/** Block buffers idle checks keep (CacheTiers.check): 4 MiB. */
const MAX_CHECK_BUFFERS = 32;

/** The memory tier is faulted in at start-up only if this much memory is still free after it. */
const PRETOUCH_HEADROOM_BYTES = 256 * 1024 * 1024;

export interface BlockCacheOptions {
  blockSize: number;
  /**
   * Which function names the blocks (crypto/cipher.ts: StoreCipher.namesId; all zero for
   * plain BLAKE3). Fixed when the cache is created, like the block size: a cache of blocks
   * named one way cannot serve a store that names them another way.
   */
  namesId: Buffer;
  /** The function those names come from (StoreCipher.blockHash): what the scrub checks blocks against. */
  blockHash: BlockHasher;
  diskBytes: number;
  memoryBytes: number;
  /** Block writes to the slab bypass the page cache where the filesystem allows (default true). */
  directWrites?: boolean;
  /**
   * Fault the memory tier's arena in at start-up, on a thread of its own (default false),
   * if it fits in the memory free then (blocks/host-memory.ts).
   */
  memoryPretouch?: boolean;
}

export interface CacheCounters {
  memoryHits: number;
  diskHits: number;
  misses: number;
  memoryEvictions: number;
  diskEvictions: number;
  blocksWritten: number;
  dedupHits: number;
  /** Blocks re-hashed by the background scrub. */
  blocksScrubbed: number;
  /** Blocks the scrub found corrupt and evicted (the store holds them; they are fetched again). */
  scrubEvictions: number;
  /** Corrupt blocks the scrub found that only this host holds (pinned): they cannot be repaired. */
  scrubCorruptPinned: number;
  /** Blocks loaded at start-up whose first read found them not matching their name, dropped (the store has them). */
  verifyEvictions: number;
  /** fdatasync calls of the slab or slot table that failed. */
  syncFailures: number;
  /** Writes of blocks to the slab that failed (a direct write reports the device's error at once). */
  slabWriteFailures: number;
  /** Fetched blocks a sequential reader streamed into the memory tier only, not written to the slab (the store holds them). */
  streamedToMemory: number;
  /** Fetched blocks written to the slab (with their slot table entries). */
  fetchedWritten: number;
  /** Fetched blocks a waiting read needed that neither tier could take, held for that read until it had them. */
  heldForReads: number;
}

/** The block cache's state: its two tiers, the slab and slot table, and their durability (BlockCache builds on it). */
export abstract class CacheTiers {
  readonly blockSize: number;
  readonly space: LocalSpace;
  readonly counters: CacheCounters = {
    memoryHits: 0, diskHits: 0, misses: 0, memoryEvictions: 0, diskEvictions: 0, blocksWritten: 0, dedupHits: 0,
    blocksScrubbed: 0, scrubEvictions: 0, scrubCorruptPinned: 0, verifyEvictions: 0, syncFailures: 0, slabWriteFailures: 0,
    streamedToMemory: 0, fetchedWritten: 0, heldForReads: 0,
  };
  /** Scratch for verifySync. */
  private verifyBuffer: Buffer | undefined;
  /** Checks of loaded slots in flight (check): a second read of a block waits for the first's. */
  private readonly checking = new Map<BlockKey, Promise<void>>();
  /** Idle block buffers of checks, at most MAX_CHECK_BUFFERS. */
  private readonly checkBuffers: Buffer[] = [];
  protected readonly slots = new Map<BlockKey, Slot>();
  private readonly freeSlots: number[] = [];
  private highWater = 0;
  private readonly maxSlots: number;
  protected readonly diskPolicy: S3Fifo<BlockKey>;
  protected readonly memory: MemoryTier;
  /** The memory tier being faulted in (memoryPretouch), until it is. */
  private touching: Promise<void> | undefined;
  private faultedIn = false;
  /** Streamed blocks kept in memory only (blocks/streamed-keys.ts): at most 4 × the memory tier's blocks. */
  protected readonly streamed: StreamedKeys;
  /** Blocks put but not yet written to the slab; reads are served from here meanwhile. */
  protected readonly writing = new Map<BlockKey, Buffer>();
  /** Blocks put whose slab write reads their memory-tier copy: not evicted from memory until it lands. */
  protected readonly writingFromMemory = new Set<BlockKey>();
  /**
   * Blocks reads wait for while their packs are fetched (awaitBlocks), each with how many
   * reads wait: neither tier evicts them for another block until the reads have them. At
   * most the keys of the reads waiting; the memory tier still never exceeds its setting.
   */
  protected readonly awaited = new Map<BlockKey, number>();
  /**
   * Copies of awaited blocks that neither tier could take when their pack arrived (both
   * full of blocks whose slab writes are in flight, pinned or awaited): dropped when the
   * last read waiting for them releases them. At most MAX_HELD_BYTES.
   */
  protected readonly held = new Map<BlockKey, Buffer>();
  private heldBytes = 0;
  private readonly inflight = new Set<Promise<void>>();
  protected readonly table: SlotTable;
  /** Every write of block bytes to the slab goes through here. */
  protected readonly slab: FileWriteQueue;
  protected slabDirty = false;
  private syncing: Promise<void> | undefined;
  /** Pinned blocks written to the slab since the last sync began: the ones a failed sync may lose. */
  protected unsynced = new Set<BlockKey>();
  /**
   * Pinned blocks whose slab write a failed sync covered: the kernel may have dropped them
   * (a later sync succeeds without them), so no journal may name them (lostBlock). Cleared
   * when the block's slot is freed; a restart reloads every slot as unverified.
   */
  protected readonly lost = new Set<BlockKey>();
  /** How blocks are named here (plain or keyed BLAKE3): the scrub's check. */
  protected readonly blockHash: BlockHasher;

  protected constructor(
    private readonly dir: string,
    protected readonly slabFd: number,
    tableFd: number,
    opts: BlockCacheOptions,
    protected readonly log: Logger,
    /** The slab opened for writes past the page cache, where the filesystem allows it. */
    private readonly slabDirectFd?: number,
  ) {
    this.blockSize = opts.blockSize;
    this.blockHash = opts.blockHash;
    this.maxSlots = Math.max(1, Math.floor(opts.diskBytes / opts.blockSize));
    this.space = new LocalSpace(opts.diskBytes, opts.blockSize);
    this.diskPolicy = new S3Fifo(this.maxSlots);
    this.memory = new MemoryTier(opts.blockSize, opts.memoryBytes, () => this.counters.memoryEvictions++);
    if (opts.memoryPretouch === true && opts.memoryBytes >= opts.blockSize && this.pretouchFits(log)) {
      const started = performance.now();
      this.touching = this.memory.pretouch().then(
        (done) => {
          this.faultedIn = done;
          if (done) log.info('memory tier faulted in', { bytes: this.memory.heldBytes, seconds: Number(((performance.now() - started) / 1000).toFixed(2)) });
        },
        (err: unknown) => log.warn('memory tier: faulting it in failed; it is faulted in as it fills', { error: String(err) }),
      );
    }
    // A block streamed again once the memory tier let it go is remembered for a few of its turnovers.
    this.streamed = new StreamedKeys(Math.max(1024, 4 * Math.floor(opts.memoryBytes / opts.blockSize)));
    this.table = new SlotTable(tableFd);
    this.slab = new FileWriteQueue(slabFd, slabDirectFd === undefined ? undefined : new DirectWrites(slabDirectFd));
  }

  /**
   * Whether faulting the whole memory tier in now leaves PRETOUCH_HEADROOM_BYTES free:
   * claiming memory the host (or the daemon's cgroup) does not have would wake the OOM
   * killer, which may pick a VM. If not, the tier fills as blocks come, as without memory_pretouch.
   */
  private pretouchFits(log: Logger): boolean {
    const memory = hostMemory();
    const tier = this.memory.heldBytes;
    if (memory === undefined || tier + PRETOUCH_HEADROOM_BYTES <= memory.availableBytes) return true;
    log.warn('memory tier not faulted in at start-up: it would not leave enough memory free; it is faulted in as it fills', {
      bytes: tier,
      available_bytes: memory.availableBytes,
      headroom_bytes: PRETOUCH_HEADROOM_BYTES,
      limit: memory.limit,
    });
    return false;
  }

  protected loadTable(namesId: Buffer): void {
    const { table, count } = SlotTable.read(this.dir, this.blockSize, namesId);
    for (let index = 0; index < count; index++) {
      const flags = SlotTable.entryFlags(table, index);
      if (!(flags & SLOT_USED) || index >= this.maxSlots) {
        if (index < this.maxSlots) this.freeSlots.push(index);
        continue;
      }
      const key = SlotTable.entryKey(table, index);
      if (this.slots.has(key)) {
        this.freeSlots.push(index); // a duplicate left by a crash between two table writes
        continue;
      }
      this.slots.set(key, { index, refs: 0, inStore: (flags & SLOT_IN_STORE) !== 0, unverified: true });
    }
    this.highWater = Math.min(count, this.maxSlots);
    // Free slots are reused lowest first so the slab stays compact.
    this.freeSlots.reverse();
  }

  /**
   * After every volume has taken its references at start-up: free the slots that no
   * volume references and no store holds (left by a crash or by overwritten chunks),
   * and let the rest enter the eviction policy.
   */
  finishStartup(): { blocks: number; freed: number } {
    let freed = 0;
    for (const [key, slot] of this.slots) {
      if (slot.refs === 0 && !slot.inStore) {
        this.freeSlot(key, slot);
        freed++;
        continue;
      }
      if (!slot.inStore) this.space.pinnedBytes += this.blockSize;
      this.diskPolicy.insert(key, 1);
    }
    return { blocks: this.slots.size, freed };
  }

  get blockCount(): number {
    return this.slots.size;
  }
  get memoryBytes(): number {
    return this.memory.bytes;
  }
  /** Bytes of the buffers the memory tier keeps alive: its arena's, at most memoryBytes. */
  get memoryHeldBytes(): number {
    return this.memory.heldBytes;
  }
  /** Whether memoryPretouch has faulted the whole memory tier in. */
  get memoryFaultedIn(): boolean {
    return this.faultedIn;
  }
  /** Whether block writes to the slab bypass the page cache (O_DIRECT). */
  get slabWritesDirect(): boolean {
    return this.slab.writesDirect;
  }
  get pinnedBlocks(): number {
    return this.space.pinnedBytes / this.blockSize;
  }

  has(key: BlockKey): boolean {
    return this.memory.has(key) || this.slots.has(key) || this.held.has(key);
  }

  /**
   * has(), except for a slot loaded at start-up and not read since with no other copy
   * here (unchecked): a read checks it first (check), off the event loop.
   */
  ready(key: BlockKey): boolean {
    const slot = this.slots.get(key);
    if (slot !== undefined && !slot.unverified) return true;
    return this.memory.has(key) || this.held.has(key) || (slot !== undefined && this.writing.has(key));
  }

  /**
   * has(), and for a slot loaded at start-up and not read since, its check against its
   * name now (verifySync, on the event loop): a read about to use the block fetches it
   * again instead of failing on it. Client reads check with check() instead.
   */
  usable(key: BlockKey): boolean {
    if (this.ready(key)) return true;
    const slot = this.slots.get(key);
    return slot !== undefined && this.verifySync(key, slot);
  }

  /** Whether `key` is on this host only in a slot loaded at start-up and not yet checked against its name. */
  unchecked(key: BlockKey): boolean {
    return this.slots.has(key) && !this.ready(key);
  }

  /**
   * Check these slots loaded at start-up against their names, reading them through the
   * thread pool: after a restart the page cache need not hold the slab, and a check on
   * the event loop would hold every volume's requests for the device's reads. A corrupt
   * block is dropped if its slot says the store holds it, else kept and reported; either
   * way it is not ready(), and the caller asks the store for it (a power cut can leave
   * the slot's in-store mark behind while the pack is there).
   */
  check(keys: readonly BlockKey[]): Promise<void> {
    return Promise.all(keys.map((key) => this.checkOne(key))).then(() => undefined);
  }

  private checkOne(key: BlockKey): Promise<void> {
    const inFlight = this.checking.get(key);
    if (inFlight !== undefined) return inFlight;
    const slot = this.slots.get(key);
    if (slot === undefined || !slot.unverified) return Promise.resolve();
    // Reused buffers: one of its own per check would be a GiB of garbage per GiB checked.
    const scratch = this.checkBuffers.pop() ?? Buffer.allocUnsafeSlow(this.blockSize);
    const work = this.readSlot(slot, scratch)
      .then((block) => {
        // Evicted, rewritten or checked while the read was in flight: nothing to judge.
        if (this.slots.get(key) !== slot || !slot.unverified || this.writing.has(key)) return;
        this.judge(key, slot, block !== undefined && this.blockHash(block).toString('latin1') === key);
      })
      .finally(() => {
        this.checking.delete(key);
        if (this.checkBuffers.length < MAX_CHECK_BUFFERS) this.checkBuffers.push(scratch);
      });
    this.checking.set(key, work);
    return work;
  }

  /** A slot's whole block, read through the thread pool into `block`; undefined when the slab ends first. */
  protected async readSlot(slot: Slot, block: Buffer = Buffer.allocUnsafe(this.blockSize)): Promise<Buffer | undefined> {
    const done = await this.readSlab(block, 0, block.length, slot.index * this.blockSize);
    return done === block.length ? block : undefined;
  }

  /** `length` bytes of the slab at `position` into `dst`, through the thread pool; fewer where the slab ends. */
  private async readSlab(dst: Buffer, dstOffset: number, length: number, position: number): Promise<number> {
    let done = 0;
    while (done < length) {
      const { bytesRead } = await read(this.slabFd, dst, dstOffset + done, length - done, position + done);
      if (bytesRead === 0) break;
      done += bytesRead;
    }
    return done;
  }

  /**
   * Copy `length` bytes at `offset` of block `key` into `dst`. Synchronous: the disk
   * tier is read with pread, which the page cache serves in microseconds. Returns
   * false when the block is not on this host.
   */
  readInto(key: BlockKey, offset: number, length: number, dst: Buffer, dstOffset: number): boolean {
    const found = this.copyOrSlot(key, offset, length, dst, dstOffset);
    if (typeof found === 'boolean') return found;
    const n = disk.readSync(this.slabFd, dst, dstOffset, length, found.index * this.blockSize + offset);
    if (n !== length) throw shortRead(found, n, length);
    this.diskHit(key);
    return true;
  }

  /**
   * readInto, but undefined when the block's bytes on the slab are not all in the page
   * cache: reading them would wait for the device (readIntoLater does, off the event loop).
   */
  readIntoNow(key: BlockKey, offset: number, length: number, dst: Buffer, dstOffset: number): boolean | undefined {
    const found = this.copyOrSlot(key, offset, length, dst, dstOffset);
    if (typeof found === 'boolean') return found;
    const n = disk.readNowSync(this.slabFd, dst, dstOffset, length, found.index * this.blockSize + offset);
    if (n === undefined) return undefined;
    if (n !== length) throw shortRead(found, n, length);
    this.diskHit(key);
    return true;
  }

  /**
   * readInto for each of `reads` (into `dst`), with the slab read through the thread pool:
   * reads of adjacent slab bytes into adjacent `dst` bytes go as one pread. Which slot each
   * block reads is decided now. False when a block is not on this host, or left the cache
   * while it was read (its slot may hold another block's bytes by then).
   */
  async readIntoLater(dst: Buffer, reads: readonly LaterRead[]): Promise<boolean> {
    const runs: number[] = [];
    // The slot each read takes, and the first slot of each run (for a short read's error).
    const slots: Array<[BlockKey, Slot]> = [];
    const firsts: Slot[] = [];
    for (const { key, offset, length, dstOffset } of reads) {
      const found = this.copyOrSlot(key, offset, length, dst, dstOffset);
      if (found === false) return false;
      if (found === true) continue;
      slots.push([key, found]);
      if (addRun(runs, found.index * this.blockSize + offset, dstOffset, length)) firsts.push(found);
    }
    const preads: Array<Promise<number>> = [];
    for (let r = 0; r < runs.length; r += 3) preads.push(this.readSlab(dst, runs[r + 1], runs[r + 2], runs[r]));
    // Every pread settles before a failure is thrown: none writes into `dst` after that.
    const done = await Promise.allSettled(preads);
    for (const outcome of done) if (outcome.status === 'rejected') throw outcome.reason;
    for (const [key, slot] of slots) if (this.slots.get(key) !== slot) return false;
    for (const [i, first] of firsts.entries()) {
      const n = (done[i] as PromiseFulfilledResult<number>).value;
      if (n !== runs[3 * i + 2]) throw shortRead(first, n, runs[3 * i + 2]);
    }
    for (const [key] of slots) this.diskHit(key);
    return true;
  }

  /**
   * What the readInto variants share: true once `key`'s bytes are copied from memory (the
   * memory tier, a held block, a slab write in flight), false when it is not on this host,
   * else its slot, to read from the slab.
   */
  private copyOrSlot(key: BlockKey, offset: number, length: number, dst: Buffer, dstOffset: number): boolean | Slot {
    if (this.memory.readInto(key, offset, length, dst, dstOffset)) {
      this.counters.memoryHits++;
      return true;
    }
    const slot = this.slots.get(key);
    if (slot === undefined) {
      const held = this.held.get(key);
      if (held === undefined) {
        this.counters.misses++;
        return false;
      }
      this.counters.memoryHits++;
      held.copy(dst, dstOffset, offset, offset + length);
      return true;
    }
    const pending = this.writing.get(key);
    if (pending !== undefined) {
      this.counters.memoryHits++;
      pending.copy(dst, dstOffset, offset, offset + length);
      return true;
    }
    if (slot.unverified && !this.verifySync(key, slot)) {
      this.counters.misses++;
      return false;
    }
    return slot;
  }

  private diskHit(key: BlockKey): void {
    this.counters.diskHits++;
    this.diskPolicy.hit(key);
  }

  /**
   * The first read of a slot loaded at start-up: whether its bytes match its name. One that
   * does not is dropped if the store has it (the next read fetches it again), or kept and
   * reported if it is the only copy (reads of it fail; nothing wrong is returned).
   */
  protected verifySync(key: BlockKey, slot: Slot): boolean {
    const block = (this.verifyBuffer ??= Buffer.allocUnsafe(this.blockSize));
    const n = disk.readSync(this.slabFd, block, 0, this.blockSize, slot.index * this.blockSize);
    return this.judge(key, slot, n === this.blockSize && this.blockHash(block).toString('latin1') === key);
  }

  /** The verdict on a loaded slot's bytes (see verifySync). */
  protected judge(key: BlockKey, slot: Slot, intact: boolean): boolean {
    if (intact) {
      slot.unverified = undefined;
      return true;
    }
    if (this.dropCorrupt(key, slot, 'block cache: a block loaded at start-up')) this.counters.verifyEvictions++;
    return false;
  }

  /**
   * A cached block whose bytes do not match its name (`what` found it): dropped when the
   * store holds it (it is fetched again), reported when it is the only copy. Returns
   * whether it was dropped.
   */
  protected dropCorrupt(key: BlockKey, slot: Slot, what: string): boolean {
    if (slot.inStore && slot.holding === undefined) {
      this.diskPolicy.remove(key);
      this.freeSlot(key, slot);
      this.log.warn(`${what} does not match its name; dropped (the store has it)`, { block: keyHex(key), slot: slot.index });
      return true;
    }
    this.log.error(`${what} that only this host holds does not match its name; reads of it fail`, { block: keyHex(key), slot: slot.index });
    return false;
  }

  /** A block a failed sync may have lost is put again: write its slot anew from these bytes. */
  protected rewriteLost(key: BlockKey, slot: Slot, block: Buffer): void {
    this.lost.delete(key);
    this.unsynced.add(key);
    this.writing.set(key, block);
    this.writingFromMemory.delete(key); // written from `block` now
    this.slabDirty = true;
    slot.unverified = undefined;
    const write = (slot.writing ?? Promise.resolve())
      .catch(() => undefined)
      .then(() => this.slab.write([block], slot.index * this.blockSize))
      .then(
        () => {
          if (this.writing.get(key) === block) this.writing.delete(key);
        },
        (err) => {
          this.counters.slabWriteFailures++;
          this.log.error('block cache: slab rewrite of a block a failed sync lost failed; the block stays in memory', { slot: slot.index, error: err.message });
          if (this.slots.get(key) === slot && !slot.inStore) this.lost.add(key);
          throw err;
        },
      );
    slot.writing = write;
    this.track(write);
  }

  /** Queue slot `key`'s table entry with `flags`, once its slab write has landed. */
  protected writeFlags(key: BlockKey, slot: Slot, flags: number): void {
    const landed = (slot.writing ?? Promise.resolve()).catch(() => undefined);
    this.track(landed.then(() => (this.slots.get(key) === slot ? this.writeEntry(slot.index, key, flags) : undefined)));
  }

  protected track(work: Promise<void>): void {
    this.inflight.add(work);
    work.then(
      () => this.inflight.delete(work),
      () => this.inflight.delete(work),
    );
  }

  /**
   * Copy `block` into the memory tier (an arena slot: the caller keeps its buffer),
   * evicting as needed, and return the copy there; undefined when the tier cannot take it.
   * A block whose slab write reads its copy is not evicted until the write lands, nor one
   * a read waits for (awaitBlocks): with the tier full of those, the block is not taken.
   * `expectedReads`: reads already expected of it (read-ahead: one).
   */
  protected admitToMemory(key: BlockKey, block: Buffer, expectedReads = 0): Buffer | undefined {
    return this.memory.admit(key, block, this.memoryEvictable, expectedReads);
  }

  /**
   * A block a read waits for that neither tier took: keep a copy for the read (`block` is
   * the caller's, reused later) until the reads waiting for it release it (awaitBlocks).
   * Past MAX_HELD_BYTES it is not kept, and the read fetches it again.
   */
  protected holdForReads(key: BlockKey, block: Buffer): void {
    if (!this.awaited.has(key) || this.held.has(key) || this.heldBytes + block.length > MAX_HELD_BYTES) return;
    this.held.set(key, Buffer.from(block));
    this.heldBytes += block.length;
    this.counters.heldForReads++;
  }

  /** No read waits for `key` any more: its held copy goes. */
  protected dropHeld(key: BlockKey): void {
    const block = this.held.get(key);
    if (block === undefined) return;
    this.held.delete(key);
    this.heldBytes -= block.length;
  }

  /** Bytes of blocks held for waiting reads outside both tiers (at most MAX_HELD_BYTES). */
  get heldForReadsBytes(): number {
    return this.heldBytes;
  }

  private readonly memoryEvictable = (victim: BlockKey): boolean => !this.writingFromMemory.has(victim) && !this.awaited.has(victim);

  protected allocateSlot(evict = true): number | undefined {
    const free = this.freeSlots.pop();
    if (free !== undefined) return free;
    if (this.highWater < this.maxSlots) return this.highWater++;
    if (!evict) return undefined;
    // Full: evict a block the store holds (never a pinned one).
    const victim = this.diskPolicy.evict((key) => {
      const slot = this.slots.get(key);
      return slot !== undefined && slot.inStore && slot.holding === undefined && !this.writing.has(key) && !this.awaited.has(key);
    });
    if (victim === undefined) return undefined;
    const slot = this.slots.get(victim)!;
    this.slots.delete(victim);
    this.memory.remove(victim);
    this.counters.diskEvictions++;
    return slot.index;
  }

  /** Free `key`'s disk slot; its memory tier copy goes too unless `keepInMemory` (a block the store holds). */
  protected freeSlot(key: BlockKey, slot: Slot, keepInMemory = false): void {
    this.slots.delete(key);
    this.lost.delete(key);
    this.unsynced.delete(key);
    if (this.writing.has(key)) this.writing.delete(key);
    this.writingFromMemory.delete(key);
    if (!keepInMemory) this.memory.remove(key);
    // The slot is reusable only once its own slab write (if any) and its cleared table
    // entry have landed; otherwise a late write could clobber the next block there.
    const release = (slot.writing ?? Promise.resolve())
      .catch(() => undefined)
      .then(() => this.writeEntry(slot.index, undefined, 0))
      .then(() => {
        this.freeSlots.push(slot.index);
      });
    this.track(release);
  }

  /** Queue a slot table write; entries land in the order they were queued. */
  protected writeEntry(index: number, key: BlockKey | undefined, flags: number): Promise<void> {
    return this.writeEntries(index, [key], flags);
  }

  /** Queue the table entries of consecutive slots from `first` as one write. */
  protected writeEntries(first: number, keys: ReadonlyArray<BlockKey | undefined>, flags: number): Promise<void> {
    return this.table.writeEntries(first, keys, flags);
  }

  /**
   * Make every block put so far durable (slab, then slot table). Volumes call this
   * before committing a journal that names new blocks. Concurrent callers share one
   * round of fdatasync calls.
   */
  async sync(): Promise<void> {
    while (this.syncing) await this.syncing;
    if (!this.slabDirty) return;
    this.slabDirty = false;
    const covered = this.unsynced;
    this.unsynced = new Set();
    this.syncing = (async () => {
      await Promise.all(this.inflight);
      await this.table.settled();
      await this.syncFile(this.slabFd, 'blocks.slab');
      await this.syncFile(this.table.fd, 'blocks.slots');
    })();
    try {
      await this.syncing;
    } catch (err) {
      this.slabDirty = true;
      this.loseUnsynced(covered);
      throw err;
    } finally {
      this.syncing = undefined;
    }
  }

  /**
   * Make these blocks durable: a sync() when one of them was put since the last sync began,
   * or while a sync runs (it may be the one covering them); otherwise they are durable already.
   */
  async syncFor(keys: readonly BlockKey[]): Promise<void> {
    if (this.syncing === undefined && !keys.some((key) => this.unsynced.has(key))) return;
    await this.sync();
  }

  private async syncFile(fd: number, file: string): Promise<void> {
    try {
      await fdatasync(fd);
    } catch (err) {
      this.counters.syncFailures++;
      throw new Error(`block cache ${path.join(this.dir, file)}: fdatasync: ${(err as Error).message}`);
    }
  }

  /**
   * After a failed sync: the pinned blocks it covered (and those written while it ran)
   * may be gone from the disk although the page cache still serves them. They are
   * remembered as lost, and their slots are read back against their names (a mismatch is
   * a miss, never wrong data).
   */
  private loseUnsynced(covered: Set<BlockKey>): void {
    for (const set of [covered, this.unsynced]) {
      for (const key of set) {
        const slot = this.slots.get(key);
        if (slot === undefined || slot.inStore) continue;
        this.lost.add(key);
        slot.unverified = true;
      }
    }
    this.unsynced = new Set();
    this.log.error('block cache: a sync of the slab failed; pinned blocks written since the last good sync may be lost, and volumes that would name them fail', {
      dir: this.dir, blocks: this.lost.size,
    });
  }

  /** Whether a failed sync may have lost this pinned block: a journal must not name it. */
  lostBlock(key: BlockKey): boolean {
    return this.lost.size > 0 && this.lost.has(key);
  }

  /** Wait for every queued slab and table write (before closing). */
  async settle(): Promise<void> {
    await Promise.allSettled(this.inflight);
    await this.table.settled();
  }

  async close(): Promise<void> {
    await this.memory.stopTouching();
    await this.touching;
    await this.settle();
    // A check's read must not land on a descriptor number reused after the close.
    await Promise.allSettled(this.checking.values());
    disk.closeSync(this.slabFd);
    if (this.slabDirectFd !== undefined) disk.closeSync(this.slabDirectFd);
    disk.closeSync(this.table.fd);
  }
}
