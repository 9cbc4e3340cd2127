// The disk tier's files (DESIGN.md: blocks/): the slab, block_size slots of block bytes,
// and the slot table, one entry (block name, flags) per slot after a header that fixes
// the block size and how blocks are named. Writes go through the thread pool; the slab's
// bypass the page cache where the filesystem allows it (O_DIRECT).
import path from 'node:path';
import { disk } from '../disk/disk.js';
import { HASH_BYTES } from '../crypto/hash.js';
import type { BlockKey } from './block-key.js';

const write = (...args: Parameters<typeof disk.write>) => disk.write(...args);
const writev = (...args: Parameters<typeof disk.writev>) => disk.writev(...args);

/** Write a whole buffer at a position through the thread pool. */
export async function writeAt(fd: number, buf: Buffer, position: number): Promise<void> {
  let done = 0;
  while (done < buf.length) {
    const { bytesWritten } = await write(fd, buf, done, buf.length - done, position + done);
    done += bytesWritten;
  }
}

/** Write buffers back to back from a position through the thread pool (one pwritev, then the rest if short). */
export async function writevAt(fd: number, buffers: Buffer[], position: number): Promise<void> {
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

/** Buffers and bytes one write takes at most: queued writes to consecutive ranges merge up to this. */
const MAX_WRITE_BUFFERS = 256;
const MAX_WRITE_BYTES = 32 * 1024 * 1024;
/** Positions, lengths and memory of a write that bypasses the page cache are multiples of this. */
const DIRECT_ALIGN = 4096;
/** A direct write's bytes are copied into a staging buffer of this size first. */
const DIRECT_STAGING_BYTES = 4 * 1024 * 1024;
const WASM_PAGE = 65536;

/**
 * A second descriptor of a file, opened with O_DIRECT, and the page-aligned buffer its
 * writes go out from. A buffered write copies every byte into page-cache pages the kernel
 * allocates for it and writes them back later, the largest cost of a drain
 * (docs/benchmarks.md); a direct write goes from the staging buffer to the device.
 */
export class DirectWrites {
  /** WebAssembly memory starts on a page boundary, as O_DIRECT needs (a Buffer's memory need not). */
  readonly staging = Buffer.from(new WebAssembly.Memory({ initial: DIRECT_STAGING_BYTES / WASM_PAGE }).buffer);

  constructor(readonly fd: number) {}

  /** Whether a write at `position` can go direct (its end is padded to the alignment). */
  fits(position: number): boolean {
    return position % DIRECT_ALIGN === 0;
  }

  /**
   * Write `buffers` back to back from `position`, through the staging buffer in pieces.
   * The last piece is padded with zeros to the alignment: the caller's ranges end on a
   * slot boundary, or inside the short last slot they write.
   */
  async write(buffers: readonly Buffer[], position: number): Promise<void> {
    const staging = this.staging;
    let filled = 0;
    let at = position;
    for (const buffer of buffers) {
      let taken = 0;
      while (taken < buffer.length) {
        const n = buffer.copy(staging, filled, taken, Math.min(buffer.length, taken + staging.length - filled));
        taken += n;
        filled += n;
        if (filled === staging.length) {
          await writeAt(this.fd, staging, at);
          at += filled;
          filled = 0;
        }
      }
    }
    if (filled === 0) return;
    const padded = Math.ceil(filled / DIRECT_ALIGN) * DIRECT_ALIGN;
    staging.fill(0, filled, padded);
    await writeAt(this.fd, staging.subarray(0, padded), at);
  }
}

interface QueuedWrite {
  buffers: Buffer[];
  position: number;
  bytes: number;
  settle: () => void;
  reject: (err: unknown) => void;
}

/**
 * Writes to one of the disk tier's files (the slab, the slot table), one pwritev at a
 * time, in the order they were queued; queued writes to consecutive ranges go as one. A
 * buffered write holds the file's lock for its whole copy, so concurrent writes to one
 * file only waited (spinning) for each other. The queue holds at most what its callers
 * have queued and not seen land (for the slab, blocks already held in memory).
 */
export class FileWriteQueue {
  private readonly queue: QueuedWrite[] = [];
  private head = 0;
  private running = false;

  /** `direct`: write through it where a write's position allows (the slab: its slots are aligned). */
  constructor(
    readonly fd: number,
    private direct?: DirectWrites,
  ) {}

  /** Whether writes go past the page cache (false once the filesystem refused a direct write). */
  get writesDirect(): boolean {
    return this.direct !== undefined;
  }

  /** Write `buffers` back to back from `position`; settles once they are in the file (the page cache). */
  write(buffers: Buffer[], position: number): Promise<void> {
    let bytes = 0;
    for (const buffer of buffers) bytes += buffer.length;
    return new Promise<void>((settle, reject) => {
      this.queue.push({ buffers, position, bytes, settle, reject });
      if (!this.running) this.next();
    });
  }

  private next(): void {
    if (this.head >= this.queue.length) {
      this.queue.length = 0;
      this.head = 0;
      this.running = false;
      return;
    }
    this.running = true;
    // Writes keep coming while a drain runs: drop the settled ones from time to time.
    if (this.head >= 1024) {
      this.queue.splice(0, this.head);
      this.head = 0;
    }
    const first = this.queue[this.head++];
    const batch = [first];
    const buffers = [...first.buffers];
    let end = first.position + first.bytes;
    let bytes = first.bytes;
    while (this.head < this.queue.length) {
      const more = this.queue[this.head];
      if (more.position !== end || buffers.length + more.buffers.length > MAX_WRITE_BUFFERS || bytes + more.bytes > MAX_WRITE_BYTES) break;
      this.head++;
      batch.push(more);
      buffers.push(...more.buffers);
      end += more.bytes;
      bytes += more.bytes;
    }
    this.writeBatch(buffers, first.position).then(
      () => {
        for (const write of batch) write.settle();
        this.next();
      },
      (err) => {
        for (const write of batch) write.reject(err);
        this.next();
      },
    );
  }

  private async writeBatch(buffers: Buffer[], position: number): Promise<void> {
    const direct = this.direct;
    if (direct === undefined || !direct.fits(position)) return writevAt(this.fd, buffers, position);
    try {
      await direct.write(buffers, position);
    } catch (err) {
      // A filesystem that takes O_DIRECT opens but not these writes: buffered from now on.
      if ((err as NodeJS.ErrnoException).code !== 'EINVAL') throw err;
      this.direct = undefined;
      await writevAt(this.fd, buffers, position);
    }
  }
}

export const SLOT_ENTRY_BYTES = 32;
export const SLOT_USED = 1;
export const SLOT_IN_STORE = 2;
const SLOT_TABLE_MAGIC = Buffer.from('UPDSLOT1');
/** Slot table header: magic(8), block size u32 BE, names id(16) at 12, zeros to 32. */
const NAMES_ID_AT = 12;
const NAMES_ID_BYTES = 16;

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

/** A block in the disk tier: its slot in the slab, and what keeps it there. */
export interface Slot {
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

/** The slot table file of a cache: its header written when created, entries written in order. */
export class SlotTable {
  /** Entry writes, in order: a slot freed and reused must end with the newer entry. */
  private readonly writes: FileWriteQueue;
  /** Settles once the last entry write queued has (the queue is in order: all before it too). */
  private tail: Promise<void> = Promise.resolve();

  constructor(readonly fd: number) {
    this.writes = new FileWriteQueue(fd);
  }

  /** A new table's header: the block size and the names id, durable before any entry. */
  writeHeader(blockSize: number, namesId: Buffer): void {
    const header = Buffer.alloc(SLOT_ENTRY_BYTES);
    SLOT_TABLE_MAGIC.copy(header, 0);
    header.writeUInt32BE(blockSize, 8);
    namesId.copy(header, NAMES_ID_AT, 0, NAMES_ID_BYTES);
    disk.writeSync(this.fd, header, 0, header.length, 0);
    disk.fsyncSync(this.fd);
  }

  /**
   * The table of the cache in `dir` as it is on disk, checked against the block size and
   * names id the host uses; entryFlags and entryKey read its entries.
   */
  static read(dir: string, blockSize: number, namesId: Buffer): { table: Buffer; count: number } {
    const table = disk.readFileSync(path.join(dir, 'blocks.slots'));
    if (table.length < SLOT_ENTRY_BYTES || !table.subarray(0, 8).equals(SLOT_TABLE_MAGIC)) {
      throw new Error(`block cache ${dir}: blocks.slots is not a slot table (bad magic)`);
    }
    const tableBlockSize = table.readUInt32BE(8);
    if (tableBlockSize !== blockSize) {
      throw new Error(
        `block cache ${dir} was created with block_size ${tableBlockSize}; the config says ${blockSize}. ` +
          'Use the same block_size or a new cache dir.',
      );
    }
    // Caches from before encryption have zeros here: plain BLAKE3, as they were.
    const tableNames = table.subarray(NAMES_ID_AT, NAMES_ID_AT + NAMES_ID_BYTES);
    if (!tableNames.equals(namesId.subarray(0, NAMES_ID_BYTES))) {
      const what = (id: Buffer) => (id.every((b) => b === 0) ? 'plain BLAKE3 (an unencrypted store)' : `the keyed BLAKE3 of an encrypted store (key id ${id.toString('hex')})`);
      throw new Error(
        `block cache ${dir} names blocks with ${what(tableNames)}; this store names them with ${what(namesId)}. ` +
          'Use a new cache dir for this store.',
      );
    }
    return { table, count: Math.floor(table.length / SLOT_ENTRY_BYTES) - 1 };
  }

  /** The flags of slot `index`'s entry in a table `read` returned. */
  static entryFlags(table: Buffer, index: number): number {
    return table[(index + 1) * SLOT_ENTRY_BYTES + HASH_BYTES];
  }

  /** The block name of slot `index`'s entry in a table `read` returned. */
  static entryKey(table: Buffer, index: number): BlockKey {
    const at = (index + 1) * SLOT_ENTRY_BYTES;
    return table.toString('latin1', at, at + HASH_BYTES);
  }

  /** Queue the table entries of consecutive slots from `first` as one write. */
  writeEntries(first: number, keys: ReadonlyArray<BlockKey | undefined>, flags: number): Promise<void> {
    const entries = Buffer.alloc(keys.length * SLOT_ENTRY_BYTES);
    for (let i = 0; i < keys.length; i++) {
      const key = keys[i];
      if (key !== undefined) entries.write(key, i * SLOT_ENTRY_BYTES, HASH_BYTES, 'latin1');
      entries[i * SLOT_ENTRY_BYTES + HASH_BYTES] = flags;
    }
    const position = (first + 1) * SLOT_ENTRY_BYTES;
    const write = this.writes.write([entries], position);
    this.tail = write.catch(() => undefined);
    return write;
  }

  /** Settles once every entry write queued so far has (it never rejects). */
  settled(): Promise<void> {
    return this.tail;
  }
}
