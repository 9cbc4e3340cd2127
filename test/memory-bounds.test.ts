// Memory is bounded by configuration, not by a client's behaviour (DESIGN.md invariant 7).
// Every host is a real daemon; data goes through the NBD test client.
import assert from 'node:assert/strict';
import { randomBytes, randomFillSync } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { BlockArena } from '../src/blocks/arena.js';
import { BlockCache, blockKey } from '../src/blocks/cache.js';
import { PLAINTEXT } from '../src/crypto/cipher.js';
import { createLogger } from '../src/log.js';
import { REWRITE_BATCH_RECORDS } from '../src/volume/journal.js';
import { Volume } from '../src/volume/volume.js';
import { CHUNK, connect, createVolume, drain, fileStore, metric, MiB, readAll, startCluster, waitFor, withLogs, writeRandom } from './harness/cluster.js';
import { rssBytes } from './harness/daemon.js';
import { NbdClient } from './harness/nbd-client.js';

const TIMEOUT = 600_000;
/** src/nbd/deferred.ts: MAX_DEFERRED_PER_CONNECTION, MAX_DEFERRED_PER_HOST. */
const PER_CONNECTION = 64;
const PER_HOST = 1024;
/** MAX_DEFERRED_BYTES_PER_CONNECTION; a request is parsed below it, so one write may go past. */
const BYTES_PER_CONNECTION = 64 * MiB;

test('reads and unaligned writes pipelined against cold blocks in a slow store stay within the deferred-request bounds, and all complete correctly', { timeout: TIMEOUT }, async () => {
  const cluster = await startCluster(fileStore);
  try {
    // One block a pack: every chunk is its own slow GET on the reading host.
    const a = await cluster.start('host-a', { servers: { nbd: { blocks_per_pack: 1 } } });
    // The readers use the first 32 chunks; the writers' edges are in the rest, cold until then.
    const chunks = 256;
    const readChunks = 32;
    const data = randomBytes(chunks * CHUNK);
    await withLogs([a], async () => {
      await createVolume(a, 'cold', 64);
      const writer = await NbdClient.connect({ path: a.socket, exportName: 'cold' });
      await writer.write(0, data);
      await writer.flush();
      await writer.disconnect();
      await drain(a, 'cold');
    });
    const b = await cluster.start('host-b', { storage: { read_ahead_packs: 0 } }, { UPDRAFT_STORE_FAULTS: 'seed=7,latency=1000' });
    await withLogs([b], async () => {
      // More connections than the host bound leaves room for at the connection bound.
      const connections = 20;
      const readsEach = 100;
      const clients: NbdClient[] = [];
      for (let i = 0; i < connections; i++) clients.push(await NbdClient.connect({ path: b.socket, exportName: 'cold', commandTimeoutMs: 300_000 }));
      const reads: Array<Promise<void>> = [];
      for (const [c, client] of clients.entries()) {
        for (let r = 0; r < readsEach; r++) {
          const offset = ((c * 7 + r) % readChunks) * CHUNK + (r % 32) * 4096;
          reads.push(client.read(offset, 4096).then((got) => assert.ok(got.equals(data.subarray(offset, offset + 4096)), `read at ${offset} returned other bytes`)));
        }
      }
      await Promise.all(reads);
      const connectionPeak = await metric(b, 'updraft_nbd_deferred_requests_connection_peak');
      const hostPeak = await metric(b, 'updraft_nbd_deferred_requests_peak');
      assert.ok(connectionPeak >= 1, 'reads of cold blocks were deferred');
      assert.ok(connectionPeak <= PER_CONNECTION, `a connection deferred ${connectionPeak} requests; the bound is ${PER_CONNECTION}`);
      assert.ok(hostPeak <= PER_HOST, `the host deferred ${hostPeak} requests; the bound is ${PER_HOST}`);
      assert.equal(await metric(b, 'updraft_nbd_deferred_requests'), 0, 'nothing is left deferred');
      for (const client of clients) await client.disconnect();
      process.stdout.write(`# deferred peaks: ${connectionPeak} on one connection, ${hostPeak} on the host (${connections} x ${readsEach} reads of ${readChunks} cold chunks)\n`);

      // Unaligned writes need their edge chunks' blocks first: each is deferred with its payload.
      const fork = await b.api('POST', '/api/exports/cold/fork', { target: 'cold-w', mode: 'lazy' });
      assert.equal(fork.status, 201, fork.text);
      const writer = await NbdClient.connect({ path: b.socket, exportName: 'cold-w', commandTimeoutMs: 300_000 });
      const piece = 4 * MiB;
      const expected = Buffer.concat([data, Buffer.alloc(CHUNK)]);
      const pieces = Array.from({ length: 7 }, () => randomBytes(piece));
      const at = (k: number) => (k + 1) * piece + 512;
      for (const [k, bytes] of pieces.entries()) bytes.copy(expected, at(k));
      // 40 writes of 4 MiB, 160 MiB in all: the same bytes for the same place, so their order does not matter.
      await Promise.all(Array.from({ length: 40 }, (_, i) => writer.write(at(i % 7), pieces[i % 7])));
      const bytesPeak = await metric(b, 'updraft_nbd_deferred_bytes_connection_peak');
      assert.ok(bytesPeak >= piece, 'unaligned writes were deferred with their payloads');
      assert.ok(bytesPeak < BYTES_PER_CONNECTION + piece, `a connection deferred ${bytesPeak} bytes of writes; the bound is ${BYTES_PER_CONNECTION} plus one request`);
      assert.equal(await metric(b, 'updraft_nbd_deferred_bytes'), 0, 'no payload is left deferred');
      const got = await writer.read(0, 32 * MiB);
      assert.ok(got.equals(expected.subarray(0, 32 * MiB)), 'the writes landed whole, around the cold blocks they were merged with');
      await writer.disconnect();
      process.stdout.write(`# deferred write bytes peak on one connection: ${bytesPeak}\n`);

      // FUA writes waiting for cold blocks, more than a connection may defer: once their
      // blocks arrive each waits for its flush in the slot its write took, not a second one.
      const lazy = await b.api('POST', '/api/exports/cold/fork', { target: 'cold-fua', mode: 'lazy' });
      assert.equal(lazy.status, 201, lazy.text);
      const fua = await NbdClient.connect({ path: b.socket, exportName: 'cold-fua', commandTimeoutMs: 300_000 });
      const small = randomBytes(512);
      const fuaWrites = 2 * PER_CONNECTION;
      const results = await Promise.allSettled(Array.from({ length: fuaWrites }, (_, i) => fua.write((i % chunks) * CHUNK + 1024, small, { fua: true })));
      const refused = results.filter((r) => r.status === 'rejected').map((r) => String((r as PromiseRejectedResult).reason));
      assert.deepEqual(refused.slice(0, 3), [], `${refused.length} of ${fuaWrites} FUA writes against cold blocks failed`);
      for (const i of [0, 1, fuaWrites - 1]) {
        const offset = (i % chunks) * CHUNK;
        const want = Buffer.from(data.subarray(offset, offset + 4096));
        small.copy(want, 1024);
        assert.ok((await fua.read(offset, 4096)).equals(want), `FUA write ${i} did not land around its cold block`);
      }
      await fua.disconnect();
    });
  } finally {
    await cluster.cleanup();
  }
});

test('the memory tier counts the bytes it keeps alive: a block cut from a decoded pack does not hold the whole pack', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'updraft-memtier-'));
  try {
    const block = 64 * 1024;
    const memory = 16 * block;
    const cache = BlockCache.open(join(dir, 'cache'), { blockSize: block, namesId: PLAINTEXT.namesId, blockHash: PLAINTEXT.blockHash, diskBytes: 256 * 1024 * 1024, memoryBytes: memory }, createLogger('test', 'error'));
    const packs = 40;
    const perPack = 25;
    const wanted: Array<{ key: string; data: Buffer }> = [];
    const scratch = Buffer.alloc(block);
    for (let p = 0; p < packs; p++) {
      // As the pack threads hand them over: every block a view into one buffer of the decoded pack.
      const decoded = randomFillSync(Buffer.allocUnsafeSlow(perPack * block));
      const blocks = [];
      for (let i = 0; i < perPack; i++) {
        const data = decoded.subarray(i * block, (i + 1) * block);
        blocks.push({ key: blockKey(PLAINTEXT.blockHash(data)), data });
      }
      cache.putPackFromStore(blocks);
      // The pack's last block is read twice while in memory: S3-FIFO keeps it once the rest of its pack is evicted.
      const read = blocks[perPack - 1];
      wanted.push({ key: read.key, data: Buffer.from(read.data) });
      for (let r = 0; r < 2; r++) assert.ok(cache.readInto(read.key, 0, block, scratch, 0));
    }
    await cache.settle();
    let inMemory = 0;
    for (const first of wanted) {
      const hits = cache.counters.memoryHits;
      assert.ok(cache.readInto(first.key, 0, block, scratch, 0), 'every block is still on this host');
      assert.ok(scratch.equals(first.data), 'and reads back as it was put');
      if (cache.counters.memoryHits > hits) inMemory++;
    }
    assert.ok(inMemory > 1, `blocks of ${inMemory} packs are in the memory tier (the case where views would keep packs alive)`);
    assert.ok(cache.memoryBytes <= memory, `the memory tier counts ${cache.memoryBytes} bytes; its setting is ${memory}`);
    assert.ok(cache.memoryHeldBytes <= memory, `the memory tier keeps ${cache.memoryHeldBytes} bytes of buffers alive; its setting is ${memory}`);
    await cache.close();
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('a flush after a small change hands the journal only the change; compacting a large sparse volume holds a bounded batch at a time', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'updraft-journal-'));
  try {
    const bs = 128 * 1024;
    const log = createLogger('test', 'error');
    const cache = BlockCache.open(join(dir, 'cache'), { blockSize: bs, namesId: PLAINTEXT.namesId, blockHash: PLAINTEXT.blockHash, diskBytes: 64 * 1024 * 1024, memoryBytes: 0 }, log);
    const ctx = { cache, blockHash: PLAINTEXT.blockHash, log, scratch: Buffer.alloc(bs) };
    const mapped = 100_000;
    // Every other chunk of a 25 GiB volume is allocated (zeroed without a hole): metadata only.
    const volume = await Volume.create(join(dir, 'volume'), 'sparse', 2 * mapped * bs, bs, ctx);
    const allocate = () => {
      for (let i = 0; i < mapped; i++) volume.zero(2 * i * bs, bs, { noHole: true, fast: false });
    };
    allocate();
    await volume.flush();
    assert.equal(volume.mappedChunks, mapped);

    let written = volume.journalStats.records;
    const sector = Buffer.alloc(4096, 7);
    for (let i = 0; i < 10; i++) {
      volume.write((2 * i + 1) * bs, sector);
      await volume.flush();
      assert.equal(volume.journalStats.records - written, 1, 'a flush after a one-chunk change hands the journal one record');
      written = volume.journalStats.records;
    }

    // Rewrite every allocated chunk until the journal is long enough to be compacted.
    while (volume.journalStats.rewrites === 0) {
      allocate();
      await volume.flush();
    }
    const largest = volume.journalStats.largestRewriteBatch;
    assert.ok(largest <= REWRITE_BATCH_RECORDS, `compaction encoded a batch of ${largest} records at once; the bound is ${REWRITE_BATCH_RECORDS}`);
    written = volume.journalStats.records;
    // A sector of chunk 3 not written before: its mask changes.
    volume.write(3 * bs + 4096, sector);
    await volume.flush();
    assert.equal(volume.journalStats.records - written, 1, 'after compaction too');
    // A rewrite of sectors already in the overlay changes no record: the batch holds the sequence alone.
    written = volume.journalStats.records;
    const sequence = volume.sequence;
    volume.write(3 * bs, sector);
    await volume.flush();
    assert.equal(volume.journalStats.records - written, 0, 'a rewrite of present sectors handed the journal a record');
    assert.equal(volume.sequence, sequence + 1);
    await volume.close();

    // The compacted journal is the whole state.
    const reopened = Volume.load(join(dir, 'volume'), ctx);
    assert.equal(reopened.mappedChunks, mapped);
    assert.equal(reopened.dirtyChunks, 10);
    const got = Buffer.alloc(4096);
    reopened.read(3 * bs, 4096, got, 0);
    assert.ok(got.equals(sector), 'an overlay sector survives compaction');
    reopened.read(3 * bs + 4096, 4096, got, 0);
    assert.ok(got.equals(sector), 'a sector written after compaction survives a reopen');
    assert.equal(reopened.sequence, sequence + 1, 'the sequence of a batch without records was not replayed');
    await reopened.close();
    await cache.close();
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('memory_pretouch: the daemon faults its whole memory tier in at start-up while a cold read fills it, and every block reads back as written', { timeout: TIMEOUT }, async () => {
  const cluster = await startCluster(fileStore);
  try {
    const tier = 256 * MiB;
    const a = await cluster.start('host-a');
    let data: Buffer;
    await withLogs([a], async () => {
      await createVolume(a, 'touched', 64);
      const writer = await connect(a, 'touched');
      data = await writeRandom(writer, 0, 48 * MiB);
      await writer.flush();
      await writer.disconnect();
      await drain(a, 'touched');
    });
    // Woken on hosts of their own: the cold read streams every block into the memory tier,
    // on b while its tier is being faulted in.
    const b = await cluster.start('host-b', { cache: { memory_size_gb: tier / 2 ** 30, memory_pretouch: true } });
    const c = await cluster.start('host-c', { cache: { memory_size_gb: tier / 2 ** 30, memory_pretouch: false } });
    await withLogs([b, c], async () => {
      for (const [name, host] of [['host-b', b], ['host-c', c]] as const) {
        await createVolume(host, 'touched', 64, {}, 200);
        const reader = await connect(host, 'touched');
        assert.ok((await readAll(reader, 0, 48 * MiB)).equals(data!), `${name}: the cold read returned other bytes`);
        await reader.disconnect();
      }
      await waitFor('host-b to fault its memory tier in', async () => (await metric(b, 'updraft_cache_memory_faulted_in')) === 1);
      assert.ok(b.log().includes('memory tier faulted in'), 'host-b logs it');
      assert.equal(await metric(c, 'updraft_cache_memory_faulted_in'), 0, 'host-c does not fault its tier in');
      const [rssB, rssC] = [rssBytes(b.pid), rssBytes(c.pid)];
      assert.ok(rssB >= tier, `host-b's RSS is ${rssB} bytes with its ${tier}-byte memory tier faulted in`);
      // host-c, after the same read, holds only the 48 MiB it filled of its tier.
      assert.ok(rssB - rssC >= tier / 2, `host-b's RSS (${rssB} bytes) is not half a tier above host-c's (memory_pretouch = false: ${rssC} bytes)`);
      // Read again from the memory tier: the blocks filled while it was being faulted in are intact.
      const hits = await metric(b, 'updraft_cache_hits_total', { tier: 'memory' });
      const reader = await connect(b, 'touched');
      assert.ok((await readAll(reader, 0, 48 * MiB)).equals(data!), 'host-b: the second read returned other bytes');
      await reader.disconnect();
      assert.ok((await metric(b, 'updraft_cache_hits_total', { tier: 'memory' })) > hits, 'the second read was served from the memory tier');
    });
  } finally {
    await cluster.cleanup();
  }
});

test('pretouch faults an arena in while slots fill: no block is lost or changed, and stopTouching leaves every buffer in place', async () => {
  const block = 128 * 1024;
  const slots = 1024; // 16 buffers of 64 slots
  const arena = new BlockArena(block, slots * block);
  const blocks: Buffer[] = [];
  const fill = (): boolean => {
    const slot = arena.allocate();
    if (slot === undefined) return false;
    const data = randomBytes(block);
    arena.fill(slot, data);
    blocks[slot] = data;
    return true;
  };
  for (let i = 0; i < 100; i++) assert.ok(fill(), 'a fresh arena hands out slots');
  // The touching thread does not keep a process alive (the daemon's servers do): this timer does, here.
  const alive = setInterval(() => undefined, 1000);
  try {
    // Slots are taken while the buffers above them are on the thread: allocate() skips the one away.
    const touched = arena.pretouch();
    // The last buffer went to the thread at once: the slots up to it are handed out, and none of it.
    while (fill());
    assert.equal(blocks.length, slots - 64, 'allocate() hands out every slot below the buffer on the thread, and none of it');
    let refused = 0;
    while (blocks.filter(Boolean).length < slots) {
      if (!fill()) refused++;
      await new Promise((resolve) => setImmediate(resolve));
    }
    assert.equal(await touched, true, 'the touch ran to its end');
    assert.equal(arena.allocate(), undefined, 'every slot is taken');
    for (const [slot, data] of blocks.entries()) assert.ok(arena.view(slot).equals(data), `slot ${slot} lost or changed its block while the arena was touched (${refused} allocations refused meanwhile)`);
    // Stopped at once, as when the cache closes: every buffer is back in the arena.
    const fresh = new BlockArena(block, slots * block);
    const stopped = fresh.pretouch();
    await fresh.stopTouching();
    assert.equal(await stopped, false, 'a stopped touch says it did not finish');
    // A buffer left on the thread would read as empty: every slot takes and keeps its block.
    const kept: Buffer[] = [];
    for (let i = 0; i < slots; i++) {
      const slot = fresh.allocate();
      assert.notEqual(slot, undefined, `slot ${i} can be handed out after a stopped touch`);
      kept[slot!] = randomBytes(block);
      fresh.fill(slot!, kept[slot!]);
    }
    for (const [slot, data] of kept.entries()) assert.ok(fresh.view(slot).equals(data), `slot ${slot} did not keep its block after a stopped touch`);
  } finally {
    clearInterval(alive);
  }
});
