// Manifest format (DESIGN.md: manifest, Formats): a volume's block map plus the pack
// location of every block it names, so any host can serve the volume from the manifest
// and the packs alone (invariant 2). Little-endian:
//
//   header, 40 bytes
//     0   magic "UPDMANI1"                 8
//     8   version u16 = 1                  2
//     10  codec u8 (of the body)           1
//     11  cipher u8 (0 = none)             1
//     12  rawBodyLength u32                4
//     16  storedBodyLength u32             4
//     20  reserved                         4
//     24  BLAKE3(stored body), 16 bytes
//   body (compressed as a whole)
//     u32 length + UTF-8 JSON meta
//     packs:  u32 count, count × 16-byte pack id
//     blocks: u32 count, count × 32 bytes { hash 16, pack index u32 (codec in its top
//             byte, so the index is < 2^24), offset u32, length u32, rawLength u32 }
//     chunks: u32 count, count × 8 bytes { chunk u32, block u32 } ascending by chunk;
//             block 0xFFFFFFFF = allocated zeros (never stored); holes are absent
//
// Its size grows with the mapped chunks, never with the volume size.
import { blake3 } from '@napi-rs/blake-hash';
import { compressBlock, decompressBlock, type CodecId, type Compression } from '../crypto/compress.js';
import { HASH_BYTES } from '../crypto/hash.js';
import { FormatError } from './errors.js';

const MAGIC = Buffer.from('UPDMANI1');
const VERSION = 1;
const HEADER_BYTES = 40;
const BLOCK_BYTES = 32;
const CHUNK_BYTES = 8;
const MAX_PACKS = 1 << 24;
/** A manifest body larger than this is refused before it is decompressed. */
const MAX_BODY_BYTES = 1 << 30;

export const ZERO_ALLOCATED_BLOCK = 0xffffffff;

export interface ManifestMeta {
  format: 1;
  name: string;
  size: number;
  blockSize: number;
  /** The volume's sequence at the snapshot. */
  sequence: number;
  /** Lease generation of the writer (fencing). */
  generation: number;
  host: string;
  created: string;
  parent?: { name: string; sequence: number };
}

export interface ManifestBlock {
  hash: Buffer;
  pack: string;
  offset: number;
  length: number;
  rawLength: number;
  codec: CodecId;
}

export interface Manifest {
  meta: ManifestMeta;
  chunks: Uint32Array;
  /** Index into blocks, or ZERO_ALLOCATED_BLOCK. */
  chunkBlocks: Uint32Array;
  blocks: ManifestBlock[];
}

export function manifestKey(volume: string): string {
  return `volumes/${volume}/manifest`;
}
export function leaseKey(volume: string): string {
  return `volumes/${volume}/lease`;
}
export function checkpointKey(volume: string, checkpoint: string): string {
  return `volumes/${volume}/checkpoints/${checkpoint}`;
}

function digest(data: Buffer): Buffer {
  return blake3(data).subarray(0, HASH_BYTES);
}

/** Collects chunk → block with locations, storing each distinct block once. */
export class ManifestBuilder {
  private readonly chunkList: number[] = [];
  private readonly chunkBlockList: number[] = [];
  private readonly blocks: ManifestBlock[] = [];
  private readonly blockIndex = new Map<string, number>();

  constructor(private readonly meta: ManifestMeta) {}

  setChunk(chunk: number, hash: Buffer | 'zero-allocated', location?: Omit<ManifestBlock, 'hash'>): void {
    let block: number;
    if (hash === 'zero-allocated') block = ZERO_ALLOCATED_BLOCK;
    else {
      const name = hash.toString('latin1');
      let index = this.blockIndex.get(name);
      if (index === undefined) {
        if (location === undefined) throw new Error(`manifest ${this.meta.name}: block ${hash.toString('hex')} has no pack location`);
        index = this.blocks.length;
        this.blocks.push({ hash: Buffer.from(hash), ...location });
        this.blockIndex.set(name, index);
      }
      block = index;
    }
    this.chunkList.push(chunk);
    this.chunkBlockList.push(block);
  }

  build(): Manifest {
    const order = this.chunkList.map((_, i) => i).sort((x, y) => this.chunkList[x] - this.chunkList[y]);
    return {
      meta: { ...this.meta },
      chunks: Uint32Array.from(order, (i) => this.chunkList[i]),
      chunkBlocks: Uint32Array.from(order, (i) => this.chunkBlockList[i]),
      blocks: this.blocks,
    };
  }
}

export function encodeManifest(m: Manifest, compression: Compression): Buffer {
  const { meta } = m;
  const chunkLimit = Math.ceil(meta.size / meta.blockSize);
  const packIds: string[] = [];
  const packIndex = new Map<string, number>();
  for (const b of m.blocks) {
    if (!packIndex.has(b.pack)) {
      packIndex.set(b.pack, packIds.length);
      packIds.push(b.pack);
    }
  }
  if (packIds.length >= MAX_PACKS) throw new Error(`manifest ${meta.name}: ${packIds.length} packs is more than one manifest holds`);
  const metaBytes = Buffer.from(JSON.stringify(meta));
  const rawLength = 4 + metaBytes.length + 4 + packIds.length * 16 + 4 + m.blocks.length * BLOCK_BYTES + 4 + m.chunks.length * CHUNK_BYTES;
  const raw = Buffer.alloc(rawLength);
  let at = raw.writeUInt32LE(metaBytes.length, 0);
  at += metaBytes.copy(raw, at);
  at = raw.writeUInt32LE(packIds.length, at);
  for (const id of packIds) at += Buffer.from(id, 'hex').copy(raw, at);
  at = raw.writeUInt32LE(m.blocks.length, at);
  for (const b of m.blocks) {
    b.hash.copy(raw, at, 0, HASH_BYTES);
    raw.writeUInt32LE(packIndex.get(b.pack)! | (b.codec << 24), at + 16);
    raw.writeUInt32LE(b.offset, at + 20);
    raw.writeUInt32LE(b.length, at + 24);
    raw.writeUInt32LE(b.rawLength, at + 28);
    at += BLOCK_BYTES;
  }
  at = raw.writeUInt32LE(m.chunks.length, at);
  let previous = -1;
  for (let i = 0; i < m.chunks.length; i++) {
    const chunk = m.chunks[i];
    const block = m.chunkBlocks[i];
    if (chunk <= previous || chunk >= chunkLimit) throw new Error(`manifest ${meta.name}: chunk ${chunk} is out of order or past the end`);
    if (block !== ZERO_ALLOCATED_BLOCK && block >= m.blocks.length) throw new Error(`manifest ${meta.name}: chunk ${chunk} names block ${block} of ${m.blocks.length}`);
    previous = chunk;
    raw.writeUInt32LE(chunk, at);
    raw.writeUInt32LE(block, at + 4);
    at += CHUNK_BYTES;
  }
  const { codec, data } = compressBlock(compression, raw);
  const header = Buffer.alloc(HEADER_BYTES);
  MAGIC.copy(header, 0);
  header.writeUInt16LE(VERSION, 8);
  header[10] = codec;
  header[11] = 0;
  header.writeUInt32LE(raw.length, 12);
  header.writeUInt32LE(data.length, 16);
  digest(data).copy(header, 24);
  return Buffer.concat([header, data]);
}

export function decodeManifest(key: string, body: Buffer): Manifest {
  const bad = (why: string): never => {
    throw new FormatError(key, `manifest ${key}: ${why}`);
  };
  if (body.length < HEADER_BYTES) bad(`${body.length} bytes is shorter than the header`);
  if (!body.subarray(0, 8).equals(MAGIC)) bad('bad magic (not an updraft manifest)');
  const version = body.readUInt16LE(8);
  if (version !== VERSION) bad(`format version ${version} is not supported (this build reads ${VERSION})`);
  const codec = body[10];
  if (codec > 2) bad(`unknown codec ${codec}`);
  if (body[11] !== 0) bad(`cipher ${body[11]} is not supported by this build (0 = none)`);
  const rawLength = body.readUInt32LE(12);
  const storedLength = body.readUInt32LE(16);
  if (storedLength !== body.length - HEADER_BYTES) bad(`body is ${body.length - HEADER_BYTES} bytes, the header says ${storedLength}`);
  if (rawLength > MAX_BODY_BYTES) bad(`raw body length ${rawLength} is too large`);
  const stored = body.subarray(HEADER_BYTES);
  if (!digest(stored).equals(body.subarray(24, 40))) bad('checksum mismatch (corrupted)');
  let raw: Buffer;
  try {
    raw = decompressBlock(codec as CodecId, stored, rawLength, MAX_BODY_BYTES);
  } catch (err) {
    return bad(`body does not decompress: ${(err as Error).message}`);
  }
  let at = 0;
  const need = (n: number, what: string) => {
    if (at + n > raw.length) bad(`${what} runs past the end of the body`);
  };
  need(4, 'meta length');
  const metaLength = raw.readUInt32LE(at);
  at += 4;
  need(metaLength, 'meta');
  let meta: ManifestMeta;
  try {
    meta = JSON.parse(raw.toString('utf8', at, at + metaLength));
  } catch (err) {
    return bad(`meta is not JSON: ${(err as Error).message}`);
  }
  at += metaLength;
  checkMeta(meta, bad);
  need(4, 'pack count');
  const packCount = raw.readUInt32LE(at);
  at += 4;
  need(packCount * 16, 'pack table');
  const packs: string[] = [];
  for (let i = 0; i < packCount; i++, at += 16) packs.push(raw.toString('hex', at, at + 16));
  need(4, 'block count');
  const blockCount = raw.readUInt32LE(at);
  at += 4;
  need(blockCount * BLOCK_BYTES, 'block table');
  const blocks: ManifestBlock[] = new Array(blockCount);
  for (let i = 0; i < blockCount; i++, at += BLOCK_BYTES) {
    const packWord = raw.readUInt32LE(at + 16);
    const pack = packWord & 0xffffff;
    const blockCodec = packWord >>> 24;
    if (pack >= packCount) bad(`block ${i} names pack ${pack} of ${packCount}`);
    if (blockCodec > 2) bad(`block ${i} has unknown codec ${blockCodec}`);
    blocks[i] = {
      hash: Buffer.from(raw.subarray(at, at + HASH_BYTES)), pack: packs[pack], offset: raw.readUInt32LE(at + 20),
      length: raw.readUInt32LE(at + 24), rawLength: raw.readUInt32LE(at + 28), codec: blockCodec as CodecId,
    };
  }
  need(4, 'chunk count');
  const chunkCount = raw.readUInt32LE(at);
  at += 4;
  need(chunkCount * CHUNK_BYTES, 'chunk table');
  const chunks = new Uint32Array(chunkCount);
  const chunkBlocks = new Uint32Array(chunkCount);
  const chunkLimit = Math.ceil(meta.size / meta.blockSize);
  let previous = -1;
  for (let i = 0; i < chunkCount; i++, at += CHUNK_BYTES) {
    const chunk = raw.readUInt32LE(at);
    const block = raw.readUInt32LE(at + 4);
    if (chunk <= previous) bad(`chunk table is not ascending at entry ${i} (chunk ${chunk})`);
    if (chunk >= chunkLimit) bad(`chunk ${chunk} is past the end of the ${meta.size}-byte volume`);
    if (block !== ZERO_ALLOCATED_BLOCK && block >= blockCount) bad(`chunk ${chunk} names block ${block} of ${blockCount}`);
    chunks[i] = chunk;
    chunkBlocks[i] = block;
    previous = chunk;
  }
  if (at !== raw.length) bad(`${raw.length - at} bytes after the chunk table`);
  return { meta, chunks, chunkBlocks, blocks };
}

function checkMeta(meta: ManifestMeta, bad: (why: string) => never): void {
  if (meta === null || typeof meta !== 'object') bad('meta is not an object');
  if (meta.format !== 1) bad(`meta.format ${String(meta.format)} is not 1`);
  if (typeof meta.name !== 'string' || meta.name === '') bad('meta.name is not a volume name');
  for (const field of ['size', 'blockSize', 'sequence', 'generation'] as const) {
    if (!Number.isSafeInteger(meta[field]) || meta[field] < 0) bad(`meta.${field} ${String(meta[field])} is not a whole number`);
  }
  if (meta.size <= 0 || meta.blockSize <= 0) bad('meta.size and meta.blockSize must be positive');
  if (typeof meta.host !== 'string' || typeof meta.created !== 'string') bad('meta.host and meta.created must be strings');
}
