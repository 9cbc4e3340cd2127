// The host's content-addressed block cache (DESIGN.md: blocks/). One per host, shared
// by every volume. Two tiers (their state: blocks/cache-tiers.ts):
//   memory: whole blocks in an arena, bounded by memory_size_gb, S3-FIFO (blocks/memory-tier.ts).
//   disk:   a slab file of block_size slots plus a slot table (hash, flags) per slot,
//           bounded by disk_size_gb, S3-FIFO over the slots that may be evicted (blocks/slab.ts).
// This file: putting sealed blocks, references and pins, admitting packs fetched from the
// store, whole-block reads and the scrub.
// A block referenced by a volume and not yet in the object store is pinned: it is the
// only copy, so it is never evicted. So is one a volume sealed while the store had it,
// until that volume's hold on its pack is committed (pinUntilHeld). Blocks nobody
// references and no store holds are garbage and their slot is freed at once.
import { disk } from '../disk/disk.js';
import path from 'node:path';
import type { Logger } from '../log.js';
import { injected } from '../faults/injected.js';
import { keyHex, type BlockKey } from './block-key.js';
import { CacheTiers, type BlockCacheOptions } from './cache-tiers.js';
import { SLOT_IN_STORE, SLOT_USED, type BlockSealer, type Slot } from './slab.js';

export { blockKey, keyBytes, keyHex, type BlockKey } from './block-key.js';
export { LocalSpace } from './local-space.js';
export type { BlockCacheOptions, CacheCounters, LaterRead } from './cache-tiers.js';
export type { BlockSealer } from './slab.js';

export class BlockCache extends CacheTiers {
  /** Where the background scrub is in the slot map; restarted when it runs out. */
  private scrubCursor: Iterator<BlockKey> | undefined;

  /** Open (or create) the cache in `dir` and load its slot table. */
  static open(dir: string, opts: BlockCacheOptions, log: Logger): BlockCache {
    disk.mkdirSync(dir, { recursive: true });
    const tablePath = path.join(dir, 'blocks.slots');
    const slabPath = path.join(dir, 'blocks.slab');
    const fresh = !disk.existsSync(tablePath);
    const tableFd = disk.openSync(tablePath, fresh ? 'w+' : 'r+');
    const slabFd = disk.openSync(slabPath, disk.existsSync(slabPath) ? 'r+' : 'w+');
    const cache = new BlockCache(dir, slabFd, tableFd, opts, log, opts.directWrites === false ? undefined : disk.openDirectSync(slabPath));
    if (fresh) {
      cache.table.writeHeader(opts.blockSize, opts.namesId);
    } else {
      cache.loadTable(opts.namesId);
      // Slab and slot writes of a killed process may be in the page cache only: durable
      // before a volume names those blocks again and a FLUSH with nothing dirty acks them.
      if (!injected.has('recover-without-sync')) {
        disk.fsyncSync(slabFd);
        disk.fsyncSync(tableFd);
      }
    }
    // The files' names must survive a power cut too (a start that failed before this left
    // them in the page cache only), or a flushed volume names blocks that vanished.
    if (fresh || !injected.has('recover-without-sync')) {
      const dirFd = disk.openSync(dir, 'r');
      try {
        disk.fsyncSync(dirFd);
      } finally {
        disk.closeSync(dirFd);
      }
    }
    return cache;
  }

  /** Take a reference to a block a volume's block map names. */
  ref(key: BlockKey): boolean {
    const slot = this.slots.get(key);
    if (slot === undefined) return false;
    slot.refs++;
    return true;
  }

  /**
   * Drop a reference; a block with none left that no store holds is freed. References
   * only matter for pinned blocks: a block the store holds may have been fetched after
   * its referrers opened (and took no reference), so its count stops at zero.
   */
  unref(key: BlockKey): void {
    const slot = this.slots.get(key);
    if (slot === undefined) return;
    if (slot.inStore && slot.refs <= 0) return;
    if (--slot.refs > 0) return;
    if (slot.refs < 0) throw new Error(`block cache: reference count of ${keyHex(key)} went below zero`);
    if (!slot.inStore) {
      this.space.pinnedBytes -= this.blockSize;
      this.diskPolicy.remove(key);
      this.freeSlot(key, slot);
    }
  }

  /**
   * Store a sealed block and take a reference to it. A block already present (from any
   * volume) is not written again. The cache copies `block` (into the memory tier, or a
   * buffer of its own without one), so the caller may reuse it at once. The slab write
   * runs in the thread pool, so a page-cache writeback stall never blocks the event
   * loop; until it lands, reads are served from the copy, which stays in the memory
   * tier. Returns false when the disk budget has no room for a new pinned block
   * (`replacing`: the block takes the place of one that will be released, so it may use
   * the rewrite reserve).
   */
  put(key: BlockKey, block: Buffer, replacing = false): boolean {
    const existing = this.slots.get(key);
    if (existing !== undefined) {
      this.counters.dedupHits++;
      existing.refs++;
      if (this.lost.has(key)) this.rewriteLost(key, existing, Buffer.from(block));
      return true;
    }
    // In the memory tier without a slot: fetched from the store (read-ahead keeps blocks there
    // only), which holds it, as for a fetched block in the slab put again (not pinned; a
    // sealing volume's hold on its pack pins it meanwhile: pinUntilHeld).
    const inStore = this.memory.has(key);
    if (!inStore && !this.space.fits(this.blockSize, replacing)) return false;
    const index = this.allocateSlot();
    if (index === undefined) return false;
    const slot: Slot = { index, refs: 1, inStore };
    this.slots.set(key, slot);
    // The slab write reads the memory tier's copy, which stays until it lands (admitToMemory's evictions skip it).
    let data = this.admitToMemory(key, block);
    if (data !== undefined) this.writingFromMemory.add(key);
    else data = Buffer.from(block);
    this.writing.set(key, data);
    this.unsynced.add(key);
    if (!inStore) this.space.pinnedBytes += this.blockSize;
    this.diskPolicy.insert(key, 1);
    this.slabDirty = true;
    this.counters.blocksWritten++;
    const write = this.slab.write([data], index * this.blockSize)
      .then(() => this.writeEntry(index, key, inStore ? SLOT_USED | SLOT_IN_STORE : SLOT_USED))
      .then(
        () => {
          if (this.writing.get(key) !== data) return;
          this.writing.delete(key);
          this.writingFromMemory.delete(key);
        },
        (err) => {
          this.counters.slabWriteFailures++;
          this.log.error('block cache: slab write failed; the block stays in memory', { slot: index, error: err.message });
          // No journal may name it now (lostBlock): a sync after this one would not see the failure.
          // A later put of the block writes it again (rewriteLost).
          if (this.slots.get(key) === slot && !slot.inStore) this.lost.add(key);
          throw err;
        },
      );
    slot.writing = write;
    this.track(write);
    return true;
  }

  /**
   * A volume sealed `key`, a block the store already holds, and is taking a hold on its
   * pack (invariant 6: the store keeps it for that volume only once the hold is
   * committed). Until the returned function is called the block is pinned, here and in the
   * slot table, so a crash meanwhile leaves it pinned. `held` false: the hold was refused
   * (the pack is being deleted), and the block stays pinned until an upload puts it in a
   * pack again. Undefined when the block is not here.
   */
  pinUntilHeld(key: BlockKey, sealer: BlockSealer): ((held: boolean) => void) | undefined {
    const slot = this.slots.get(key);
    if (slot === undefined) return undefined;
    const wasPinned = !slot.inStore || slot.holding !== undefined;
    slot.holding = (slot.holding ?? 0) + 1;
    if (!wasPinned) {
      this.space.pinnedBytes += this.blockSize;
      // The next sync (before a journal names the block) makes the pin durable.
      this.slabDirty = true;
      this.writeFlags(key, slot, SLOT_USED);
    }
    let settled = false;
    return (held) => {
      // Freed meanwhile: a block no store held that nothing names any more.
      if (settled || this.slots.get(key) !== slot) return;
      settled = true;
      if (--slot.holding! === 0) slot.holding = undefined;
      if (!held) {
        slot.inStore = false;
        this.addSealer(slot, sealer);
      }
      if (slot.inStore && slot.holding === undefined) {
        this.space.pinnedBytes -= this.blockSize;
        this.writeFlags(key, slot, SLOT_USED | SLOT_IN_STORE);
      }
    };
  }

  /** `sealer` sealed `key` while no pack holds it: the upload that puts it in a pack holds the pack for `sealer` too. */
  noteSealer(key: BlockKey, sealer: BlockSealer): void {
    const slot = this.slots.get(key);
    if (slot !== undefined && !slot.inStore) this.addSealer(slot, sealer);
  }

  private addSealer(slot: Slot, sealer: BlockSealer): void {
    const sealers = slot.sealers;
    if (sealers === undefined || sealers === sealer) slot.sealers = sealer;
    else if (sealers instanceof Set) sealers.add(sealer);
    else slot.sealers = new Set([sealers, sealer]);
  }

  /** The volumes that sealed `key` while no pack held it (noteSealer). */
  sealersOf(key: BlockKey): Iterable<BlockSealer> {
    const sealers = this.slots.get(key)?.sealers;
    return sealers === undefined ? [] : sealers instanceof Set ? sealers : [sealers];
  }

  /**
   * A read waits for `keys` to be fetched: until the returned release is called, a block
   * of them that is here is not evicted to make room for another (another pack's blocks
   * would otherwise push out the ones fetched before them, round after round), and one
   * that arrives with no room in either tier is held for the read (holdForReads).
   */
  awaitBlocks(keys: readonly BlockKey[]): () => void {
    for (const key of keys) this.awaited.set(key, (this.awaited.get(key) ?? 0) + 1);
    let released = false;
    return () => {
      if (released) return;
      released = true;
      for (const key of keys) {
        const waiting = this.awaited.get(key)!;
        if (waiting > 1) this.awaited.set(key, waiting - 1);
        else {
          this.awaited.delete(key);
          this.dropHeld(key);
        }
      }
    };
  }

  /** Whether the object store holds this block (so it may be evicted here). */
  isInStore(key: BlockKey): boolean {
    return this.slots.get(key)?.inStore === true;
  }

  /**
   * Cache the blocks of a pack fetched (and verified) from the object store. They are not
   * pinned: the store holds them, so they may be evicted. Without a free or evictable slot
   * a block is kept in the memory tier only; one a read waits for that the memory tier
   * cannot take either is held for that read (holdForReads). Blocks that land in
   * consecutive slots (the usual case: a pack's blocks take slots in a row) are written
   * with one pwritev and one slot table write per run, not 25 of each: 25 writers at once
   * contended for the slab's inode lock (a quarter of a cold read's CPU went to that and
   * the copies).
   *
   * The memory tier takes copies; the slab writes read `blocks` until the returned promise
   * settles (it never rejects), after which the caller may reuse their buffer.
   *
   * `stream`: fetched for a sequential reader (read-ahead). Such a block goes to the memory
   * tier only, the first time: a stream reads most blocks once, and the store holds them.
   * It is written to the slab when it is streamed again after leaving the memory tier
   * (blocks/streamed-keys.ts), or when the memory tier cannot take it.
   */
  putPackFromStore(blocks: ReadonlyArray<{ key: BlockKey; data: Buffer }>, wanted?: ReadonlySet<BlockKey>, stream = false): Promise<void> {
    let run: { first: number; keys: BlockKey[]; data: Buffer[]; slots: Slot[] } | undefined;
    const writes: Promise<void>[] = [];
    const flush = () => {
      if (run !== undefined) writes.push(this.writeRun(run.first, run.keys, run.data, run.slots, wanted));
      run = undefined;
    };
    for (const { key, data } of blocks) {
      const existing = this.slots.get(key);
      if (existing !== undefined) {
        if (existing.unverified && !this.writing.has(key) && !this.verifySync(key, existing) && this.slots.get(key) === existing) {
          this.repairFromStore(key, existing, Buffer.from(data));
        }
        if (this.slots.has(key)) continue;
      }
      if (stream && !this.streamed.take(key) && (this.memory.has(key) || this.admitToMemory(key, data, 1) !== undefined)) {
        this.streamed.add(key);
        this.counters.streamedToMemory++;
        continue;
      }
      // A pack's other blocks take only room that is free: evicting for them would push out
      // the blocks a waiting read needs (fetched from other packs meanwhile).
      const needed = wanted === undefined || wanted.has(key);
      const index = this.allocateSlot(needed);
      if (index === undefined) {
        if (needed && this.admitToMemory(key, data) === undefined) this.holdForReads(key, data);
        continue;
      }
      const slot: Slot = { index, refs: 0, inStore: true };
      this.slots.set(key, slot);
      this.counters.fetchedWritten++;
      this.writing.set(key, data);
      this.diskPolicy.insert(key, 1);
      this.slabDirty = true;
      this.admitToMemory(key, data);
      // A run continues into the next slot only after a whole block (a short one ends it).
      if (run !== undefined && run.first + run.keys.length === index && run.data[run.data.length - 1].length === this.blockSize) {
        run.keys.push(key);
        run.data.push(data);
        run.slots.push(slot);
      } else {
        flush();
        run = { first: index, keys: [key], data: [data], slots: [slot] };
      }
    }
    flush();
    return Promise.all(writes).then(() => undefined);
  }

  /**
   * A slot whose bytes do not match its name although a pack in the store holds the block
   * (a power cut took its slab write and its in-store mark): it takes the fetched bytes.
   */
  private repairFromStore(key: BlockKey, slot: Slot, block: Buffer): void {
    this.log.warn('block cache: a block that did not match its name is written again from the store', { block: keyHex(key), slot: slot.index });
    this.rewriteLost(key, slot, block);
    this.admitToMemory(key, block);
    if (slot.inStore) return;
    slot.inStore = true;
    this.space.pinnedBytes -= this.blockSize;
    const landed = slot.writing!.catch(() => undefined);
    this.track(landed.then(() => (this.slots.get(key) === slot ? this.writeEntry(slot.index, key, SLOT_USED | SLOT_IN_STORE) : undefined)));
  }

  /**
   * Write fetched blocks into consecutive slots from `first`, then their table entries.
   * Settles (never rejects) once nothing reads `data` any more: the caller's buffer is free.
   * Should the write fail, the blocks leave the disk tier but the ones a read waits for
   * (`wanted`; all for read-ahead) stay in the memory tier, so that read still finds them.
   */
  private writeRun(first: number, keys: BlockKey[], data: Buffer[], slots: Slot[], wanted: ReadonlySet<BlockKey> | undefined): Promise<void> {
    const write = this.slab.write(data, first * this.blockSize)
      .then(() => this.writeEntries(first, keys, SLOT_USED | SLOT_IN_STORE))
      .then(
        () => {
          for (let i = 0; i < keys.length; i++) if (this.writing.get(keys[i]) === data[i]) this.writing.delete(keys[i]);
        },
        (err) => {
          // The store has them: they leave the disk tier (a later read fetches them again), and
          // `data`, which the caller reuses, is not read from after this. The ones a read waits
          // for stay in the memory tier: dropping them would leave that read nothing to take,
          // fetch after fetch, while the disk stays full.
          this.counters.slabWriteFailures++;
          this.log.error('block cache: slab write of fetched blocks failed; they leave the disk tier', { slot: first, blocks: keys.length, error: err.message });
          for (let i = 0; i < keys.length; i++) {
            if (this.writing.get(keys[i]) !== data[i]) continue;
            this.writing.delete(keys[i]);
            if (this.slots.get(keys[i]) !== slots[i]) continue;
            this.diskPolicy.remove(keys[i]);
            const needed = wanted === undefined || wanted.has(keys[i]);
            this.freeSlot(keys[i], slots[i], needed);
            if (needed && this.admitToMemory(keys[i], data[i]) === undefined) this.holdForReads(keys[i], data[i]);
          }
        },
      );
    for (const slot of slots) slot.writing = write;
    this.track(write);
    return write;
  }

  /**
   * The store now holds these blocks (their pack is uploaded): unpin them, so the
   * cache may evict them once it needs the room. Returns how many were pinned.
   */
  markInStore(keys: Iterable<BlockKey>): number {
    let unpinned = 0;
    for (const key of keys) {
      const slot = this.slots.get(key);
      if (slot === undefined || slot.inStore) continue;
      slot.inStore = true;
      slot.sealers = undefined;
      // A hold being taken keeps it pinned until it settles (pinUntilHeld).
      if (slot.holding !== undefined) continue;
      this.space.pinnedBytes -= this.blockSize;
      unpinned++;
      this.writeFlags(key, slot, SLOT_USED | SLOT_IN_STORE);
    }
    return unpinned;
  }

  /**
   * The block if it is in memory (the memory tier, or a slab write in flight), without a
   * copy: a view valid only until the caller next yields (the slot may then take another
   * block). Undefined otherwise (readBlock reads it from the disk tier).
   */
  blockInMemory(key: BlockKey): Buffer | undefined {
    const pending = this.writing.get(key);
    if (pending !== undefined) return pending;
    return this.memory.view(key);
  }

  /** The whole block, read through the thread pool; undefined when it is not on this host. */
  async readBlock(key: BlockKey): Promise<Buffer | undefined> {
    // Copies: a memory tier slot, or a reused buffer of fetched blocks, may take another block meanwhile.
    const pending = this.writing.get(key);
    if (pending !== undefined) return Buffer.from(pending);
    const inMemory = this.memory.copy(key);
    if (inMemory !== undefined) return inMemory;
    const slot = this.slots.get(key);
    if (slot === undefined) return undefined;
    const block = await this.readSlot(slot);
    if (block === undefined) throw new Error(`block cache: slot ${slot.index} ends early`);
    // The slot may have been evicted and reused while the read was in flight.
    if (this.slots.get(key) !== slot) return undefined;
    if (slot.unverified && !this.judge(key, slot, this.blockHash(block).toString('latin1') === key)) return undefined;
    return block;
  }

  /**
   * Background scrub: read up to `count` more blocks from the disk tier and check each
   * against its name (invariant 3: a bit flipped on the SSD must become a miss, never
   * wrong data). A corrupt block the store holds is evicted and will be fetched again; a
   * corrupt pinned block has no other copy and is reported. Returns the corrupt ones.
   */
  async scrubStep(count: number): Promise<BlockKey[]> {
    const corrupt: BlockKey[] = [];
    for (let i = 0; i < count; i++) {
      let next = this.scrubCursor?.next();
      if (next === undefined || next.done) {
        this.scrubCursor = this.slots.keys();
        next = this.scrubCursor.next();
        if (next.done) break;
      }
      const key = next.value;
      const slot = this.slots.get(key);
      if (slot === undefined || this.writing.has(key)) continue;
      const block = await this.readSlot(slot);
      // Evicted or rewritten while the read was in flight: nothing to judge.
      if (this.slots.get(key) !== slot || this.writing.has(key)) continue;
      this.counters.blocksScrubbed++;
      if (block !== undefined && this.blockHash(block).toString('latin1') === key) {
        slot.unverified = undefined;
        continue;
      }
      corrupt.push(key);
      if (this.dropCorrupt(key, slot, 'cache scrub: a cached block')) this.counters.scrubEvictions++;
      else this.counters.scrubCorruptPinned++;
    }
    return corrupt;
  }
}
