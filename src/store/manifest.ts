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
//
// The format's parts, each a file: manifest-body.ts (the body: layout, relabel, counts),
// manifest-patch.ts (an incremental body), manifest-seal.ts (compress, seal and frame a
// body: the stored object), manifest-decode.ts (validate, open and decode a stored one),
// manifest-builder.ts (a volume's chunks into a Manifest).
import { Blake3Hasher } from '@napi-rs/blake-hash';
import * as z from 'zod';
import { CODEC_NONE, CODEC_LZ4, CODEC_ZSTD, MAX_BLOCK_BYTES, codecName } from '../crypto/compress.js';
import type { CodecId } from '../crypto/compress.js';
import { SEAL_OVERHEAD, sealLabel } from '../crypto/cipher.js';
import { HASH_BYTES, ZERO_ALLOCATED_HASH, ZERO_HASH } from '../crypto/hash.js';
import { volumeNameProblem } from '../volume/names.js';
import { countField, fieldProblem, isoTimeField, volumeNameField } from './fields.js';
import { PACK_ENTRY_BYTES, PACK_HEADER_BYTES } from './pack.js';

export const MANIFEST_MAGIC = Buffer.from('UPDMANI1');
export const MANIFEST_VERSION = 1;
export const MANIFEST_HEADER_BYTES = 36;
/** Block value of a chunk that reads as zeros but is reported allocated (ZERO_ALLOCATED_HASH). */
export const ZERO_ALLOCATED_BLOCK = 0xffffffff;

export const CHECKSUM_AT = 20;
export const CHECKSUM_BYTES = 16;
export const PACK_ID_BYTES = 16;
export const BLOCK_ENTRY_BYTES = 36;
export const CHUNK_ENTRY_BYTES = 8;
/** Bodies are u32-sized; Node 20 buffers stop at 4 GiB too. */
export const MAX_BODY_BYTES = 0xffffffff;
/** Smallest offset of a block in a pack: after the header and one index entry. */
const MIN_BLOCK_OFFSET = PACK_HEADER_BYTES + PACK_ENTRY_BYTES;
const MIN_BLOCK_SIZE = 4096;

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
  /**
   * The writer's flush mode: a host that wakes or promotes the volume keeps it unless told
   * otherwise, so a durable volume stays durable across a failover. Absent in older manifests.
   */
  flushMode?: 'demand' | 'continuous' | 'durable';
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

/** What a ManifestMeta must be: checked on every body laid out, relabelled, patched or decoded. */
export const META_SCHEMA = z.object({
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
  flushMode: z.enum(['demand', 'continuous', 'durable']).optional(),
});

/** `meta` as META_SCHEMA parses it; throws naming `operation` and the volume otherwise. */
export function checkedMeta(operation: string, meta: ManifestMeta): ManifestMeta {
  const parsed = META_SCHEMA.safeParse(meta);
  if (!parsed.success) throw new Error(`${operation} ${meta?.name}: meta ${fieldProblem(parsed.error)}`);
  return parsed.data;
}

/**
 * 1 for ZERO_HASH, 2 for ZERO_ALLOCATED_HASH, 0 for the name of a stored block. Plain JS:
 * a manifest holds a million of these and a native Buffer.equals per hash costs more.
 */
export function zeroNameOf(hash: Uint8Array): 0 | 1 | 2 {
  for (let i = 0; i < HASH_BYTES - 1; i++) if (hash[i] !== 0) return 0;
  return hash[HASH_BYTES - 1] === 0 ? 1 : hash[HASH_BYTES - 1] === 1 ? 2 : 0;
}
if (zeroNameOf(ZERO_HASH) !== 1 || zeroNameOf(ZERO_ALLOCATED_HASH) !== 2) {
  throw new Error('manifest: zeroNameOf does not match the zero names in crypto/hash.ts');
}

export function chunkCountOf(meta: ManifestMeta): number {
  return Math.ceil(meta.size / meta.blockSize);
}

/**
 * Why the block cannot be in a manifest, or undefined. `overhead`: the seal overhead of the
 * store's packs (an uncompressed block is stored in rawLength + overhead bytes); undefined
 * where the cipher is not known (ManifestBuilder), which accepts either.
 */
export function blockProblem(block: ManifestBlock, blockSize: number, overhead: number | undefined): string | undefined {
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
export function manifestLabel(header: Buffer, key: string): Buffer {
  return sealLabel('manifest', header.subarray(0, CHECKSUM_AT), key);
}

/** The header's checksum of a stored manifest `body` (the layout above). */
export function manifestChecksum(body: Buffer): Buffer {
  return new Blake3Hasher()
    .update(body.subarray(0, CHECKSUM_AT))
    .update(body.subarray(MANIFEST_HEADER_BYTES))
    .digestBuffer()
    .subarray(0, CHECKSUM_BYTES);
}
