// Pack format (DESIGN.md: pack, Formats). One object holding up to blocks_per_pack
// compressed blocks and an index of them. Little-endian throughout:
//
//   header, 32 bytes
//     0   magic "UPDPACK1"                      8
//     8   version u16 = 1                       2
//     10  cipher u8 (0 = none)                  1
//     11  flags u8 (0)                          1
//     12  count u32                             4
//     16  checksum: BLAKE3(header[0..16] ++ index), first 16 bytes
//   index, count × 32 bytes
//     0   block hash                            16
//     16  offset u32 (from the start of the pack)
//     20  length u32 (stored bytes)
//     24  rawLength u32
//     28  codec u8, 3 reserved
//   block bytes, back to back
//
// The pack id is the first 16 bytes of BLAKE3 of the whole pack, in hex; the key is
// packs/{first two hex digits}/{id}. A whole-pack GET is verified against its id; a
// ranged GET of one block against the block's hash.
import { blake3 } from '@napi-rs/blake-hash';
import { compressBlock, decompressBlock, MAX_BLOCK_BYTES, type CodecId, type Compression } from './../crypto/compress.js';
import { blockHash, HASH_BYTES } from '../crypto/hash.js';
import { FormatError } from './errors.js';

const MAGIC = Buffer.from('UPDPACK1');
const VERSION = 1;
const HEADER_BYTES = 32;
const ENTRY_BYTES = 32;
const MAX_BLOCKS = 65535;

export interface PackBlock {
  hash: Buffer;
  data: Buffer;
}

export interface PackEntry {
  hash: Buffer;
  offset: number;
  length: number;
  rawLength: number;
  codec: CodecId;
}

export interface EncodedPack {
  id: string;
  key: string;
  body: Buffer;
  entries: PackEntry[];
}

function digest(data: Buffer): Buffer {
  return blake3(data).subarray(0, HASH_BYTES);
}

export function packKey(id: string): string {
  return `packs/${id.slice(0, 2)}/${id}`;
}

export function packIdFromKey(key: string): string | undefined {
  const m = /^packs\/([0-9a-f]{2})\/([0-9a-f]{32})$/.exec(key);
  return m && m[2].startsWith(m[1]) ? m[2] : undefined;
}

/** Build a pack from raw blocks: each compressed (or stored raw when that is smaller). */
export function encodePack(blocks: PackBlock[], compression: Compression): EncodedPack {
  if (blocks.length < 1 || blocks.length > MAX_BLOCKS) throw new Error(`a pack holds 1 to ${MAX_BLOCKS} blocks, not ${blocks.length}`);
  const stored = blocks.map((b) => compressBlock(compression, b.data));
  const dataStart = HEADER_BYTES + blocks.length * ENTRY_BYTES;
  const total = stored.reduce((sum, s) => sum + s.data.length, dataStart);
  const body = Buffer.allocUnsafe(total);
  MAGIC.copy(body, 0);
  body.writeUInt16LE(VERSION, 8);
  body[10] = 0;
  body[11] = 0;
  body.writeUInt32LE(blocks.length, 12);
  const entries: PackEntry[] = [];
  const seen = new Set<string>();
  let offset = dataStart;
  for (let i = 0; i < blocks.length; i++) {
    const hash = blocks[i].hash;
    const name = hash.toString('latin1');
    if (seen.has(name)) throw new Error(`pack: block ${hash.toString('hex')} appears twice`);
    seen.add(name);
    const { codec, data } = stored[i];
    const at = HEADER_BYTES + i * ENTRY_BYTES;
    hash.copy(body, at, 0, HASH_BYTES);
    body.writeUInt32LE(offset, at + 16);
    body.writeUInt32LE(data.length, at + 20);
    body.writeUInt32LE(blocks[i].data.length, at + 24);
    body.writeUInt32LE(codec, at + 28); // codec byte + 3 zero bytes
    data.copy(body, offset);
    entries.push({ hash: Buffer.from(hash.subarray(0, HASH_BYTES)), offset, length: data.length, rawLength: blocks[i].data.length, codec });
    offset += data.length;
  }
  digest(Buffer.concat([body.subarray(0, 16), body.subarray(HEADER_BYTES, dataStart)])).copy(body, 16);
  const id = digest(body).toString('hex');
  return { id, key: packKey(id), body, entries };
}

/** The pack's BLAKE3 matches the id in its key (detects truncated or corrupted GETs). */
export function verifyPackId(key: string, body: Buffer): void {
  const id = packIdFromKey(key);
  if (id === undefined) throw new FormatError(key, `pack key ${key} is not packs/xx/<32 hex digits>`);
  const actual = digest(body).toString('hex');
  if (actual !== id) throw new FormatError(key, `pack ${key}: content hash is ${actual} (${body.length} bytes): corrupted or truncated`);
}

/** The index of a pack, every entry checked against the body. */
export function decodePackIndex(key: string, body: Buffer): PackEntry[] {
  if (body.length < HEADER_BYTES) throw new FormatError(key, `pack ${key}: ${body.length} bytes is shorter than the header`);
  if (!body.subarray(0, 8).equals(MAGIC)) throw new FormatError(key, `pack ${key}: bad magic (not an updraft pack)`);
  const version = body.readUInt16LE(8);
  if (version !== VERSION) throw new FormatError(key, `pack ${key}: format version ${version} is not supported (this build reads ${VERSION})`);
  const cipher = body[10];
  if (cipher !== 0) throw new FormatError(key, `pack ${key}: cipher ${cipher} is not supported by this build (0 = none)`);
  const count = body.readUInt32LE(12);
  const dataStart = HEADER_BYTES + count * ENTRY_BYTES;
  if (count < 1 || count > MAX_BLOCKS || dataStart > body.length) {
    throw new FormatError(key, `pack ${key}: block count ${count} does not fit a ${body.length}-byte pack`);
  }
  const expected = digest(Buffer.concat([body.subarray(0, 16), body.subarray(HEADER_BYTES, dataStart)]));
  if (!expected.equals(body.subarray(16, 32))) throw new FormatError(key, `pack ${key}: header/index checksum mismatch`);
  const entries: PackEntry[] = [];
  let end = dataStart;
  for (let i = 0; i < count; i++) {
    const at = HEADER_BYTES + i * ENTRY_BYTES;
    const offset = body.readUInt32LE(at + 16);
    const length = body.readUInt32LE(at + 20);
    const rawLength = body.readUInt32LE(at + 24);
    const codec = body[at + 28];
    if (offset !== end || offset + length > body.length) {
      throw new FormatError(key, `pack ${key}: index entry ${i} (offset ${offset}, length ${length}) does not follow the previous block inside the ${body.length}-byte pack`);
    }
    if (codec > 2) throw new FormatError(key, `pack ${key}: index entry ${i} has unknown codec ${codec}`);
    if (rawLength > MAX_BLOCK_BYTES) throw new FormatError(key, `pack ${key}: index entry ${i} has raw length ${rawLength}`);
    entries.push({ hash: Buffer.from(body.subarray(at, at + HASH_BYTES)), offset, length, rawLength, codec: codec as CodecId });
    end = offset + length;
  }
  if (end !== body.length) throw new FormatError(key, `pack ${key}: ${body.length - end} bytes after the last block`);
  return entries;
}

/** One block of a pack, decompressed and verified against its hash. A fresh buffer. */
export function unpackBlock(key: string, body: Buffer, entry: PackEntry): Buffer {
  return unpackRange(key, body.subarray(entry.offset, entry.offset + entry.length), entry);
}

/** A block from just its stored bytes (a ranged GET), decompressed and verified. */
export function unpackRange(key: string, stored: Buffer, entry: PackEntry): Buffer {
  if (stored.length !== entry.length) {
    throw new FormatError(key, `pack ${key}: block ${entry.hash.toString('hex')} is ${stored.length} bytes, the index says ${entry.length}`);
  }
  let raw: Buffer;
  try {
    raw = decompressBlock(entry.codec, stored, entry.rawLength);
  } catch (err) {
    throw new FormatError(key, `pack ${key}: block ${entry.hash.toString('hex')} does not decompress: ${(err as Error).message}`);
  }
  if (!blockHash(raw).equals(entry.hash)) {
    throw new FormatError(key, `pack ${key}: block ${entry.hash.toString('hex')} does not match its hash (corrupted)`);
  }
  return raw === stored ? Buffer.from(raw) : raw;
}
