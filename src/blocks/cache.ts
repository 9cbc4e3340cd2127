// The host's content-addressed block cache (DESIGN.md: blocks/). One per host, shared
// by every volume. Two tiers:
//   memory: whole blocks in Buffers, bounded by memory_size_gb, S3-FIFO.
//   disk:   a slab file of block_size slots plus a slot table (hash, flags) per slot,
//           bounded by disk_size_gb, S3-FIFO over the slots that may be evicted.
// A block referenced by a volume and not yet in the object store is pinned: it is the
// only copy, so it is never evicted. So is one a volume sealed while the store had it,
// until that volume's hold on its pack is committed (pinUntilHeld). Blocks nobody
// references and no store holds are garbage and their slot is freed at once.
import { disk } from '../disk/disk.js';
import path from 'node:path';
import { BlockArena } from './arena.js';
import { S3Fifo } from './s3fifo.js';
import { HASH_BYTES, type BlockHasher } from '../crypto/hash.js';
import type { Logger } from '../log.js';
import { injected } from '../faults/injected.js';

const fdatasync = (...args: Parameters<typeof disk.fdatasync>) => disk.fdatasync(...args);
const write = (...args: Parameters<typeof disk.write>) => disk.write(...args);
const read = (...args: Parameters<typeof disk.read>) => disk.read(...args);

/** Write a whole buffer at a position through the thread pool. */
async function writeAt(fd: number, buf: Buffer, position: number): Promise<void> {
  let done = 0;
  while (done < buf.length) {
    const { bytesWritten } = await write(fd, buf, done, buf.length - done, position + done);
    done += bytesWritten;
  }
}

const writev = (...args: Parameters<typeof disk.writev>) => disk.writev(...args);

/** Write buffers back to back from a position through the thread pool (one pwritev, then the rest if short). */
async function writevAt(fd: number, buffers: Buffer[], position: number): Promise<void> {
  const total = buffers.reduce((n, b) => n + b.length, 0);
  const { bytesWritten } = await writev(fd, buffers, position);
  if (bytesWritten >= total) return;
  // A short write: the rest, one buffer at a time.
  let skip = bytesWritten;
  let at = position;
  for (const buffer of buffers) {
    if (skip >= buffer.length) {
      skip -= buffer.length;
      at += buffer.length;
      continue;
    }
    await writeAt(fd, buffer.subarray(skip), at + skip);
    at += buffer.length;
    skip = 0;
  }
}

/** A block name as a 16-character latin1 string: cheap Map key, exact bytes. */
export type BlockKey = string;

export function blockKey(hash: Uint8Array): BlockKey {
  return Buffer.from(hash.buffer, hash.byteOffset, HASH_BYTES).toString('latin1');
}
export function keyBytes(key: BlockKey): Buffer {
  return Buffer.from(key, 'latin1');
}
export function keyHex(key: BlockKey): string {
  return keyBytes(key).toString('hex');
}

const SLOT_ENTRY_BYTES = 32;
const SLOT_USED = 1;
const SLOT_IN_STORE = 2;
const SLOT_TABLE_MAGIC = Buffer.from('UPDSLOT1');
/** Slot table header: magic(8), block size u32 BE, names id(16) at 12, zeros to 32. */
const NAMES_ID_AT = 12;
const NAMES_ID_BYTES = 16;

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
}

interface Slot {
  index: number;
  refs: number;
  inStore: boolean;
  /** Set while the block's slab write is in flight: the slot must not be reused before it lands. */
  writing?: Promise<void>;
  /**
   * Loaded from the slot table at start-up and not read since: its first read checks the
   * block against its name. A crash can leave a table entry on disk whose slab write is
   * not (the kernel writes the two files back in any order), or an evicted slot's entry
   * under a newer block's bytes; that read then misses instead of returning other data.
   */
  unverified?: true;
  /**
   * Holds on the store's copy being taken for volumes that sealed this block (pinUntilHeld):
   * pinned until they are committed, though the store has it.
   */
  holding?: number;
  /** The volumes that sealed this block while no pack held it (noteSealer), until it is in the store; one is kept without a Set. */
  sealers?: BlockSealer | Set<BlockSealer>;
}

/**
 * A volume that seals blocks, as its store link knows it: an upload of a block it sealed
 * while no pack held it holds that pack for it too (invariant 6).
 */
export interface BlockSealer {
  /** The refcount key of the volume's uploads set. */
  readonly hold: string;
  /** The volume left the host: nothing is held for it any more. */
  left: boolean;
  /** An upload is holding `pack` for it (before the pack's PUT): its store link keeps it held past its next drain. */
  holding(pack: string): void;
}

/**
 * Bytes of local disk that only exist here: overlay sectors plus pinned blocks, against
 * the disk budget. Rewrites of data that already has a block may also use a reserve
 * above the budget: a full disk must not stop a guest rewriting its own journal, and the
 * seal that follows releases the old block, giving the room back.
 */
export class LocalSpace {
  overlayBytes = 0;
  pinnedBytes = 0;
  /** Overlay bytes of writes in flight on the thread pool, counted until their sectors are present. */
  writingBytes = 0;
  readonly reserve: number;
  constructor(
    readonly capacity: number,
    blockSize: number,
  ) {
    this.reserve = Math.max(capacity * REWRITE_RESERVE, 4 * blockSize);
  }
  get used(): number {
    return this.overlayBytes + this.pinnedBytes + this.writingBytes;
  }
  /** Whether `extra` bytes of new local-only data fit; `rewrite` may use the reserve. */
  fits(extra: number, rewrite = false): boolean {
    return this.used + extra <= this.capacity + (rewrite ? this.reserve : 0);
  }
}

/** Share of the disk budget kept for rewrites of data that already has a block. */
const REWRITE_RESERVE = 0.05;

export class BlockCache {
  readonly blockSize: number;
  readonly space: LocalSpace;
  readonly counters: CacheCounters = {
    memoryHits: 0, diskHits: 0, misses: 0, memoryEvictions: 0, diskEvictions: 0, blocksWritten: 0, dedupHits: 0,
    blocksScrubbed: 0, scrubEvictions: 0, scrubCorruptPinned: 0, verifyEvictions: 0, syncFailures: 0,
  };
  /** Scratch for verifySync. */
  private verifyBuffer: Buffer | undefined;
  /** Where the background scrub is in the slot map; restarted when it runs out. */
  private scrubCursor: Iterator<BlockKey> | undefined;
  private readonly slots = new Map<BlockKey, Slot>();
  private readonly freeSlots: number[] = [];
  private highWater = 0;
  private readonly maxSlots: number;
  private readonly diskPolicy: S3Fifo<BlockKey>;
  /** The memory tier: block → its slot in `arena`. */
  private readonly memory = new Map<BlockKey, number>();
  private readonly memoryPolicy: S3Fifo<BlockKey>;
  /** The memory tier's buffers: at most memoryBytes, in block_size slots. */
  private readonly arena: BlockArena;
  /** Blocks put but not yet written to the slab; reads are served from here meanwhile. */
  private readonly writing = new Map<BlockKey, Buffer>();
  /** Blocks put whose slab write reads their memory-tier copy: not evicted from memory until it lands. */
  private readonly writingFromMemory = new Set<BlockKey>();
  /**
   * Blocks reads wait for while their packs are fetched (awaitBlocks), each with how many
   * reads wait: neither tier evicts them for another block until the reads have them. At
   * most the keys of the reads waiting; the memory tier still never exceeds its setting.
   */
  private readonly awaited = new Map<BlockKey, number>();
  private readonly inflight = new Set<Promise<void>>();
  /** Slot table writes, in order: a slot freed and reused must end with the newer entry. */
  private tableTail: Promise<void> = Promise.resolve();
  private slabDirty = false;
  private syncing: Promise<void> | undefined;
  /** Pinned blocks written to the slab since the last sync began: the ones a failed sync may lose. */
  private unsynced = new Set<BlockKey>();
  /**
   * Pinned blocks whose slab write a failed sync covered: the kernel may have dropped them
   * (a later sync succeeds without them), so no journal may name them (lostBlock). Cleared
   * when the block's slot is freed; a restart reloads every slot as unverified.
   */
  private readonly lost = new Set<BlockKey>();
  /** How blocks are named here (plain or keyed BLAKE3): the scrub's check. */
  private readonly blockHash: BlockHasher;

  private constructor(
    private readonly dir: string,
    private readonly slabFd: number,
    private readonly tableFd: number,
    opts: BlockCacheOptions,
    private readonly log: Logger,
  ) {
    this.blockSize = opts.blockSize;
    this.blockHash = opts.blockHash;
    this.maxSlots = Math.max(1, Math.floor(opts.diskBytes / opts.blockSize));
    this.space = new LocalSpace(opts.diskBytes, opts.blockSize);
    this.diskPolicy = new S3Fifo(this.maxSlots);
    this.memoryPolicy = new S3Fifo(opts.memoryBytes);
    this.arena = new BlockArena(opts.blockSize, opts.memoryBytes);
  }

  /** Open (or create) the cache in `dir` and load its slot table. */
  static open(dir: string, opts: BlockCacheOptions, log: Logger): BlockCache {
    disk.mkdirSync(dir, { recursive: true });
    const tablePath = path.join(dir, 'blocks.slots');
    const slabPath = path.join(dir, 'blocks.slab');
    const fresh = !disk.existsSync(tablePath);
    const tableFd = disk.openSync(tablePath, fresh ? 'w+' : 'r+');
    const slabFd = disk.openSync(slabPath, disk.existsSync(slabPath) ? 'r+' : 'w+');
    const cache = new BlockCache(dir, slabFd, tableFd, opts, log);
    if (fresh) {
      const header = Buffer.alloc(SLOT_ENTRY_BYTES);
      SLOT_TABLE_MAGIC.copy(header, 0);
      header.writeUInt32BE(opts.blockSize, 8);
      opts.namesId.copy(header, NAMES_ID_AT, 0, NAMES_ID_BYTES);
      disk.writeSync(tableFd, header, 0, header.length, 0);
      disk.fsyncSync(tableFd);
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

  private loadTable(namesId: Buffer): void {
    const table = disk.readFileSync(path.join(this.dir, 'blocks.slots'));
    if (table.length < SLOT_ENTRY_BYTES || !table.subarray(0, 8).equals(SLOT_TABLE_MAGIC)) {
      throw new Error(`block cache ${this.dir}: blocks.slots is not a slot table (bad magic)`);
    }
    const tableBlockSize = table.readUInt32BE(8);
    if (tableBlockSize !== this.blockSize) {
      throw new Error(
        `block cache ${this.dir} was created with block_size ${tableBlockSize}; the config says ${this.blockSize}. ` +
          'Use the same block_size or a new cache dir.',
      );
    }
    // Caches from before encryption have zeros here: plain BLAKE3, as they were.
    const tableNames = table.subarray(NAMES_ID_AT, NAMES_ID_AT + NAMES_ID_BYTES);
    if (!tableNames.equals(namesId.subarray(0, NAMES_ID_BYTES))) {
      const what = (id: Buffer) => (id.every((b) => b === 0) ? 'plain BLAKE3 (an unencrypted store)' : `the keyed BLAKE3 of an encrypted store (key id ${id.toString('hex')})`);
      throw new Error(
        `block cache ${this.dir} names blocks with ${what(tableNames)}; this store names them with ${what(namesId)}. ` +
          'Use a new cache dir for this store.',
      );
    }
    const count = Math.floor(table.length / SLOT_ENTRY_BYTES) - 1;
    for (let index = 0; index < count; index++) {
      const at = (index + 1) * SLOT_ENTRY_BYTES;
      const flags = table[at + HASH_BYTES];
      if (!(flags & SLOT_USED) || index >= this.maxSlots) {
        if (index < this.maxSlots) this.freeSlots.push(index);
        continue;
      }
      const key = table.toString('latin1', at, at + HASH_BYTES);
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
    return this.memoryPolicy.size;
  }
  /** Bytes of the buffers the memory tier keeps alive: its arena's, at most memoryBytes. */
  get memoryHeldBytes(): number {
    return this.arena.heldBytes;
  }
  get pinnedBlocks(): number {
    return this.space.pinnedBytes / this.blockSize;
  }

  has(key: BlockKey): boolean {
    return this.memory.has(key) || this.slots.has(key);
  }

  /**
   * has(), and for a slot loaded at start-up and not read since, its check against its
   * name now (verifySync): a read about to use the block fetches it again instead of
   * failing on it.
   */
  usable(key: BlockKey): boolean {
    if (this.memory.has(key)) return true;
    const slot = this.slots.get(key);
    if (slot === undefined) return false;
    return !slot.unverified || this.writing.has(key) || this.verifySync(key, slot);
  }

  /**
   * Copy `length` bytes at `offset` of block `key` into `dst`. Synchronous: the disk
   * tier is read with pread, which the page cache serves in microseconds. Returns
   * false when the block is not on this host.
   */
  readInto(key: BlockKey, offset: number, length: number, dst: Buffer, dstOffset: number): boolean {
    const inMemory = this.memory.get(key);
    if (inMemory !== undefined) {
      this.counters.memoryHits++;
      this.memoryPolicy.hit(key);
      this.arena.copyOut(inMemory, offset, length, dst, dstOffset);
      return true;
    }
    const slot = this.slots.get(key);
    if (slot === undefined) {
      this.counters.misses++;
      return false;
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
    this.counters.diskHits++;
    this.diskPolicy.hit(key);
    const position = slot.index * this.blockSize + offset;
    const n = disk.readSync(this.slabFd, dst, dstOffset, length, position);
    if (n !== length) throw new Error(`block cache: short read of slot ${slot.index} (${n} of ${length} bytes)`);
    return true;
  }

  /**
   * The first read of a slot loaded at start-up: whether its bytes match its name. One that
   * does not is dropped if the store has it (the next read fetches it again), or kept and
   * reported if it is the only copy (reads of it fail; nothing wrong is returned).
   */
  private verifySync(key: BlockKey, slot: Slot): boolean {
    const block = (this.verifyBuffer ??= Buffer.allocUnsafe(this.blockSize));
    const n = disk.readSync(this.slabFd, block, 0, this.blockSize, slot.index * this.blockSize);
    return this.judge(key, slot, n === this.blockSize && this.blockHash(block).toString('latin1') === key);
  }

  /** The verdict on a loaded slot's bytes (see verifySync). */
  private judge(key: BlockKey, slot: Slot, intact: boolean): boolean {
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
  private dropCorrupt(key: BlockKey, slot: Slot, what: string): boolean {
    if (slot.inStore && slot.holding === undefined) {
      this.diskPolicy.remove(key);
      this.freeSlot(key, slot);
      this.log.warn(`${what} does not match its name; dropped (the store has it)`, { block: keyHex(key), slot: slot.index });
      return true;
    }
    this.log.error(`${what} that only this host holds does not match its name; reads of it fail`, { block: keyHex(key), slot: slot.index });
    return false;
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
    if (!this.space.fits(this.blockSize, replacing)) return false;
    const index = this.allocateSlot();
    if (index === undefined) return false;
    const slot: Slot = { index, refs: 1, inStore: false };
    this.slots.set(key, slot);
    // The slab write reads the memory tier's copy, which stays until it lands (admitToMemory's evictions skip it).
    let data = this.admitToMemory(key, block);
    if (data !== undefined) this.writingFromMemory.add(key);
    else data = Buffer.from(block);
    this.writing.set(key, data);
    this.unsynced.add(key);
    this.space.pinnedBytes += this.blockSize;
    this.diskPolicy.insert(key, 1);
    this.slabDirty = true;
    this.counters.blocksWritten++;
    const write = writeAt(this.slabFd, data, index * this.blockSize)
      .then(() => this.writeEntry(index, key, SLOT_USED))
      .then(
        () => {
          if (this.writing.get(key) !== data) return;
          this.writing.delete(key);
          this.writingFromMemory.delete(key);
        },
        (err) => {
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

  /** A block a failed sync may have lost is put again: write its slot anew from these bytes. */
  private rewriteLost(key: BlockKey, slot: Slot, block: Buffer): void {
    this.lost.delete(key);
    this.unsynced.add(key);
    this.writing.set(key, block);
    this.writingFromMemory.delete(key); // written from `block` now
    this.slabDirty = true;
    slot.unverified = undefined;
    const write = (slot.writing ?? Promise.resolve())
      .catch(() => undefined)
      .then(() => writeAt(this.slabFd, block, slot.index * this.blockSize))
      .then(
        () => {
          if (this.writing.get(key) === block) this.writing.delete(key);
        },
        (err) => {
          this.log.error('block cache: slab rewrite of a block a failed sync lost failed; the block stays in memory', { slot: slot.index, error: err.message });
          if (this.slots.get(key) === slot && !slot.inStore) this.lost.add(key);
          throw err;
        },
      );
    slot.writing = write;
    this.track(write);
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

  /** Queue slot `key`'s table entry with `flags`, once its slab write has landed. */
  private writeFlags(key: BlockKey, slot: Slot, flags: number): void {
    const landed = (slot.writing ?? Promise.resolve()).catch(() => undefined);
    this.track(landed.then(() => (this.slots.get(key) === slot ? this.writeEntry(slot.index, key, flags) : undefined)));
  }

  /**
   * A read waits for `keys` to be fetched: until the returned release is called, a block
   * of them that is here is not evicted to make room for another (another pack's blocks
   * would otherwise push out the ones fetched before them, round after round).
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
        else this.awaited.delete(key);
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
   * a block is kept in the memory tier only. Blocks that land in consecutive slots
   * (the usual case: a pack's blocks take slots in a row) are written with one pwritev
   * and one slot table write per run, not 25 of each: 25 writers at once contended for
   * the slab's inode lock (a quarter of a cold read's CPU went to that and the copies).
   *
   * The memory tier takes copies; the slab writes read `blocks` until the returned promise
   * settles (it never rejects), after which the caller may reuse their buffer.
   */
  putPackFromStore(blocks: ReadonlyArray<{ key: BlockKey; data: Buffer }>, wanted?: ReadonlySet<BlockKey>): Promise<void> {
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
      // A pack's other blocks take only room that is free: evicting for them would push out
      // the blocks a waiting read needs (fetched from other packs meanwhile).
      const needed = wanted === undefined || wanted.has(key);
      const index = this.allocateSlot(needed);
      if (index === undefined) {
        if (needed) this.admitToMemory(key, data);
        continue;
      }
      const slot: Slot = { index, refs: 0, inStore: true };
      this.slots.set(key, slot);
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
    const write = writevAt(this.slabFd, data, first * this.blockSize)
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
          this.log.error('block cache: slab write of fetched blocks failed; they leave the disk tier', { slot: first, blocks: keys.length, error: err.message });
          for (let i = 0; i < keys.length; i++) {
            if (this.writing.get(keys[i]) !== data[i]) continue;
            this.writing.delete(keys[i]);
            if (this.slots.get(keys[i]) !== slots[i]) continue;
            this.diskPolicy.remove(keys[i]);
            const needed = wanted === undefined || wanted.has(keys[i]);
            this.freeSlot(keys[i], slots[i], needed);
            if (needed) this.admitToMemory(keys[i], data[i]);
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
    const inMemory = this.memory.get(key);
    return inMemory === undefined ? undefined : this.arena.view(inMemory);
  }

  /** The whole block, read through the thread pool; undefined when it is not on this host. */
  async readBlock(key: BlockKey): Promise<Buffer | undefined> {
    // Copies: a memory tier slot, or a reused buffer of fetched blocks, may take another block meanwhile.
    const pending = this.writing.get(key);
    if (pending !== undefined) return Buffer.from(pending);
    const inMemory = this.memory.get(key);
    if (inMemory !== undefined) return this.arena.copy(inMemory);
    const slot = this.slots.get(key);
    if (slot === undefined) return undefined;
    const block = Buffer.allocUnsafe(this.blockSize);
    let done = 0;
    while (done < block.length) {
      const { bytesRead } = await read(this.slabFd, block, done, block.length - done, slot.index * this.blockSize + done);
      if (bytesRead === 0) throw new Error(`block cache: slot ${slot.index} ends early (${done} of ${block.length} bytes)`);
      done += bytesRead;
    }
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
      const block = Buffer.allocUnsafe(this.blockSize);
      let done = 0;
      while (done < block.length) {
        const { bytesRead } = await read(this.slabFd, block, done, block.length - done, slot.index * this.blockSize + done);
        if (bytesRead === 0) break;
        done += bytesRead;
      }
      // Evicted or rewritten while the read was in flight: nothing to judge.
      if (this.slots.get(key) !== slot || this.writing.has(key)) continue;
      this.counters.blocksScrubbed++;
      if (done === block.length && this.blockHash(block).toString('latin1') === key) {
        slot.unverified = undefined;
        continue;
      }
      corrupt.push(key);
      if (this.dropCorrupt(key, slot, 'cache scrub: a cached block')) this.counters.scrubEvictions++;
      else this.counters.scrubCorruptPinned++;
    }
    return corrupt;
  }

  private track(work: Promise<void>): void {
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
   */
  private admitToMemory(key: BlockKey, block: Buffer): Buffer | undefined {
    if (this.arena.capacity === 0 || block.length > this.blockSize) return undefined;
    const present = this.memory.get(key);
    if (present !== undefined) return this.arena.view(present);
    const evictable = (victim: BlockKey) => !this.writingFromMemory.has(victim) && !this.awaited.has(victim);
    let slot = this.arena.allocate();
    while (slot === undefined) {
      const victim = this.memoryPolicy.evict(evictable);
      if (victim === undefined) return undefined;
      this.counters.memoryEvictions++;
      this.dropFromMemory(victim);
      slot = this.arena.allocate();
    }
    this.arena.fill(slot, block);
    this.memory.set(key, slot);
    this.memoryPolicy.insert(key, this.blockSize);
    while (this.memoryPolicy.overBudget()) {
      const victim = this.memoryPolicy.evict(evictable);
      if (victim === undefined) break;
      this.counters.memoryEvictions++;
      this.dropFromMemory(victim);
    }
    // Over budget with every other block's copy in use by a slab write: this one goes instead.
    if (!this.memory.has(key)) return undefined;
    return this.arena.view(slot);
  }

  /** Take `key` out of the memory tier's map and arena (its policy entry is the caller's). */
  private dropFromMemory(key: BlockKey): void {
    const slot = this.memory.get(key);
    if (slot === undefined) return;
    this.memory.delete(key);
    this.arena.release(slot);
  }

  private allocateSlot(evict = true): number | undefined {
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
    this.dropFromMemory(victim);
    this.memoryPolicy.remove(victim);
    this.counters.diskEvictions++;
    return slot.index;
  }

  /** Free `key`'s disk slot; its memory tier copy goes too unless `keepInMemory` (a block the store holds). */
  private freeSlot(key: BlockKey, slot: Slot, keepInMemory = false): void {
    this.slots.delete(key);
    this.lost.delete(key);
    this.unsynced.delete(key);
    if (this.writing.has(key)) this.writing.delete(key);
    this.writingFromMemory.delete(key);
    if (!keepInMemory) {
      this.dropFromMemory(key);
      this.memoryPolicy.remove(key);
    }
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
  private writeEntry(index: number, key: BlockKey | undefined, flags: number): Promise<void> {
    return this.writeEntries(index, [key], flags);
  }

  /** Queue the table entries of consecutive slots from `first` as one write. */
  private writeEntries(first: number, keys: ReadonlyArray<BlockKey | undefined>, flags: number): Promise<void> {
    const entries = Buffer.alloc(keys.length * SLOT_ENTRY_BYTES);
    for (let i = 0; i < keys.length; i++) {
      const key = keys[i];
      if (key !== undefined) entries.write(key, i * SLOT_ENTRY_BYTES, HASH_BYTES, 'latin1');
      entries[i * SLOT_ENTRY_BYTES + HASH_BYTES] = flags;
    }
    const position = (first + 1) * SLOT_ENTRY_BYTES;
    const write = this.tableTail.then(() => writeAt(this.tableFd, entries, position));
    this.tableTail = write.catch(() => undefined);
    return write;
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
      await this.tableTail;
      await this.syncFile(this.slabFd, 'blocks.slab');
      await this.syncFile(this.tableFd, 'blocks.slots');
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
    await this.tableTail;
  }

  async close(): Promise<void> {
    await this.settle();
    disk.closeSync(this.slabFd);
    disk.closeSync(this.tableFd);
  }
}
