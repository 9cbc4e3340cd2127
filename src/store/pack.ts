// Packs (DESIGN.md: Words, pack; Formats, `packs/{xx}/{pack-id}`): one object in the
// store holding up to 65535 blocks, each compressed (and in an encrypted store sealed) on
// its own, and an index of them, so that a reader can take one block out of a whole-pack
// GET or fetch one block with a ranged GET of [offset, offset + length).
//
// Layout, all integers little-endian:
//
//   offset  size  field
//   0       8     magic "UPDPACK1"
//   8       2     version u16: 1, or 2 for a sealed pack named by its seals (below); a
//                 writer makes 1 in a plaintext store and 2 in an encrypted one
//   10      1     cipher u8 (crypto/cipher.ts): 0 none, 1 XChaCha20-Poly1305; a reader
//                 refuses any cipher but its store's
//   11      1     flags u8: 0 (reserved; a reader refuses other values)
//   12      4     count u32: number of blocks, 1..65535
//   16      16    checksum: BLAKE3(bytes 0..16 ‖ stored index)[0..16]
//   32      the stored index: 32 × count bytes, sealed as a whole when encrypted (24-byte
//           nonce in front, 16-byte tag behind; AAD "updraft pack index\0" ‖ bytes 0..16).
//           One entry per block:
//                   0   16  hash: the block's name (the store's block hash of the raw block)
//                   16  4   offset u32: of the stored bytes, from the start of the pack
//                   20  4   length u32: stored bytes (compressed, plus 40 when sealed)
//                   24  4   rawLength u32: bytes after decompression
//                   28  1   codec u8 (crypto/compress.ts: 0 none, 1 lz4, 2 zstd)
//                   29  3   reserved, 0
//   then the stored blocks, back to back, in index order. Encrypted, each is
//   nonce(24) ‖ XChaCha20-Poly1305 of the compressed block ‖ tag(16), with AAD
//   "updraft block\0" ‖ hash ‖ rawLength u32 ‖ codec u8: a block opens only where the
//   index (or a manifest) names it by its own name, so blocks swapped between packs or
//   within one fail to open. Compression comes before encryption.
//
// The checksum covers header and stored index, so a reader can trust the index of a pack
// it got with a ranged GET of its first bytes (when encrypted, opening the index proves
// it too). Block bytes are covered by each block's own hash (checked by unpackBlock and
// unpackRange after opening and decompressing) and, when sealed, by its Poly1305 tag.
//
// The pack id (32 hex digits, the first 16 bytes of a BLAKE3; verifyPackId) names:
//   version 1  the entire stored body
//   version 2  the header and the sealed index (bytes 0 .. 32 + 32 × count + 40): every
//              block is sealed, so its tag already authenticates each of its bytes, and
//              the sealed index (random nonce, tag) already makes the name unique. Hashing
//              the ciphertext again cost 0.45 s of CPU per GiB drained and per GiB read
//              cold, 40% of what sealing itself costs, and checked nothing a tag does not.
// For an encrypted pack either is a hash of ciphertext and says nothing of the content.
import { blake3, Blake3Hasher } from '@napi-rs/blake-hash';
import { CODEC_NONE, CODEC_LZ4, CODEC_ZSTD, MAX_BLOCK_BYTES, codecName, compressBlock } from '../crypto/compress.js';
import type { CodecId, Compression } from '../crypto/compress.js';
import { cipherName, cipherOverhead, OpenError, sealLabel, type StoreCipher } from '../crypto/cipher.js';
import { HASH_BYTES, ZERO_ALLOCATED_HASH, ZERO_HASH } from '../crypto/hash.js';
import { FormatError, openSealedBody } from './errors.js';

export const PACK_MAGIC = Buffer.from('UPDPACK1');
/** The version of a pack with no seals, named by its entire body. */
export const PACK_VERSION = 1;
/** The version of a sealed pack, named by its header and sealed index. */
export const PACK_VERSION_SEALED = 2;
export const PACK_HEADER_BYTES = 32;
export const PACK_ENTRY_BYTES = 32;
export const MAX_PACK_BLOCKS = 65535;
const CHECKSUM_AT = 16;
const CHECKSUM_BYTES = 16;
/** A pack id: 32 lowercase hex digits (16 bytes of BLAKE3). */
export const PACK_ID = /^[0-9a-f]{32}$/;
const PACK_KEY = /^packs\/([0-9a-f]{2})\/([0-9a-f]{32})$/;

export interface PackBlock {
  /** The store's block hash of data, 16 bytes. */
  hash: Buffer;
  /** The raw block. */
  data: Buffer;
}

/** Where one block sits in a pack and how it is stored. */
export interface PackEntry {
  hash: Buffer;
  /** Of the stored bytes, from the start of the pack body. */
  offset: number;
  /** Stored bytes (compressed, plus the seal overhead when encrypted). */
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

/** The associated data of a pack's sealed index: the header fields before the checksum. */
function indexLabel(body: Buffer): Buffer {
  return sealLabel('pack index', body.subarray(0, CHECKSUM_AT));
}

/** The associated data of one sealed block: its name, raw length and codec. */
export function blockLabel(entry: { hash: Buffer; rawLength: number; codec: CodecId }): Buffer {
  const binding = Buffer.allocUnsafe(HASH_BYTES + 5);
  entry.hash.copy(binding, 0, 0, HASH_BYTES);
  binding.writeUInt32LE(entry.rawLength, HASH_BYTES);
  binding.writeUInt8(entry.codec, HASH_BYTES + 4);
  return sealLabel('block', binding);
}

/** Where the stored index of `count` blocks ends (and the blocks begin), `overhead` being its seal's. */
function indexEnd(count: number, overhead: number): number {
  return PACK_HEADER_BYTES + count * PACK_ENTRY_BYTES + overhead;
}

function indexChecksum(body: Buffer, indexEnd: number): Buffer {
  return new Blake3Hasher()
    .update(body.subarray(0, CHECKSUM_AT))
    .update(body.subarray(PACK_HEADER_BYTES, indexEnd))
    .digestBuffer()
    .subarray(0, CHECKSUM_BYTES);
}

/**
 * Compress (then seal, with `cipher`) `blocks` one by one and lay them out as a pack.
 * Asserts 1..65535 blocks, each a 16-byte hash that is not a zero name and matches its
 * data under `cipher`'s block hash, no hash twice, and a body that fits u32 offsets.
 */
export function encodePack(
  blocks: PackBlock[],
  compression: Compression,
  cipher: StoreCipher,
  /** Where the body goes: a buffer of exactly `bytes` (a view of a reused one, say). */
  allocate: (bytes: number) => Buffer = Buffer.allocUnsafe,
): EncodedPack {
  if (blocks.length < 1 || blocks.length > MAX_PACK_BLOCKS) {
    throw new Error(`encodePack: ${blocks.length} blocks; a pack holds 1 to ${MAX_PACK_BLOCKS}`);
  }
  const seen = new Set<string>();
  const stored: { codec: CodecId; data: Buffer }[] = new Array(blocks.length);
  const indexBytes = blocks.length * PACK_ENTRY_BYTES;
  const dataStart = indexEnd(blocks.length, cipher.overhead);
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
    const actual = cipher.blockHash(data);
    if (!actual.equals(hash)) throw new Error(`encodePack: block ${hex} does not match its hash (content hashes to ${actual.toString('hex')})`);
    stored[i] = compressBlock(compression, data);
    total += stored[i].data.length + cipher.overhead;
  }
  if (total > 0xffffffff) throw new Error(`encodePack: ${blocks.length} blocks make a ${total}-byte pack; offsets are u32, so at most 4 GiB`);

  const body = allocate(total);
  if (body.length !== total) throw new Error(`encodePack: a ${body.length}-byte body buffer for a ${total}-byte pack`);
  PACK_MAGIC.copy(body, 0);
  const sealed = cipher.overhead > 0;
  body.writeUInt16LE(sealed ? PACK_VERSION_SEALED : PACK_VERSION, 8);
  body.writeUInt8(cipher.id, 10);
  body.writeUInt8(0, 11);
  body.writeUInt32LE(blocks.length, 12);
  const index = Buffer.allocUnsafe(indexBytes);
  const entries: PackEntry[] = new Array(blocks.length);
  let offset = dataStart;
  for (let i = 0; i < blocks.length; i++) {
    const { codec, data } = stored[i];
    const length = data.length + cipher.overhead;
    const at = i * PACK_ENTRY_BYTES;
    blocks[i].hash.copy(index, at);
    index.writeUInt32LE(offset, at + 16);
    index.writeUInt32LE(length, at + 20);
    index.writeUInt32LE(blocks[i].data.length, at + 24);
    index.writeUInt8(codec, at + 28);
    index.fill(0, at + 29, at + PACK_ENTRY_BYTES);
    const entry: PackEntry = { hash: Buffer.from(blocks[i].hash), offset, length, rawLength: blocks[i].data.length, codec };
    cipher.sealInto(body.subarray(offset, offset + length), data, blockLabel(entry));
    entries[i] = entry;
    offset += length;
  }
  cipher.sealInto(body.subarray(PACK_HEADER_BYTES, dataStart), index, indexLabel(body));
  indexChecksum(body, dataStart).copy(body, CHECKSUM_AT);
  const id = blake3(body.subarray(0, sealed ? dataStart : body.length)).toString('hex', 0, 16);
  return { id, key: packKey(id), body, entries };
}

/**
 * Validate (and open, when encrypted) a pack's header and index and return its entries
 * (hashes are copies: they do not keep `body` alive). `body` may be the whole pack or any
 * prefix that holds every block the index names. Throws FormatError naming `key`, also
 * for a pack sealed otherwise than `cipher` says (never mixed in one store).
 */
export function decodePackIndex(key: string, body: Buffer, cipher: StoreCipher): PackEntry[] {
  const fail = (what: string) => new FormatError(key, `pack ${key}: ${what}`);
  if (body.length < PACK_HEADER_BYTES) throw fail(`truncated: ${body.length} bytes, the header alone is ${PACK_HEADER_BYTES}`);
  if (!body.subarray(0, 8).equals(PACK_MAGIC)) throw fail(`bad magic ${JSON.stringify(body.toString('latin1', 0, 8))}, expected "UPDPACK1" (not a pack)`);
  const version = body.readUInt16LE(8);
  if (version !== PACK_VERSION && version !== PACK_VERSION_SEALED) {
    throw fail(`format version ${version}; this reader knows versions ${PACK_VERSION} and ${PACK_VERSION_SEALED}`);
  }
  const count = body.readUInt32LE(12);
  const intact = (end: number) => end <= body.length && indexChecksum(body, end).equals(body.subarray(CHECKSUM_AT, CHECKSUM_AT + CHECKSUM_BYTES));
  const stored = body.readUInt8(10);
  // An intact pack of another cipher (a store must never be mixed) is named as such; a
  // damaged cipher byte is only a checksum mismatch.
  const storedOverhead = cipherOverhead(stored);
  if (stored !== cipher.id && storedOverhead !== undefined && intact(indexEnd(count, storedOverhead))) throw fail(cipherMismatch(stored, cipher));
  const dataStart = indexEnd(count, cipher.overhead);
  if (dataStart > body.length) throw fail(`truncated: the index of ${count} blocks needs ${dataStart} bytes, the body has ${body.length}`);
  if (!intact(dataStart)) throw fail('header or index checksum mismatch (corrupt)');
  if (stored !== cipher.id) throw fail(cipherMismatch(stored, cipher));
  if (version === PACK_VERSION_SEALED && cipher.overhead === 0) throw fail(`is format version ${version} (sealed) but its blocks are not sealed`);
  const flags = body.readUInt8(11);
  if (flags !== 0) throw fail(`unknown flags 0x${flags.toString(16)}`);
  if (count < 1 || count > MAX_PACK_BLOCKS) throw fail(`holds ${count} blocks; a pack holds 1 to ${MAX_PACK_BLOCKS}`);

  const storedIndex = body.subarray(PACK_HEADER_BYTES, dataStart);
  let index: Buffer;
  try {
    index = cipher.open(storedIndex, indexLabel(body));
  } catch (err) {
    if (!(err instanceof OpenError)) throw err;
    throw new FormatError(key, `pack ${key}: the index does not decrypt with this store's key: ${err.message}`, { cause: err });
  }
  // One copy for all hashes (an opened index is a fresh buffer already).
  const hashes = index === storedIndex ? Buffer.from(index) : index;
  const entries: PackEntry[] = new Array(count);
  const seen = new Set<string>();
  let previousEnd = dataStart;
  for (let i = 0; i < count; i++) {
    const at = i * PACK_ENTRY_BYTES;
    const hash = hashes.subarray(at, at + HASH_BYTES);
    const offset = hashes.readUInt32LE(at + 16);
    const length = hashes.readUInt32LE(at + 20);
    const rawLength = hashes.readUInt32LE(at + 24);
    const codec = hashes.readUInt8(at + 28);
    const entry = `index entry ${i} (block ${hash.toString('hex')})`;
    if (!isCodec(codec)) throw fail(`${entry} has ${codecName(codec)}`);
    if (hashes.readUInt8(at + 29) !== 0 || hashes.readUInt16LE(at + 30) !== 0) throw fail(`${entry} has nonzero reserved bytes`);
    if (rawLength < 1 || rawLength > MAX_BLOCK_BYTES) throw fail(`${entry} has raw length ${rawLength}; blocks are 1 to ${MAX_BLOCK_BYTES} bytes`);
    if (length <= cipher.overhead) throw fail(`${entry} has length ${length}`);
    if (codec === CODEC_NONE && length !== rawLength + cipher.overhead) {
      throw fail(`${entry} is stored uncompressed in ${length} bytes but its raw length is ${rawLength}`);
    }
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

/** Why an object sealed with cipher `stored` cannot be read in a store whose cipher is `cipher`. */
export function cipherMismatch(stored: number, cipher: StoreCipher): string {
  if (cipher.id === 0) return `is encrypted (${cipherName(stored)}), but this store is not encrypted: refused (a store is never mixed)`;
  if (stored === 0) return 'is not encrypted, but this store is: refused (an encrypted store never holds plaintext objects)';
  return `is sealed with ${cipherName(stored)}; this store uses ${cipherName(cipher.id)}`;
}

/**
 * The raw block of `entry`, taken from the whole pack `body`, opened, decompressed and
 * checked against its hash. Always a fresh buffer (never a view of `body`), so callers may keep it.
 */
export function unpackBlock(key: string, body: Buffer, entry: PackEntry, cipher: StoreCipher): Buffer {
  if (entry.offset + entry.length > body.length) {
    const where = `offset ${entry.offset} + length ${entry.length} > ${body.length} bytes`;
    throw new FormatError(key, `pack ${key}: block ${entry.hash.toString('hex')} runs past the end of the body (${where})`);
  }
  return unpackRange(key, body.subarray(entry.offset, entry.offset + entry.length), entry, cipher);
}

/**
 * Like unpackBlock, given only the entry's stored bytes (a ranged GET of
 * [offset, offset + length)) and the entry (from the pack's index or a manifest). Always
 * returns a fresh buffer.
 */
export function unpackRange(key: string, stored: Buffer, entry: PackEntry, cipher: StoreCipher): Buffer {
  const hex = entry.hash.toString('hex');
  if (stored.length !== entry.length) {
    throw new FormatError(key, `pack ${key}: block ${hex}: got ${stored.length} stored bytes, the index says ${entry.length}`);
  }
  const { raw } = openSealedBody(key, `pack ${key}: block ${hex}`, cipher, stored, blockLabel(entry), entry.codec, entry.rawLength);
  const actual = cipher.blockHash(raw);
  if (!actual.equals(entry.hash)) {
    throw new FormatError(key, `pack ${key}: block ${hex} is corrupt: its content hashes to ${actual.toString('hex')}`);
  }
  // CODEC_NONE hands back the stored bytes themselves: copy so the caller's block does
  // not alias (and keep alive) the pack body or the GET buffer.
  return raw === stored ? Buffer.from(raw) : raw;
}

/**
 * unpackBlock into `out` (exactly entry.rawLength bytes), so that a whole pack's blocks
 * can be opened into one buffer: a block stored uncompressed is opened (copied, or
 * decrypted) straight into `out`, with no buffer of its own.
 */
export function unpackInto(key: string, body: Buffer, entry: PackEntry, cipher: StoreCipher, out: Buffer): void {
  if (out.length !== entry.rawLength) throw new Error(`unpackInto: a ${out.length}-byte output for a ${entry.rawLength}-byte block`);
  if (entry.codec !== CODEC_NONE) {
    unpackBlock(key, body, entry, cipher).copy(out);
    return;
  }
  const hex = entry.hash.toString('hex');
  if (entry.offset + entry.length > body.length) {
    const where = `offset ${entry.offset} + length ${entry.length} > ${body.length} bytes`;
    throw new FormatError(key, `pack ${key}: block ${hex} runs past the end of the body (${where})`);
  }
  // decodePackIndex checked that an uncompressed block's stored length is its raw length plus the seal.
  try {
    cipher.openInto(out, body.subarray(entry.offset, entry.offset + entry.length), blockLabel(entry));
  } catch (err) {
    if (!(err instanceof OpenError)) throw err;
    throw new FormatError(key, `pack ${key}: block ${hex} does not decrypt with this store's key: ${err.message}`, { cause: err });
  }
  const actual = cipher.blockHash(out);
  if (!actual.equals(entry.hash)) {
    throw new FormatError(key, `pack ${key}: block ${hex} is corrupt: its content hashes to ${actual.toString('hex')}`);
  }
}

/**
 * Check that `body` hashes to the pack id in `key`: all of it (version 1), or its header
 * and sealed index (version 2, whose blocks each prove themselves when opened). Catches
 * truncated, corrupt and misplaced whole-pack GETs; needs no key.
 */
export function verifyPackId(key: string, body: Buffer): void {
  const id = packIdFromKey(key);
  if (id === undefined) throw new FormatError(key, `pack ${key}: not a pack key (expected packs/xx/<32 hex digits>)`);
  let named = body;
  let what = `the ${body.length}-byte body hashes`;
  if (body.length >= PACK_HEADER_BYTES && body.readUInt16LE(8) === PACK_VERSION_SEALED) {
    const end = indexEnd(body.readUInt32LE(12), cipherOverhead(body.readUInt8(10)) ?? 0);
    if (end > body.length) throw new FormatError(key, `pack ${key}: truncated: the header and sealed index need ${end} bytes, the body has ${body.length}`);
    named = body.subarray(0, end);
    what = `the header and sealed index (${end} bytes) hash`;
  }
  const actual = blake3(named).toString('hex', 0, 16);
  if (actual !== id) throw new FormatError(key, `pack ${key}: ${what} to ${actual}, not to its id (truncated or corrupt)`);
}

/**
 * Open the whole pack `body` fetched from `key`: every block unpacked (decrypted,
 * decompressed, hash-checked) into one buffer: the start of `out` when the blocks fit
 * there, else a new one. Throws FormatError naming `key`. A sealed pack's id (its header
 * and sealed index) is checked; a plain pack's id, the hash of its whole body, is not: each
 * of its blocks is checked against its name, which a truncated or corrupt body fails, and
 * hashing every byte a second time proves nothing more about them. The caller checks the
 * pack holds the blocks it was fetched for (a misplaced pack: store/fetch.ts).
 */
export function openPack(key: string, body: Buffer, cipher: StoreCipher, out?: Buffer): { hashes: Buffer; blocks: Buffer; lengths: number[] } {
  if (body.length < PACK_HEADER_BYTES || body.readUInt16LE(8) !== PACK_VERSION) verifyPackId(key, body);
  else if (packIdFromKey(key) === undefined) throw new FormatError(key, `pack ${key}: not a pack key (expected packs/xx/<32 hex digits>)`);
  const entries = decodePackIndex(key, body, cipher);
  let total = 0;
  for (const entry of entries) total += entry.rawLength;
  const hashes = Buffer.from(new ArrayBuffer(entries.length * HASH_BYTES));
  const blocks = out !== undefined && out.length >= total ? out.subarray(0, total) : Buffer.from(new ArrayBuffer(total));
  const lengths: number[] = new Array(entries.length);
  let at = 0;
  for (let i = 0; i < entries.length; i++) {
    const length = entries[i].rawLength;
    unpackInto(key, body, entries[i], cipher, blocks.subarray(at, at + length));
    entries[i].hash.copy(hashes, i * HASH_BYTES);
    lengths[i] = length;
    at += length;
  }
  return { hashes, blocks, lengths };
}
