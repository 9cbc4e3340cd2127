// An incremental manifest body: an earlier body of the volume with a few chunks changed
// (the layout: store/manifest.ts).
import { ZERO_ALLOCATED_HASH } from '../crypto/hash.js';
import { blockKey, type BlockKey } from '../blocks/cache.js';
import { BLOCK_ENTRY_BYTES, blockProblem, checkedMeta, CHUNK_ENTRY_BYTES, chunkCountOf, PACK_ID_BYTES, ZERO_ALLOCATED_BLOCK, type ManifestMeta } from './manifest.js';
import { chunkAt, chunkEntryAtOrAfter, packIdAt, startBody, tableLayout, writeBlockEntry } from './manifest-body.js';
import { PACK_ID } from './pack.js';
import type { PackLocation } from './pack-index.js';

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
  const checked = checkedMeta('patchManifestBody', meta);
  const what = `patchManifestBody ${meta.name}`;
  const layout = tableLayout(base);
  const chunkLimit = chunkCountOf(checked);

  // New blocks (each distinct name once) and the packs they add.
  let packIndex: Map<string, number> | undefined;
  const newPacks: string[] = [];
  const packOf = (pack: string): number => {
    if (packIndex === undefined) {
      packIndex = new Map();
      for (let i = 0; i < layout.packCount; i++) packIndex.set(packIdAt(base, layout.packsAt, i), i);
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
      const problem = blockProblem({ hash, ...location }, checked.blockSize, overhead);
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
    copyOld(chunkEntryAtOrAfter(base, layout, from, chunk));
    if (from < layout.chunkCount && chunkAt(base, layout, from) === chunk) from++; // replaced or removed
    if (e < entries.length && entries[e][0] === chunk) {
      out.writeUInt32LE(chunk, written * CHUNK_ENTRY_BYTES);
      out.writeUInt32LE(entries[e][1], written * CHUNK_ENTRY_BYTES + 4);
      written++;
      e++;
    }
  }
  copyOld(layout.chunkCount);
  const chunkTable = out.subarray(0, written * CHUNK_ENTRY_BYTES);

  const packCount = layout.packCount + newPacks.length;
  const blockCount = layout.blockCount + newBlocks.length;
  const { raw, at: tablesAt } = startBody(what, checked, packCount, blockCount, written);
  let at = raw.writeUInt32LE(packCount, tablesAt);
  at += base.copy(raw, at, layout.packsAt, layout.packsAt + layout.packCount * PACK_ID_BYTES);
  for (const pack of newPacks) at += raw.write(pack, at, 'hex');
  at = raw.writeUInt32LE(blockCount, at);
  at += base.copy(raw, at, layout.blocksAt, layout.blocksAt + layout.blockCount * BLOCK_ENTRY_BYTES);
  for (const { hash, pack, location } of newBlocks) at = writeBlockEntry(raw, at, hash, pack, location);
  at = raw.writeUInt32LE(written, at);
  at += chunkTable.copy(raw, at);
  if (at !== raw.length) throw new Error(`${what}: wrote ${at} body bytes, planned ${raw.length}`);
  return { raw, appended: newBlocks.length };
}
