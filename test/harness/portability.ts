// The object-store behaviours every backend must show, run by store-file.test.ts and
// store-s3.test.ts: drain on one host and read every byte on another, one writer at a
// time, and live migration with fio verifying the data across it.
import assert from 'node:assert/strict';
import { test, type TestContext } from 'node:test';
import { commandLine, requireTools, run, tail, TOOLS } from './tools.js';
import {
  CHUNK, connect, createVolume, drain, exportInfo, MiB, readAll, startCluster, storeRequests, waitFor, withLogs, writeRandom,
  type SharedStore,
} from './cluster.js';
import { NbdCommandError } from './nbd-client.js';

const TIMEOUT = 180_000;

async function fio(cwd: string, args: string[]): Promise<void> {
  const full = [...args, '--output-format=json'];
  const result = await run('fio', full, { timeoutMs: 120_000, cwd });
  const output = `$ ${commandLine('fio', full)}\n${tail(result.stdout, 15)}\n${tail(result.stderr, 15)}`;
  assert.equal(result.code, 0, `fio exited ${result.code}\n${output}`);
  const json = JSON.parse(result.stdout.slice(result.stdout.indexOf('{')));
  for (const job of json.jobs) assert.equal(job.error, 0, `fio job ${job.jobname} error ${job.error}\n${output}`);
}

export function definePortabilityTests(store: (dir: string) => SharedStore, label: string): void {
  test(`${label}: a volume written and drained on host A reads back byte for byte on host B; B cannot write while A holds the lease`, { timeout: TIMEOUT }, async () => {
    const cluster = await startCluster(store);
    try {
      const a = await cluster.start('host-a');
      const b = await cluster.start('host-b');
      await withLogs([a, b], async () => {
        const name = 'acme/vm-1';
        await createVolume(a, name, 64);
        const ca = await connect(a, name);
        const data = Buffer.alloc(64 * MiB);
        (await writeRandom(ca, 0, 24 * MiB)).copy(data, 0);
        (await writeRandom(ca, 40 * MiB + 512, 3 * MiB + 1000, 64 * 1024)).copy(data, 40 * MiB + 512);
        await ca.writeZeroes(50 * MiB, 4 * CHUNK, { noHole: true });
        await ca.flush();
        const drained = await drain(a, name);
        assert.ok(drained.packs_uploaded > 0 && drained.bytes_uploaded > 0, JSON.stringify(drained));
        assert.equal(typeof drained.manifest_etag, 'string');
        assert.ok(drained.sequence > 0);
        // B has never seen the volume: it wakes it from the manifest.
        const before = await storeRequests(b, 'get');
        const cb = await connect(b, name);
        assert.equal(cb.size, 64 * MiB);
        const seen = await readAll(cb, 0, 64 * MiB);
        assert.ok(seen.equals(data), 'B read different bytes than A wrote');
        const packGets = (await storeRequests(b, 'get')) - before;
        // The manifest, the lease and the boot hot set, then each pack once.
        assert.ok(packGets <= drained.packs_uploaded + 4, `B made ${packGets} GETs for ${drained.packs_uploaded} packs`);
        const info = await exportInfo(b, name);
        assert.equal(info.read_only, true);
        await assert.rejects(cb.write(0, Buffer.alloc(4096, 1)), (err: unknown) => err instanceof NbdCommandError && err.code === 'EPERM');
        const promote = await b.api('POST', `/api/exports/${encodeURIComponent(name)}/promote`);
        assert.equal(promote.status, 409, promote.text);
        assert.match(promote.json.error, /leased by host host-a/);
        // A still writes.
        await ca.write(0, Buffer.alloc(4096, 7));
        await ca.disconnect();
        await cb.disconnect();
      });
    } finally {
      await cluster.cleanup();
    }
  });

  test(`${label}: live migration A → B: drain, release, promote; the B client writes on without reconnecting and fio verifies across it`, { timeout: TIMEOUT }, async (t: TestContext) => {
    if (!requireTools(t, [TOOLS.fio])) return;
    const cluster = await startCluster(store);
    try {
      const a = await cluster.start('host-a');
      const b = await cluster.start('host-b');
      await withLogs([a, b], async () => {
        const name = 'migrate-me';
        await createVolume(a, name, 64);
        // fio writes a verifiable pattern on A ...
        await fio(cluster.dir, ['--name=m1', '--ioengine=nbd', `--uri=${a.uri(name)}`, '--rw=randwrite', '--bs=4k', '--iodepth=16', '--size=32M', '--verify=crc32c', '--do_verify=0', '--verify_state_save=1']);
        const ca = await connect(a, name);
        const tailData = await writeRandom(ca, 48 * MiB, 4 * MiB);
        await drain(a, name); // the bulk goes up while A is still the writer
        // B attaches read-only (A holds the lease) and sees the drained data.
        const cb = await connect(b, name);
        assert.equal((await exportInfo(b, name)).read_only, true);
        // A writes more after the first drain: release refuses writes, then drains them.
        const late = await writeRandom(ca, 60 * MiB, 1 * MiB);
        const pauseStart = performance.now();
        const released = await a.api('POST', `/api/exports/${encodeURIComponent(name)}/release`);
        assert.equal(released.status, 200, released.text);
        assert.ok(released.json.drained?.packs_uploaded > 0, `release did not drain the late writes: ${released.text}`);
        const putsBefore = await storeRequests(b, 'put');
        const promoted = await b.api('POST', `/api/exports/${encodeURIComponent(name)}/promote`);
        assert.equal(promoted.status, 200, promoted.text);
        // A released its generation: nobody to fence, so the promotion writes the lease and no manifest.
        assert.equal((await storeRequests(b, 'put')) - putsBefore, 1, 'the promotion after a release put more than its lease');
        await cb.write(62 * MiB, Buffer.alloc(CHUNK, 9)); // same connection, no reconnect
        const pauseMs = performance.now() - pauseStart;
        t.diagnostic(`write pause (release with its final drain + promote + first write): ${pauseMs.toFixed(0)} ms`);
        // A is fenced: writes refused, a drain is refused.
        await assert.rejects(ca.write(0, Buffer.alloc(4096)), (err: unknown) => err instanceof NbdCommandError && err.code === 'EPERM');
        const stale = await a.api('POST', `/api/exports/${encodeURIComponent(name)}/drain`);
        assert.equal(stale.status, 409, stale.text);
        assert.ok((await readAll(cb, 48 * MiB, 4 * MiB)).equals(tailData), 'migrated data differs (first drain)');
        assert.ok((await readAll(cb, 60 * MiB, 1 * MiB)).equals(late), 'migrated data differs (writes after the first drain)');
        assert.ok((await cb.read(62 * MiB, CHUNK)).equals(Buffer.alloc(CHUNK, 9)));
        await ca.disconnect();
        await cb.disconnect();
        // ... and verifies it on B.
        await fio(cluster.dir, ['--name=m1', '--ioengine=nbd', `--uri=${b.uri(name)}`, '--rw=randwrite', '--bs=4k', '--iodepth=16', '--size=32M', '--verify=crc32c', '--verify_only', '--verify_state_load=1']);
        // B is the writer now: it can drain, and fio can write and verify there.
        await fio(cluster.dir, ['--name=m2', '--ioengine=nbd', `--uri=${b.uri(name)}`, '--rw=randwrite', '--bs=64k', '--iodepth=8', '--size=16M', '--offset=32M', '--verify=crc32c', '--do_verify=1']);
        await drain(b, name);
      });
    } finally {
      await cluster.cleanup();
    }
  });

  test(`${label}: a drained volume restarts on the same host from local state with no store GET`, { timeout: TIMEOUT }, async () => {
    const cluster = await startCluster(store);
    try {
      const a = await cluster.start('host-a');
      await withLogs([a], async () => {
        await createVolume(a, 'restart-me', 64);
        const c = await connect(a, 'restart-me');
        const data = await writeRandom(c, 0, 8 * MiB);
        await c.flush();
        await c.disconnect();
        await drain(a, 'restart-me');
        await a.restart();
        const c2 = await connect(a, 'restart-me');
        assert.ok((await readAll(c2, 0, 8 * MiB)).equals(data));
        await c2.disconnect();
        // The one request is the start-up probe (a 1-byte range read of store.json).
        assert.equal(await storeRequests(a, 'get'), 0, 'a same-host restart fetched from the store');
        assert.equal(await storeRequests(a), 1, 'a same-host restart made store requests beyond the start-up probe');
      });
    } finally {
      await cluster.cleanup();
    }
  });

  test(`${label}: SIGTERM drains every volume before exiting; another host wakes the data`, { timeout: TIMEOUT }, async () => {
    const cluster = await startCluster(store);
    try {
      const a = await cluster.start('host-a', { host: { lease_ttl_s: 2, clock_skew_margin_s: 0.5 } });
      const b = await cluster.start('host-b');
      await withLogs([a, b], async () => {
        await createVolume(a, 'term', 64);
        const c = await connect(a, 'term');
        const data = await writeRandom(c, 4 * MiB, 6 * MiB);
        await c.disconnect();
        assert.equal(await a.stop(), 0);
        assert.match(a.log(), /drained volumes/);
        const cb = await connect(b, 'term');
        assert.ok((await readAll(cb, 4 * MiB, 6 * MiB)).equals(data));
        await cb.disconnect();
        // A's lease (2 s) lapses after it stopped: B may take the volume over.
        await waitFor('promotion after lease expiry', async () => {
          const r = await b.api('POST', '/api/exports/term/promote');
          return r.status === 200;
        }, 15_000, 500);
      });
    } finally {
      await cluster.cleanup();
    }
  });
}

export { waitFor };
