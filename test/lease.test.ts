// Leases and fencing across hosts (DESIGN.md invariant 4): a host that lost the lease,
// crashed mid-release or was paused across a promotion never writes over the new
// holder's state, by any path; lease expiry is judged on one clock (the store's).
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import {
  pauseOutsideStoreLocks,
  CHUNK, connect, createVolume, drain, exportInfo, fileStore, MiB, readAll, startCluster, waitFor, withLogs, writeRandom,
} from './harness/cluster.js';
import { removeDir, scratchDir, type Daemon } from './harness/daemon.js';
import { NbdCommandError } from './harness/nbd-client.js';
import { PackRefcounts } from '../src/gc/refcounts.js';
import { openGcDatabase } from '../src/gc/sql.js';
import { createLogger } from '../src/log.js';
import { clockKey, StoreClock } from '../src/objectstore/clock.js';
import { openObjectStore } from '../src/objectstore/index.js';

const TIMEOUT = 180_000;

/** Every object in a file:// store under `prefix` (a folder of it), by key, with a hash of its content. */
function storeObjects(storeDir: string, prefix: string): Map<string, string> {
  const out = new Map<string, string>();
  const walk = (dir: string) => {
    if (!fs.existsSync(dir)) return;
    for (const entry of fs.readdirSync(dir, { withFileTypes: true })) {
      const full = path.join(dir, entry.name);
      if (entry.isDirectory()) walk(full);
      // In-flight temp files of the file store are not objects.
      else if (!entry.name.startsWith('.')) out.set(path.relative(storeDir, full), createHash('sha256').update(fs.readFileSync(full)).digest('hex'));
    }
  };
  walk(path.join(storeDir, prefix));
  return out;
}

const post = (d: Daemon, name: string, action: string, body?: unknown) => d.api('POST', `/api/exports/${encodeURIComponent(name)}/${action}`, body);

test('a host that crashed between putting its released lease and saving it comes back read-only and never writes over the new holder', { timeout: TIMEOUT }, async () => {
  const cluster = await startCluster(fileStore);
  try {
    const a = await cluster.start('host-a');
    const b = await cluster.start('host-b');
    await withLogs([a, b], async () => {
      const name = 'released-then-crashed';
      await createVolume(a, name, 8);
      const ca = await connect(a, name);
      await writeRandom(ca, 0, 2 * MiB);
      await ca.flush();
      await drain(a, name);
      await ca.disconnect();
      // B follows the volume read-only.
      const cb = await connect(b, name);
      assert.equal((await exportInfo(b, name)).read_only, true);

      // A dies right after the released lease reached the store, before it saved that locally.
      await a.restart({ UPDRAFT_CRASH_AT: 'lease-released' });
      const ca2 = await connect(a, name);
      await writeRandom(ca2, 2 * MiB, MiB);
      await ca2.flush();
      await ca2.disconnect().catch(() => undefined);
      await post(a, name, 'release').catch(() => undefined);
      await a.exited();
      assert.match(a.log(), /crashing at lease-released/);

      // B takes over and writes on.
      const promoted = await post(b, name, 'promote');
      assert.equal(promoted.status, 200, promoted.text);
      const bData = await writeRandom(cb, 4 * MiB, MiB);
      await cb.flush();

      // A restarts: it must not take its old generation for its own.
      await a.restart({});
      const ca3 = await connect(a, name);
      await assert.rejects(ca3.write(0, Buffer.alloc(4096, 3)), (err: unknown) => err instanceof NbdCommandError && err.code === 'EPERM', 'the old holder accepted a write after its release');
      await ca3.disconnect();
      const stale = await post(a, name, 'drain');
      assert.equal(stale.status, 409, `the old holder drained over the new holder's manifest: ${stale.text}`);
      assert.equal((await exportInfo(a, name)).read_only, true);

      // B is still the writer: its drain lands and its data is what a fresh reader sees.
      await drain(b, name);
      const c = await cluster.start('host-c');
      const cc = await connect(c, name);
      assert.ok((await readAll(cc, 4 * MiB, MiB)).equals(bData), "the store does not hold the new holder's writes");
      await cc.disconnect();
      await cb.disconnect();
    });
  } finally {
    await cluster.cleanup();
  }
});

test('a host paused (SIGSTOP) across another host\'s promotion writes nothing of the volume when it resumes: no manifest, checkpoint, fork or pack; it says it lost the lease', { timeout: TIMEOUT }, async () => {
  const cluster = await startCluster(fileStore);
  const storeDir = path.join(cluster.dir, 'store');
  let paused: number | undefined;
  try {
    const ttl = { host: { lease_ttl_s: 4, clock_skew_margin_s: 1 } };
    // Continuous flush catches the store up a second after writes stop, and not before.
    const a = await cluster.start('host-a', { ...ttl, volumes: { continuous_block_interval_ms: 60_000, continuous_manifest_interval_ms: 60_000 } });
    const b = await cluster.start('host-b', ttl);
    await withLogs([a, b], async () => {
      const name = 'paused-holder';
      // Continuous flush: the resumed host finds writes the store has not got and would drain them.
      await createVolume(a, name, 16, { flush_mode: 'continuous' });
      const ca = await connect(a, name);
      await writeRandom(ca, 0, 2 * MiB);
      await ca.flush();
      await drain(a, name);
      const cb = await connect(b, name);
      assert.equal((await exportInfo(b, name)).read_only, true);

      // A writes more (acknowledged, not in the store yet) and stops dead at once.
      await writeRandom(ca, 4 * MiB, 4 * MiB);
      await ca.flush();
      paused = a.pid;
      await pauseOutsideStoreLocks(a.pid, storeDir);

      // B waits out A's lease, promotes, writes and drains.
      await waitFor('host B to promote once the paused lease expired', async () => (await post(b, name, 'promote')).status === 200, 60_000, 500);
      const bData = await writeRandom(cb, 10 * MiB, CHUNK * 3);
      await cb.flush();
      await drain(b, name);
      const served = await readAll(cb, 0, 16 * MiB);
      const volumeBefore = storeObjects(storeDir, 'volumes');
      const packsBefore = storeObjects(storeDir, 'packs');

      process.kill(a.pid, 'SIGCONT');
      paused = undefined;
      // Every path that writes the volume (or a snapshot of it) to the store, at once.
      const [checkpoint, fork, drained] = await Promise.all([
        post(a, name, 'checkpoints', { name: 'stale' }),
        post(a, name, 'fork', { target: 'stale-fork', mode: 'consistent' }),
        post(a, name, 'drain'),
      ]);
      assert.equal(checkpoint.status, 409, `checkpoint on the paused host: ${checkpoint.text}`);
      assert.equal(fork.status, 409, `consistent fork on the paused host: ${fork.text}`);
      assert.equal(drained.status, 409, `drain on the paused host: ${drained.text}`);
      await waitFor('host A to say it lost the lease', async () => /lost the lease/.test(a.log()) && (await exportInfo(a, name)).read_only === true);
      await assert.rejects(ca.write(0, Buffer.alloc(4096, 5)), (err: unknown) => err instanceof NbdCommandError && err.code === 'EPERM');
      // A few store ticks (continuous flush, dirty budget, renewal) pass on A.
      await new Promise((r) => setTimeout(r, 1500));

      // The lease is B's to renew meanwhile: it must still name B's generation.
      const leaseKey = path.join('volumes', name, 'lease');
      const lease = JSON.parse(fs.readFileSync(path.join(storeDir, leaseKey), 'utf8'));
      assert.deepEqual([lease.owner, lease.generation, lease.released], ['host-b', 2, undefined]);
      const withoutLease = (objects: Map<string, string>) => new Map([...objects].filter(([key]) => key !== leaseKey));
      assert.deepEqual(withoutLease(storeObjects(storeDir, 'volumes')), withoutLease(volumeBefore), 'the paused host changed the volume\'s objects in the store');
      assert.match((await exportInfo(a, name)).lease_lost, /another host took the lease: host host-b generation 2/);
      // A's event timeline (the dashboard's) has it as fencing.
      const events = (await a.api('GET', '/api/dashboard')).json.events as Array<{ kind: string; volume: string; message: string }>;
      assert.ok(events.some((e) => e.kind === 'fencing' && e.volume === name && /another host took the lease: host host-b/.test(e.message)), JSON.stringify(events));
      assert.deepEqual([...storeObjects(storeDir, 'packs').keys()].filter((k) => !packsBefore.has(k)), [], 'the paused host uploaded packs after it lost the lease');
      assert.ok((await readAll(cb, 0, 16 * MiB)).equals(served), 'what the new holder serves changed');
      assert.ok((await readAll(cb, 10 * MiB, CHUNK * 3)).equals(bData));
      // B is still the writer.
      await cb.write(0, Buffer.alloc(4096, 6));
      await drain(b, name);
      await ca.disconnect().catch(() => undefined);
      await cb.disconnect();
    });
  } finally {
    if (paused !== undefined) process.kill(paused, 'SIGCONT');
    await cluster.cleanup();
  }
});

test('lease expiry is judged on the store\'s clock: a host whose clock runs a minute ahead does not take a lease whose holder (a minute behind) renews it, and takes it once it lapses', { timeout: TIMEOUT }, async () => {
  const cluster = await startCluster(fileStore);
  try {
    const ttl = { host: { lease_ttl_s: 4, clock_skew_margin_s: 1 } };
    const a = await cluster.start('host-a', ttl, { UPDRAFT_TEST_CLOCK_SKEW_MS: '-60000' });
    const b = await cluster.start('host-b', ttl, { UPDRAFT_TEST_CLOCK_SKEW_MS: '60000' });
    await withLogs([a, b], async () => {
      const name = 'skewed';
      await createVolume(a, name, 8);
      const ca = await connect(a, name);
      await writeRandom(ca, 0, MiB);
      await ca.flush();
      await drain(a, name);
      // By B's clock A's lease expired two minutes ago; by the store's it is live.
      const cb = await connect(b, name);
      assert.equal((await exportInfo(b, name)).read_only, true, 'a host with a fast clock took a live lease');
      await new Promise((r) => setTimeout(r, 2500)); // past a renewal of A's
      const early = await post(b, name, 'promote');
      assert.equal(early.status, 409, `promotion while the holder renews: ${early.text}`);
      await ca.write(0, Buffer.alloc(4096, 1)); // A still writes
      await ca.disconnect().catch(() => undefined);
      // A dies: its lease lapses by the store's clock and B takes it.
      await a.kill9();
      await waitFor('host B to promote once the lease lapsed', async () => (await post(b, name, 'promote')).status === 200, 30_000, 250);
      await cb.write(0, Buffer.alloc(4096, 2));
      await drain(b, name);
      await cb.disconnect();
    });
  } finally {
    await cluster.cleanup();
  }
});

test('a holder cut off from the store stops taking writes clock_skew_margin_s before another host may take its lease', { timeout: TIMEOUT }, async () => {
  const cluster = await startCluster(fileStore);
  try {
    const ttl = { host: { lease_ttl_s: 4, clock_skew_margin_s: 1 } };
    // A reaches the shared store through a link the test can cut.
    const link = path.join(cluster.dir, 'store-of-a');
    fs.mkdirSync(path.join(cluster.dir, 'store'), { recursive: true });
    fs.symlinkSync(path.join(cluster.dir, 'store'), link);
    const a = await cluster.start('host-a', { ...ttl, storage: { url: `file://${link}` } });
    const b = await cluster.start('host-b', ttl);
    await withLogs([a, b], async () => {
      const name = 'cut-off';
      await createVolume(a, name, 8);
      const ca = await connect(a, name);
      await writeRandom(ca, 0, MiB);
      await ca.flush();
      await drain(a, name);
      const cb = await connect(b, name);
      fs.unlinkSync(link);
      // Each round looks at A first, then tries B: B may only win a round A had already lost.
      let aWritable = true;
      await waitFor('host B to promote once the lease lapsed', async () => {
        aWritable = !(await exportInfo(a, name)).read_only;
        const promoted = await post(b, name, 'promote');
        if (promoted.status === 200) assert.equal(aWritable, false, 'host B took the lease while host A still took writes');
        return promoted.status === 200;
      }, 30_000, 100);
      assert.match(a.log(), /lease not renewed in time; writes are refused/);
      await assert.rejects(ca.write(0, Buffer.alloc(4096, 1)), (err: unknown) => err instanceof NbdCommandError && err.code === 'EPERM');
      await cb.write(0, Buffer.alloc(4096, 2));
      await drain(b, name);
      ca.close();
      await cb.disconnect();
    });
  } finally {
    await cluster.cleanup();
  }
});

/** Whether process `pid` is stopped (state T in /proc). */
function stopped(pid: number): boolean {
  const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  return stat.slice(stat.lastIndexOf(')') + 2).startsWith('T');
}

function leaseIn(storeDir: string, name: string): { owner: string; generation: number; released?: boolean } {
  return JSON.parse(fs.readFileSync(path.join(storeDir, 'volumes', name, 'lease'), 'utf8'));
}

test('renewal racing an acquisition, the acquisition first: the holder frozen just before its renewal PUT resumes, fails its renewal and turns read-only', { timeout: TIMEOUT }, async () => {
  const cluster = await startCluster(fileStore);
  const storeDir = path.join(cluster.dir, 'store');
  let frozen: number | undefined;
  try {
    const ttl = { host: { lease_ttl_s: 4, clock_skew_margin_s: 1 } };
    const a = await cluster.start('host-a', ttl, { UPDRAFT_PAUSE_AT: 'lease-renew-put' });
    const b = await cluster.start('host-b', ttl);
    await withLogs([a, b], async () => {
      const name = 'renew-late';
      await createVolume(a, name, 8);
      const ca = await connect(a, name);
      await writeRandom(ca, 0, MiB);
      await ca.flush();
      await drain(a, name);
      frozen = a.pid;
      await waitFor('host A to stop at its renewal PUT', async () => stopped(a.pid));
      const cb = await connect(b, name);
      await waitFor('host B to promote once the lease lapsed', async () => (await post(b, name, 'promote')).status === 200, 30_000, 250);
      const bData = await writeRandom(cb, 2 * MiB, MiB);
      await drain(b, name);
      const before = storeObjects(storeDir, 'volumes');
      process.kill(a.pid, 'SIGCONT');
      frozen = undefined;
      await waitFor('host A to say it lost the lease', async () => (await exportInfo(a, name)).lease_lost !== undefined);
      assert.match((await exportInfo(a, name)).lease_lost, /another host took the lease: host host-b generation 2/);
      await assert.rejects(ca.write(0, Buffer.alloc(4096, 1)), (err: unknown) => err instanceof NbdCommandError && err.code === 'EPERM');
      assert.equal((await post(a, name, 'drain')).status, 409);
      assert.deepEqual([leaseIn(storeDir, name).owner, leaseIn(storeDir, name).generation], ['host-b', 2]);
      const manifestKey = path.join('volumes', name, 'manifest');
      assert.equal(storeObjects(storeDir, 'volumes').get(manifestKey), before.get(manifestKey), 'the manifest changed after the old holder resumed');
      assert.ok((await readAll(cb, 2 * MiB, MiB)).equals(bData));
      ca.close();
      await cb.disconnect();
    });
  } finally {
    if (frozen !== undefined) process.kill(frozen, 'SIGCONT');
    await cluster.cleanup();
  }
});

test('renewal racing an acquisition, the renewal first: a taker frozen between reading the lapsed lease and its PUT loses to the holder\'s late renewal, and the holder writes on', { timeout: TIMEOUT }, async () => {
  const cluster = await startCluster(fileStore);
  const storeDir = path.join(cluster.dir, 'store');
  const frozen = new Set<number>();
  try {
    const ttl = { host: { lease_ttl_s: 4, clock_skew_margin_s: 1 } };
    const a = await cluster.start('host-a', ttl, { UPDRAFT_PAUSE_AT: 'lease-renew-put' });
    const b = await cluster.start('host-b', ttl, { UPDRAFT_PAUSE_AT: 'lease-acquire-put' });
    await withLogs([a, b], async () => {
      const name = 'renew-first';
      await createVolume(a, name, 8);
      const ca = await connect(a, name);
      await writeRandom(ca, 0, MiB);
      await ca.flush();
      await drain(a, name);
      frozen.add(a.pid);
      await waitFor('host A to stop at its renewal PUT', async () => stopped(a.pid));
      const cb = await connect(b, name);
      // B judges the lease lapsed, and stops right before its conditional PUT.
      let promote: Promise<{ status: number; text: string }> | undefined;
      await waitFor('host B to stop at its acquisition PUT', async () => {
        if (promote === undefined) {
          const attempt = post(b, name, 'promote');
          const settled = await Promise.race([attempt, new Promise<undefined>((r) => setTimeout(r, 300, undefined))]);
          if (settled === undefined) promote = attempt;
        }
        return stopped(b.pid);
      }, 30_000, 250);
      frozen.add(b.pid);
      // A's renewal lands first (the lease object is still the one it put).
      const leaseFile = path.join(storeDir, 'volumes', name, 'lease');
      const lapsed = fs.readFileSync(leaseFile, 'utf8');
      process.kill(a.pid, 'SIGCONT');
      frozen.delete(a.pid);
      await waitFor('host A to renew its lease', async () => fs.readFileSync(leaseFile, 'utf8') !== lapsed);
      assert.deepEqual([leaseIn(storeDir, name).owner, leaseIn(storeDir, name).generation], ['host-a', 1]);
      await waitFor('host A to take writes again', async () => (await exportInfo(a, name)).read_only === false);
      process.kill(b.pid, 'SIGCONT');
      frozen.delete(b.pid);
      const lost = await promote!;
      assert.equal(lost.status, 409, `the taker won over a renewal that landed first: ${lost.text}`);
      assert.equal((await exportInfo(b, name)).read_only, true);
      assert.deepEqual([leaseIn(storeDir, name).owner, leaseIn(storeDir, name).generation], ['host-a', 1]);
      const aData = await writeRandom(ca, 2 * MiB, MiB);
      await drain(a, name);
      assert.equal((await exportInfo(a, name)).lease_lost, undefined);
      await ca.disconnect();
      await cb.disconnect();
      const c = await cluster.start('host-c');
      const cc = await connect(c, name);
      assert.ok((await readAll(cc, 2 * MiB, MiB)).equals(aData));
      await cc.disconnect();
    });
  } finally {
    for (const pid of frozen) process.kill(pid, 'SIGCONT');
    await cluster.cleanup();
  }
});

test('a refcount intent ages on the store\'s clock: one recorded by a host whose clock is ten minutes slow is not reverted before its settle time', { timeout: TIMEOUT }, async () => {
  const dir = await scratchDir('updraft-intent-clock-');
  const store = openObjectStore(`file://${path.join(dir, 'store')}`, {});
  fs.mkdirSync(path.join(dir, 'store'));
  const db = openGcDatabase('', dir);
  try {
    const log = createLogger('test', 'error');
    const settleMs = 60_000;
    const slowClock = new StoreClock(store, clockKey('slow-host'));
    const slow = await PackRefcounts.open(db, { hostId: 'slow-host', store, settleMs, log, now: () => Date.now() - 600_000, storeTime: () => slowClock.now() });
    // An intent whose PUT never happened (yet): it may still land for settleMs.
    await slow.begin('volumes/v/manifest', new Set(), '0'.repeat(32));
    const otherClock = new StoreClock(store, clockKey('other-host'));
    const other = await PackRefcounts.open(db, { hostId: 'other-host', store, settleMs, log, storeTime: () => otherClock.now() });
    assert.deepEqual(await other.resolveIntents(), { committed: 0, reverted: 0, pending: 1 }, 'an intent younger than the settle time was judged by the writer\'s slow clock');
    // Past the settle time (here: judged with none) it is reverted.
    assert.deepEqual(await other.resolveIntents({ settleMs: 0 }), { committed: 0, reverted: 1, pending: 0 });
  } finally {
    await db.close();
    await store.close();
    await removeDir(dir);
  }
});
