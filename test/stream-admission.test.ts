// The disk tier's admission of fetched blocks (src/blocks/cache.ts: putPackFromStore): a
// sequential reader's read-ahead keeps the blocks it fetches in the memory tier only, so a
// cold stream does not write every block into the slab; a block streamed again after it
// left the memory tier is written then. Demand fetches, and blocks only this host holds
// (sealed, not in any pack), are written to the slab as before.
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdirSync, mkdtempSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { BlockCache, blockKey, type BlockKey } from '../src/blocks/cache.js';
import { PLAINTEXT } from '../src/crypto/cipher.js';
import { parseCompression } from '../src/crypto/compress.js';
import { createLogger } from '../src/log.js';
import { FileObjectStore } from '../src/objectstore/index.js';
import { PackFetcher } from '../src/store/fetch.js';
import { packKey } from '../src/store/pack.js';
import { PackIndex } from '../src/store/pack-index.js';
import { packThreads } from '../src/store/pack-threads.js';
import { PackUploader } from '../src/store/upload.js';

const BLOCK = 64 * 1024;
const PER_PACK = 4;
const PACKS = 6;
const log = createLogger('test', 'error');
const options = { blockSize: BLOCK, namesId: PLAINTEXT.namesId, blockHash: PLAINTEXT.blockHash, diskBytes: 64 * 1024 * 1024 };

type Block = { key: BlockKey; data: Buffer };

/** PACKS packs of PER_PACK random blocks in a file store, and the pack index that names them. */
async function storeWithPacks(dir: string): Promise<{ files: FileObjectStore; index: PackIndex; blocks: Block[] }> {
  const writer = BlockCache.open(join(dir, 'writer'), { ...options, memoryBytes: 64 * BLOCK }, log);
  const index = PackIndex.open(join(dir, 'packs.index'));
  mkdirSync(join(dir, 'store'));
  const files = new FileObjectStore(join(dir, 'store'));
  const blocks: Block[] = [];
  for (let i = 0; i < PACKS * PER_PACK; i++) {
    const data = randomBytes(BLOCK);
    blocks.push({ key: blockKey(PLAINTEXT.blockHash(data)), data });
    assert.ok(writer.put(blocks[i].key, data));
  }
  const uploaded = await new PackUploader(files, index, writer, parseCompression('lz4'), PLAINTEXT, PER_PACK, log).upload(blocks.map((b) => b.key), 'test');
  assert.equal(uploaded.packs, PACKS);
  await writer.close();
  return { files, index, blocks };
}

/** Read-ahead of `keys` (as a sequential reader asks for it), until every pack it started is loaded. */
async function readAhead(fetcher: PackFetcher, keys: BlockKey[]): Promise<void> {
  const before = fetcher.counters.prefetchedPacks;
  fetcher.prefetch(keys);
  const started = fetcher.counters.prefetchedPacks - before;
  const target = fetcher.counters.packsFetched + started;
  while (fetcher.counters.packsFetched < target) await new Promise((resolve) => setTimeout(resolve, 5));
}

function assertReadsBack(cache: BlockCache, blocks: Block[]): void {
  const scratch = Buffer.alloc(BLOCK);
  for (const [i, b] of blocks.entries()) {
    assert.ok(cache.readInto(b.key, 0, BLOCK, scratch, 0), `block ${i} is on the reading host`);
    assert.ok(scratch.equals(b.data), `block ${i} reads back as stored`);
  }
}

const slabBytes = (dir: string) => statSync(join(dir, 'blocks.slab')).size;

test('read-ahead keeps a cold stream in the memory tier without writing the slab; a block streamed again after leaving it is written once', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'updraft-stream-admission-'));
  try {
    const { files, index, blocks } = await storeWithPacks(dir);
    // A memory tier that holds two packs' blocks: the stream passes through it.
    const readerDir = join(dir, 'reader');
    const reader = BlockCache.open(readerDir, { ...options, memoryBytes: 2 * PER_PACK * BLOCK }, log);
    const fetcher = new PackFetcher(files, index, reader, PLAINTEXT, 8 * PER_PACK, log);

    // First pass, pack by pack as a reader moves along: nothing goes to the slab.
    for (let p = 0; p < PACKS; p++) {
      const pack = blocks.slice(p * PER_PACK, (p + 1) * PER_PACK);
      await readAhead(fetcher, pack.map((b) => b.key));
      assertReadsBack(reader, pack);
    }
    await reader.settle();
    assert.equal(fetcher.counters.packsFetched, PACKS);
    assert.equal(reader.counters.streamedToMemory, PACKS * PER_PACK, 'every streamed block went to the memory tier');
    assert.equal(reader.counters.fetchedWritten, 0, 'no streamed block was written to the slab on its first fetch');
    assert.equal(reader.blockCount, 0, 'the disk tier holds no slot');
    assert.equal(slabBytes(readerDir), 0, 'the slab file was not written');

    // Second pass: the blocks the memory tier let go are fetched again, and written to the slab this time.
    const gone = blocks.filter((b) => !reader.has(b.key));
    assert.equal(gone.length, (PACKS - 2) * PER_PACK, 'the memory tier kept the last two packs only');
    await readAhead(fetcher, gone.map((b) => b.key));
    await reader.settle();
    assert.equal(fetcher.counters.packsFetched, 2 * PACKS - 2);
    assert.equal(reader.counters.fetchedWritten, gone.length, 'the blocks streamed twice were written to the slab');
    assert.equal(reader.blockCount, gone.length);
    assert.ok(slabBytes(readerDir) >= gone.length * BLOCK, `the slab holds ${slabBytes(readerDir)} bytes`);

    // Third pass: what the memory tier let go meanwhile (of the last two packs) is fetched and
    // written now; after that every block is on the host.
    const rest = blocks.filter((b) => !reader.has(b.key));
    assert.ok(rest.length > 0, 'the second pass pushed streamed blocks out of the memory tier');
    await readAhead(fetcher, rest.map((b) => b.key));
    await reader.settle();
    const refetched = fetcher.counters.packsFetched - PACKS;
    assert.ok(refetched > PACKS - 2, `${refetched} packs were fetched twice`);
    assert.equal(reader.counters.fetchedWritten, refetched * PER_PACK, 'each block of a pack fetched a second time was written to the slab once');
    assert.equal(reader.blockCount, refetched * PER_PACK);
    assert.ok(blocks.every((b) => reader.has(b.key)), 'every block is on the host');
    assertReadsBack(reader, blocks);
    await reader.close();
  } finally {
    await packThreads(PLAINTEXT).close();
    rmSync(dir, { recursive: true, force: true });
  }
});

test('demand fetches, and read-ahead with no memory tier, write fetched blocks to the slab', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'updraft-stream-admission-'));
  try {
    const { files, index, blocks } = await storeWithPacks(dir);
    const demand = BlockCache.open(join(dir, 'demand'), { ...options, memoryBytes: 64 * BLOCK }, log);
    const demandFetcher = new PackFetcher(files, index, demand, PLAINTEXT, 0, log);
    await demandFetcher.fetch(blocks.map((b) => b.key));
    await demand.settle();
    assert.equal(demand.counters.streamedToMemory, 0);
    assert.equal(demand.counters.fetchedWritten, blocks.length, 'a read that waits on the store writes the pack to the slab');
    assert.equal(demand.blockCount, blocks.length);
    assertReadsBack(demand, blocks);
    await demand.close();

    const noMemory = BlockCache.open(join(dir, 'no-memory'), { ...options, memoryBytes: 0 }, log);
    const streamFetcher = new PackFetcher(files, index, noMemory, PLAINTEXT, 8 * PER_PACK, log);
    await readAhead(streamFetcher, blocks.map((b) => b.key));
    await noMemory.settle();
    assert.equal(noMemory.counters.streamedToMemory, 0);
    assert.equal(noMemory.counters.fetchedWritten, blocks.length, 'with no memory tier to keep them, streamed blocks go to the slab');
    assertReadsBack(noMemory, blocks);
    await noMemory.close();
  } finally {
    await packThreads(PLAINTEXT).close();
    rmSync(dir, { recursive: true, force: true });
  }
});

test('a block only this host holds is written to the slab, pinned, and survives a reopen, beside a stream of fetched blocks', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'updraft-stream-admission-'));
  try {
    const { files, index, blocks } = await storeWithPacks(dir);
    const cacheDir = join(dir, 'host');
    const cache = BlockCache.open(cacheDir, { ...options, memoryBytes: 64 * BLOCK }, log);
    const fetcher = new PackFetcher(files, index, cache, PLAINTEXT, 8 * PER_PACK, log);
    await readAhead(fetcher, blocks.map((b) => b.key));
    assert.equal(cache.counters.streamedToMemory, blocks.length);
    // Sealed with the bytes of a block read-ahead brought: the store holds it; written, not pinned.
    assert.ok(cache.put(blocks[0].key, blocks[0].data));
    assert.ok(cache.isInStore(blocks[0].key), 'a sealed block the memory tier had from the store is in the store');
    assert.equal(cache.pinnedBlocks, 0);
    // Sealed here, in no pack: pinned, and the only copy.
    const sealed: Block[] = [];
    for (let i = 0; i < 4; i++) {
      const data = randomBytes(BLOCK);
      sealed.push({ key: blockKey(PLAINTEXT.blockHash(data)), data });
      assert.ok(cache.put(sealed[i].key, data));
    }
    assert.equal(cache.counters.blocksWritten, sealed.length + 1);
    assert.equal(cache.pinnedBlocks, sealed.length);
    await cache.sync();
    assert.ok(slabBytes(cacheDir) >= sealed.length * BLOCK, `the slab holds ${slabBytes(cacheDir)} bytes`);
    await cache.close();

    // Reopened (the memory tier is gone): the sealed blocks come from the slab, checked against their names.
    const reopened = BlockCache.open(cacheDir, { ...options, memoryBytes: 64 * BLOCK }, log);
    for (const b of sealed) assert.ok(reopened.ref(b.key), 'the sealed block has its slot after a reopen');
    reopened.finishStartup();
    assertReadsBack(reopened, sealed);
    assert.equal(reopened.counters.diskHits, sealed.length);
    assert.equal(reopened.counters.verifyEvictions, 0);
    assert.ok(blocks.slice(1).every((b) => !reopened.has(b.key)), 'the streamed blocks were never written to the slab');
    assert.ok(reopened.isInStore(blocks[0].key), 'the block sealed over a streamed one is in the slab, marked in the store');
    assertReadsBack(reopened, blocks.slice(0, 1));
    await reopened.close();
  } finally {
    await packThreads(PLAINTEXT).close();
    rmSync(dir, { recursive: true, force: true });
  }
});

test('a fetched plain pack is checked block by block: a truncated body, or another pack at its key, is refused', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'updraft-stream-admission-'));
  try {
    const { files, index, blocks } = await storeWithPacks(dir);
    const packOf = (b: Block) => index.get(b.key)!.pack;
    const first = blocks[0];
    const other = blocks.find((b) => packOf(b) !== packOf(first))!;
    const bodyOf = async (b: Block) => (await files.get(packKey(packOf(b))))!.body;
    const firstBody = await bodyOf(first);
    // Another pack's body at the first pack's key: every block in it checks out, but not the one wanted.
    const swapped = Object.create(files) as FileObjectStore;
    swapped.get = async (key: string) => (key === packKey(packOf(first)) ? { ...(await files.get(packKey(packOf(other))))!, body: await bodyOf(other) } : files.get(key));
    const cache = BlockCache.open(join(dir, 'swapped'), { ...options, memoryBytes: 64 * BLOCK }, log);
    const fetcher = new PackFetcher(swapped, index, cache, PLAINTEXT, 0, log);
    await assert.rejects(fetcher.fetch([first.key]), /does not hold block [0-9a-f]+, which the pack index places there \(after 3 GETs\)/);
    assert.equal(fetcher.counters.verifyFailures, 3);
    assert.ok(!cache.has(first.key));
    await cache.close();

    // A body cut short inside its last block.
    const truncated = Object.create(files) as FileObjectStore;
    truncated.get = async (key: string) => {
      const object = await files.get(key);
      return key === packKey(packOf(first)) && object !== undefined ? { ...object, body: firstBody.subarray(0, firstBody.length - 100) } : object;
    };
    const cut = BlockCache.open(join(dir, 'truncated'), { ...options, memoryBytes: 64 * BLOCK }, log);
    const cutFetcher = new PackFetcher(truncated, index, cut, PLAINTEXT, 0, log);
    await assert.rejects(cutFetcher.fetch([first.key]), /runs past the end of the body/);
    assert.equal(cutFetcher.counters.verifyFailures, 3);
    assert.ok(!cut.has(first.key));
    await cut.close();
  } finally {
    await packThreads(PLAINTEXT).close();
    rmSync(dir, { recursive: true, force: true });
  }
});
