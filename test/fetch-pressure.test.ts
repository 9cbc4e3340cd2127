// A read's blocks fetched from several packs while the disk tier is full of pinned blocks
// must all be on the host when the last pack arrives: the packs' other blocks take no
// room from them (src/store/fetch.ts passes the blocks a read waits for).
import assert from 'node:assert/strict';
import { randomFillSync } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { BlockCache, blockKey } from '../src/blocks/cache.js';
import { PLAINTEXT } from '../src/crypto/cipher.js';
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
