// The host pack index (DESIGN.md: pack index): block hash → pack location, one per host,
// shared by every volume, so a block already in some pack is never uploaded again.
// Persisted as an append-only file of fixed 64-byte records, each with its own
// checksum; a torn or corrupt tail (a crash mid-append) is cut off on open. It is a
// cache of what the store holds: losing it costs re-uploads, never data.
//
//   record: hash 16 | pack id 16 | offset u32 | length u32 | rawLength u32 | codec u8 |
//           kind u8 (1 add, 2 remove-pack) | 2 reserved | 12 reserved | BLAKE3 of bytes 0..48, first 16
//
// Memory: one Map entry per block, ~150 bytes each (a 16-char key string and a small
// location object; the pack id strings are shared per pack).
import fs from 'node:fs';
import { promisify } from 'node:util';
import { blake3 } from '@napi-rs/blake-hash';
import type { BlockKey } from '../blocks/cache.js';
import type { CodecId } from '../crypto/compress.js';
import { HASH_BYTES } from '../crypto/hash.js';

const fdatasync = promisify(fs.fdatasync);

const RECORD_BYTES = 64;
const BODY_BYTES = 48;
const KIND_ADD = 1;
const KIND_REMOVE_PACK = 2;
const MAGIC = Buffer.from('UPDPIDX1'.padEnd(RECORD_BYTES, '\0'));

export interface PackLocation {
  pack: string;
  offset: number;
  length: number;
  rawLength: number;
  codec: CodecId;
}

function checksum(record: Buffer): Buffer {
  return blake3(record.subarray(0, BODY_BYTES)).subarray(0, HASH_BYTES);
}

export class PackIndex {
  private readonly map = new Map<BlockKey, PackLocation>();
  private readonly packIds = new Map<string, string>();
  private records: number;
  private dirty = false;

  private constructor(
    private readonly file: string,
    private fd: number,
    records: number,
    /** Bytes cut off a torn tail at open. */
    readonly truncatedBytes: number,
  ) {
    this.records = records;
  }

  static open(file: string): PackIndex {
    if (!fs.existsSync(file)) {
      const fd = fs.openSync(file, 'w+');
      fs.writeSync(fd, MAGIC, 0, RECORD_BYTES, 0);
      fs.fsyncSync(fd);
      return new PackIndex(file, fd, 0, 0);
    }
    const data = fs.readFileSync(file);
    if (data.length < RECORD_BYTES || !data.subarray(0, RECORD_BYTES).equals(MAGIC)) {
      throw new Error(`pack index ${file}: not a pack index (bad magic); remove it to rebuild from the store`);
    }
    let at = RECORD_BYTES;
    const entries: Buffer[] = [];
    while (at + RECORD_BYTES <= data.length) {
      const record = data.subarray(at, at + RECORD_BYTES);
      if (!checksum(record).equals(record.subarray(BODY_BYTES, BODY_BYTES + HASH_BYTES))) break;
      entries.push(record);
      at += RECORD_BYTES;
    }
    const truncated = data.length - at;
    const fd = fs.openSync(file, 'r+');
    if (truncated > 0) {
      fs.ftruncateSync(fd, at);
      fs.fsyncSync(fd);
    }
    const index = new PackIndex(file, fd, entries.length, truncated);
    for (const record of entries) index.apply(record);
    return index;
  }

  private apply(record: Buffer): void {
    const pack = this.intern(record.toString('hex', 16, 32));
    if (record[45] === KIND_REMOVE_PACK) {
      for (const [key, location] of this.map) if (location.pack === pack) this.map.delete(key);
      this.packIds.delete(pack);
      return;
    }
    this.map.set(record.toString('latin1', 0, HASH_BYTES), {
      pack,
      offset: record.readUInt32LE(32),
      length: record.readUInt32LE(36),
      rawLength: record.readUInt32LE(40),
      codec: record[44] as CodecId,
    });
  }

  private intern(id: string): string {
    let shared = this.packIds.get(id);
    if (shared === undefined) this.packIds.set(id, (shared = id));
    return shared;
  }

  get(key: BlockKey): PackLocation | undefined {
    return this.map.get(key);
  }

  has(key: BlockKey): boolean {
    return this.map.has(key);
  }

  get size(): number {
    return this.map.size;
  }

  /** Record blocks as stored in their packs (one append). Call only once the packs are in the store. */
  add(entries: Iterable<[BlockKey, PackLocation]>): void {
    const list = [...entries];
    if (list.length === 0) return;
    const out = Buffer.alloc(list.length * RECORD_BYTES);
    list.forEach(([key, location], i) => {
      const record = out.subarray(i * RECORD_BYTES, (i + 1) * RECORD_BYTES);
      record.write(key, 0, HASH_BYTES, 'latin1');
      record.write(location.pack, 16, HASH_BYTES, 'hex');
      record.writeUInt32LE(location.offset, 32);
      record.writeUInt32LE(location.length, 36);
      record.writeUInt32LE(location.rawLength, 40);
      record[44] = location.codec;
      record[45] = KIND_ADD;
      checksum(record).copy(record, BODY_BYTES);
      this.map.set(key, { ...location, pack: this.intern(location.pack) });
    });
    this.append(out);
  }

  /** Forget every block of a pack (it is gone from the store). Returns how many. */
  removePack(packId: string): number {
    let removed = 0;
    for (const [key, location] of this.map) {
      if (location.pack === packId) {
        this.map.delete(key);
        removed++;
      }
    }
    const record = Buffer.alloc(RECORD_BYTES);
    record.write(packId, 16, HASH_BYTES, 'hex');
    record[45] = KIND_REMOVE_PACK;
    checksum(record).copy(record, BODY_BYTES);
    this.append(record);
    this.packIds.delete(packId);
    if (this.records > 4 * Math.max(1024, this.map.size)) this.compact();
    return removed;
  }

  private append(bytes: Buffer): void {
    fs.writeSync(this.fd, bytes, 0, bytes.length, (this.records + 1) * RECORD_BYTES);
    this.records += bytes.length / RECORD_BYTES;
    this.dirty = true;
  }

  /** Rewrite with live entries only (temp file, fsync, rename). */
  private compact(): void {
    const tmp = this.file + '.tmp';
    const fd = fs.openSync(tmp, 'w');
    fs.writeSync(fd, MAGIC);
    fs.closeSync(fd);
    const live = [...this.map];
    fs.closeSync(this.fd);
    this.map.clear();
    this.fd = fs.openSync(tmp, 'r+');
    this.records = 0;
    this.add(live);
    fs.fsyncSync(this.fd);
    fs.renameSync(tmp, this.file);
    this.dirty = false;
  }

  async sync(): Promise<void> {
    if (!this.dirty) return;
    this.dirty = false;
    await fdatasync(this.fd);
  }

  close(): void {
    fs.closeSync(this.fd);
  }
}
