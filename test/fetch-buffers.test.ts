// Cold reads (src/store/fetch.ts) read pack GET bodies into reused buffers and open their
// blocks into reused buffers on the pack threads: however many packs are fetched, at most
// MAX_PACK_LOADS bodies are in use at once, the buffers are taken again rather than made
// anew, and every block reads back as it was stored.
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { BlockCache, blockKey, type BlockKey } from '../src/blocks/cache.js';
import { PLAINTEXT } from '../src/crypto/cipher.js';
import { parseCompression } from '../src/crypto/compress.js';
import { createLogger } from '../src/log.js';
import { FileObjectStore } from '../src/objectstore/index.js';
import type { GetOptions, ObjectStore, StoredObject } from '../src/objectstore/types.js';
import { PackFetcher } from '../src/store/fetch.js';
import { PackIndex } from '../src/store/pack-index.js';
import { packThreads } from '../src/store/pack-threads.js';
import { PackUploader } from '../src/store/upload.js';

const BLOCK = 64 * 1024;
const PER_PACK = 4;
/** src/store/fetch.ts: MAX_PACK_LOADS. */
const MAX_PACK_LOADS = 16;

/** The file store, but a GET's body goes where `into` says (as the s3:// backend does), slowly, and the bodies are counted. */
function intoStore(inner: ObjectStore): { store: ObjectStore; buffers: Set<ArrayBufferLike>; peak: () => number } {
  const buffers = new Set<ArrayBufferLike>();
  let inFlight = 0;
  let peak = 0;
  const store = Object.create(inner) as ObjectStore;
  store.get = async (key: string, options?: GetOptions): Promise<StoredObject | undefined> => {
    inFlight++;
    peak = Math.max(peak, inFlight);
    try {
      await new Promise((resolve) => setTimeout(resolve, 20));
      const object = await inner.get(key);
      if (object === undefined || options?.into === undefined) return object;
      const body = options.into(object.body.length);
      assert.equal(body.length, object.body.length, 'into() gives a buffer of the body length');
      object.body.copy(body);
      buffers.add(body.buffer);
      return { ...object, body };
    } finally {
      inFlight--;
    }
  };
  return { store, buffers, peak: () => peak };
}

test('cold reads of many packs use at most MAX_PACK_LOADS reused body buffers, and every block reads back as stored', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'updraft-fetch-buffers-'));
  const log = createLogger('test', 'error');
  try {
    const options = { blockSize: BLOCK, namesId: PLAINTEXT.namesId, blockHash: PLAINTEXT.blockHash, diskBytes: 256 * 1024 * 1024 };
    const writer = BlockCache.open(join(dir, 'writer'), { ...options, memoryBytes: 64 * 1024 * 1024 }, log);
    const index = PackIndex.open(join(dir, 'packs.index'));
    mkdirSync(join(dir, 'store'));
    const files = new FileObjectStore(join(dir, 'store'));
    const packs = 2 * MAX_PACK_LOADS + 8;
    const blocks: Array<{ key: BlockKey; data: Buffer }> = [];
    for (let i = 0; i < packs * PER_PACK; i++) {
      const data = randomBytes(BLOCK);
      blocks.push({ key: blockKey(PLAINTEXT.blockHash(data)), data });
      assert.ok(writer.put(blocks[i].key, data));
    }
    const uploaded = await new PackUploader(files, index, writer, parseCompression('lz4'), PLAINTEXT, PER_PACK, log).upload(blocks.map((b) => b.key), 'test');
    assert.equal(uploaded.packs, packs);
    await writer.close();

    // Another host's cache, with a memory tier smaller than what is fetched.
    const reader = BlockCache.open(join(dir, 'reader'), { ...options, memoryBytes: 8 * BLOCK }, log);
    const { store, buffers, peak } = intoStore(files);
    const fetcher = new PackFetcher(store, index, reader, PLAINTEXT, 0, log);
    // Two rounds: every pack of the first at once (more than MAX_PACK_LOADS), then the rest.
    const half = MAX_PACK_LOADS + 4;
    await fetcher.fetch(blocks.slice(0, half * PER_PACK).map((b) => b.key));
    await fetcher.fetch(blocks.slice(half * PER_PACK).map((b) => b.key));
    assert.equal(fetcher.counters.packsFetched, packs);
    assert.ok(peak() <= MAX_PACK_LOADS, `${peak()} pack GETs ran at once; the bound is ${MAX_PACK_LOADS}`);
    assert.ok(buffers.size <= MAX_PACK_LOADS, `${packs} pack GETs read into ${buffers.size} distinct buffers; at most ${MAX_PACK_LOADS} are in use at once and idle ones are taken again`);
    await reader.settle();
    const scratch = Buffer.alloc(BLOCK);
    for (const [i, b] of blocks.entries()) {
      assert.ok(reader.readInto(b.key, 0, BLOCK, scratch, 0), `block ${i} is on the reading host`);
      assert.ok(scratch.equals(b.data), `block ${i} reads back as stored`);
    }
    assert.ok(reader.memoryHeldBytes <= 8 * BLOCK, `the memory tier keeps ${reader.memoryHeldBytes} bytes; its setting is ${8 * BLOCK}`);
    await reader.close();
    await packThreads(PLAINTEXT).close();
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
