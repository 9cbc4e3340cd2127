// Packs (DESIGN.md: Words, pack; Formats, `packs/{xx}/{pack-id}`): one object in the
// store holding up to 65535 blocks, each compressed on its own, and an index of them,
// so that a reader can take one block out of a whole-pack GET or fetch one block with a
// ranged GET of [offset, offset + length).
//
// Layout, all integers little-endian:
//
//   offset  size  field
//   0       8     magic "UPDPACK1"
//   8       2     version u16 = 1
//   10      1     cipher u8: 0 = none (other values reserved for encryption; refused)
//   11      1     flags u8: 0 (reserved; a reader refuses other values)
//   12      4     count u32: number of blocks, 1..65535
//   16      16    checksum: BLAKE3(bytes 0..16 ‖ index)[0..16]
//   32      32 × count  index, one entry per block:
//                   0   16  hash: the block's name (blockHash of the raw block)
//                   16  4   offset u32: of the stored bytes, from the start of the pack
//                   20  4   length u32: stored (compressed) bytes
//                   24  4   rawLength u32: bytes after decompression
//                   28  1   codec u8 (crypto/compress.ts: 0 none, 1 lz4, 2 zstd)
//                   29  3   reserved, 0
//   32 + 32 × count  the stored blocks, back to back, in index order
//
// The checksum covers header and index, so a reader can trust the index of a pack it got
// with a ranged GET of the first 32 + 32 × count bytes. Block bytes are covered by each
// block's own hash (checked by unpackBlock/unpackRange), and the whole body by the pack
// id: the first 16 bytes of BLAKE3 of the entire body, as 32 hex digits (verifyPackId).
import { blake3, Blake3Hasher } from '@napi-rs/blake-hash';
import { CODEC_NONE, CODEC_LZ4, CODEC_ZSTD, MAX_BLOCK_BYTES, codecName, compressBlock, decompressBlock } from '../crypto/compress.js';
import type { CodecId, Compression } from '../crypto/compress.js';
import { HASH_BYTES, ZERO_ALLOCATED_HASH, ZERO_HASH, blockHash } from '../crypto/hash.js';
import { FormatError } from './errors.js';
import { errorMessage } from '../log.js';

export const PACK_MAGIC = Buffer.from('UPDPACK1');
export const PACK_VERSION = 1;
export const PACK_HEADER_BYTES = 32;
export const PACK_ENTRY_BYTES = 32;
export const MAX_PACK_BLOCKS = 65535;
const CIPHER_NONE = 0;
const CHECKSUM_AT = 16;
const CHECKSUM_BYTES = 16;
/** A pack id: 32 lowercase hex digits (16 bytes of BLAKE3). */
export const PACK_ID = /^[0-9a-f]{32}$/;
const PACK_KEY = /^packs\/([0-9a-f]{2})\/([0-9a-f]{32})$/;

export interface PackBlock {
  /** blockHash(data), 16 bytes. */
  hash: Buffer;
  /** The raw block. */
  data: Buffer;
}

/** Where one block sits in a pack and how it is stored. */
export interface PackEntry {
  hash: Buffer;
  /** Of the stored bytes, from the start of the pack body. */
  offset: number;
  /** Stored bytes. */
  length: number;
  /** Bytes after decompression. */
  rawLength: number;
  codec: CodecId;
}

export interface EncodedPack {
  id: string;
  key: string;
  body: Buffer;
  entries: PackEntry[];
}

/** The object key of a pack: `packs/{first two hex digits}/{id}`. */
export function packKey(id: string): string {
  if (!PACK_ID.test(id)) throw new Error(`pack id ${JSON.stringify(id)} is not 32 lowercase hex digits`);
  return `packs/${id.slice(0, 2)}/${id}`;
}

/** The pack id in a pack key, or undefined if `key` is not a pack key. */
export function packIdFromKey(key: string): string | undefined {
  const match = PACK_KEY.exec(key);
  if (!match || !match[2].startsWith(match[1])) return undefined;
  return match[2];
}

function isCodec(codec: number): codec is CodecId {
  return codec === CODEC_NONE || codec === CODEC_LZ4 || codec === CODEC_ZSTD;
}

function indexChecksum(body: Buffer, indexEnd: number): Buffer {
  return new Blake3Hasher()
    .update(body.subarray(0, CHECKSUM_AT))
    .update(body.subarray(PACK_HEADER_BYTES, indexEnd))
    .digestBuffer()
    .subarray(0, CHECKSUM_BYTES);
}

/**
 * Compress `blocks` one by one and lay them out as a pack. Asserts 1..65535 blocks, each
 * a 16-byte hash that is not a zero name and matches its data, no hash twice, and a body
 * that fits u32 offsets.
 */
export function encodePack(blocks: PackBlock[], compression: Compression): EncodedPack {
  if (blocks.length < 1 || blocks.length > MAX_PACK_BLOCKS) {
    throw new Error(`encodePack: ${blocks.length} blocks; a pack holds 1 to ${MAX_PACK_BLOCKS}`);
  }
  const seen = new Set<string>();
  const stored: { codec: CodecId; data: Buffer }[] = new Array(blocks.length);
  const dataStart = PACK_HEADER_BYTES + blocks.length * PACK_ENTRY_BYTES;
  let total = dataStart;
  for (let i = 0; i < blocks.length; i++) {
    const { hash, data } = blocks[i];
    const hex = hash.toString('hex');
    if (hash.length !== HASH_BYTES) throw new Error(`encodePack: block ${i} has a ${hash.length}-byte hash`);
    if (hash.equals(ZERO_HASH) || hash.equals(ZERO_ALLOCATED_HASH)) {
      throw new Error(`encodePack: block ${i} is a zero name (${hex}); zero blocks are never stored`);
    }
    if (seen.has(hex)) throw new Error(`encodePack: block ${hex} is given twice`);
    seen.add(hex);
    if (data.length < 1 || data.length > MAX_BLOCK_BYTES) {
      throw new Error(`encodePack: block ${hex} is ${data.length} bytes; blocks are 1 to ${MAX_BLOCK_BYTES}`);
    }
    // The last chance to catch a block that was corrupted in the cache before it becomes
    // the only copy; costs less than compressing it.
    if (!blockHash(data).equals(hash)) {
      throw new Error(`encodePack: block ${hex} does not match its hash (content hashes to ${blockHash(data).toString('hex')})`);
    }
    stored[i] = compressBlock(compression, data);
    total += stored[i].data.length;
  }
  if (total > 0xffffffff) throw new Error(`encodePack: ${blocks.length} blocks make a ${total}-byte pack; offsets are u32, so at most 4 GiB`);

  const body = Buffer.allocUnsafe(total);
  PACK_MAGIC.copy(body, 0);
  body.writeUInt16LE(PACK_VERSION, 8);
  body.writeUInt8(CIPHER_NONE, 10);
  body.writeUInt8(0, 11);
  body.writeUInt32LE(blocks.length, 12);
  const entries: PackEntry[] = new Array(blocks.length);
  let offset = dataStart;
  for (let i = 0; i < blocks.length; i++) {
    const { codec, data } = stored[i];
    const at = PACK_HEADER_BYTES + i * PACK_ENTRY_BYTES;
    blocks[i].hash.copy(body, at);
    body.writeUInt32LE(offset, at + 16);
    body.writeUInt32LE(data.length, at + 20);
    body.writeUInt32LE(blocks[i].data.length, at + 24);
    body.writeUInt8(codec, at + 28);
    body.fill(0, at + 29, at + PACK_ENTRY_BYTES);
    data.copy(body, offset);
    entries[i] = { hash: Buffer.from(blocks[i].hash), offset, length: data.length, rawLength: blocks[i].data.length, codec };
    offset += data.length;
  }
  indexChecksum(body, dataStart).copy(body, CHECKSUM_AT);
  const id = blake3(body).toString('hex', 0, 16);
  return { id, key: packKey(id), body, entries };
}

/**
 * Validate a pack's header and index and return its entries (hashes are copies: they do
 * not keep `body` alive). `body` may be the whole pack or any prefix that holds every
 * block the index names. Throws FormatError naming `key`.
 */
export function decodePackIndex(key: string, body: Buffer): PackEntry[] {
  const fail = (what: string) => new FormatError(key, `pack ${key}: ${what}`);
  if (body.length < PACK_HEADER_BYTES) throw fail(`truncated: ${body.length} bytes, the header alone is ${PACK_HEADER_BYTES}`);
  if (!body.subarray(0, 8).equals(PACK_MAGIC)) throw fail(`bad magic ${JSON.stringify(body.toString('latin1', 0, 8))}, expected "UPDPACK1" (not a pack)`);
  const version = body.readUInt16LE(8);
  if (version !== PACK_VERSION) throw fail(`format version ${version}; this reader knows version ${PACK_VERSION}`);
  const count = body.readUInt32LE(12);
  const dataStart = PACK_HEADER_BYTES + count * PACK_ENTRY_BYTES;
  if (dataStart > body.length) throw fail(`truncated: the index of ${count} blocks needs ${dataStart} bytes, the body has ${body.length}`);
  if (!indexChecksum(body, dataStart).equals(body.subarray(CHECKSUM_AT, CHECKSUM_AT + CHECKSUM_BYTES))) {
    throw fail('header or index checksum mismatch (corrupt)');
  }
  const cipher = body.readUInt8(10);
  if (cipher !== CIPHER_NONE) throw fail(`cipher ${cipher} is not supported (this reader knows only 0, unencrypted)`);
  const flags = body.readUInt8(11);
  if (flags !== 0) throw fail(`unknown flags 0x${flags.toString(16)}`);
  if (count < 1 || count > MAX_PACK_BLOCKS) throw fail(`holds ${count} blocks; a pack holds 1 to ${MAX_PACK_BLOCKS}`);

  const hashes = Buffer.from(body.subarray(PACK_HEADER_BYTES, dataStart)); // one copy for all hashes
  const entries: PackEntry[] = new Array(count);
  const seen = new Set<string>();
  let previousEnd = dataStart;
  for (let i = 0; i < count; i++) {
    const at = PACK_HEADER_BYTES + i * PACK_ENTRY_BYTES;
    const hash = hashes.subarray(i * PACK_ENTRY_BYTES, i * PACK_ENTRY_BYTES + HASH_BYTES);
    const offset = body.readUInt32LE(at + 16);
    const length = body.readUInt32LE(at + 20);
    const rawLength = body.readUInt32LE(at + 24);
    const codec = body.readUInt8(at + 28);
    const entry = `index entry ${i} (block ${hash.toString('hex')})`;
    if (!isCodec(codec)) throw fail(`${entry} has ${codecName(codec)}`);
    if (body.readUInt8(at + 29) !== 0 || body.readUInt16LE(at + 30) !== 0) throw fail(`${entry} has nonzero reserved bytes`);
    if (rawLength < 1 || rawLength > MAX_BLOCK_BYTES) throw fail(`${entry} has raw length ${rawLength}; blocks are 1 to ${MAX_BLOCK_BYTES} bytes`);
    if (length < 1) throw fail(`${entry} has length 0`);
    if (codec === CODEC_NONE && length !== rawLength) throw fail(`${entry} is stored uncompressed in ${length} bytes but its raw length is ${rawLength}`);
    if (offset < previousEnd) throw fail(`${entry} at offset ${offset} overlaps the ${i === 0 ? 'index' : `previous block (which ends at ${previousEnd})`}`);
    if (offset + length > body.length) throw fail(`${entry} runs past the end of the body (offset ${offset} + length ${length} > ${body.length} bytes)`);
    const name = hash.toString('latin1');
    if (seen.has(name)) throw fail(`${entry} names a block that is already in the index`);
    seen.add(name);
    previousEnd = offset + length;
    entries[i] = { hash, offset, length, rawLength, codec };
  }
  return entries;
}

/**
 * The raw block of `entry`, taken from the whole pack `body`, decompressed and checked
 * against its hash. Always a fresh buffer (never a view of `body`), so callers may keep it.
 */
export function unpackBlock(key: string, body: Buffer, entry: PackEntry): Buffer {
  if (entry.offset + entry.length > body.length) {
    const where = `offset ${entry.offset} + length ${entry.length} > ${body.length} bytes`;
    throw new FormatError(key, `pack ${key}: block ${entry.hash.toString('hex')} runs past the end of the body (${where})`);
  }
  return unpackRange(key, body.subarray(entry.offset, entry.offset + entry.length), entry);
}

/**
 * Like unpackBlock, given only the entry's stored bytes (a ranged GET of
 * [offset, offset + length)). Always returns a fresh buffer.
 */
export function unpackRange(key: string, stored: Buffer, entry: PackEntry): Buffer {
  const hex = entry.hash.toString('hex');
  if (stored.length !== entry.length) {
    throw new FormatError(key, `pack ${key}: block ${hex}: got ${stored.length} stored bytes, the index says ${entry.length}`);
  }
  let raw: Buffer;
  try {
    raw = decompressBlock(entry.codec, stored, entry.rawLength);
  } catch (err) {
    throw new FormatError(key, `pack ${key}: block ${hex} does not decompress (${codecName(entry.codec)}): ${errorMessage(err)}`, { cause: err });
  }
  const actual = blockHash(raw);
  if (!actual.equals(entry.hash)) {
    throw new FormatError(key, `pack ${key}: block ${hex} is corrupt: its content hashes to ${actual.toString('hex')}`);
  }
  // CODEC_NONE hands back the stored bytes themselves: copy so the caller's block does
  // not alias (and keep alive) the pack body or the GET buffer.
  return raw === stored ? Buffer.from(raw) : raw;
}

/** Check that `body` hashes to the pack id in `key` (catches truncated and corrupt whole-pack GETs). */
export function verifyPackId(key: string, body: Buffer): void {
  const id = packIdFromKey(key);
  if (id === undefined) throw new FormatError(key, `pack ${key}: not a pack key (expected packs/xx/<32 hex digits>)`);
  const actual = blake3(body).toString('hex', 0, 16);
  if (actual !== id) throw new FormatError(key, `pack ${key}: the ${body.length}-byte body hashes to ${actual}, not to its id (truncated or corrupt)`);
}
