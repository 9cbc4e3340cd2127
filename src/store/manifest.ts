// Manifests (DESIGN.md: Words, manifest; Formats, `volumes/{name}/manifest` and
// `volumes/{name}/checkpoints/{checkpoint}`): a volume's block map plus the pack location
// of every block it names. Self-contained: any host can serve the volume from the
// manifest and the packs alone, without a pack index. Holes are absent, so the size grows
// with the mapped chunks, never with the volume size.
//
// Layout, all integers little-endian:
//
//   offset  size  field
//   0       8     magic "UPDMANI1"
//   8       2     version u16 = 1
//   10      1     codec u8: compression of the body (crypto/compress.ts; 0 none, 1 lz4, 2 zstd)
//   11      1     cipher u8 (crypto/cipher.ts): 0 none, 1 XChaCha20-Poly1305; a reader
//                 refuses any cipher but its store's
//   12      4     rawBodyLength u32: body bytes after decompression
//   16      4     storedBodyLength u32: body bytes as stored (= object size - 36)
//   20      16    checksum: BLAKE3(bytes 0..20 ‖ stored body)[0..16]
//   36      storedBodyLength  the body, compressed with `codec`, then (encrypted) sealed:
//                 nonce(24) ‖ ciphertext ‖ tag(16), AAD "updraft manifest\0" ‖ bytes 0..20
//                 ‖ the object key, so a manifest opens only under the key it was written
//                 for (a checkpoint cannot stand in for the manifest, nor one volume's for
//                 another's)
//
// The body, before compression:
//
//   u32 metaLength, metaLength bytes of UTF-8 JSON (ManifestMeta)
//   u32 packCount,  packCount × 16 bytes: pack ids (raw bytes of the 32 hex digits)
//   u32 blockCount, blockCount × 36 bytes, one per distinct block:
//                     0 16 hash; 16 u32 pack (index into the pack table); 20 u32 offset;
//                     24 u32 length; 28 u32 rawLength; 32 u8 codec; 33 3 reserved (0)
//   u32 chunkCount, chunkCount × 8 bytes: u32 chunk, u32 block (index into the block
//                   table, or 0xFFFFFFFF: zero, allocated — ZERO_ALLOCATED_HASH, never
//                   stored); sorted by chunk, each chunk once
//
// A manifest's body grows with its mapped chunks, not with the volume's size; its size and
// encode/decode time for the worst case (nothing dedups): docs/benchmarks.md.
import { Blake3Hasher } from '@napi-rs/blake-hash';
import * as z from 'zod';
import { CODEC_NONE, CODEC_LZ4, CODEC_ZSTD, MAX_BLOCK_BYTES, codecName, compressBlock, decompressBlock, zstdFrame } from '../crypto/compress.js';
import type { CodecId, Compression } from '../crypto/compress.js';
import { OpenError, SEAL_OVERHEAD, sealLabel, type StoreCipher } from '../crypto/cipher.js';
import { HASH_BYTES, ZERO_ALLOCATED_HASH, ZERO_HASH } from '../crypto/hash.js';
import { blockKey } from '../blocks/cache.js';
import type { BlockKey } from '../blocks/cache.js';
import { volumeNameProblem } from '../volume/names.js';
import { FormatError } from './errors.js';
import { countField, fieldProblem, isoTimeField, volumeNameField } from './fields.js';
import { cipherMismatch, PACK_ENTRY_BYTES, PACK_HEADER_BYTES, PACK_ID } from './pack.js';
import type { PackLocation } from './pack-index.js';
import { errorMessage } from '../log.js';

export const MANIFEST_MAGIC = Buffer.from('UPDMANI1');
export const MANIFEST_VERSION = 1;
export const MANIFEST_HEADER_BYTES = 36;
/** Block value of a chunk that reads as zeros but is reported allocated (ZERO_ALLOCATED_HASH). */
export const ZERO_ALLOCATED_BLOCK = 0xffffffff;

const CHECKSUM_AT = 20;
const CHECKSUM_BYTES = 16;
const PACK_ID_BYTES = 16;
const BLOCK_ENTRY_BYTES = 36;
const CHUNK_ENTRY_BYTES = 8;
/** Bodies are u32-sized; Node 20 buffers stop at 4 GiB too. */
const MAX_BODY_BYTES = 0xffffffff;
/** Smallest offset of a block in a pack: after the header and one index entry. */
const MIN_BLOCK_OFFSET = PACK_HEADER_BYTES + PACK_ENTRY_BYTES;
const MIN_BLOCK_SIZE = 4096;
const HASH_SLAB = 4096;

export interface ManifestMeta {
  format: 1;
  name: string;
  /** Volume size in bytes. */
  size: number;
  blockSize: number;
  /** The volume's sequence at the cut this manifest records. */
  sequence: number;
  /** Lease generation of the writer. */
  generation: number;
  /** Host id of the writer. */
  host: string;
  /** ISO time of writing. */
  created: string;
  /** Set on a fork: the volume and sequence it was forked from. */
  parent?: { name: string; sequence: number };
}

export interface ManifestBlock {
  hash: Buffer;
  /** Pack id, 32 hex digits. */
  pack: string;
  offset: number;
  length: number;
  rawLength: number;
  codec: CodecId;
}

export interface Manifest {
  meta: ManifestMeta;
  /** Mapped chunk indices, ascending, each once. Holes are absent. */
  chunks: Uint32Array;
  /** Per chunk (same index as `chunks`): index into `blocks`, or ZERO_ALLOCATED_BLOCK. */
  chunkBlocks: Uint32Array;
  blocks: ManifestBlock[];
}

function assertVolumeName(name: string): void {
  const problem = volumeNameProblem(name);
  if (problem) throw new Error(problem);
}

export function manifestKey(volume: string): string {
  assertVolumeName(volume);
  return `volumes/${volume}/manifest`;
}

export function leaseKey(volume: string): string {
  assertVolumeName(volume);
  return `volumes/${volume}/lease`;
}

/** Checkpoint names follow the volume name rules, in one segment (no '/'). */
export function checkpointKey(volume: string, checkpoint: string): string {
  assertVolumeName(volume);
  const problem = volumeNameProblem(checkpoint)?.replace('volume name', 'checkpoint name');
  if (problem) throw new Error(problem);
  if (checkpoint.includes('/')) throw new Error(`checkpoint name ${JSON.stringify(checkpoint)} has a '/'`);
  return `volumes/${volume}/checkpoints/${checkpoint}`;
}

const META_SCHEMA = z.object({
  format: z.literal(1),
  name: volumeNameField,
  size: countField,
  blockSize: z
    .number()
    .int()
    .refine((n) => n >= MIN_BLOCK_SIZE && n <= MAX_BLOCK_BYTES && (n & (n - 1)) === 0, `expected a power of two from ${MIN_BLOCK_SIZE} to ${MAX_BLOCK_BYTES}`),
  sequence: countField,
  generation: countField,
  host: z.string().min(1),
  created: isoTimeField,
  parent: z.object({ name: volumeNameField, sequence: countField }).optional(),
});

/**
 * 1 for ZERO_HASH, 2 for ZERO_ALLOCATED_HASH, 0 for the name of a stored block. Plain JS:
 * a manifest holds a million of these and a native Buffer.equals per hash costs more.
 */
function zeroNameOf(hash: Uint8Array): 0 | 1 | 2 {
  for (let i = 0; i < HASH_BYTES - 1; i++) if (hash[i] !== 0) return 0;
  return hash[HASH_BYTES - 1] === 0 ? 1 : hash[HASH_BYTES - 1] === 1 ? 2 : 0;
}
if (zeroNameOf(ZERO_HASH) !== 1 || zeroNameOf(ZERO_ALLOCATED_HASH) !== 2) {
  throw new Error('manifest: zeroNameOf does not match the zero names in crypto/hash.ts');
}

function chunkCountOf(meta: ManifestMeta): number {
  return Math.ceil(meta.size / meta.blockSize);
}

/**
 * Why the block cannot be in a manifest, or undefined. `overhead`: the seal overhead of the
 * store's packs (an uncompressed block is stored in rawLength + overhead bytes); undefined
 * where the cipher is not known (ManifestBuilder), which accepts either.
 */
function blockProblem(block: ManifestBlock, blockSize: number, overhead: number | undefined): string | undefined {
  const { hash, offset, length, rawLength, codec } = block;
  if (hash.length !== HASH_BYTES) return `has a ${hash.length}-byte hash`;
  if (zeroNameOf(hash) !== 0) return 'is a zero name (never stored)';
  if (codec !== CODEC_NONE && codec !== CODEC_LZ4 && codec !== CODEC_ZSTD) return `has ${codecName(codec)}`;
  // Blocks are whole chunks (bytes past the end of the volume are zeros), so a block of
  // another size comes from a volume with another block size and cannot be mapped here.
  if (rawLength !== blockSize) return `has raw length ${rawLength}; the volume's block size is ${blockSize}`;
  if (!Number.isInteger(length) || length <= (overhead ?? 0)) return `has length ${length}`;
  if (codec === CODEC_NONE && (overhead === undefined ? length !== rawLength && length !== rawLength + SEAL_OVERHEAD : length !== rawLength + overhead)) {
    return `is stored uncompressed in ${length} bytes but its raw length is ${rawLength}`;
  }
  if (!Number.isInteger(offset) || offset < MIN_BLOCK_OFFSET || offset + length > 0xffffffff) return `has offset ${offset} (length ${length}), outside a pack`;
  return undefined;
}

/** The associated data of a sealed manifest body: the header before the checksum, and the object key. */
function manifestLabel(header: Buffer, key: string): Buffer {
  return sealLabel('manifest', header.subarray(0, CHECKSUM_AT), key);
}

/**
 * Lay out, compress and (with an encrypting `cipher`) seal a manifest for the object
 * `key`. Asserts what decodeManifest checks: valid meta, chunks ascending and unique and
 * inside the volume, every block index valid, every block a stored block with a location.
 */
export function encodeManifest(key: string, m: Manifest, compression: Compression, cipher: StoreCipher): Buffer {
  return sealManifest(key, manifestBody(m, cipher.overhead), compression, cipher).body;
}

/**
 * A manifest body (opened, as decodeManifestBody gives it or a host laid it out) under
 * another name (a lazy fork): the body with its meta replaced, the tables copied as they are, so nothing is laid out again per
 * block (sealManifest frames it). `meta` must describe the same volume (size and block
 * size) as the body.
 */
export function relabelManifest(body: Buffer, meta: ManifestMeta): Buffer {
  const parsed = META_SCHEMA.safeParse(meta);
  if (!parsed.success) throw new Error(`relabelManifest ${meta?.name}: meta ${fieldProblem(parsed.error)}`);
  const old = bodyMeta(body);
  if (parsed.data.size !== old.size || parsed.data.blockSize !== old.blockSize) {
    throw new Error(`relabelManifest ${meta.name}: size ${parsed.data.size}/${parsed.data.blockSize} differs from the body's ${old.size}/${old.blockSize}`);
  }
  const metaJson = Buffer.from(JSON.stringify(parsed.data));
  const tables = body.subarray(4 + body.readUInt32LE(0));
  const raw = Buffer.allocUnsafe(4 + metaJson.length + tables.length);
  raw.writeUInt32LE(metaJson.length, 0);
  metaJson.copy(raw, 4);
  tables.copy(raw, 4 + metaJson.length);
  return raw;
}

/** The meta of a manifest body this host laid out or decoded. */
export function bodyMeta(raw: Buffer): ManifestMeta {
  const metaLength = raw.readUInt32LE(0);
  return META_SCHEMA.parse(JSON.parse(raw.toString('utf8', 4, 4 + metaLength)));
}

/**
 * The stored form of a body's tables (everything after the meta) with zstd: one frame per
 * segment (see tableSegments), concatenated (decompression runs through every frame).
 */
export interface StoredTables {
  /** The raw tables these frames hold. */
  raw: Buffer;
  /** The frames, concatenated: what a relabelled body (a lazy fork) reuses whole. */
  frame: Buffer;
  /** Per segment key, its raw bytes and frame (views of `raw` and `frame`), when this host compressed them. */
  segments?: Map<string, { raw: Buffer; frame: Buffer }>;
  /** Segments the seal that made these compressed (the others were lent). */
  compressed: number;
}

// Segments of the tables, each compressed on its own so that a manifest written again with
// a few chunks changed (an incremental drain, a consistent fork) compresses only the
// segments those chunks touch: the pack and block tables by entry index (a patch only
// appends to them), the chunk table by chunk index (a changed chunk stays in its segment).
// A few changed chunks recompress a few segments of about 50, not the whole tables
// (docs/benchmarks.md).
const SEGMENT_PACKS = 4096;
const SEGMENT_BLOCKS = 2048;
const SEGMENT_CHUNKS = 8192;

/** The tables of `raw` (a body this host laid out or decoded) cut into keyed segments, in order. */
function tableSegments(raw: Buffer): Array<{ key: string; raw: Buffer }> {
  const layout = tableLayout(raw);
  const out: Array<{ key: string; raw: Buffer }> = [];
  const entries = (prefix: string, at: number, count: number, bytes: number, per: number) => {
    out.push({ key: `${prefix}#`, raw: raw.subarray(at - 4, at) });
    for (let i = 0; i < count; i += per) out.push({ key: `${prefix}${i / per}`, raw: raw.subarray(at + i * bytes, at + Math.min(count, i + per) * bytes) });
  };
  entries('p', layout.packsAt, layout.packCount, PACK_ID_BYTES, SEGMENT_PACKS);
  entries('b', layout.blocksAt, layout.blockCount, BLOCK_ENTRY_BYTES, SEGMENT_BLOCKS);
  out.push({ key: 'c#', raw: raw.subarray(layout.chunksAt - 4, layout.chunksAt) });
  const chunkAt = (i: number) => raw.readUInt32LE(layout.chunksAt + i * CHUNK_ENTRY_BYTES);
  for (let i = 0; i < layout.chunkCount; ) {
    const segment = Math.floor(chunkAt(i) / SEGMENT_CHUNKS);
    // First entry of a later segment (binary search: chunks ascend).
    let lo = i + 1;
    let hi = layout.chunkCount;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (chunkAt(mid) < (segment + 1) * SEGMENT_CHUNKS) lo = mid + 1;
      else hi = mid;
    }
    out.push({ key: `c${segment}`, raw: raw.subarray(layout.chunksAt + i * CHUNK_ENTRY_BYTES, layout.chunksAt + lo * CHUNK_ENTRY_BYTES) });
    i = lo;
  }
  return out;
}

/**
 * Compress, seal and frame a manifest body (the layout above) for the object `key`. With
 * zstd the meta and every segment of the tables are frames of their own; `previous` (the
 * stored tables of an earlier body of this volume, or of the manifest a lazy fork copies)
 * lends every frame whose raw bytes did not change, so only what changed is compressed.
 * Returns the stored tables, to lend to the next write.
 */
export function sealManifest(key: string, raw: Buffer, compression: Compression, cipher: StoreCipher, previous?: StoredTables): { body: Buffer; tables?: StoredTables } {
  const what = `encodeManifest ${key}`;
  let stored: { codec: CodecId; data: Buffer };
  let tables: StoredTables | undefined;
  if (compression.codec === CODEC_ZSTD) {
    const tablesAt = 4 + raw.readUInt32LE(0);
    const rawTables = raw.subarray(tablesAt);
    const metaFrame = zstdFrame(raw.subarray(0, tablesAt), compression.level);
    if (previous !== undefined && previous.segments === undefined && previous.raw.equals(rawTables)) {
      // Frames of a manifest this host did not compress (a woken one): reused only whole.
      stored = { codec: CODEC_ZSTD, data: Buffer.concat([metaFrame, previous.frame]) };
      tables = { raw: rawTables, frame: stored.data.subarray(metaFrame.length), compressed: 0 };
    } else {
      const segments = tableSegments(raw);
      let compressed = 0;
      const frames = segments.map(({ key: segment, raw: bytes }) => {
        const lent = previous?.segments?.get(segment);
        if (lent !== undefined && lent.raw.equals(bytes)) return lent.frame;
        compressed++;
        return zstdFrame(bytes, compression.level);
      });
      stored = { codec: CODEC_ZSTD, data: Buffer.concat([metaFrame, ...frames]) };
      const frame = stored.data.subarray(metaFrame.length);
      const views = new Map<string, { raw: Buffer; frame: Buffer }>();
      let at = 0;
      for (let i = 0; i < segments.length; i++) {
        views.set(segments[i].key, { raw: segments[i].raw, frame: frame.subarray(at, at + frames[i].length) });
        at += frames[i].length;
      }
      tables = { raw: rawTables, frame, segments: views, compressed };
    }
  } else stored = compressBlock(compression, raw);
  const storedLength = stored.data.length + cipher.overhead;
  if (storedLength > MAX_BODY_BYTES) throw new Error(`${what}: the stored body would be ${storedLength} bytes; at most ${MAX_BODY_BYTES}`);
  const out = Buffer.allocUnsafe(MANIFEST_HEADER_BYTES + storedLength);
  MANIFEST_MAGIC.copy(out, 0);
  out.writeUInt16LE(MANIFEST_VERSION, 8);
  out.writeUInt8(stored.codec, 10);
  out.writeUInt8(cipher.id, 11);
  out.writeUInt32LE(raw.length, 12);
  out.writeUInt32LE(storedLength, 16);
  cipher.sealInto(out.subarray(MANIFEST_HEADER_BYTES), stored.data, manifestLabel(out, key));
  manifestChecksum(out).copy(out, CHECKSUM_AT);
  return { body: out, tables };
}

/**
 * The stored tables of a decoded manifest that sealManifest stored with zstd at
 * `compression`, found by compressing its meta again (zstd is deterministic) and checking
 * that the stored bytes begin with exactly that frame; undefined otherwise. Its segments
 * are unknown, so it lends its frames only whole (a lazy fork of it).
 */
export function storedTables(decoded: DecodedManifest, compression: Compression): StoredTables | undefined {
  if (decoded.codec !== CODEC_ZSTD || compression.codec !== CODEC_ZSTD) return undefined;
  const head = zstdFrame(decoded.raw.subarray(0, decoded.tablesAt), compression.level);
  if (decoded.stored.length <= head.length || !decoded.stored.subarray(0, head.length).equals(head)) return undefined;
  // A view: the opened body is the manifest object's own buffer (or, encrypted, a fresh
  // one), so it pins no more than the frames themselves and its 36-byte header.
  return { raw: decoded.raw.subarray(decoded.tablesAt), frame: decoded.stored.subarray(head.length), compressed: 0 };
}

/** One block table entry at `at` (the layout above); returns the offset after it. */
function writeBlockEntry(raw: Buffer, at: number, hash: Uint8Array, pack: number, location: Omit<PackLocation, 'pack'>): number {
  raw.set(hash, at);
  raw.writeUInt32LE(pack, at + 16);
  raw.writeUInt32LE(location.offset, at + 20);
  raw.writeUInt32LE(location.length, at + 24);
  raw.writeUInt32LE(location.rawLength, at + 28);
  raw[at + 32] = location.codec;
  raw[at + 33] = raw[at + 34] = raw[at + 35] = 0;
  return at + BLOCK_ENTRY_BYTES;
}

/**
 * The body of a manifest before compression, checked as encodeManifest promises.
 * `overhead`: the seal overhead of the store's packs.
 */
export function manifestBody(m: Manifest, overhead: number): Buffer {
  const parsed = META_SCHEMA.safeParse(m.meta);
  if (!parsed.success) throw new Error(`encodeManifest ${m.meta?.name}: meta ${fieldProblem(parsed.error)}`);
  const { meta, chunks, chunkBlocks, blocks } = m;
  const what = `encodeManifest ${meta.name}`;
  if (chunks.length !== chunkBlocks.length) throw new Error(`${what}: ${chunks.length} chunks but ${chunkBlocks.length} chunk blocks`);
  const chunkCount = chunkCountOf(meta);
  for (let i = 0; i < chunks.length; i++) {
    if (i > 0 && chunks[i] <= chunks[i - 1]) throw new Error(`${what}: chunk ${chunks[i]} after chunk ${chunks[i - 1]} (chunks must ascend, each once)`);
    if (chunks[i] >= chunkCount) throw new Error(`${what}: chunk ${chunks[i]} is past the end of the volume (${chunkCount} chunks)`);
    const block = chunkBlocks[i];
    if (block !== ZERO_ALLOCATED_BLOCK && block >= blocks.length) throw new Error(`${what}: chunk ${chunks[i]} names block ${block} of ${blocks.length}`);
  }

  const packIndex = new Map<string, number>();
  const packs: string[] = [];
  for (const block of blocks) {
    const problem = blockProblem(block, meta.blockSize, overhead);
    if (problem) throw new Error(`${what}: block ${block.hash.toString('hex')} ${problem}`);
    if (!packIndex.has(block.pack)) {
      if (!PACK_ID.test(block.pack)) {
        throw new Error(`${what}: block ${block.hash.toString('hex')} names pack ${JSON.stringify(block.pack)}, not 32 lowercase hex digits`);
      }
      packIndex.set(block.pack, packs.length);
      packs.push(block.pack);
    }
  }

  const metaJson = Buffer.from(JSON.stringify(parsed.data));
  const rawLength =
    4 + metaJson.length + 4 + packs.length * PACK_ID_BYTES + 4 + blocks.length * BLOCK_ENTRY_BYTES + 4 + chunks.length * CHUNK_ENTRY_BYTES;
  if (rawLength > MAX_BODY_BYTES) throw new Error(`${what}: the body would be ${rawLength} bytes; at most ${MAX_BODY_BYTES}`);
  const raw = Buffer.allocUnsafe(rawLength);
  let at = raw.writeUInt32LE(metaJson.length, 0);
  at += metaJson.copy(raw, at);
  at = raw.writeUInt32LE(packs.length, at);
  for (const pack of packs) at += raw.write(pack, at, 'hex');
  at = raw.writeUInt32LE(blocks.length, at);
  for (const block of blocks) at = writeBlockEntry(raw, at, block.hash, packIndex.get(block.pack)!, block);
  at = raw.writeUInt32LE(chunks.length, at);
  for (let i = 0; i < chunks.length; i++) {
    raw.writeUInt32LE(chunks[i], at);
    raw.writeUInt32LE(chunkBlocks[i], at + 4);
    at += CHUNK_ENTRY_BYTES;
  }
  if (at !== rawLength) throw new Error(`${what}: wrote ${at} body bytes, planned ${rawLength}`);
  return raw;
}

/** Where the tables of a manifest body (before compression) are, from its counts. */
interface TableLayout {
  packCount: number;
  packsAt: number;
  blockCount: number;
  blocksAt: number;
  chunkCount: number;
  chunksAt: number;
}

/** The layout of a body this host laid out or already decoded (so its counts are trusted). */
function tableLayout(raw: Buffer): TableLayout {
  const tablesAt = 4 + raw.readUInt32LE(0);
  const packCount = raw.readUInt32LE(tablesAt);
  const packsAt = tablesAt + 4;
  const blockCount = raw.readUInt32LE(packsAt + packCount * PACK_ID_BYTES);
  const blocksAt = packsAt + packCount * PACK_ID_BYTES + 4;
  const chunkCount = raw.readUInt32LE(blocksAt + blockCount * BLOCK_ENTRY_BYTES);
  const chunksAt = blocksAt + blockCount * BLOCK_ENTRY_BYTES + 4;
  if (chunksAt + chunkCount * CHUNK_ENTRY_BYTES !== raw.length) throw new Error(`manifest body: the tables end at ${chunksAt + chunkCount * CHUNK_ENTRY_BYTES}, the body at ${raw.length}`);
  return { packCount, packsAt, blockCount, blocksAt, chunkCount, chunksAt };
}

/** The pack ids a manifest body's pack table names: the packs GC counts for it. */
export function bodyPacks(raw: Buffer): Set<string> {
  const { packCount, packsAt } = tableLayout(raw);
  const packs = new Set<string>();
  for (let i = 0; i < packCount; i++) packs.add(raw.toString('hex', packsAt + i * PACK_ID_BYTES, packsAt + (i + 1) * PACK_ID_BYTES));
  return packs;
}

/** Mapped chunks and block table entries of a manifest body. */
export function bodyCounts(raw: Buffer): { chunks: number; blocks: number } {
  const { chunkCount, blockCount } = tableLayout(raw);
  return { chunks: chunkCount, blocks: blockCount };
}

const ZERO_ALLOCATED_NAME: BlockKey = blockKey(ZERO_ALLOCATED_HASH);

/**
 * An incremental manifest (DESIGN.md: Fork): the body of `base` (an earlier manifest of
 * the same volume, as laid out or decoded on this host) with `meta` and the chunks in
 * `changes` (ascending, each once; a block name, the allocated-zero name, or undefined
 * for a hole) changed. Everything else is copied as it is, so the work is the changes,
 * a binary search each, and a copy of the tables. New blocks are appended to the block
 * table (and their packs to the pack table); blocks that no chunk names any more stay
 * until a full layout (`appended` counts them, an upper bound). The result is a complete,
 * self-contained manifest like any other.
 */
export function patchManifestBody(
  base: Buffer,
  meta: ManifestMeta,
  changes: ReadonlyArray<readonly [number, BlockKey | undefined]>,
  locate: (key: BlockKey, chunk: number) => PackLocation,
  overhead: number,
): { raw: Buffer; appended: number } {
  const parsed = META_SCHEMA.safeParse(meta);
  if (!parsed.success) throw new Error(`patchManifestBody ${meta?.name}: meta ${fieldProblem(parsed.error)}`);
  const what = `patchManifestBody ${meta.name}`;
  const layout = tableLayout(base);
  const chunkLimit = chunkCountOf(parsed.data);
  const chunkAt = (i: number) => base.readUInt32LE(layout.chunksAt + i * CHUNK_ENTRY_BYTES);

  // New blocks (each distinct name once) and the packs they add.
  let packIndex: Map<string, number> | undefined;
  const newPacks: string[] = [];
  const packOf = (pack: string): number => {
    if (packIndex === undefined) {
      packIndex = new Map();
      for (let i = 0; i < layout.packCount; i++) packIndex.set(base.toString('hex', layout.packsAt + i * PACK_ID_BYTES, layout.packsAt + (i + 1) * PACK_ID_BYTES), i);
    }
    let index = packIndex.get(pack);
    if (index === undefined) {
      if (!PACK_ID.test(pack)) throw new Error(`${what}: pack ${JSON.stringify(pack)} is not 32 lowercase hex digits`);
      index = layout.packCount + newPacks.length;
      packIndex.set(pack, index);
      newPacks.push(pack);
    }
    return index;
  };
  const newBlocks: Array<{ hash: Buffer; pack: number; location: PackLocation }> = [];
  const blockOf = new Map<BlockKey, number>();
  const entries: Array<[number, number]> = []; // [chunk, block] of the changes that map a chunk
  let previous = -1;
  for (const [chunk, key] of changes) {
    if (!Number.isInteger(chunk) || chunk <= previous || chunk >= chunkLimit) {
      throw new Error(`${what}: change of chunk ${chunk} after chunk ${previous} (ascending, each once, below ${chunkLimit})`);
    }
    previous = chunk;
    if (key === undefined) continue;
    if (key === ZERO_ALLOCATED_NAME) {
      entries.push([chunk, ZERO_ALLOCATED_BLOCK]);
      continue;
    }
    let block = blockOf.get(key);
    if (block === undefined) {
      const location = locate(key, chunk);
      const hash = Buffer.from(key, 'latin1');
      const problem = blockProblem({ hash, ...location }, parsed.data.blockSize, overhead);
      if (problem) throw new Error(`${what}: chunk ${chunk}: block ${hash.toString('hex')} ${problem}`);
      block = layout.blockCount + newBlocks.length;
      newBlocks.push({ hash, pack: packOf(location.pack), location });
      blockOf.set(key, block);
    }
    entries.push([chunk, block]);
  }

  // The chunk table: runs of the old one copied between the changed chunks.
  const out = Buffer.allocUnsafe((layout.chunkCount + entries.length) * CHUNK_ENTRY_BYTES);
  let written = 0;
  let from = 0; // next old entry to copy
  let e = 0;
  const copyOld = (until: number) => {
    if (until > from) {
      base.copy(out, written * CHUNK_ENTRY_BYTES, layout.chunksAt + from * CHUNK_ENTRY_BYTES, layout.chunksAt + until * CHUNK_ENTRY_BYTES);
      written += until - from;
      from = until;
    }
  };
  for (const [chunk] of changes) {
    // First old entry at or after `chunk` (binary search from `from`).
    let lo = from;
    let hi = layout.chunkCount;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (chunkAt(mid) < chunk) lo = mid + 1;
      else hi = mid;
    }
    copyOld(lo);
    if (from < layout.chunkCount && chunkAt(from) === chunk) from++; // replaced or removed
    if (e < entries.length && entries[e][0] === chunk) {
      out.writeUInt32LE(chunk, written * CHUNK_ENTRY_BYTES);
      out.writeUInt32LE(entries[e][1], written * CHUNK_ENTRY_BYTES + 4);
      written++;
      e++;
    }
  }
  copyOld(layout.chunkCount);
  const chunkTable = out.subarray(0, written * CHUNK_ENTRY_BYTES);

  const metaJson = Buffer.from(JSON.stringify(parsed.data));
  const packCount = layout.packCount + newPacks.length;
  const blockCount = layout.blockCount + newBlocks.length;
  const rawLength = 4 + metaJson.length + 4 + packCount * PACK_ID_BYTES + 4 + blockCount * BLOCK_ENTRY_BYTES + 4 + chunkTable.length;
  if (rawLength > MAX_BODY_BYTES) throw new Error(`${what}: the body would be ${rawLength} bytes; at most ${MAX_BODY_BYTES}`);
  const raw = Buffer.allocUnsafe(rawLength);
  let at = raw.writeUInt32LE(metaJson.length, 0);
  at += metaJson.copy(raw, at);
  at = raw.writeUInt32LE(packCount, at);
  at += base.copy(raw, at, layout.packsAt, layout.packsAt + layout.packCount * PACK_ID_BYTES);
  for (const pack of newPacks) at += raw.write(pack, at, 'hex');
  at = raw.writeUInt32LE(blockCount, at);
  at += base.copy(raw, at, layout.blocksAt, layout.blocksAt + layout.blockCount * BLOCK_ENTRY_BYTES);
  for (const { hash, pack, location } of newBlocks) at = writeBlockEntry(raw, at, hash, pack, location);
  at = raw.writeUInt32LE(written, at);
  at += chunkTable.copy(raw, at);
  if (at !== rawLength) throw new Error(`${what}: wrote ${at} body bytes, planned ${rawLength}`);
  return { raw, appended: newBlocks.length };
}

/**
 * Whether two manifests of a store sealed with `cipher` say the same thing. Their stored
 * bodies cannot tell in an encrypted store: every seal has a fresh random nonce.
 */
export function sameManifest(a: Manifest, b: Manifest, cipher: StoreCipher): boolean {
  return manifestBody(a, cipher.overhead).equals(manifestBody(b, cipher.overhead));
}

function manifestChecksum(body: Buffer): Buffer {
  return new Blake3Hasher()
    .update(body.subarray(0, CHECKSUM_AT))
    .update(body.subarray(MANIFEST_HEADER_BYTES))
    .digestBuffer()
    .subarray(0, CHECKSUM_BYTES);
}

/**
 * Validate, open (with an encrypting `cipher`) and decode the manifest (or checkpoint)
 * stored under `key`. Throws FormatError naming `key`, also for a manifest sealed otherwise
 * than `cipher` says or for another key.
 */
export function decodeManifest(key: string, body: Buffer, cipher: StoreCipher): Manifest {
  return decodeManifestBody(key, body, cipher).manifest;
}

/** A decoded manifest with its body as opened: what relabelManifest copies. */
export interface DecodedManifest {
  manifest: Manifest;
  /** The body as stored, opened (still compressed), and its codec. */
  stored: Buffer;
  codec: CodecId;
  /** The body after opening and decompression. */
  raw: Buffer;
  /** Where the tables start in `raw`, after the meta. */
  tablesAt: number;
}

/** decodeManifest, keeping the opened body. */
export function decodeManifestBody(key: string, body: Buffer, cipher: StoreCipher): DecodedManifest {
  const fail = (what: string, cause?: unknown) => new FormatError(key, `manifest ${key}: ${what}`, cause === undefined ? undefined : { cause });
  if (body.length < MANIFEST_HEADER_BYTES) throw fail(`truncated: ${body.length} bytes, the header alone is ${MANIFEST_HEADER_BYTES}`);
  if (!body.subarray(0, 8).equals(MANIFEST_MAGIC)) {
    throw fail(`bad magic ${JSON.stringify(body.toString('latin1', 0, 8))}, expected "UPDMANI1" (not a manifest)`);
  }
  const version = body.readUInt16LE(8);
  if (version !== MANIFEST_VERSION) throw fail(`format version ${version}; this reader knows version ${MANIFEST_VERSION}`);
  const storedLength = body.readUInt32LE(16);
  if (storedLength !== body.length - MANIFEST_HEADER_BYTES) {
    throw fail(`the header says ${storedLength} stored body bytes, the object has ${body.length - MANIFEST_HEADER_BYTES} (truncated or corrupt)`);
  }
  if (!manifestChecksum(body).equals(body.subarray(CHECKSUM_AT, CHECKSUM_AT + CHECKSUM_BYTES))) throw fail('checksum mismatch (corrupt)');
  const storedCipher = body.readUInt8(11);
  if (storedCipher !== cipher.id) throw fail(cipherMismatch(storedCipher, cipher));
  const codec = body.readUInt8(10);
  if (codec !== CODEC_NONE && codec !== CODEC_LZ4 && codec !== CODEC_ZSTD) throw fail(`body compressed with ${codecName(codec)}`);
  const rawLength = body.readUInt32LE(12);
  let compressed: Buffer;
  try {
    compressed = cipher.open(body.subarray(MANIFEST_HEADER_BYTES), manifestLabel(body, key));
  } catch (err) {
    if (!(err instanceof OpenError)) throw err;
    throw fail(`does not decrypt with this store's key: ${err.message}`, err);
  }
  let raw: Buffer;
  try {
    raw = decompressBlock(codec, compressed, rawLength, MAX_BODY_BYTES);
  } catch (err) {
    throw fail(`body does not decompress (${codecName(codec)}): ${errorMessage(err)}`, err);
  }

  let at = 0;
  const table = (name: string, entryBytes: number): number => {
    if (at + 4 > raw.length) throw fail(`body ends before the ${name} count (at byte ${at} of ${raw.length})`);
    const n = raw.readUInt32LE(at);
    at += 4;
    if (at + n * entryBytes > raw.length) throw fail(`${name} of ${n} entries runs past the end of the body (${at} + ${n * entryBytes} > ${raw.length} bytes)`);
    return n;
  };

  const metaLength = table('meta', 1);
  let metaValue: unknown;
  try {
    metaValue = JSON.parse(raw.toString('utf8', at, at + metaLength));
  } catch (err) {
    throw fail(`meta is not JSON: ${errorMessage(err)}`, err);
  }
  at += metaLength;
  const parsed = META_SCHEMA.safeParse(metaValue);
  if (!parsed.success) throw fail(`meta ${fieldProblem(parsed.error)}`);
  const meta: ManifestMeta = parsed.data;
  const tablesAt = at;

  const packCount = table('pack table', PACK_ID_BYTES);
  const packs: string[] = new Array(packCount);
  for (let i = 0; i < packCount; i++) {
    packs[i] = raw.toString('hex', at, at + PACK_ID_BYTES);
    at += PACK_ID_BYTES;
  }

  const blockCount = table('block table', BLOCK_ENTRY_BYTES);
  // All hashes in one allocation: the blocks must not keep the whole raw body alive.
  const hashes = Buffer.allocUnsafe(blockCount * HASH_BYTES);
  const blocks: ManifestBlock[] = new Array(blockCount);
  for (let i = 0; i < blockCount; i++) {
    for (let b = 0; b < HASH_BYTES; b++) hashes[i * HASH_BYTES + b] = raw[at + b];
    const hash = hashes.subarray(i * HASH_BYTES, (i + 1) * HASH_BYTES);
    const pack = raw.readUInt32LE(at + 16);
    if (pack >= packCount) throw fail(`block ${i} (${hash.toString('hex')}) names pack ${pack} of ${packCount}`);
    if (raw[at + 33] !== 0 || raw[at + 34] !== 0 || raw[at + 35] !== 0) throw fail(`block ${i} (${hash.toString('hex')}) has nonzero reserved bytes`);
    const block: ManifestBlock = {
      hash,
      pack: packs[pack],
      offset: raw.readUInt32LE(at + 20),
      length: raw.readUInt32LE(at + 24),
      rawLength: raw.readUInt32LE(at + 28),
      codec: raw[at + 32] as CodecId,
    };
    const problem = blockProblem(block, meta.blockSize, cipher.overhead);
    if (problem) throw fail(`block ${i} (${hash.toString('hex')}) ${problem}`);
    blocks[i] = block;
    at += BLOCK_ENTRY_BYTES;
  }

  const chunkCount = chunkCountOf(meta);
  const mapped = table('chunk table', CHUNK_ENTRY_BYTES);
  const chunks = new Uint32Array(mapped);
  const chunkBlocks = new Uint32Array(mapped);
  for (let i = 0; i < mapped; i++) {
    const chunk = raw.readUInt32LE(at);
    const block = raw.readUInt32LE(at + 4);
    if (i > 0 && chunk <= chunks[i - 1]) throw fail(`chunk table entry ${i}: chunk ${chunk} after chunk ${chunks[i - 1]} (must ascend, each once)`);
    if (chunk >= chunkCount) {
      throw fail(`chunk table entry ${i}: chunk ${chunk} is past the end of the volume (${chunkCount} chunks of ${meta.blockSize} bytes)`);
    }
    if (block !== ZERO_ALLOCATED_BLOCK && block >= blockCount) throw fail(`chunk table entry ${i}: chunk ${chunk} names block ${block} of ${blockCount}`);
    chunks[i] = chunk;
    chunkBlocks[i] = block;
    at += CHUNK_ENTRY_BYTES;
  }
  if (at !== raw.length) throw fail(`${raw.length - at} bytes after the chunk table`);
  return { manifest: { meta, chunks, chunkBlocks, blocks }, stored: compressed, codec, raw, tablesAt };
}

/**
 * Collects a volume's chunks into a Manifest: blocks deduplicated by hash, chunks sorted,
 * blocks and packs numbered in order of first use (so a sequentially written volume
 * gives runs of the same pack and rising offsets, which compress well).
 */
export class ManifestBuilder {
  private readonly chunkBlock = new Map<number, number>();
  private readonly blockIndex = new Map<BlockKey, number>();
  private readonly blocks: ManifestBlock[] = [];
  private readonly chunkCount: number;
  /** Copies of the hashes, HASH_SLAB at a time: one allocation per 4096 blocks. */
  private hashSlab = Buffer.alloc(0);
  private hashSlabUsed = 0;
  private lastPack = '';

  constructor(private readonly meta: ManifestMeta) {
    const parsed = META_SCHEMA.safeParse(meta);
    if (!parsed.success) throw new Error(`ManifestBuilder ${meta?.name}: meta ${fieldProblem(parsed.error)}`);
    // Chunk indices are u32 in the format.
    this.chunkCount = Math.min(chunkCountOf(meta), 0xffffffff);
  }

  /**
   * Map `chunk` to a block. ZERO_HASH makes the chunk a hole (absent); ZERO_ALLOCATED_HASH
   * or 'zero-allocated' maps it to zeros, allocated; any other hash needs its pack
   * location the first time the builder sees it. Setting a chunk again replaces it.
   */
  setChunk(chunk: number, hash: Buffer | 'zero-allocated', location?: PackLocation): void {
    if (!Number.isInteger(chunk) || chunk < 0 || chunk >= this.chunkCount) {
      throw new Error(`ManifestBuilder ${this.meta.name}: chunk ${chunk} is outside the volume (${this.chunkCount} chunks)`);
    }
    const zero = hash === 'zero-allocated' ? 2 : zeroNameOf(hash);
    if (zero === 2) {
      this.chunkBlock.set(chunk, ZERO_ALLOCATED_BLOCK);
      return;
    }
    if (zero === 1) {
      this.chunkBlock.delete(chunk);
      return;
    }
    const name = hash as Buffer;
    if (name.length !== HASH_BYTES) throw new Error(`ManifestBuilder ${this.meta.name}: chunk ${chunk}: a ${name.length}-byte hash`);
    const key = blockKey(name);
    let index = this.blockIndex.get(key);
    if (index === undefined) {
      if (!location) throw new Error(`ManifestBuilder ${this.meta.name}: chunk ${chunk}: block ${name.toString('hex')} has no pack location`);
      const block: ManifestBlock = {
        hash: this.copyHash(name),
        pack: location.pack,
        offset: location.offset,
        length: location.length,
        rawLength: location.rawLength,
        codec: location.codec,
      };
      const problem = blockProblem(block, this.meta.blockSize, undefined);
      if (problem) throw new Error(`ManifestBuilder ${this.meta.name}: chunk ${chunk}: block ${name.toString('hex')} ${problem}`);
      if (location.pack !== this.lastPack) {
        if (!PACK_ID.test(location.pack)) {
          throw new Error(`ManifestBuilder ${this.meta.name}: block ${name.toString('hex')} names pack ${JSON.stringify(location.pack)}`);
        }
        this.lastPack = location.pack;
      }
      index = this.blocks.length;
      this.blocks.push(block);
      this.blockIndex.set(key, index);
    }
    this.chunkBlock.set(chunk, index);
  }

  private copyHash(hash: Buffer): Buffer {
    if (this.hashSlabUsed === this.hashSlab.length) {
      this.hashSlab = Buffer.allocUnsafe(HASH_SLAB * HASH_BYTES);
      this.hashSlabUsed = 0;
    }
    const at = this.hashSlabUsed;
    for (let b = 0; b < HASH_BYTES; b++) this.hashSlab[at + b] = hash[b];
    this.hashSlabUsed += HASH_BYTES;
    return this.hashSlab.subarray(at, at + HASH_BYTES);
  }

  /** The manifest of the chunks set so far. Blocks no chunk names any more are left out. */
  build(): Manifest {
    const chunks = Uint32Array.from(this.chunkBlock.keys()).sort();
    const chunkBlocks = new Uint32Array(chunks.length);
    const renumbered = new Int32Array(this.blocks.length).fill(-1);
    const blocks: ManifestBlock[] = [];
    for (let i = 0; i < chunks.length; i++) {
      const old = this.chunkBlock.get(chunks[i])!;
      if (old === ZERO_ALLOCATED_BLOCK) {
        chunkBlocks[i] = ZERO_ALLOCATED_BLOCK;
        continue;
      }
      if (renumbered[old] < 0) {
        renumbered[old] = blocks.length;
        blocks.push(this.blocks[old]);
      }
      chunkBlocks[i] = renumbered[old];
    }
    return { meta: structuredClone(this.meta), chunks, chunkBlocks, blocks };
  }
}
