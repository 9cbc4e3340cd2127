// A volume's metadata journal: the durable record of its block map, overlay sector
// masks, size and sequence. Append-only batches, each sealed with a checksum, written
// by FLUSH; the last valid batch wins per chunk. A torn batch at the tail (crash while
// appending) fails its checksum and is cut off on open. When the journal grows well
// past the live state it is rewritten into a new file, a bounded batch at a time (compaction).
//
//   file   = header(16) batch*
//   header = "UPDJRNL1" u32 block_size u32 mask_bytes
//   batch  = "BTCH" u32 record_count u64 sequence u64 size records checksum(16)
//          | "BMAP" u32 record_count u64 sequence u64 size map_records checksum(16)
//          | "BLOG" u32 record_count u64 sequence u64 size records u32 extent_count extents checksum(16)
//   record = u64 chunk, hash(16), mask(mask_bytes)
//   map_record = u64 chunk, hash(16): no overlay sectors (a volume created from a
//            manifest starts with one BMAP batch of its whole block map, 24 bytes a chunk)
//   extent = u64 position u32 length bytes(length): overlay data, whole sectors
// A BLOG batch carries the overlay writes its FLUSH covers, so that FLUSH syncs the journal
// alone. Every other batch is written only once the overlay holds every logged write
// durably, so replay lays over the overlay the extents of the BLOG batches after the last
// other batch, in order.
import { disk } from '../disk/disk.js';
import { blake3 } from '@napi-rs/blake-hash';
import { HASH_BYTES, ZERO_HASH } from '../crypto/hash.js';
import type { BlockMap } from './blockmap.js';
import { SECTOR } from './sectors.js';

const fdatasync = (...args: Parameters<typeof disk.fdatasync>) => disk.fdatasync(...args);
const fsync = (...args: Parameters<typeof disk.fsync>) => disk.fsync(...args);

const MAGIC = Buffer.from('UPDJRNL1');
const BATCH_MAGIC = 0x42544348; // "BTCH"
/** A batch of records with no overlay sectors, so no mask (a block map from a manifest). */
const MAP_BATCH_MAGIC = 0x424d4150; // "BMAP"
/** A batch of records and the overlay writes its FLUSH covers. */
const LOG_BATCH_MAGIC = 0x424c4f47; // "BLOG"
const MAP_RECORD_BYTES = 8 + HASH_BYTES;
const EXTENT_HEADER_BYTES = 12;
const HEADER_BYTES = 16;
const BATCH_HEADER_BYTES = 24;
const CHECKSUM_BYTES = 16;
/**
 * Records per batch when the journal is rewritten: a compaction of a large volume encodes
 * and writes its state this many records at a time, so what it holds in memory is bounded.
 */
export const REWRITE_BATCH_RECORDS = 4096;
/**
 * The file is zero-filled this far past its last batch. A batch then overwrites allocated,
 * written blocks, so its fdatasync writes the data only, with no file-system metadata
 * commit for a new size or extent. Replay stops at the zeros (no batch magic).
 */
const PREALLOCATE_BYTES = 1 << 20;

export interface ChunkRecord {
  chunk: number;
  /** 16 bytes, or a block key (the same bytes as a latin1 string); all zero = no block. */
  hash: Uint8Array | string;
  mask: Uint8Array; // mask_bytes; all zero = no overlay sectors
}

/** A record as read back from the file: the hash is always bytes. */
export interface ReplayedRecord extends ChunkRecord {
  hash: Uint8Array;
}

/** Overlay bytes a BLOG batch carries: `data` belongs at `position` in the overlay file. */
export interface LoggedExtent {
  position: number;
  data: Buffer;
}

export interface JournalState {
  sequence: number;
  size: number;
  /** Final record per chunk, in journal order. */
  chunks: Map<number, ReplayedRecord>;
  /** Logged overlay writes the overlay may not hold durably (BLOG batches after the last other batch), oldest first. */
  logged: LoggedExtent[];
  batches: number;
  /** Bytes cut off the tail because the last batch was torn. */
  truncatedBytes: number;
}

/** A batch buffer with its header written; `body` is where its checksum goes. */
function batchOf(magic: number, count: number, recordBytes: number, sequence: number, size: number, extentBytes = 0): { batch: Buffer; body: number } {
  const body = BATCH_HEADER_BYTES + count * recordBytes + extentBytes;
  const batch = Buffer.alloc(body + CHECKSUM_BYTES);
  batch.writeUInt32BE(magic, 0);
  batch.writeUInt32BE(count, 4);
  batch.writeBigUInt64BE(BigInt(sequence), 8);
  batch.writeBigUInt64BE(BigInt(size), 16);
  return { batch, body };
}

export interface JournalStats {
  /** Records encoded into batches since the journal was opened. */
  records: number;
  /** Rewrites (compactions) since then. */
  rewrites: number;
  /** Records in the largest batch a rewrite encoded: what it held in memory at once. */
  largestRewriteBatch: number;
}

export class Journal {
  private position: number;
  /** The file's length: zeros from position to here. */
  private allocated: number;
  readonly stats: JournalStats = { records: 0, rewrites: 0, largestRewriteBatch: 0 };
  /**
   * Bytes logged since the last other batch: what replay may lay over the overlay. The file
   * keeps at least this much zero-filled space past its last batch, which a recovery frees
   * before laying them (releaseReserve): overlay space a power cut lost is found again.
   */
  private debt = 0;

  private constructor(
    readonly path: string,
    private fd: number,
    readonly maskBytes: number,
    position: number,
    allocated = position,
  ) {
    this.position = position;
    this.allocated = allocated;
  }

  get bytes(): number {
    return this.position;
  }

  get recordBytes(): number {
    return 8 + HASH_BYTES + this.maskBytes;
  }

  /**
   * Create a journal holding one batch with the initial size, and `initial`'s chunks and
   * sequence when given. Durable once it resolves; the sync runs off the event loop (a
   * fork's map is 1.5 MB for 8 GiB written, synced while its manifest PUT is in flight).
   */
  static async create(file: string, blockSize: number, maskBytes: number, size: number, initial?: { map: BlockMap; sequence: number }): Promise<Journal> {
    const fd = disk.openSync(file, 'w+');
    const header = Journal.header(blockSize, maskBytes);
    disk.writeSync(fd, header, 0, header.length, 0);
    const journal = new Journal(file, fd, maskBytes, HEADER_BYTES);
    if (initial === undefined) journal.appendSync([], 0, size);
    else {
      const batch = journal.encodeMap(initial.map, initial.sequence, size);
      disk.writeSync(fd, batch, 0, batch.length, HEADER_BYTES);
      journal.position += batch.length;
      journal.allocated = journal.position;
    }
    await fsync(fd);
    return journal;
  }

  private static header(blockSize: number, maskBytes: number): Buffer {
    const header = Buffer.alloc(HEADER_BYTES);
    MAGIC.copy(header, 0);
    header.writeUInt32BE(blockSize, 8);
    header.writeUInt32BE(maskBytes, 12);
    return header;
  }

  /**
   * Open and replay. A torn tail batch is cut off (it was never acknowledged). `blockSize`
   * and `maskBytes` are the volume's: a journal written with others is refused.
   */
  static open(file: string, blockSize: number, maskBytes: number): { journal: Journal; state: JournalState } {
    const data = disk.readFileSync(file);
    if (data.length < HEADER_BYTES || !data.subarray(0, 8).equals(MAGIC)) {
      throw new Error(`journal ${file}: not a volume journal (bad magic)`);
    }
    const fileBlockSize = data.readUInt32BE(8);
    if (fileBlockSize !== blockSize) {
      throw new Error(`journal ${file}: written with block_size ${fileBlockSize}, volume says ${blockSize}`);
    }
    const fileMaskBytes = data.readUInt32BE(12);
    if (fileMaskBytes !== maskBytes) {
      throw new Error(`journal ${file}: written with ${fileMaskBytes}-byte sector masks, the volume's ${blockSize}-byte chunks have ${maskBytes}`);
    }
    const recordBytes = 8 + HASH_BYTES + maskBytes;
    const state: JournalState = { sequence: 0, size: 0, chunks: new Map(), logged: [], batches: 0, truncatedBytes: 0 };
    let at = HEADER_BYTES;
    const noMask = Buffer.alloc(maskBytes);
    while (at + BATCH_HEADER_BYTES + CHECKSUM_BYTES <= data.length) {
      const magic = data.readUInt32BE(at);
      if (magic !== BATCH_MAGIC && magic !== MAP_BATCH_MAGIC && magic !== LOG_BATCH_MAGIC) break;
      const size = magic === MAP_BATCH_MAGIC ? MAP_RECORD_BYTES : recordBytes;
      const count = data.readUInt32BE(at + 4);
      const recordsEnd = at + BATCH_HEADER_BYTES + count * size;
      const extents = magic === LOG_BATCH_MAGIC ? logExtents(data, recordsEnd) : undefined;
      if (extents === null) break;
      const end = extents?.end ?? recordsEnd;
      if (end + CHECKSUM_BYTES > data.length) break;
      const sum = blake3(data.subarray(at, end)).subarray(0, CHECKSUM_BYTES);
      if (!sum.equals(data.subarray(end, end + CHECKSUM_BYTES))) break;
      state.sequence = Number(data.readBigUInt64BE(at + 8));
      const volumeSize = Number(data.readBigUInt64BE(at + 16));
      // A volume never shrinks: no batch records a smaller size than the one before, and
      // every chunk a batch names is inside the size it records.
      if (volumeSize < state.size) {
        throw new Error(`journal ${file}: the batch at byte ${at} records a ${volumeSize}-byte volume, smaller than the ${state.size} bytes before it`);
      }
      state.size = volumeSize;
      const chunks = Math.ceil(state.size / blockSize);
      for (let r = at + BATCH_HEADER_BYTES; r < recordsEnd; r += size) {
        const chunk = Number(data.readBigUInt64BE(r));
        if (chunk >= chunks) {
          throw new Error(`journal ${file}: the batch at byte ${at} names chunk ${data.readBigUInt64BE(r)}, past the end of its ${state.size}-byte volume`);
        }
        // Copies: the records outlive the file buffer (a map record's mask is the shared empty one).
        state.chunks.set(chunk, {
          chunk,
          hash: Buffer.from(data.subarray(r + 8, r + 8 + HASH_BYTES)),
          mask: magic === MAP_BATCH_MAGIC ? noMask : Buffer.from(data.subarray(r + 8 + HASH_BYTES, r + recordBytes)),
        });
      }
      if (extents === undefined) {
        // Written once the overlay held every logged write durably: the earlier extents are stale.
        state.logged = [];
      } else {
        for (const extent of extents.list) {
          if (extent.position % SECTOR !== 0 || extent.data.length % SECTOR !== 0 || extent.position + extent.data.length > chunks * blockSize) {
            throw new Error(
              `journal ${file}: the batch at byte ${at} logs ${extent.data.length} bytes at ${extent.position}, ` +
                `not whole sectors inside its ${state.size}-byte volume`,
            );
          }
          state.logged.push(extent);
        }
      }
      state.batches++;
      at = end + CHECKSUM_BYTES;
    }
    if (state.batches === 0) throw new Error(`journal ${file}: no valid batch (the volume was never created completely)`);
    // Zeros past the last batch are the preallocated space; anything else is a torn batch,
    // cut off so that a later, shorter batch can never be followed by an older one on replay.
    const preallocated = isZero(data.subarray(at));
    state.truncatedBytes = preallocated ? 0 : data.length - at;
    const fd = disk.openSync(file, 'r+');
    // Not synced: a loaded volume's first flush rewrites the journal into a new file
    // (compaction) before any batch is appended, and a cut lost to a crash is made again.
    // (A failed sync here would have left the volume unserved.)
    if (state.truncatedBytes > 0) disk.ftruncateSync(fd, at);
    const journal = new Journal(file, fd, maskBytes, at, preallocated ? data.length : at);
    journal.debt = loggedBytesOf(state.logged);
    return { journal, state };
  }

  private encode(records: readonly ChunkRecord[], sequence: number, size: number, logged?: readonly LoggedExtent[]): Buffer {
    this.stats.records += records.length;
    let extentBytes = 0;
    if (logged !== undefined) {
      extentBytes = 4;
      for (const extent of logged) extentBytes += EXTENT_HEADER_BYTES + extent.data.length;
    }
    const magic = logged === undefined ? BATCH_MAGIC : LOG_BATCH_MAGIC;
    const { batch, body } = batchOf(magic, records.length, this.recordBytes, sequence, size, extentBytes);
    let at = this.writeRecords(batch, records);
    if (logged !== undefined) {
      batch.writeUInt32BE(logged.length, at);
      at += 4;
      for (const extent of logged) {
        batch.writeUInt32BE(Math.floor(extent.position / 0x100000000), at);
        batch.writeUInt32BE(extent.position >>> 0, at + 4);
        batch.writeUInt32BE(extent.data.length, at + 8);
        at += EXTENT_HEADER_BYTES + extent.data.copy(batch, at + EXTENT_HEADER_BYTES);
      }
    }
    blake3(batch.subarray(0, body)).copy(batch, body, 0, CHECKSUM_BYTES);
    return batch;
  }

  /** Records into a batch after its header; returns where they end. */
  private writeRecords(batch: Buffer, records: readonly ChunkRecord[]): number {
    let at = BATCH_HEADER_BYTES;
    for (const record of records) {
      // u64 chunk as two u32 halves: no BigInt per record (a wake journals every chunk).
      batch.writeUInt32BE(Math.floor(record.chunk / 0x100000000), at);
      batch.writeUInt32BE(record.chunk >>> 0, at + 4);
      if (typeof record.hash === 'string') batch.write(record.hash, at + 8, HASH_BYTES, 'latin1');
      else batch.set(record.hash, at + 8);
      batch.set(record.mask, at + 8 + HASH_BYTES);
      at += this.recordBytes;
    }
    return at;
  }

  /**
   * One batch naming every chunk of `map` with no overlay sectors, encoded straight from
   * its pages: a volume woken or forked from a manifest starts with tens of thousands of
   * records, and this allocates nothing per record.
   */
  private encodeMap(map: BlockMap, sequence: number, size: number): Buffer {
    const { batch, body } = batchOf(MAP_BATCH_MAGIC, map.count, MAP_RECORD_BYTES, sequence, size);
    const walk = new MapRecordWalk(map);
    const written = walk.write(new DataView(batch.buffer, batch.byteOffset, batch.byteLength), BATCH_HEADER_BYTES, map.count);
    if (walk.more()) throw new Error(`journal ${this.path}: the block map holds more chunks than its count (${map.count})`);
    if (written !== map.count) throw new Error(`journal ${this.path}: the block map holds ${written} chunks, its count says ${map.count}`);
    blake3(batch.subarray(0, body)).copy(batch, body, 0, CHECKSUM_BYTES);
    return batch;
  }

  /**
   * The chunks of `map` as BMAP batches of at most REWRITE_BATCH_RECORDS records, encoded
   * from its pages into one reused buffer: write each before taking the next.
   */
  private *mapBatches(map: BlockMap, sequence: number, size: number): Generator<{ batch: Buffer; records: number }> {
    if (map.count === 0) return;
    const { batch: buffer } = batchOf(MAP_BATCH_MAGIC, Math.min(map.count, REWRITE_BATCH_RECORDS), MAP_RECORD_BYTES, sequence, size);
    const out = new DataView(buffer.buffer, buffer.byteOffset, buffer.byteLength);
    const walk = new MapRecordWalk(map);
    let written = 0;
    for (;;) {
      const records = walk.write(out, BATCH_HEADER_BYTES, REWRITE_BATCH_RECORDS);
      if (records === 0) break;
      written += records;
      const at = BATCH_HEADER_BYTES + records * MAP_RECORD_BYTES;
      buffer.writeUInt32BE(records, 4);
      blake3(buffer.subarray(0, at)).copy(buffer, at, 0, CHECKSUM_BYTES);
      this.stats.records += records;
      yield { batch: buffer.subarray(0, at + CHECKSUM_BYTES), records };
    }
    if (written !== map.count) throw new Error(`journal ${this.path}: the block map holds ${written} chunks, its count says ${map.count}`);
  }

  private appendSync(records: readonly ChunkRecord[], sequence: number, size: number, logged?: readonly LoggedExtent[]): void {
    const batch = this.encode(records, sequence, size, logged);
    if (this.position + batch.length > this.allocated) this.preallocate(this.position + batch.length);
    disk.writeSync(this.fd, batch, 0, batch.length, this.position);
    this.position += batch.length;
  }

  /** Zero-fill the file from its end to past `end` (see PREALLOCATE_BYTES); durable with the next sync. */
  private preallocate(end: number): void {
    const from = Math.max(this.allocated, this.position);
    const target = Math.ceil((end + 1) / PREALLOCATE_BYTES) * PREALLOCATE_BYTES;
    const zeros = Buffer.alloc(Math.min(target - from, PREALLOCATE_BYTES));
    for (let at = from; at < target; at += zeros.length) {
      disk.writeSync(this.fd, zeros, 0, Math.min(zeros.length, target - at), at);
    }
    this.allocated = target;
  }

  /**
   * Append one batch and make it durable. When the sync fails the batch is cut off again:
   * the page cache may still hold it after the kernel dropped it from the disk, and a
   * journal reopened from the page cache must not replay a batch the disk does not have.
   */
  async commit(records: readonly ChunkRecord[], sequence: number, size: number): Promise<void> {
    await this.append(records, sequence, size);
    this.debt = 0;
  }

  /**
   * Make room for a BLOG batch of `records` records and `logged`, with the zero-filled
   * reserve past it; false when that fails (a full disk): the FLUSH syncs the overlay and
   * commits instead, and a commit that fails too fails the volume.
   */
  reserveLog(records: number, logged: readonly LoggedExtent[]): boolean {
    const data = loggedBytesOf(logged);
    const batch = BATCH_HEADER_BYTES + records * this.recordBytes + 4 + logged.length * EXTENT_HEADER_BYTES + data + CHECKSUM_BYTES;
    const end = this.position + batch + this.debt + data;
    if (end <= this.allocated) return true;
    try {
      this.preallocate(end);
      return true;
    } catch {
      return false;
    }
  }

  /**
   * Append one BLOG batch (records and the overlay writes `logged` a FLUSH covers) and make
   * it durable: the FLUSH's one sync. Cut off again when the sync fails, as commit's. Its
   * room and reserve come first (reserveLog); without them it is refused.
   */
  async commitLogged(records: readonly ChunkRecord[], logged: readonly LoggedExtent[], sequence: number, size: number): Promise<void> {
    if (!this.reserveLog(records.length, logged)) throw new Error(`journal ${this.path}: no room for a logged batch and its reserve`);
    await this.append(records, sequence, size, logged);
    this.debt += loggedBytesOf(logged);
  }

  /**
   * Give the zero-filled space past the last batch back to the file system: a recovery
   * does this before laying logged writes over the overlay, which needs that much again.
   */
  releaseReserve(): void {
    if (this.allocated <= this.position) return;
    disk.ftruncateSync(this.fd, this.position);
    this.allocated = this.position;
  }

  private async append(records: readonly ChunkRecord[], sequence: number, size: number, logged?: readonly LoggedExtent[]): Promise<void> {
    const before = this.position;
    this.appendSync(records, sequence, size, logged);
    try {
      await fdatasync(this.fd);
    } catch (err) {
      this.position = before;
      this.allocated = before;
      try {
        disk.ftruncateSync(this.fd, before);
      } catch (cut) {
        throw new Error(`journal ${this.path}: fdatasync failed (${(err as Error).message}), and cutting the batch off failed too (${(cut as Error).message})`);
      }
      throw new Error(`journal ${this.path}: fdatasync: ${(err as Error).message}`);
    }
  }

  /**
   * Replace the journal with the state `map` and `overlay` (chunk -> sector mask) give:
   * written to a new file, made durable, renamed over the old one. The state goes in
   * batches of REWRITE_BATCH_RECORDS records, every chunk of the map first and then the
   * overlay's chunks with their masks (the last record of a chunk wins on replay). The
   * caller hands in a frozen map (a clone) and its own copies of the masks.
   */
  async rewrite(map: BlockMap, overlay: ReadonlyArray<readonly [number, Uint8Array]>, sequence: number, size: number, blockSize: number): Promise<void> {
    const tmp = `${this.path}.compact`;
    const fd = disk.openSync(tmp, 'w');
    this.stats.rewrites++;
    try {
      const header = Journal.header(blockSize, this.maskBytes);
      disk.writeSync(fd, header, 0, header.length, 0);
      let at = HEADER_BYTES;
      const put = (batch: Buffer, records: number) => {
        disk.writeSync(fd, batch, 0, batch.length, at);
        at += batch.length;
        this.stats.largestRewriteBatch = Math.max(this.stats.largestRewriteBatch, records);
      };
      for (const { batch, records } of this.mapBatches(map, sequence, size)) put(batch, records);
      for (let from = 0; from < overlay.length; from += REWRITE_BATCH_RECORDS) {
        const records = overlay.slice(from, from + REWRITE_BATCH_RECORDS).map(([chunk, mask]) => ({ chunk, hash: map.get(chunk) ?? ZERO_HASH, mask }));
        put(this.encode(records, sequence, size), records.length);
      }
      // Open needs one batch at least: an empty state is one empty batch.
      if (at === HEADER_BYTES) put(this.encode([], sequence, size), 0);
      await fsync(fd);
    } catch (err) {
      disk.rmSync(tmp, { force: true });
      throw new Error(`journal ${tmp}: compaction: ${(err as Error).message}`);
    } finally {
      disk.closeSync(fd);
    }
    disk.renameSync(tmp, this.path);
    const dirFd = disk.openSync(this.path.slice(0, this.path.lastIndexOf('/')) || '.', 'r');
    try {
      await fsync(dirFd);
    } finally {
      disk.closeSync(dirFd);
    }
    disk.closeSync(this.fd);
    this.fd = disk.openSync(this.path, 'r+');
    this.position = disk.fstatSync(this.fd).size;
    this.allocated = this.position;
    this.debt = 0;
  }

  close(): void {
    disk.closeSync(this.fd);
  }
}

/** Overlay bytes the extents carry. */
export function loggedBytesOf(logged: readonly LoggedExtent[]): number {
  let bytes = 0;
  for (const extent of logged) bytes += extent.data.length;
  return bytes;
}

/**
 * The extents of a BLOG batch whose records end at `from`, as views of `data`, and where
 * they end; null when the file ends inside them (a torn batch).
 */
function logExtents(data: Buffer, from: number): { list: LoggedExtent[]; end: number } | null {
  if (from + 4 > data.length) return null;
  const count = data.readUInt32BE(from);
  const list: LoggedExtent[] = [];
  let at = from + 4;
  for (let i = 0; i < count; i++) {
    if (at + EXTENT_HEADER_BYTES > data.length) return null;
    const position = Number(data.readBigUInt64BE(at));
    const length = data.readUInt32BE(at + 8);
    at += EXTENT_HEADER_BYTES;
    if (at + length > data.length) return null;
    list.push({ position, data: data.subarray(at, at + length) });
    at += length;
  }
  return { list, end: at };
}

function isZero(bytes: Buffer): boolean {
  for (let i = 0; i < bytes.length; i++) if (bytes[i] !== 0) return false;
  return true;
}

/**
 * A walk of a block map's pages by ascending chunk that writes each chunk naming a block
 * as a map record (u64 chunk, hash), resumable: the one page walk of encodeMap and
 * mapBatches.
 */
class MapRecordWalk {
  private readonly pages: Array<[number, Buffer]>;
  private page = -1;
  private words: DataView | undefined;
  private length = 0;
  private from = 0;
  private chunk = 0;

  constructor(map: BlockMap) {
    this.pages = map.pagesInOrder();
  }

  /** Write the next named chunks, at most `max`, into `out` from byte `at`; returns how many (0: the walk is done). */
  write(out: DataView, at: number, max: number): number {
    let records = 0;
    while (records < max) {
      if (this.from >= this.length && !this.nextPage()) break;
      // A name (HASH_BYTES = 16) is read and written as four words through DataViews: a
      // Buffer.copy call per name is several times slower (docs/benchmarks.md), with the
      // event loop held (and the manifest PUT it runs beside waiting for it).
      const words = this.words!;
      let from = this.from;
      let chunk = this.chunk;
      for (; from < this.length && records < max; from += HASH_BYTES, chunk++) {
        const w0 = words.getUint32(from), w1 = words.getUint32(from + 4), w2 = words.getUint32(from + 8), w3 = words.getUint32(from + 12);
        if ((w0 | w1 | w2 | w3) === 0) continue;
        out.setUint32(at, Math.floor(chunk / 0x100000000));
        out.setUint32(at + 4, chunk >>> 0);
        out.setUint32(at + 8, w0);
        out.setUint32(at + 12, w1);
        out.setUint32(at + 16, w2);
        out.setUint32(at + 20, w3);
        at += MAP_RECORD_BYTES;
        records++;
      }
      this.from = from;
      this.chunk = chunk;
    }
    return records;
  }

  /** Whether a chunk naming a block is left (the walk moves past the holes before it). */
  more(): boolean {
    for (;;) {
      if (this.from >= this.length && !this.nextPage()) return false;
      const words = this.words!;
      for (; this.from < this.length; this.from += HASH_BYTES, this.chunk++) {
        if ((words.getUint32(this.from) | words.getUint32(this.from + 4) | words.getUint32(this.from + 8) | words.getUint32(this.from + 12)) !== 0) return true;
      }
    }
  }

  private nextPage(): boolean {
    if (++this.page >= this.pages.length) return false;
    const [pageIndex, page] = this.pages[this.page];
    this.words = new DataView(page.buffer, page.byteOffset, page.byteLength);
    this.length = page.length;
    this.from = 0;
    this.chunk = pageIndex * (page.length / HASH_BYTES);
    return true;
  }
}
