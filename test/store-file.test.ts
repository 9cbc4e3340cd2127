// Volumes in the embedded file:// object store: the portability suite, plus flush modes,
// dedup across volumes, faults, corruption and bad objects. Every host is a real daemon;
// data goes through the NBD test client.
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import {
  CHUNK, connect, createVolume, drain, exportInfo, fileStore, metric, MiB, readAll, startCluster, storeRequests, waitFor,
  withLogs, writeRandom,
} from './harness/cluster.js';
import { removeDir, scratchDir, startDaemon, type Daemon } from './harness/daemon.js';
import { NbdCommandError, type NbdClient } from './harness/nbd-client.js';
import { requireTools, runOk, TOOLS } from './harness/tools.js';
import { definePortabilityTests } from './harness/portability.js';
import { PLAINTEXT } from '../src/crypto/cipher.js';
import { decodeManifest } from '../src/store/manifest-decode.js';
import { decodePackIndex, packKey, verifyPackId } from '../src/store/pack.js';
import { blockHash } from '../src/crypto/hash.js';

const TIMEOUT = 180_000;

definePortabilityTests(fileStore, 'file://');

/** A 16 MiB volume with 4 chunks of random data, flushed and drained (its blocks on the slab); the data. */
async function drainedVolume(d: Daemon, name: string): Promise<Buffer> {
  await createVolume(d, name, 16);
  const c = await connect(d, name);
  const data = await writeRandom(c, 0, 4 * CHUNK);
  await c.flush();
  await c.disconnect();
  await drain(d, name);
  return data;
}

/** 4 KiB reads at `first` then at `second`, sent back to back on `c`: the order they were answered in, and their bytes. */
async function readPair(c: NbdClient, first: number, second: number): Promise<{ answered: string[]; bytes: Buffer[] }> {
  const answered: string[] = [];
  const bytes = await Promise.all([
    c.read(first, 4096).then((b) => (answered.push('first'), b)),
    c.read(second, 4096).then((b) => (answered.push('second'), b)),
  ]);
  return { answered, bytes };
}

/** Every file under the store's packs/ folder. */
function packFiles(storeDir: string): string[] {
  const root = path.join(storeDir, 'packs');
  if (!fs.existsSync(root)) return [];
  const out: string[] = [];
  for (const prefix of fs.readdirSync(root)) {
    for (const name of fs.readdirSync(path.join(root, prefix))) {
      if (/^[0-9a-f]{32}$/.test(name)) out.push(path.join(root, prefix, name));
    }
  }
  return out;
}

test('demand mode: 256 MiB written, read back and deleted on one host makes zero PUTs to the store', { timeout: TIMEOUT }, async () => {
  const cluster = await startCluster(fileStore);
  try {
    const a = await cluster.start('host-a', { volumes: { seal_idle_ms: 100 } });
    await withLogs([a], async () => {
      await createVolume(a, 'quiet', 512);
      const putsBefore = await storeRequests(a, 'put');
      const c = await connect(a, 'quiet');
      const data = await writeRandom(c, 0, 256 * MiB);
      await c.flush();
      // Let it seal (idle) so the blocks exist, then read everything back.
      await waitFor('sealing', async () => (await exportInfo(a, 'quiet')).dirty_bytes === 0, 30_000);
      assert.ok((await readAll(c, 0, 256 * MiB)).equals(data));
      await c.disconnect();
      const r = await a.api('DELETE', '/api/exports/quiet');
      assert.equal(r.status, 200, r.text);
      assert.equal((await storeRequests(a, 'put')) - putsBefore, 0, 'a demand-mode volume made PUTs');
      assert.equal(packFiles(path.join(cluster.dir, 'store')).length, 0);
    });
  } finally {
    await cluster.cleanup();
  }
});

test('continuous mode: the store catches up after writes stop; after SIGKILL another host reads it all', { timeout: TIMEOUT }, async () => {
  const cluster = await startCluster(fileStore);
  try {
    const intervals = { continuous_block_interval_ms: 500, continuous_manifest_interval_ms: 2000 };
    const a = await cluster.start('host-a', { volumes: intervals, host: { lease_ttl_s: 3, clock_skew_margin_s: 0.5 } });
    const b = await cluster.start('host-b');
    await withLogs([a, b], async () => {
      await createVolume(a, 'steady', 64, { flush_mode: 'continuous' });
      const c = await connect(a, 'steady');
      const first = await writeRandom(c, 0, 16 * MiB);
      const started = Date.now();
      await waitFor('the manifest to reach the last write', async () => {
        const info = await exportInfo(a, 'steady');
        return info.manifest_sequence === info.sequence;
      }, 15_000);
      const caughtUpMs = Date.now() - started;
      assert.ok(caughtUpMs < 10_000, `took ${caughtUpMs} ms`);
      // Switch to demand at run time: later writes stay local.
      const switched = await a.api('POST', '/api/exports/steady/flush-mode', { flush_mode: 'demand' });
      assert.equal(switched.status, 200, switched.text);
      assert.equal(switched.json.flush_mode, 'demand');
      const puts = await storeRequests(a, 'put');
      await c.write(32 * MiB, Buffer.alloc(CHUNK, 3));
      await new Promise((r) => setTimeout(r, 1500));
      assert.equal((await storeRequests(a, 'put')) - puts <= 1, true, 'demand mode uploaded (beyond a lease renewal)');
      await a.kill9();
      const cb = await connect(b, 'steady');
      assert.ok((await readAll(cb, 0, 16 * MiB)).equals(first), 'data flushed continuously is not all in the store');
      await cb.disconnect();
    });
  } finally {
    await cluster.cleanup();
  }
});

test('dedup: two volumes with the same 256 MiB drain to about one copy; a third host fetches each pack once', { timeout: TIMEOUT }, async () => {
  const cluster = await startCluster(fileStore);
  try {
    const a = await cluster.start('host-a');
    await withLogs([a], async () => {
      await createVolume(a, 'twin-1', 512);
      await createVolume(a, 'twin-2', 512);
      const data = randomBytes(256 * MiB);
      for (const name of ['twin-1', 'twin-2']) {
        const c = await connect(a, name);
        for (let at = 0; at < data.length; at += 4 * MiB) await c.write(at, data.subarray(at, at + 4 * MiB));
        await c.flush();
        await c.disconnect();
      }
      const d1 = await drain(a, 'twin-1');
      const d2 = await drain(a, 'twin-2');
      assert.equal(d2.packs_uploaded, 0, 'the second volume uploaded blocks the first already had');
      const packs = packFiles(path.join(cluster.dir, 'store'));
      const stored = packs.reduce((sum, f) => sum + fs.statSync(f).size, 0);
      assert.equal(packs.length, d1.packs_uploaded);
      assert.ok(stored < 256 * MiB * 1.05, `store holds ${stored} bytes for 256 MiB of unique data`);
      assert.ok(stored > 256 * MiB * 0.95, `store holds only ${stored} bytes (random data does not compress)`);
      const c3 = await cluster.start('host-c');
      const packGets = await storeRequests(c3, 'get');
      for (const name of ['twin-1', 'twin-2']) {
        const c = await connect(c3, name);
        assert.ok((await readAll(c, 0, 256 * MiB, 4 * MiB)).equals(data), `${name} differs on host C`);
        await c.disconnect();
      }
      const fetched = await metric(c3, 'updraft_store_packs_fetched_total');
      assert.equal(fetched, packs.length, `host C fetched ${fetched} packs; the store has ${packs.length}`);
      // GETs: the packs once each, plus the manifest, the lease and the boot hot set of each volume.
      const gets = (await storeRequests(c3, 'get')) - packGets;
      assert.ok(gets <= packs.length + 6, `host C made ${gets} GETs for ${packs.length} packs`);
    });
  } finally {
    await cluster.cleanup();
  }
});

test('faults: drain under errors, latency and lost replies succeeds or reports an error; the manifest never names a missing pack', { timeout: TIMEOUT }, async () => {
  const cluster = await startCluster(fileStore);
  try {
    const faults = 'seed=11,error=0.15,server_error=0.05,latency=3,jitter=3,lost_put=0.15,truncate=0.1';
    const a = await cluster.start('host-a', {}, { UPDRAFT_STORE_FAULTS: faults });
    const b = await cluster.start('host-b', {}, { UPDRAFT_STORE_FAULTS: 'seed=5,error=0.1,truncate=0.2,latency=2' });
    await withLogs([a, b], async () => {
      await createVolume(a, 'shaky', 64);
      const c = await connect(a, 'shaky');
      const data = await writeRandom(c, 0, 32 * MiB);
      await c.disconnect();
      let ok = false;
      let failures = 0;
      for (let attempt = 0; attempt < 10 && !ok; attempt++) {
        const r = await a.api('POST', '/api/exports/shaky/drain');
        if (r.status === 200) ok = true;
        else {
          failures++;
          assert.ok(r.status >= 500 && r.status < 600 || r.status === 409, `drain failed with ${r.status}: ${r.text}`);
          assert.equal(typeof r.json.error, 'string');
        }
      }
      assert.ok(ok, `drain never succeeded (${failures} failures)`);
      assert.ok((await storeRequests(a)) > 0);
      // Invariant 2, read straight from the store: every pack the manifest names is there, whole.
      const storeDir = path.join(cluster.dir, 'store');
      const manifest = decodeManifest('volumes/shaky/manifest', fs.readFileSync(path.join(storeDir, 'volumes', 'shaky', 'manifest')), PLAINTEXT);
      assert.ok(manifest.blocks.length >= 256, `the manifest names ${manifest.blocks.length} blocks`);
      for (const pack of new Set(manifest.blocks.map((b) => b.pack))) {
        const file = path.join(storeDir, packKey(pack));
        assert.ok(fs.existsSync(file), `the manifest names pack ${packKey(pack)}, which is not in the store`);
        verifyPackId(packKey(pack), fs.readFileSync(file));
      }
      // Invariant 2, checked from the outside: B reads every byte through truncated bodies and errors.
      const cb = await connect(b, 'shaky');
      assert.ok((await readAll(cb, 0, 32 * MiB)).equals(data));
      await cb.disconnect();
      assert.ok((await metric(b, 'updraft_store_verify_failures_total')) > 0, 'truncated pack bodies were not detected');
    });
  } finally {
    await cluster.cleanup();
  }
});

test('a cached block whose bytes changed on disk while the daemon was down is fetched from the store again, never served', { timeout: TIMEOUT }, async () => {
  const cluster = await startCluster(fileStore);
  try {
    // No background scrub: the first read after the restart must be what finds it.
    const a = await cluster.start('host-a', { cache: { scrub_blocks_per_second: 0 } });
    await withLogs([a], async () => {
      const data = await drainedVolume(a, 'rotting');
      await a.restart(); // the slot table is on disk now; the blocks are in the store
      // A crash can leave a slot's table entry on disk without its bytes (or a reused
      // slot's entry over another block's bytes): here, the bytes of chunk 2's block change.
      const cacheDir = path.join(a.dir, 'cache', 'blocks');
      const table = fs.readFileSync(path.join(cacheDir, 'blocks.slots'));
      const name = blockHash(data.subarray(2 * CHUNK, 3 * CHUNK));
      let slot = -1;
      for (let at = 32; at + 32 <= table.length; at += 32) if (table.subarray(at, at + 16).equals(name)) slot = at / 32 - 1;
      assert.ok(slot >= 0, 'the block of chunk 2 is in the slot table');
      const slab = fs.openSync(path.join(cacheDir, 'blocks.slab'), 'r+');
      fs.writeSync(slab, randomBytes(4096), 0, 4096, slot * CHUNK + 8192);
      fs.closeSync(slab);
      await a.restart();
      const gets = await storeRequests(a, 'get');
      const c2 = await connect(a, 'rotting');
      assert.ok((await readAll(c2, 0, 4 * CHUNK)).equals(data), 'the volume read back other bytes than were written');
      await c2.disconnect();
      assert.equal(await metric(a, 'updraft_cache_verify_evictions_total'), 1);
      assert.ok((await storeRequests(a, 'get')) > gets, 'the block was not fetched from the store again');
      assert.match(a.log(), /does not match its name; dropped/);
    });
  } finally {
    await cluster.cleanup();
  }
});

test('after a restart, the first read of a cached block checks it off the event loop: a read behind it on the same connection is answered first', { timeout: TIMEOUT }, async () => {
  const cluster = await startCluster(fileStore);
  try {
    // No background scrub: the first read after the restart must be what checks the block.
    const a = await cluster.start('host-a', { cache: { scrub_blocks_per_second: 0 } });
    await withLogs([a], async () => {
      const data = await drainedVolume(a, 'waking');
      await a.restart(); // the blocks are slots loaded from the table, not yet checked
      const gets = await storeRequests(a, 'get');
      const c2 = await connect(a, 'waking');
      const later = randomBytes(4096);
      await c2.write(8 * CHUNK, later); // in the overlay: read without touching the slab
      // Checked on the event loop, the slab read would hold the connection's next request
      // (and every other volume's) until the device answered; checked through the thread
      // pool, the overlay read behind it is served meanwhile.
      const { answered, bytes: [fromSlab, fromOverlay] } = await readPair(c2, 2 * CHUNK, 8 * CHUNK);
      assert.deepEqual(answered, ['second', 'first'], 'the read of the unchecked block was not deferred');
      assert.ok(fromSlab.equals(data.subarray(2 * CHUNK, 2 * CHUNK + 4096)), 'the checked block read back other bytes than were written');
      assert.ok(fromOverlay.equals(later));
      assert.ok((await readAll(c2, 0, 4 * CHUNK)).equals(data), 'the other blocks read back other bytes than were written');
      await c2.disconnect();
      assert.equal(await storeRequests(a, 'get'), gets, 'a block that was intact on the slab was fetched from the store');
      assert.equal(await metric(a, 'updraft_cache_verify_evictions_total'), 0);
      assert.ok((await metric(a, 'updraft_cache_hits_total', { tier: 'disk' })) >= 4, 'the reads were not served from the slab');
    });
  } finally {
    await cluster.cleanup();
  }
});

test('a cached block whose bytes the page cache dropped is read through the thread pool: a read behind it on the same connection is answered first', { timeout: TIMEOUT }, async (t) => {
  if (!requireTools(t, [TOOLS.dd, TOOLS.fincore])) return;
  const cluster = await startCluster(fileStore);
  try {
    // No memory tier: the blocks are read from the slab only.
    const a = await cluster.start('host-a', { cache: { scrub_blocks_per_second: 0, memory_size_gb: 0 } });
    await withLogs([a], async () => {
      const data = await drainedVolume(a, 'evicted');
      const c = await connect(a, 'evicted');
      // Sealed and drained: the blocks are in the slab, and read once they are checked.
      assert.ok((await readAll(c, 0, 4 * CHUNK)).equals(data));
      const later = randomBytes(4096);
      await c.write(8 * CHUNK, later);
      // The host drops the slab's pages, as it does under memory pressure.
      const slab = path.join(a.dir, 'cache', 'blocks', 'blocks.slab');
      await runOk(TOOLS.dd.cmd, [`if=${slab}`, 'iflag=nocache', 'count=0', 'status=none'], { timeoutMs: 30_000 });
      const resident = (await runOk(TOOLS.fincore.cmd, ['--bytes', '--noheadings', '--output', 'RES', slab], { timeoutMs: 30_000 })).stdout.trim();
      if (resident !== '0') return t.skip(`the filesystem kept ${resident} bytes of the slab in the page cache (tmpfs keeps them all)`);
      const { answered, bytes: [fromSlab, fromOverlay] } = await readPair(c, CHUNK, 8 * CHUNK);
      assert.deepEqual(answered, ['second', 'first'], 'the read that had to wait for the device held the one behind it');
      assert.ok(fromSlab.equals(data.subarray(CHUNK, CHUNK + 4096)), 'the block read through the thread pool read back other bytes than were written');
      assert.ok(fromOverlay.equals(later));
      assert.ok((await readAll(c, 0, 4 * CHUNK)).equals(data), 'the volume read back other bytes than were written');
      await c.disconnect();
    });
  } finally {
    await cluster.cleanup();
  }
});

test('overlay sectors whose bytes the page cache dropped are read through the thread pool: a read behind them on the same connection is answered first', { timeout: TIMEOUT }, async (t) => {
  if (!requireTools(t, [TOOLS.dd, TOOLS.fincore])) return;
  const cluster = await startCluster(fileStore);
  try {
    // No idle seal: the written chunks stay in the overlay.
    const a = await cluster.start('host-a', { volumes: { seal_idle_ms: 3_600_000 } });
    await withLogs([a], async () => {
      await createVolume(a, 'unsealed', 16);
      const c = await connect(a, 'unsealed');
      const data = await writeRandom(c, 0, 4 * CHUNK);
      await c.flush();
      // Written back (a FLUSH may log the writes instead of syncing the overlay), then
      // dropped by the host, as it does under memory pressure.
      const overlay = path.join(a.dir, 'cache', 'volumes', 'unsealed', '@', 'overlay');
      const fd = fs.openSync(overlay, 'r');
      try {
        fs.fsyncSync(fd);
      } finally {
        fs.closeSync(fd);
      }
      await runOk(TOOLS.dd.cmd, [`if=${overlay}`, 'iflag=nocache', 'count=0', 'status=none'], { timeoutMs: 30_000 });
      const resident = (await runOk(TOOLS.fincore.cmd, ['--bytes', '--noheadings', '--output', 'RES', overlay], { timeoutMs: 30_000 })).stdout.trim();
      if (resident !== '0') return t.skip(`the filesystem kept ${resident} bytes of the overlay in the page cache (tmpfs keeps them all)`);
      // The second read is of a chunk never written: zeros, with no pread at all.
      const { answered, bytes: [fromOverlay, fromHole] } = await readPair(c, CHUNK, 12 * CHUNK);
      assert.deepEqual(answered, ['second', 'first'], 'the overlay read that had to wait for the device held the one behind it');
      assert.ok(fromOverlay.equals(data.subarray(CHUNK, CHUNK + 4096)), 'the sectors read through the thread pool read back other bytes than were written');
      assert.ok(fromHole.equals(Buffer.alloc(4096)));
      assert.ok((await readAll(c, 0, 4 * CHUNK)).equals(data), 'the volume read back other bytes than were written');
      assert.equal((await exportInfo(a, 'unsealed')).dirty_bytes > 0, true, 'the volume was sealed: its reads did not come from the overlay');
      await c.disconnect();
    });
  } finally {
    await cluster.cleanup();
  }
});

test('a corrupted pack is EIO on read (named in the log); the volume keeps serving its other chunks', { timeout: TIMEOUT }, async () => {
  const cluster = await startCluster(fileStore);
  try {
    const a = await cluster.start('host-a', { servers: { nbd: { blocks_per_pack: 4 } } });
    const b = await cluster.start('host-b', { servers: { nbd: { blocks_per_pack: 4 } } });
    await withLogs([a, b], async () => {
      await createVolume(a, 'rot', 64);
      const c = await connect(a, 'rot');
      const data = await writeRandom(c, 0, 4 * MiB); // 32 chunks: 8 packs of 4
      await c.disconnect();
      await drain(a, 'rot');
      const packs = packFiles(path.join(cluster.dir, 'store'));
      assert.equal(packs.length, 8);
      // Flip one byte in the middle of every pack but... just one of them.
      const victim = packs[0];
      const body = fs.readFileSync(victim);
      body[body.length - 100] ^= 0xff;
      fs.writeFileSync(victim, body);
      const cb = await connect(b, 'rot');
      let eio = 0;
      let good = 0;
      for (let chunk = 0; chunk < 32; chunk++) {
        try {
          const got = await cb.read(chunk * CHUNK, CHUNK);
          assert.ok(got.equals(data.subarray(chunk * CHUNK, (chunk + 1) * CHUNK)), `chunk ${chunk} read wrong data`);
          good++;
        } catch (err) {
          assert.ok(err instanceof NbdCommandError && err.code === 'EIO', String(err));
          eio++;
        }
      }
      assert.equal(eio, 4, 'the 4 chunks of the corrupted pack should fail');
      assert.equal(good, 28);
      assert.match(b.log(), new RegExp(`packs/${path.basename(path.dirname(victim))}/${path.basename(victim)}`));
      await cb.disconnect();
    });
  } finally {
    await cluster.cleanup();
  }
});

test('bad objects in the store: a malformed manifest or lease gives a clear error naming the key', { timeout: TIMEOUT }, async () => {
  const cluster = await startCluster(fileStore);
  try {
    const storeDir = path.join(cluster.dir, 'store');
    fs.mkdirSync(path.join(storeDir, 'volumes', 'junk'), { recursive: true });
    fs.writeFileSync(path.join(storeDir, 'volumes', 'junk', 'manifest'), 'this is not a manifest');
    const a = await cluster.start('host-a');
    await withLogs([a], async () => {
      const r = await a.api('PUT', '/api/exports/junk', { size_gb: 0.0625 });
      assert.equal(r.status, 502, r.text);
      assert.match(r.json.error, /volumes\/junk\/manifest/);
      // Over NBD the export is refused, and the daemon keeps serving.
      await assert.rejects(connect(a, 'junk'));
      assert.equal((await a.api('GET', '/healthz')).status, 200);
      // A good volume whose lease object is garbage.
      await createVolume(a, 'leasy', 64);
      const c = await connect(a, 'leasy');
      await c.write(0, Buffer.alloc(CHUNK, 1));
      await c.disconnect();
      await drain(a, 'leasy');
      fs.writeFileSync(path.join(storeDir, 'volumes', 'leasy', 'lease'), '{"format":1,"owner":42}');
      const b = await cluster.start('host-b');
      const woke = await b.api('PUT', '/api/exports/leasy', { size_gb: 0.0625 });
      assert.equal(woke.status, 502, woke.text);
      assert.match(woke.json.error, /volumes\/leasy\/lease/);
    });
  } finally {
    await cluster.cleanup();
  }
});

test('a wrong storage URL or an unreachable endpoint fails start-up with a clear message', { timeout: TIMEOUT }, async () => {
  await assert.rejects(
    startDaemon({ toml: { storage: { url: 's3://no-such-bucket-here/x' }, aws: { endpoint: 'http://127.0.0.1:1', allow_http: true, force_path_style: true, access_key_id: 'k', secret_access_key: 's' } } }),
    (err: Error) => /unreachable|127\.0\.0\.1:1|ECONNREFUSED/.test(err.message),
  );
  // A store folder that cannot be created: its parent is a file.
  const dir = await scratchDir('updraft-badstore-');
  try {
    fs.writeFileSync(path.join(dir, 'a-file'), 'x');
    const url = `file://${path.join(dir, 'a-file', 'store')}`;
    await assert.rejects(startDaemon({ toml: { storage: { url } } }), (err: Error) => err.message.includes(`cannot create folder ${path.join(dir, 'a-file', 'store')}`));
  } finally {
    await removeDir(dir);
  }
});

test('DELETE refuses while a client is attached, then ?force=true disconnects it; the store keeps the drained data', { timeout: TIMEOUT }, async () => {
  const cluster = await startCluster(fileStore);
  try {
    const a = await cluster.start('host-a');
    await withLogs([a], async () => {
      await createVolume(a, 'gone/soon', 64);
      const c = await connect(a, 'gone/soon');
      const data = await writeRandom(c, 0, 2 * MiB);
      await drain(a, 'gone/soon');
      const refused = await a.api('DELETE', '/api/exports/gone%2Fsoon');
      assert.equal(refused.status, 409, refused.text);
      const forced = await a.api('DELETE', '/api/exports/gone%2Fsoon?force=true');
      assert.equal(forced.status, 200, forced.text);
      assert.equal(forced.json.disconnected, 1);
      await assert.rejects(c.read(0, 4096));
      assert.equal((await a.api('GET', '/api/exports/gone%2Fsoon')).status, 404);
      // Asked again, the host wakes it from the store, writable (the lease was released).
      const again = await connect(a, 'gone/soon');
      assert.ok((await readAll(again, 0, 2 * MiB)).equals(data));
      await again.write(0, Buffer.alloc(4096, 5));
      await again.disconnect();
      const bad = await a.api('DELETE', '/api/exports/gone%2Fsoon?force=maybe');
      assert.equal(bad.status, 400, bad.text);
    });
  } finally {
    await cluster.cleanup();
  }
});

test('the dirty budget uploads the oldest changed chunks in demand mode, without a manifest, until half the budget is left', { timeout: TIMEOUT }, async () => {
  const cluster = await startCluster(fileStore);
  try {
    const a = await cluster.start('host-a');
    await withLogs([a], async () => {
      const budget = 16 * MiB; // 128 chunks; an upload leaves the newest 64 dirty
      const created = await createVolume(a, 'budgeted', 128, { dirty_budget_gb: budget / 1024 ** 3 });
      assert.equal(created.dirty_budget_gb, budget / 1024 ** 3);
      const c = await connect(a, 'budgeted');
      const written = 48 * MiB; // 384 chunks, written in order: chunk 0 is the oldest change
      const data = await writeRandom(c, 0, written);
      await c.flush();
      await c.disconnect();
      const storeDir = path.join(cluster.dir, 'store');
      await waitFor('the dirty budget to be met', async () => (await exportInfo(a, 'budgeted')).store_dirty_bytes <= budget, 20_000);
      const info = await exportInfo(a, 'budgeted');
      assert.ok(info.store_dirty_bytes >= budget / 2, `the budget uploaded more than it had to: ${info.store_dirty_bytes} bytes left dirty`);
      assert.equal(info.manifest_sequence, -1, 'the budget wrote a manifest');
      assert.ok(!fs.existsSync(path.join(storeDir, 'volumes', 'budgeted', 'manifest')));
      assert.match(a.log(), /dirty budget exceeded: uploaded the oldest changed chunks/);
      // Which chunks went up: the block names in every pack's index.
      const uploaded = new Set<string>();
      for (const file of packFiles(storeDir)) {
        for (const entry of decodePackIndex(file, fs.readFileSync(file), PLAINTEXT)) uploaded.add(entry.hash.toString('hex'));
      }
      const isUp = (chunk: number) => uploaded.has(blockHash(data.subarray(chunk * CHUNK, (chunk + 1) * CHUNK)).toString('hex'));
      const chunks = written / CHUNK;
      const keep = budget / 2 / CHUNK;
      // At most the budget is left dirty, and it is the newest changes: the oldest went first.
      const missing = Array.from({ length: chunks - budget / CHUNK }, (_, i) => i).filter((chunk) => !isUp(chunk));
      assert.deepEqual(missing, [], 'old changes were left behind');
      const newest = Array.from({ length: keep }, (_, i) => chunks - keep + i).filter(isUp);
      assert.deepEqual(newest, [], 'the newest changes were uploaded before older ones');
    });
  } finally {
    await cluster.cleanup();
  }
});

test('fencing: a holder whose lease was taken over cannot write the manifest again and turns read-only', { timeout: TIMEOUT }, async () => {
  const cluster = await startCluster(fileStore);
  try {
    const a = await cluster.start('host-a');
    const b = await cluster.start('host-b');
    await withLogs([a, b], async () => {
      await createVolume(a, 'split', 64);
      const c = await connect(a, 'split');
      await c.write(0, Buffer.alloc(CHUNK, 1));
      await drain(a, 'split');
      // A is cut off from the store and its lease runs out: simulate the expiry in the store
      // (expiry counts from the store's stamp of the lease: make it a minute old, twice the TTL).
      const leaseFile = path.join(cluster.dir, 'store', 'volumes', 'split', 'lease');
      const lease = JSON.parse(fs.readFileSync(leaseFile, 'utf8'));
      const stamped = new Date(Date.now() - 60_000);
      fs.utimesSync(leaseFile, stamped, stamped);
      const cb = await connect(b, 'split');
      const promoted = await b.api('POST', '/api/exports/split/promote');
      assert.equal(promoted.status, 200, promoted.text);
      assert.equal(promoted.json.generation, lease.generation + 1);
      await cb.write(CHUNK, Buffer.alloc(CHUNK, 2));
      await drain(b, 'split');
      // A still believes it holds the lease: its next manifest write is refused and it stops writing.
      await c.write(0, Buffer.alloc(CHUNK, 3));
      const stale = await a.api('POST', '/api/exports/split/drain');
      assert.equal(stale.status, 409, stale.text);
      assert.match(stale.json.error, /another host/);
      await assert.rejects(c.write(0, Buffer.alloc(4096)), (err: unknown) => err instanceof NbdCommandError && err.code === 'EPERM');
      assert.equal((await exportInfo(a, 'split')).read_only, true);
      // The store has B's data, not A's late write.
      const d = await cluster.start('host-d');
      const cd = await connect(d, 'split');
      assert.ok((await cd.read(0, CHUNK)).equals(Buffer.alloc(CHUNK, 1)));
      assert.ok((await cd.read(CHUNK, CHUNK)).equals(Buffer.alloc(CHUNK, 2)));
      await cd.disconnect();
      await cb.disconnect();
      c.close();
    });
  } finally {
    await cluster.cleanup();
  }
});

test('the store API validates paths and bodies: 404 for unknown exports, 400 for bad bodies', { timeout: TIMEOUT }, async () => {
  const cluster = await startCluster(fileStore);
  try {
    const a = await cluster.start('host-a');
    await withLogs([a], async () => {
      for (const action of ['drain', 'promote', 'release', 'flush-mode']) {
        const r = await a.api('POST', `/api/exports/nope/${action}`, action === 'flush-mode' ? { flush_mode: 'demand' } : undefined);
        assert.equal(r.status, 404, `${action}: ${r.text}`);
      }
      await createVolume(a, 'valid', 64);
      for (const body of [{}, { flush_mode: 'sometimes' }, { flush_mode: 'demand', extra: 1 }, { flush_mode: 'continuous', dirty_budget_gb: -1 }]) {
        const r = await a.api('POST', '/api/exports/valid/flush-mode', body);
        assert.equal(r.status, 400, `${JSON.stringify(body)}: ${r.text}`);
        assert.match(r.json.error, /body/);
      }
      const bad = await a.api('PUT', '/api/exports/valid2', { size_gb: 1, flush_mode: 'never' });
      assert.equal(bad.status, 400, bad.text);
      const badName = await a.api('POST', '/api/exports/..%2Fetc/drain');
      assert.equal(badName.status, 400, badName.text);
      // A name whose keys would collide with another volume's lease or manifest.
      for (const name of ['valid%2Flease', 'valid%2Fmanifest', 'x%2Fcheckpoints%2Fy']) {
        const r = await a.api('PUT', `/api/exports/${name}`, { size_gb: 0.0625 });
        assert.equal(r.status, 400, `${name}: ${r.text}`);
        assert.match(r.json.error, /reserved/);
      }
      assert.equal((await a.api('PUT', '/api/exports/lease%2Fok', { size_gb: 0.0625 })).status, 201);
    });
  } finally {
    await cluster.cleanup();
  }
});
