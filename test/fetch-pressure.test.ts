// A read's blocks fetched from several packs while the disk tier is full of pinned blocks
// must all be on the host when the last pack arrives: the packs' other blocks take no
// room from them (src/store/fetch.ts passes the blocks a read waits for). Nor may a
// failed slab write of fetched blocks (a full disk) take them from the memory tier.
import assert from 'node:assert/strict';
import { randomFillSync } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { BlockCache, blockKey } from '../src/blocks/cache.js';
import { PLAINTEXT } from '../src/crypto/cipher.js';
import { nodeDisk, useDisk } from '../src/disk/disk.js';
import { createLogger } from '../src/log.js';

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
      assert.ok(cache.usable(w.key), `the block the read waits for from pack ${i} is on the host after its slab write failed`);
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
