// Pack uploads (src/store/upload.ts) against a real block cache, pack index and file://
// store: a drain's early uploads (blocks named while its snapshot still seals) and the
// upload of the whole snapshot that follows put every block in exactly one pack.
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { BlockCache, blockKey, type BlockKey } from '../src/blocks/cache.js';
import { PLAINTEXT } from '../src/crypto/cipher.js';
import { parseCompression } from '../src/crypto/compress.js';
import { createLogger } from '../src/log.js';
import { FileObjectStore, withMetering } from '../src/objectstore/index.js';
import { decodePackIndex, packIdFromKey } from '../src/store/pack.js';
import { PackIndex } from '../src/store/pack-index.js';
import { PackUploader } from '../src/store/upload.js';
import { uploadsKey } from '../src/gc/uploads.js';

const BLOCK = 4096;
/** The uploads key the packs are uploaded for (it holds them only with GC on, which these tests run without). */
const HOLD = uploadsKey('test-host', 'v');
const dirs: string[] = [];
after(() => {
  for (const dir of dirs) rmSync(dir, { recursive: true, force: true });
});

function setup() {
  const dir = mkdtempSync(join(tmpdir(), 'updraft-upload-'));
  dirs.push(dir);
  const log = createLogger('test', 'error');
  const cache = BlockCache.open(join(dir, 'cache'), { blockSize: BLOCK, namesId: PLAINTEXT.namesId, blockHash: PLAINTEXT.blockHash, diskBytes: 64 * 1024 * 1024, memoryBytes: 16 * 1024 * 1024 }, log);
  const index = PackIndex.open(join(dir, 'packs.index'));
  mkdirSync(join(dir, 'store'));
  const store = withMetering(new FileObjectStore(join(dir, 'store')));
  const uploader = new PackUploader(store, index, cache, parseCompression('lz4'), PLAINTEXT, 4, log);
  const block = (): { key: BlockKey; data: Buffer } => {
    const data = randomBytes(BLOCK);
    return { key: blockKey(PLAINTEXT.blockHash(data)), data };
  };
  /** Every block key in the store's packs, with how many packs hold it. */
  const stored = async () => {
    const held = new Map<BlockKey, number>();
    for (const info of await store.list('packs/')) {
      const body = (await store.get(info.key))!.body;
      assert.ok(packIdFromKey(info.key));
      for (const entry of decodePackIndex(info.key, body, PLAINTEXT)) held.set(blockKey(entry.hash), (held.get(blockKey(entry.hash)) ?? 0) + 1);
    }
    return held;
  };
  return { cache, index, store, uploader, block, stored };
}

test('blocks named early go up in full packs; the upload of the whole snapshot puts only the rest and every block is in exactly one pack', async () => {
  const { cache, index, store, uploader, block, stored } = setup();
  const blocks = Array.from({ length: 30 }, block);
  for (const b of blocks) assert.ok(cache.put(b.key, b.data));
  const early = uploader.early(HOLD);
  for (const b of blocks.slice(0, 10)) early.add(b.key);
  early.add(blocks[3].key); // named twice (two chunks with the same content)
  const [first, rest] = await Promise.all([early.finish(), uploader.upload(blocks.map((b) => b.key), HOLD)]);
  // 10 named early: two full packs of 4 went up; the partial third is left to upload().
  assert.deepEqual(first, { packs: 2, blocks: 8, bytes: first.bytes });
  assert.deepEqual({ packs: rest.packs, blocks: rest.blocks }, { packs: 6, blocks: 22 });
  const held = await stored();
  assert.equal(held.size, 30);
  assert.ok([...held.values()].every((n) => n === 1), 'a block went up in two packs');
  assert.ok(blocks.every((b) => index.has(b.key)));
  assert.equal(store.counters().requests.put, 8);
  // Nothing left to do: a second upload puts nothing.
  assert.deepEqual(await uploader.upload(blocks.map((b) => b.key), HOLD), { packs: 0, blocks: 0, bytes: 0 });
});

test('an early pack that cannot be uploaded fails quietly; the upload of the snapshot puts its blocks', async () => {
  const { cache, uploader, block, stored } = setup();
  const blocks = Array.from({ length: 4 }, block);
  // The last block is not in the cache yet: the early pack of all four fails.
  for (const b of blocks.slice(0, 3)) assert.ok(cache.put(b.key, b.data));
  const early = uploader.early(HOLD);
  for (const b of blocks) early.add(b.key);
  assert.deepEqual(await early.finish(), { packs: 0, blocks: 0, bytes: 0 });
  assert.ok(cache.put(blocks[3].key, blocks[3].data));
  assert.deepEqual((await uploader.upload(blocks.map((b) => b.key), HOLD)).blocks, 4);
  assert.equal((await stored()).size, 4);
});
