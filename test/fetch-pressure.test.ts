// A read's blocks fetched from several packs while the disk tier is full of pinned blocks
// must all be on the host when the last pack arrives: the packs' other blocks take no
// room from them (src/store/fetch.ts passes the blocks a read waits for). Nor may a
// failed slab write of fetched blocks (a full disk) take them from the memory tier. A
// block that neither tier can take is held for the read until it has read it.
import assert from 'node:assert/strict';
import { randomFillSync } from 'node:crypto';
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { setImmediate as nextTurn } from 'node:timers/promises';
import { BlockCache, blockKey } from '../src/blocks/cache.js';
import { PLAINTEXT } from '../src/crypto/cipher.js';
import { parseCompression } from '../src/crypto/compress.js';
import { nodeDisk, useDisk } from '../src/disk/disk.js';
import { createLogger } from '../src/log.js';
import { FileObjectStore } from '../src/objectstore/index.js';
import { PackFetcher } from '../src/store/fetch.js';
import { PackIndex } from '../src/store/pack-index.js';
import { packThreads } from '../src/store/pack-threads.js';
import { PackUploader } from '../src/store/upload.js';

function block(size: number): { key: string; data: Buffer } {
  const data = randomFillSync(Buffer.allocUnsafe(size));
  return { key: blockKey(PLAINTEXT.blockHash(data)), data };
}

test('the blocks a read waits for, one from each of four packs, all stay on the host when the disk tier is full and memory holds fewer than the packs bring', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'updraft-fetch-pressure-'));
  try {
    const size = 64 * 1024;
    const cache = BlockCache.open(join(dir, 'cache'), { blockSize: size, namesId: PLAINTEXT.namesId, blockHash: PLAINTEXT.blockHash, diskBytes: 8 * size, memoryBytes: 6 * size }, createLogger('test', 'error'));
    // The disk tier full: pinned blocks (not in the store yet), two of them since uploaded (evictable).
    const pinned: string[] = [];
    for (;;) {
      const b = block(size);
      if (!cache.put(b.key, b.data)) break;
      pinned.push(b.key);
    }
    assert.ok(pinned.length >= 4, `the disk tier took ${pinned.length} pinned blocks`);
    cache.markInStore(pinned.slice(0, 2));
    await cache.settle();

    const packs = Array.from({ length: 4 }, () => Array.from({ length: 4 }, () => block(size)));
    const wanted = packs.map((pack, i) => pack[i % pack.length]);
    for (const [i, pack] of packs.entries()) cache.putPackFromStore(pack, new Set([wanted[i].key]));
    const scratch = Buffer.alloc(size);
    for (const [i, w] of wanted.entries()) {
      assert.ok(cache.readInto(w.key, 0, size, scratch, 0), `the block the read waits for from pack ${i} is on the host`);
      assert.ok(scratch.equals(w.data), `and reads back as fetched (pack ${i})`);
    }
    for (const key of pinned.slice(2)) assert.ok(cache.has(key), 'pinned blocks stay');
    assert.ok(cache.memoryBytes <= 6 * size, 'the memory tier stays within its setting');
    await cache.close();
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('the blocks a read waits for stay in the memory tier when the slab write of their packs fails (a full disk)', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'updraft-fetch-pressure-'));
  // Every pwritev (the slab writes of fetched blocks) fails as on a full disk.
  const previous = useDisk({
    ...nodeDisk,
    writev: async () => {
      throw Object.assign(new Error('ENOSPC: no space left on device, writev'), { code: 'ENOSPC' });
    },
  });
  try {
    const size = 64 * 1024;
    const cache = BlockCache.open(join(dir, 'cache'), { blockSize: size, namesId: PLAINTEXT.namesId, blockHash: PLAINTEXT.blockHash, diskBytes: 32 * size, memoryBytes: 6 * size }, createLogger('test', 'error'));
    const packs = Array.from({ length: 4 }, () => Array.from({ length: 4 }, () => block(size)));
    const wanted = packs.map((pack, i) => pack[i % pack.length]);
    const expected = wanted.map((w) => Buffer.from(w.data));
    // As the fetcher does for a read: its blocks are awaited while the packs arrive, and
    // each pack's buffer is reused once its slab writes settle.
    const release = cache.awaitBlocks(wanted.map((w) => w.key));
    const written = packs.map((pack, i) => cache.putPackFromStore(pack, new Set([wanted[i].key])));
    await Promise.all(written);
    for (const pack of packs) for (const b of pack) b.data.fill(0xee);
    const scratch = Buffer.alloc(size);
    for (const [i, w] of wanted.entries()) {
      assert.ok(cache.ready(w.key), `the block the read waits for from pack ${i} is on the host after its slab write failed`);
      assert.ok(cache.readInto(w.key, 0, size, scratch, 0), `and readable (pack ${i})`);
      assert.ok(scratch.equals(expected[i]), `and reads back as fetched, not as the reused buffer (pack ${i})`);
    }
    release();
    assert.ok(cache.memoryBytes <= 6 * size, 'the memory tier stays within its setting');
    assert.ok(cache.memoryHeldBytes <= 6 * size, 'and so do its buffers');
    await cache.close();
  } finally {
    useDisk(previous);
    rmSync(dir, { recursive: true, force: true });
  }
});

test('a block a read waits for that neither tier can take (both full of blocks whose slab writes are in flight) is held for the read until it has read it', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'updraft-fetch-pressure-'));
  const log = createLogger('test', 'error');
  const size = 64 * 1024;
  const options = { blockSize: size, namesId: PLAINTEXT.namesId, blockHash: PLAINTEXT.blockHash };
  // Slab and slot table writes wait for the gate, as behind a slow device.
  let openGate!: () => void;
  const gate = new Promise<void>((resolve) => (openGate = resolve));
  let previous;
  try {
    const writer = BlockCache.open(join(dir, 'writer'), { ...options, diskBytes: 16 * size, memoryBytes: 0 }, log);
    const index = PackIndex.open(join(dir, 'packs.index'));
    mkdirSync(join(dir, 'store'));
    const store = new FileObjectStore(join(dir, 'store'));
    const pack = Array.from({ length: 4 }, () => block(size));
    for (const b of pack) assert.ok(writer.put(b.key, b.data));
    await new PackUploader(store, index, writer, parseCompression('lz4'), PLAINTEXT, 4, log).upload(pack.map((b) => b.key), 'test');
    await writer.close();

    const reader = BlockCache.open(join(dir, 'reader'), { ...options, diskBytes: 8 * size, memoryBytes: 6 * size }, log);
    previous = useDisk({
      ...nodeDisk,
      write: async (...args) => gate.then(() => nodeDisk.write(...args)),
      writev: async (...args) => gate.then(() => nodeDisk.writev(...args)),
    });
    // Sealed blocks fill the disk tier (pinned) and the memory tier (their slab writes read it).
    for (let i = 0; i < 8; i++) {
      const b = block(size);
      assert.ok(reader.put(b.key, b.data), `sealed block ${i} is taken`);
    }
    const wanted = pack[2];
    const fetcher = new PackFetcher(store, index, reader, PLAINTEXT, 0, log);
    await fetcher.fetch([wanted.key]);
    const scratch = Buffer.alloc(size);
    assert.ok(reader.ready(wanted.key), 'the block the read waits for is on the host when the fetch returns');
    assert.ok(reader.readInto(wanted.key, 0, size, scratch, 0), 'and the read takes it');
    assert.ok(scratch.equals(wanted.data), 'as fetched');
    assert.equal(reader.counters.heldForReads, 1, 'it was held for the read, outside both tiers');
    assert.ok(reader.memoryBytes <= 6 * size, 'the memory tier stays within its setting');
    await nextTurn();
    assert.ok(!reader.has(wanted.key), 'once the read has had it, the held copy goes');
    assert.equal(reader.heldForReadsBytes, 0, 'and no bytes stay held');
    openGate();
    await reader.close();
    await packThreads(PLAINTEXT).close();
  } finally {
    openGate();
    if (previous !== undefined) useDisk(previous);
    rmSync(dir, { recursive: true, force: true });
  }
});
