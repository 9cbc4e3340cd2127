// Forks and checkpoints through the real daemon: a consistent fork under a running writer
// equals the source at the returned sequence; source and fork diverge independently;
// forks of forks, across hosts, after the source is deleted; checkpoints served
// read-only as VOLUME@CHECKPOINT; bad requests.
import assert from 'node:assert/strict';
import { randomBytes, randomInt } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import {
  connect, createVolume, drain, exportInfo, fileStore, metric, MiB, readAll, startCluster, storeRequests, waitFor, withLogs, writeRandom,
} from './harness/cluster.js';
import { NbdCommandError } from './harness/nbd-client.js';

const TIMEOUT = 180_000;
const SIZE = 64 * MiB;
const PIECE = 64 * 1024;

function apply(model: Buffer, log: Array<[number, Buffer]>, count: number): Buffer {
  const out = Buffer.from(model);
  for (let i = 0; i < count; i++) log[i][1].copy(out, log[i][0]);
  return out;
}

test('a consistent fork under a running writer equals the source at the returned sequence; both diverge independently', { timeout: TIMEOUT }, async () => {
  const cluster = await startCluster(fileStore);
  try {
    const a = await cluster.start('host-a');
    const b = await cluster.start('host-b');
    await withLogs([a, b], async () => {
      await createVolume(a, 'src', SIZE / MiB);
      const c = await connect(a, 'src');
      const base = Buffer.alloc(SIZE);
      (await writeRandom(c, 0, 16 * MiB)).copy(base, 0);
      await c.flush();
      const baseSequence = (await exportInfo(a, 'src')).sequence;
      // One writer, one request at a time: write k moves the sequence to baseSequence + k.
      const log: Array<[number, Buffer]> = [];
      let forkDone = false;
      let after = 0;
      const writer = (async () => {
        while (!forkDone || after < 20) {
          const offset = randomInt(0, SIZE / PIECE) * PIECE;
          const data = randomBytes(PIECE);
          await c.write(offset, data);
          log.push([offset, data]);
          if (forkDone) after++;
        }
      })();
      while (log.length < 50) await new Promise((r) => setTimeout(r, 5));
      const r = await a.api('POST', '/api/exports/src/fork', { target: 'src-fork', mode: 'consistent' });
      forkDone = true;
      await writer;
      assert.equal(r.status, 201, r.text);
      const k = r.json.sequence - baseSequence;
      assert.ok(k >= 50 && k <= log.length, `fork at sequence ${r.json.sequence}: ${k} of ${log.length} writes`);
      const cf = await connect(a, 'src-fork');
      const forked = await readAll(cf, 0, SIZE);
      assert.ok(forked.equals(apply(base, log, k)), `the fork is not the source after exactly ${k} writes`);
      const sourceNow = apply(base, log, log.length);
      assert.ok((await readAll(c, 0, SIZE)).equals(sourceNow), 'the source lost writes');
      // Independent: a write on either side does not show on the other.
      await cf.write(0, Buffer.alloc(PIECE, 0xaa));
      await c.write(PIECE, Buffer.alloc(PIECE, 0xbb));
      assert.ok((await c.read(0, PIECE)).equals(sourceNow.subarray(0, PIECE)));
      assert.ok((await cf.read(PIECE, PIECE)).equals(forked.subarray(PIECE, 2 * PIECE)));
      // Fork of the fork, then the source is deleted: both forks stay whole.
      const ff = await a.api('POST', '/api/exports/src-fork/fork', { target: 'src-fork-2' });
      assert.equal(ff.status, 201, ff.text);
      await c.disconnect();
      assert.equal((await a.api('DELETE', '/api/exports/src?force=true')).status, 200);
      const cff = await connect(a, 'src-fork-2');
      const expectedFork = Buffer.from(forked);
      Buffer.alloc(PIECE, 0xaa).copy(expectedFork, 0);
      assert.ok((await readAll(cff, 0, SIZE)).equals(expectedFork), 'the fork of the fork differs');
      await cff.disconnect();
      // Another host wakes the first fork from the store as it was forked.
      const cb = await connect(b, 'src-fork');
      assert.ok((await readAll(cb, 0, SIZE)).equals(forked) || (await exportInfo(b, 'src-fork')).read_only, 'host B sees another fork');
      assert.ok((await readAll(cb, 0, SIZE)).equals(forked), 'host B reads the fork differently');
      await cb.disconnect();
      await cf.disconnect();
    });
  } finally {
    await cluster.cleanup();
  }
});

test('lazy fork copies the last manifest without the source host; checkpoints are immutable, listed, served read-only and forkable', { timeout: TIMEOUT }, async () => {
  const cluster = await startCluster(fileStore);
  try {
    const a = await cluster.start('host-a');
    const b = await cluster.start('host-b');
    await withLogs([a, b], async () => {
      await createVolume(a, 'base', SIZE / MiB);
      const c = await connect(a, 'base');
      const v1 = await writeRandom(c, 0, 8 * MiB);
      const drained = await drain(a, 'base');
      const cp = await a.api('POST', '/api/exports/base/checkpoints', { name: 'golden' });
      assert.equal(cp.status, 200, cp.text);
      assert.equal(cp.json.sequence, drained.sequence);
      const again = await a.api('POST', '/api/exports/base/checkpoints', { name: 'golden' });
      assert.equal(again.status, 409, again.text);
      await c.write(0, Buffer.alloc(MiB, 0x11)); // after the drain and the checkpoint
      // Host B forks lazily from the store: it sees the drained state, not the later write.
      const lazy = await b.api('POST', '/api/exports/base/fork', { target: 'base-lazy', mode: 'lazy' });
      assert.equal(lazy.status, 201, lazy.text);
      assert.equal(lazy.json.sequence, drained.sequence);
      const cl = await connect(b, 'base-lazy');
      assert.ok((await readAll(cl, 0, 8 * MiB)).equals(v1));
      await cl.write(0, Buffer.alloc(4096, 1)); // writable: a new, unleased volume
      await cl.disconnect();
      // The checkpoint: listed, served read-only, forked.
      const list = await a.api('GET', '/api/exports/base/checkpoints');
      assert.deepEqual(list.json.map((x: { name: string }) => x.name), ['golden']);
      const ccp = await connect(b, 'base@golden');
      assert.ok((await readAll(ccp, 0, 8 * MiB)).equals(v1));
      await assert.rejects(ccp.write(0, Buffer.alloc(4096)), (err: unknown) => err instanceof NbdCommandError && err.code === 'EPERM');
      await ccp.disconnect();
      const fromCp = await b.api('POST', '/api/exports/base/fork', { target: 'from-golden', checkpoint: 'golden' });
      assert.equal(fromCp.status, 201, fromCp.text);
      const cg = await connect(b, 'from-golden');
      assert.ok((await readAll(cg, 0, 8 * MiB)).equals(v1));
      await cg.disconnect();
      const del = await a.api('DELETE', '/api/exports/base/checkpoints/golden');
      assert.equal(del.status, 200, del.text);
      assert.equal((await a.api('DELETE', '/api/exports/base/checkpoints/golden')).status, 404);
      assert.deepEqual((await a.api('GET', '/api/exports/base/checkpoints')).json, []);

      // A lazy fork on the source's own host copies the manifest body that host holds (no
      // decode) and shares its block map page; it too is the drained state, not the later
      // write, and it survives a kill -9 with its own write.
      const local = await a.api('POST', '/api/exports/base/fork', { target: 'base-local', mode: 'lazy' });
      assert.equal(local.status, 201, local.text);
      assert.equal(local.json.sequence, drained.sequence);
      const shared = (await a.api('GET', '/api/exports/base-local/metrics')).json;
      assert.deepEqual([shared.map_pages, shared.map_pages_shared], [1, 1], 'the local lazy fork did not share the held block map');
      const cloc = await connect(a, 'base-local');
      assert.ok((await readAll(cloc, 0, 8 * MiB)).equals(v1));
      // Its manifest (the held tables' compressed frame under the fork's meta) wakes elsewhere.
      const cbl = await connect(b, 'base-local');
      assert.ok((await readAll(cbl, 0, 8 * MiB)).equals(v1), 'host B reads the local lazy fork differently');
      await cbl.disconnect();
      await cloc.write(4 * MiB, Buffer.alloc(MiB, 0x22));
      await cloc.flush();
      await cloc.disconnect();
      await c.flush();
      await c.disconnect();
      await a.kill9();
      await a.restart();
      const forkNow = Buffer.from(v1);
      Buffer.alloc(MiB, 0x22).copy(forkNow, 4 * MiB);
      const cloc2 = await connect(a, 'base-local');
      assert.ok((await readAll(cloc2, 0, 8 * MiB)).equals(forkNow), 'the local lazy fork after a restart');
      await cloc2.disconnect();
      const sourceNow = Buffer.from(v1);
      Buffer.alloc(MiB, 0x11).copy(sourceNow, 0);
      const c2 = await connect(a, 'base');
      assert.ok((await readAll(c2, 0, 8 * MiB)).equals(sourceNow), 'the source after a restart');
      await c2.disconnect();
    });
  } finally {
    await cluster.cleanup();
  }
});

test('a lazy fork killed with its folder made but not yet marked as published: the restart removes the folder and the fork wakes from the store', { timeout: TIMEOUT }, async () => {
  // The target's folder is made while its manifest PUT is in flight; until the fork is
  // registered it carries a mark, so a restart never serves (unleased) a volume the store may not have.
  const cluster = await startCluster(fileStore);
  try {
    const a = await cluster.start('host-a', {}, { UPDRAFT_CRASH_AT: 'fork-unmark:1' });
    await withLogs([a], async () => {
      await createVolume(a, 'src', SIZE / MiB);
      const c = await connect(a, 'src');
      const v1 = await writeRandom(c, 0, 4 * MiB);
      await drain(a, 'src');
      await c.disconnect();
      await a.api('POST', '/api/exports/src/fork', { target: 'forked', mode: 'lazy' }).catch(() => undefined);
      await a.exited();
      assert.match(a.log(), /crashing at fork-unmark/);
      await a.restart({});
      assert.match(a.log(), /removing the folder of a fork that stopped before it was registered/);
      const cf = await connect(a, 'forked');
      assert.ok((await readAll(cf, 0, 4 * MiB)).equals(v1), 'the fork woken from the store reads differently');
      const info = await exportInfo(a, 'forked');
      assert.equal(info.read_only, false);
      assert.ok(info.lease_generation >= 1, `the fork woke without its lease: ${JSON.stringify(info)}`);
      await cf.write(0, Buffer.alloc(4096, 7));
      await cf.flush();
      await cf.disconnect();
    });
  } finally {
    await cluster.cleanup();
  }
});

test('fork and checkpoint bad input: an existing target is 409, a missing source 404, bad checkpoint names 400', { timeout: TIMEOUT }, async () => {
  const cluster = await startCluster(fileStore);
  try {
    const a = await cluster.start('host-a');
    await withLogs([a], async () => {
      await createVolume(a, 'one', 64);
      await createVolume(a, 'two', 64);
      const exists = await a.api('POST', '/api/exports/one/fork', { target: 'two' });
      assert.equal(exists.status, 409, exists.text);
      const missing = await a.api('POST', '/api/exports/nope/fork', { target: 'three' });
      assert.equal(missing.status, 404, missing.text);
      const missingLazy = await a.api('POST', '/api/exports/nope/fork', { target: 'three', mode: 'lazy' });
      assert.equal(missingLazy.status, 404, missingLazy.text);
      for (const name of ['a/b', '..', '.', 'x y', '']) {
        const r = await a.api('POST', '/api/exports/one/checkpoints', { name });
        assert.equal(r.status, 400, `${JSON.stringify(name)}: ${r.text}`);
      }
      const badTarget = await a.api('POST', '/api/exports/one/fork', { target: '../x' });
      assert.equal(badTarget.status, 400, badTarget.text);
      const badMode = await a.api('POST', '/api/exports/one/fork', { target: 'x', mode: 'eager' });
      assert.equal(badMode.status, 400, badMode.text);
      assert.equal((await a.api('DELETE', '/api/exports/one/checkpoints/a%20b')).status, 400, 'a checkpoint name with a space');
    });
  } finally {
    await cluster.cleanup();
  }
});

test('boot hot set: the chunks read after attach are recorded; a fork woken on an empty host fetches them up front and boots with fewer on-demand fetches', { timeout: TIMEOUT }, async (t) => {
  const cluster = await startCluster(fileStore);
  try {
    const a = await cluster.start('host-a');
    await withLogs([a], async () => {
      await createVolume(a, 'os', SIZE / MiB);
      const c = await connect(a, 'os');
      const data = await writeRandom(c, 0, 48 * MiB);
      await drain(a, 'os');
      // A "boot": 40 scattered chunks in a shuffled order (no read-ahead), over most packs.
      const chunks = Array.from({ length: 40 }, (_, i) => (i * 9) % 384).sort(() => Math.random() - 0.5);
      const boot = async (client: Awaited<ReturnType<typeof connect>>) => {
        const t0 = performance.now();
        for (const chunk of chunks) {
          const got = await client.read(chunk * 128 * 1024, 128 * 1024);
          assert.ok(got.equals(data.subarray(chunk * 128 * 1024, (chunk + 1) * 128 * 1024)), `chunk ${chunk} differs`);
        }
        return performance.now() - t0;
      };
      // Without a hot set: a fork taken before any recording, booted on an empty host.
      assert.equal((await a.api('POST', '/api/exports/os/fork', { target: 'os-cold', mode: 'lazy' })).status, 201);
      const b = await cluster.start('host-b');
      const cb = await connect(b, 'os-cold');
      const coldMs = await boot(cb);
      const coldDemand = await metric(b, 'updraft_store_demand_packs_total');
      await cb.disconnect();
      // Record the boot on the source (its first read starts the window), then fork it.
      const armed = await a.api('POST', '/api/exports/os/boot-record', { seconds: 1 });
      assert.equal(armed.status, 200, armed.text);
      await boot(c);
      const bootset = path.join(cluster.dir, 'store', 'volumes', 'os', 'bootset');
      await waitFor('the boot hot set in the store', async () => fs.existsSync(bootset), 10_000);
      assert.deepEqual(JSON.parse(fs.readFileSync(bootset, 'utf8')).chunks, [...chunks].sort((x, y) => x - y));
      assert.equal((await a.api('POST', '/api/exports/os/fork', { target: 'os-hot', mode: 'lazy' })).status, 201);
      const h = await cluster.start('host-c');
      const ch = await connect(h, 'os-hot');
      await waitFor('the hot set fetch', async () => /fetched the boot hot set/.test(h.log()), 10_000);
      const hotMs = await boot(ch);
      const hotDemand = await metric(h, 'updraft_store_demand_packs_total');
      const hotsetPacks = await metric(h, 'updraft_store_hotset_packs_total');
      await ch.disconnect();
      await c.disconnect();
      t.diagnostic(`boot read of 40 chunks: ${coldMs.toFixed(0)} ms with ${coldDemand} on-demand pack fetches; with the hot set ${hotMs.toFixed(0)} ms, ${hotDemand} on demand (${hotsetPacks} fetched up front)`);
      assert.ok(coldDemand >= 10, `the cold boot fetched only ${coldDemand} packs on demand`);
      assert.ok(hotsetPacks >= 10);
      assert.ok(hotDemand < coldDemand, `hot set: ${hotDemand} on-demand fetches, without: ${coldDemand}`);
      const bad = await a.api('POST', '/api/exports/os/boot-record', { seconds: 0 });
      assert.equal(bad.status, 400, bad.text);
    });
  } finally {
    await cluster.cleanup();
  }
});

/**
 * Writes the manifest of a volume with `chunks` chunks of distinct blocks straight into the
 * store (no data: a fork never reads a block, and 8 GiB of real writes and uploads would
 * take minutes here). Its packs exist as objects, because GC refuses to count a pack that
 * is not in the store, but hold no block: nothing below reads them.
 */
async function writeSyntheticVolume(storeDir: string, name: string, chunks: number): Promise<void> {
  const { manifestKey } = await import('../src/store/manifest.js');
  const { ManifestBuilder } = await import('../src/store/manifest-builder.js');
  const { encodeManifest } = await import('../src/store/manifest-seal.js');
  const { parseCompression } = await import('../src/crypto/compress.js');
  const { openObjectStore } = await import('../src/objectstore/index.js');
  const { PLAINTEXT } = await import('../src/crypto/cipher.js');
  const blockSize = 128 * 1024;
  const builder = new ManifestBuilder({
    format: 1, name, size: 16 * 1024 * MiB, blockSize, sequence: 1, generation: 0, host: 'test', created: new Date().toISOString(),
  });
  const { packKey } = await import('../src/store/pack.js');
  const store = openObjectStore(`file://${storeDir}`, {});
  let pack = '';
  for (let chunk = 0; chunk < chunks; chunk++) {
    if (chunk % 25 === 0) {
      pack = randomBytes(16).toString('hex');
      await store.put(packKey(pack), Buffer.from('synthetic pack: never read\n'));
    }
    builder.setChunk(chunk, randomBytes(16), { pack, offset: 4096 + (chunk % 25) * 70_000, length: 70_000, rawLength: blockSize, codec: 1 });
  }
  await store.put(manifestKey(name), encodeManifest(manifestKey(name), builder.build(), parseCompression('zstd'), PLAINTEXT), { ifNoneMatch: '*' });
}

test('fork work does not grow with written data: a volume with 8 GiB mapped and one with 256 MiB take the same store requests, and one manifest each', { timeout: TIMEOUT }, async (t) => {
  const cluster = await startCluster(fileStore);
  try {
    // Leases renew at a third of their TTL: a renewal inside a fork would count as its PUT.
    const a = await cluster.start('host-a', { host: { lease_ttl_s: 3600 } });
    await withLogs([a], async () => {
      const storeDir = path.join(cluster.dir, 'store');
      const sizes = { small: 2048, big: 65536 }; // 256 MiB and 8 GiB of 128 KiB chunks
      const work: Record<string, Record<string, { requests: number; put: number; get: number; up: number; ms: number }>> = {};
      // The daemon's first manifest write reads the store's clock (a PUT and a HEAD, then
      // good for an hour): made here, outside the counts.
      await createVolume(a, 'first', 8);
      await drain(a, 'first');
      for (const [label, chunks] of Object.entries(sizes)) {
        await writeSyntheticVolume(storeDir, label, chunks);
        // GC learns the new manifest and its packs, as it would have from their uploads.
        const reconciled = await a.api('POST', '/api/gc', { reconcile: true });
        assert.equal(reconciled.status, 200, reconciled.text);
        // Open the source here and give it the same dirty data: 1 MiB of whole chunks.
        const c = await connect(a, label);
        await writeRandom(c, 0, MiB);
        await c.flush();
        work[label] = {};
        for (const mode of ['lazy', 'consistent'] as const) {
          const before = { requests: await storeRequests(a), put: await storeRequests(a, 'put'), get: await storeRequests(a, 'get'), up: await metric(a, 'updraft_store_bytes_total', { direction: 'up' }) };
          const started = performance.now();
          const r = await a.api('POST', `/api/exports/${label}/fork`, { target: `${label}-${mode}`, mode });
          const ms = performance.now() - started;
          assert.equal(r.status, 201, r.text);
          work[label][mode] = {
            requests: (await storeRequests(a)) - before.requests,
            put: (await storeRequests(a, 'put')) - before.put,
            get: (await storeRequests(a, 'get')) - before.get,
            up: (await metric(a, 'updraft_store_bytes_total', { direction: 'up' })) - before.up,
            ms,
          };
          assert.equal((await exportInfo(a, `${label}-${mode}`)).sequence >= 1, true);
        }
        await c.disconnect();
      }
      for (const mode of ['lazy', 'consistent'] as const) {
        const small = work.small[mode];
        const big = work.big[mode];
        t.diagnostic(`${mode} fork: 256 MiB mapped ${small.ms.toFixed(0)} ms, 8 GiB mapped ${big.ms.toFixed(0)} ms (timing is the bench's job; requests and bytes are checked)`);
        // GETs: the source manifest (lazy) and the boot hot set look-ups the wake starts in
        // the background (they may land before or after the count is read): a few, never per block.
        assert.equal(big.put, small.put, `${mode}: PUTs grew with the written data (${small.put} → ${big.put})`);
        assert.ok(big.get <= 4 && small.get <= 4, `${mode}: GETs ${small.get} (256 MiB) and ${big.get} (8 GiB)`);
        assert.ok(big.requests <= small.requests + 2, `${mode}: store requests grew with the written data (${small.requests} → ${big.requests})`);
        // One manifest and, for a consistent fork, the one pack of the dirty MiB: never a block of the 8 GiB.
        assert.ok(big.up < 4 * MiB, `${mode}: the 8 GiB fork sent ${big.up} bytes`);
      }
      // The first (lazy) fork of each wrote only its manifest; the consistent one also the dirty MiB's pack.
      assert.ok(work.small.consistent.up >= MiB / 2, 'the consistent fork did not upload the dirty data');

      // The consistent fork shares its parent's block map pages (1,024 chunks each) until
      // one side writes one: 8 GiB mapped is 64 pages, and a write copies only its page.
      const pages = async (name: string) => {
        const r = await a.api('GET', `/api/exports/${encodeURIComponent(name)}/metrics`);
        assert.equal(r.status, 200, r.text);
        const m = r.json as { map_pages: number; map_pages_shared: number; mapped_chunks: number };
        return { total: m.map_pages, shared: m.map_pages_shared, chunks: m.mapped_chunks };
      };
      assert.deepEqual(await pages('big-consistent'), { total: 64, shared: 64, chunks: 65536 });
      const fork = await connect(a, 'big-consistent');
      // A whole chunk (the synthetic packs hold no real blocks, so no base is read), on page 4.
      await writeRandom(fork, 5000 * 128 * 1024, 128 * 1024);
      await fork.flush();
      await fork.disconnect();
      // The write stays in the overlay until sealed; sealing maps the chunk and copies page 4 only.
      await waitFor('the written page to be copied', async () => (await pages('big-consistent')).shared === 63);
      assert.deepEqual(await pages('big-consistent'), { total: 64, shared: 63, chunks: 65536 });
      assert.equal((await pages('big')).total, 64);
    });
  } finally {
    await cluster.cleanup();
  }
});

test('a fork to a name with a lease left by an earlier volume: its first lease put (made without a read) fails on it, the lease is read, and the fork takes the next generation', { timeout: TIMEOUT }, async () => {
  const cluster = await startCluster(fileStore);
  try {
    const a = await cluster.start('host-a');
    await withLogs([a], async () => {
      await createVolume(a, 'base', SIZE / MiB);
      const c = await connect(a, 'base');
      const data = await writeRandom(c, 0, 2 * MiB);
      await drain(a, 'base');
      // An expired lease of another host under the name, as a deleted volume's host may leave it.
      const leaseDir = path.join(cluster.dir, 'store', 'volumes', 'reborn');
      fs.mkdirSync(leaseDir, { recursive: true });
      const past = new Date(Date.now() - 60_000).toISOString();
      fs.writeFileSync(path.join(leaseDir, 'lease'), JSON.stringify({ format: 1, volume: 'reborn', owner: 'host-gone', generation: 7, expires: past, acquired: past }));
      // Expiry counts from the store's stamp of the lease: a minute old.
      fs.utimesSync(path.join(leaseDir, 'lease'), new Date(Date.parse(past)), new Date(Date.parse(past)));
      for (const [target, mode, generation] of [['fresh', 'lazy', 1], ['reborn', 'lazy', 8], ['fresh-consistent', 'consistent', 1]] as const) {
        const r = await a.api('POST', '/api/exports/base/fork', { target, mode });
        assert.equal(r.status, 201, r.text);
        const info = await exportInfo(a, target);
        assert.equal(info.lease_generation, generation, `${target}: ${JSON.stringify(info)}`);
        const cf = await connect(a, target);
        assert.ok((await readAll(cf, 0, 2 * MiB)).equals(data));
        await cf.write(0, Buffer.alloc(4096, 7)); // writable: the lease is this host's
        await cf.flush();
        await cf.disconnect();
      }
      const lease = JSON.parse(fs.readFileSync(path.join(leaseDir, 'lease'), 'utf8'));
      assert.notEqual(lease.owner, 'host-gone');
      assert.equal(lease.generation, 8);
      await c.disconnect();
    });
  } finally {
    await cluster.cleanup();
  }
});
