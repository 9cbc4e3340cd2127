// A manifest's body before compression (the layout: store/manifest.ts): laid out from a
// Manifest, relabelled for a lazy fork, and read for its meta, packs and counts.
import type { StoreCipher } from '../crypto/cipher.js';
import {
  BLOCK_ENTRY_BYTES, blockProblem, checkedMeta, CHUNK_ENTRY_BYTES, chunkCountOf, MAX_BODY_BYTES, META_SCHEMA, PACK_ID_BYTES, ZERO_ALLOCATED_BLOCK,
  type Manifest, type ManifestMeta,
} from './manifest.js';
import { PACK_ID } from './pack.js';
import type { PackLocation } from './pack-index.js';

/**
 * A manifest body (opened, as decodeManifestBody gives it or a host laid it out) under
 * another name (a lazy fork): the body with its meta replaced, the tables copied as they are, so nothing is laid out again per
 * block (sealManifest frames it). `meta` must describe the same volume (size and block
 * size) as the body.
 */
export function relabelManifest(body: Buffer, meta: ManifestMeta): Buffer {
  const checked = checkedMeta('relabelManifest', meta);
  const old = bodyMeta(body);
  if (checked.size !== old.size || checked.blockSize !== old.blockSize) {
    throw new Error(`relabelManifest ${meta.name}: size ${checked.size}/${checked.blockSize} differs from the body's ${old.size}/${old.blockSize}`);
  }
  const metaJson = Buffer.from(JSON.stringify(checked));
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

/** One block table entry at `at`; returns the offset after it. */
export function writeBlockEntry(raw: Buffer, at: number, hash: Uint8Array, pack: number, location: Omit<PackLocation, 'pack'>): number {
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
  const checked = checkedMeta('encodeManifest', m.meta);
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

  const { raw, at: tablesAt } = startBody(what, checked, packs.length, blocks.length, chunks.length);
  let at = raw.writeUInt32LE(packs.length, tablesAt);
  for (const pack of packs) at += raw.write(pack, at, 'hex');
  at = raw.writeUInt32LE(blocks.length, at);
  for (const block of blocks) at = writeBlockEntry(raw, at, block.hash, packIndex.get(block.pack)!, block);
  at = raw.writeUInt32LE(chunks.length, at);
  for (let i = 0; i < chunks.length; i++) {
    raw.writeUInt32LE(chunks[i], at);
    raw.writeUInt32LE(chunkBlocks[i], at + 4);
    at += CHUNK_ENTRY_BYTES;
  }
  if (at !== raw.length) throw new Error(`${what}: wrote ${at} body bytes, planned ${raw.length}`);
  return raw;
}

/**
 * A buffer for a body of `meta` (checked) and tables of these counts, with the meta
 * written; `at`: where the tables start. Throws naming `what` past MAX_BODY_BYTES.
 */
export function startBody(what: string, meta: ManifestMeta, packCount: number, blockCount: number, chunkCount: number): { raw: Buffer; at: number } {
  const metaJson = Buffer.from(JSON.stringify(meta));
  const rawLength = 4 + metaJson.length + 4 + packCount * PACK_ID_BYTES + 4 + blockCount * BLOCK_ENTRY_BYTES + 4 + chunkCount * CHUNK_ENTRY_BYTES;
  if (rawLength > MAX_BODY_BYTES) throw new Error(`${what}: the body would be ${rawLength} bytes; at most ${MAX_BODY_BYTES}`);
  const raw = Buffer.allocUnsafe(rawLength);
  const at = raw.writeUInt32LE(metaJson.length, 0);
  return { raw, at: at + metaJson.copy(raw, at) };
}

/** Where the tables of a manifest body (before compression) are, from its counts. */
export interface TableLayout {
  packCount: number;
  packsAt: number;
  blockCount: number;
  blocksAt: number;
  chunkCount: number;
  chunksAt: number;
}

/** The layout of a body this host laid out or already decoded (so its counts are trusted). */
export function tableLayout(raw: Buffer): TableLayout {
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
  for (let i = 0; i < packCount; i++) packs.add(packIdAt(raw, packsAt, i));
  return packs;
}

/** Entry `i` of the pack table at `packsAt`: a pack id, 32 hex digits. */
export function packIdAt(raw: Buffer, packsAt: number, i: number): string {
  return raw.toString('hex', packsAt + i * PACK_ID_BYTES, packsAt + (i + 1) * PACK_ID_BYTES);
}

/** The chunk of entry `i` of the chunk table. */
export function chunkAt(raw: Buffer, layout: TableLayout, i: number): number {
  return raw.readUInt32LE(layout.chunksAt + i * CHUNK_ENTRY_BYTES);
}

/** The first entry from `from` on whose chunk is `chunk` or later (binary search: chunks ascend); chunkCount if none. */
export function chunkEntryAtOrAfter(raw: Buffer, layout: TableLayout, from: number, chunk: number): number {
  let lo = from;
  let hi = layout.chunkCount;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (chunkAt(raw, layout, mid) < chunk) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

/** Mapped chunks and block table entries of a manifest body. */
export function bodyCounts(raw: Buffer): { chunks: number; blocks: number } {
  const { chunkCount, blockCount } = tableLayout(raw);
  return { chunks: chunkCount, blocks: blockCount };
}

/**
 * Whether two manifests of a store sealed with `cipher` say the same thing. Their stored
 * bodies cannot tell in an encrypted store: every seal has a fresh random nonce.
 */
export function sameManifest(a: Manifest, b: Manifest, cipher: StoreCipher): boolean {
  return manifestBody(a, cipher.overhead).equals(manifestBody(b, cipher.overhead));
}
