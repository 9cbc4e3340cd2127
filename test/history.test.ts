// Histories of real clients across faults, checked by test/harness/history.ts (per-sector
// register semantics, DESIGN.md invariants 1 and 4). Clients on the unix socket and on TCP
// write payloads that name their write to random sectors, read and flush, while:
// 1. the daemon is SIGKILLed and restarted mid-load (and mid-drain), four times;
// 2. the volume migrates A → B (drain, release, promote) under load, B is SIGKILLed and
//    restarted, and the volume migrates back to A;
// 3. the holder A is paused (SIGSTOP) while B promotes over its expired lease, then resumed
//    (SIGCONT) and asked to drain: the store's objects of the volume and its packs are
//    the same before and after, and nothing A acknowledged after the pause shows on B;
// 4. the store (MinIO) hangs (SIGSTOP) during a drain, goes away (SIGKILL) and comes back,
//    and the volume then migrates to B;
// 5. A releases the volume while its lease renewal is in flight (a proxy holds the PUT);
// 6. A drains while its lease renewal is held past the lease's margin: the drain renews
//    the lease itself, and the late renewal must not take that for a lost lease;
// 7. a drain's manifest PUT gets no answer (the proxy cuts it): once the store answers
//    again, the volume drains and migrates;
// 8. A is killed after its release's lease PUT landed and before it saw the answer, and
//    restarted; B promotes: A must acknowledge no write after that.
// Every run prints how many operations it checked and what it found; an anomaly fails it.

import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { readdir, readFile } from 'node:fs/promises';
import path from 'node:path';
import { test, type TestContext } from 'node:test';
import { ListObjectsV2Command, S3Client } from '@aws-sdk/client-s3';
import { createVolume, fileStore, pauseOutsideStoreLocks, startCluster, waitFor, withLogs, type Cluster } from './harness/cluster.js';
import { startDaemon, type Daemon } from './harness/daemon.js';
import { checkHistory, summarize, type Fault, type OpKind } from './harness/history.js';
import { LoadClient, Recorder, Rng, sleep, sweep, type Transport } from './harness/history-load.js';
import { minioForTests, minioStore, type Minio } from './harness/minio.js';
import { startStoreProxy } from './harness/store-proxy.js';

const TIMEOUT = 120_000;
const KILLS = 4;
const VOLUME = 'hist/vol';
const VOLUME_MIB = 64;
const SECTORS_PER_CHUNK = 32;
/** 8 sectors in each of 8 chunks, edges included: seals merge them with old blocks all the time. */
const SECTORS: number[] = [];
for (let chunk = 0; chunk < 8; chunk++) {
  for (const at of [0, 1, 5, 13, 16, 22, 30, 31]) SECTORS.push(chunk * 3 * SECTORS_PER_CHUNK + at);
}
const TRANSPORTS: Transport[] = ['unix', 'tcp', 'unix', 'tcp'];
const SEED = Number(process.env.UPDRAFT_HISTORY_SEED ?? Math.floor(Math.random() * 2 ** 32));

/** The run's clients, following `target`. */
class Load {
  readonly recorder = new Recorder();
  readonly clients: LoadClient[] = [];
  target: Daemon | null;
  private nextClient = 100;

  constructor(first: Daemon, readonly names: Map<Daemon, string>, seed: number, private readonly flushShare = 0.05, count = TRANSPORTS.length) {
    this.target = first;
    const rng = new Rng(seed);
    for (let i = 0; i < count; i++) {
      this.clients.push(this.client(i + 1, TRANSPORTS[i % TRANSPORTS.length], rng, () => this.target));
    }
  }

  client(id: number, transport: Transport, rng: Rng, target: () => Daemon | null): LoadClient {
    return new LoadClient(id, transport, this.recorder, new Rng(rng.u32()), {
      volume: VOLUME, sectors: SECTORS, writeShare: 0.55, flushShare: this.flushShare, fuaShare: 0.03,
    }, target, (d) => this.names.get(d)!);
  }

  start(): void {
    for (const c of this.clients) c.start();
  }

  async stop(): Promise<void> {
    await Promise.all(this.clients.map((c) => c.stop()));
  }

  /** A drain or release through the API, recorded (a barrier for the checker). */
  async api(host: Daemon, kind: Extract<OpKind, 'drain' | 'release'>): Promise<{ status: number; text: string }> {
    const op = this.recorder.begin({ client: 0, host: this.names.get(host)!, kind });
    try {
      const r = await host.api('POST', `/api/exports/${encodeURIComponent(VOLUME)}/${kind}`);
      this.recorder.finish(op, r.status === 200 ? 'ok' : 'fail', r.status === 200 ? undefined : r.text);
      return r;
    } catch (err) {
      this.recorder.finish(op, 'info', (err as Error).message);
      return { status: 0, text: (err as Error).message };
    }
  }

  /** Drains on `host()` every `everyMs` until the returned stop is called (so faults land mid-drain too). */
  drainEvery(host: () => Daemon, everyMs: number): () => Promise<void> {
    let stopped = false;
    const loop = (async () => {
      while (!stopped) {
        await sleep(everyMs);
        if (!stopped) await this.api(host(), 'drain');
      }
    })();
    return async () => {
      stopped = true;
      await loop;
    };
  }

  /** Reads every sector on `host` (a fresh connection), while the load goes on. */
  async sweep(host: Daemon): Promise<void> {
    const failed = await sweep(this.recorder, host, this.names.get(host)!, VOLUME, SECTORS, this.nextClient++);
    assert.equal(failed, 0, `a sweep of ${VOLUME} on ${this.names.get(host)} had ${failed} failed reads`);
  }

  /** Checks the history; prints what was checked and found; fails on any anomaly. */
  check(t: TestContext, label: string): void {
    const result = checkHistory(this.recorder.history());
    const line = `${label} (seed ${SEED}): ${summarize(result)}; faults ${this.recorder.faults.map((f) => `${f.kind}@${f.at.toFixed(0)}`).join(' ')}; connects ${this.clients.map((c) => c.connects).join('/')}`;
    t.diagnostic(line);
    console.log(line);
    assert.ok(result.readsChecked > 0 && (result.counts['write:ok'] ?? 0) > 0, 'the run did no checked work');
    assert.deepEqual(result.anomalies.map((a) => `${a.kind}: ${a.message}`), [], line);
  }
}

async function promote(host: Daemon): Promise<{ status: number; text: string }> {
  return host.api('POST', `/api/exports/${encodeURIComponent(VOLUME)}/promote`);
}

test('SIGKILL and restart of the daemon mid-load, four times: no flushed write is lost, no read is stale or unknown', { timeout: TIMEOUT }, async (t) => {
  const d = await startDaemon({ toml: { volumes: { seal_idle_ms: 50, seal_dirty_mb: 1 }, servers: { nbd: { auto_create_size_gb: VOLUME_MIB / 1024 } } } });
  try {
    await withLogs([d], async () => {
      const load = new Load(d, new Map([[d, 'a']]), SEED, 0.01); // few FLUSHes: kills find unflushed writes
      t.after(() => load.stop()); // also when the test fails early
      const rng = new Rng(SEED ^ 0x1);
      load.start();
      const stopDrains = load.drainEvery(() => d, 1000);
      for (let round = 0; round < KILLS; round++) {
        await sleep(rng.int(1500, 3000));
        await d.kill9();
        load.recorder.fault({ kind: 'crash', host: 'a', at: load.recorder.now() });
        await d.restart();
        await load.sweep(d);
      }
      await sleep(1000);
      await stopDrains();
      await load.stop();
      await load.sweep(d);
      load.check(t, `kill x${KILLS}`);
    });
  } finally {
    await d.cleanup();
  }
});

test('migration A → B under load, SIGKILL of B, migration back to A: every acknowledged write follows the volume', { timeout: TIMEOUT }, async (t) => {
  const cluster = await startCluster(fileStore);
  try {
    const a = await cluster.start('host-a');
    const b = await cluster.start('host-b');
    await withLogs([a, b], async () => {
      await createVolume(a, VOLUME, VOLUME_MIB);
      const load = new Load(a, new Map([[a, 'a'], [b, 'b']]), SEED ^ 0x2);
      t.after(() => load.stop()); // also when the test fails early
      const rng = new Rng(SEED ^ 0x22);
      load.start();
      await sleep(1500);
      assert.equal((await load.api(a, 'drain')).status, 200);
      await sleep(800);
      for (const [from, to] of [[a, b], [b, a]] as const) {
        // The new host wakes the volume read-only (or has it, released, from before).
        const woke = await to.api('PUT', `/api/exports/${encodeURIComponent(VOLUME)}`, { size_gb: VOLUME_MIB / 1024 });
        assert.equal(woke.status, 200, woke.text);
        const released = await load.api(from, 'release');
        assert.equal(released.status, 200, released.text);
        load.recorder.fault({ kind: 'handover', from: load.names.get(from)!, to: load.names.get(to)!, at: load.recorder.now() });
        await sleep(200); // the clients meet EPERM on the old holder
        const promoted = await promote(to);
        assert.equal(promoted.status, 200, promoted.text);
        load.target = to;
        if (to === b) {
          // Killed soon after it took over: what it woke from the store and was written since must survive.
          await sleep(rng.int(0, 300));
          await b.kill9();
          load.recorder.fault({ kind: 'crash', host: 'b', at: load.recorder.now() });
          await b.restart();
          await load.sweep(b);
        }
        await sleep(1500);
        await load.sweep(to);
      }
      await load.stop();
      await load.sweep(a);
      load.check(t, 'migrate A→B, kill B, B→A');
    });
  } finally {
    await cluster.cleanup();
  }
});

/** The store's objects of the volume (lease by owner and generation) and its pack keys, each with a content hash. */
async function fileStoreState(storeDir: string): Promise<Record<string, string>> {
  const out: Record<string, string> = {};
  const walk = async (dir: string): Promise<void> => {
    for (const entry of await readdir(dir, { withFileTypes: true }).catch(() => [])) {
      const full = path.join(dir, entry.name);
      if (entry.isDirectory()) await walk(full);
      else if (!entry.name.includes('.lock') && !entry.name.startsWith('.')) {
        const key = path.relative(storeDir, full);
        const body = await readFile(full);
        if (key.endsWith('/lease')) {
          const lease = JSON.parse(body.toString('utf8'));
          out[key] = `owner=${lease.owner} generation=${lease.generation} released=${lease.released === true}`;
        } else out[key] = createHash('sha256').update(body).digest('hex').slice(0, 16);
      }
    }
  };
  await walk(storeDir);
  return out;
}

test('holder A paused across B\'s promotion: A changes nothing in the store after it resumes and its late writes never show on B', { timeout: TIMEOUT }, async (t) => {
  const cluster: Cluster = await startCluster(fileStore);
  const ttl = { host: { lease_ttl_s: 3, clock_skew_margin_s: 0.5 } };
  let paused: Daemon | null = null;
  try {
    const a = await cluster.start('host-a', ttl);
    const b = await cluster.start('host-b', ttl);
    await withLogs([a, b], async () => {
      await createVolume(a, VOLUME, VOLUME_MIB);
      const load = new Load(a, new Map([[a, 'a'], [b, 'b']]), SEED ^ 0x3);
      t.after(() => load.stop()); // also when the test fails early
      const rng = new Rng(SEED ^ 0x34);
      // One client stays on A whatever happens: after the pause it is the old holder's client.
      const stale = load.client(9, 'tcp', new Rng(SEED ^ 0x33), () => a);
      load.clients.push(stale);
      load.start();
      await sleep(1200);
      assert.equal((await load.api(a, 'drain')).status, 200);
      await sleep(800);
      const woke = await b.api('PUT', `/api/exports/${encodeURIComponent(VOLUME)}`, { size_gb: VOLUME_MIB / 1024 });
      assert.equal(woke.status, 200, woke.text);
      // Paused with a drain in flight: it may have put packs, not yet its manifest.
      const inFlight = load.api(a, 'drain');
      await sleep(rng.int(0, 40));
      const storeDir = path.join(cluster.dir, 'store');
      paused = a;
      await pauseOutsideStoreLocks(a.pid, storeDir);
      const failover: Extract<Fault, { kind: 'failover' }> = { kind: 'failover', from: 'a', to: 'b', at: load.recorder.now() };
      load.recorder.fault(failover);
      load.target = b;
      for (const c of load.clients) if (c !== stale) c.abandonOther(b); // a timed-out client gives up its connection to A
      // Until the promotion answers, B's reads are a replica's (of the manifest it woke from).
      await waitFor('B promoted over the expired lease', async () => {
        if ((await promote(b)).status !== 200) return false;
        failover.promoted = load.recorder.now();
        return true;
      }, 15_000, 250);
      await sleep(1500);
      const before = await fileStoreState(storeDir);
      process.kill(a.pid, 'SIGCONT');
      paused = null;
      await sleep(2500); // A's lease renewal runs and fails; its held client's writes are answered
      const drained = await load.api(a, 'drain');
      assert.notEqual(drained.status, 200, `the resumed old holder drained: ${drained.text}`);
      const interrupted = await inFlight;
      const afterResume = await fileStoreState(storeDir);
      const volumeKeys = (state: Record<string, string>) => Object.fromEntries(Object.entries(state).filter(([k]) => k.startsWith('volumes/')));
      assert.deepEqual(volumeKeys(afterResume), volumeKeys(before), "the volume's objects in the store changed while only the paused-then-resumed old holder could have changed them");
      // Packs are named by their content: one the old holder finishes uploading is garbage for GC, never the volume's state.
      const newPacks = Object.keys(afterResume).filter((k) => !(k in before));
      assert.ok(newPacks.every((k) => k.startsWith('packs/')), `new objects: ${newPacks.join(' ')}`);
      t.diagnostic(`drain in flight at the pause: ${interrupted.status}; packs the resumed holder put: ${newPacks.length}`);
      await load.sweep(b);
      await load.stop();
      assert.equal((await load.api(b, 'drain')).status, 200);
      await load.sweep(b);
      const staleWrites = load.recorder.ops.filter((op) => op.client === 9 && op.kind === 'write' && op.outcome === 'ok' && op.start > load.recorder.faults[0].at).length;
      t.diagnostic(`writes A acknowledged after its pause (must not show on B): ${staleWrites}; store keys compared: ${Object.keys(before).length}`);
      load.check(t, 'pause A across promotion of B');
    });
  } finally {
    if (paused !== null) process.kill((paused as Daemon).pid, 'SIGCONT');
    await cluster.cleanup();
  }
});

const minio = minioForTests();

test('store faults (MinIO hangs during a drain, then dies and comes back) under load, then migration: nothing acknowledged is lost', { timeout: TIMEOUT }, async (t) => {
  const cluster = await startCluster((dir) => minioStore(minio(), dir));
  const m = minio()!;
  try {
    const ttl = { host: { lease_ttl_s: 6, clock_skew_margin_s: 1 } };
    const a = await cluster.start('host-a', ttl);
    const b = await cluster.start('host-b', ttl);
    await withLogs([a, b], async () => {
      await createVolume(a, VOLUME, VOLUME_MIB);
      const load = new Load(a, new Map([[a, 'a'], [b, 'b']]), SEED ^ 0x4);
      t.after(() => load.stop()); // also when the test fails early
      load.start();
      await sleep(1200);
      assert.equal((await load.api(a, 'drain')).status, 200);
      await sleep(600);
      // The store hangs for 2 s in the middle of a drain.
      const hung = load.api(a, 'drain');
      await sleep(50);
      m.pause();
      await sleep(2000);
      m.resume();
      t.diagnostic(`drain across a 2 s store hang: ${(await hung).status}`);
      await sleep(600);
      // The store goes away under load (lease renewals, no drain) and comes back 2 s later.
      await m.kill();
      await sleep(2000);
      await m.restart();
      await waitFor('a drain after the store came back', async () => (await load.api(a, 'drain')).status === 200, 30_000, 500);
      await sleep(600);
      const woke = await b.api('PUT', `/api/exports/${encodeURIComponent(VOLUME)}`, { size_gb: VOLUME_MIB / 1024 });
      assert.equal(woke.status, 200, woke.text);
      const released = await load.api(a, 'release');
      assert.equal(released.status, 200, released.text);
      load.recorder.fault({ kind: 'handover', from: 'a', to: 'b', at: load.recorder.now() });
      const promoted = await promote(b);
      assert.equal(promoted.status, 200, promoted.text);
      load.target = b;
      await sleep(1500);
      await load.stop();
      await load.sweep(b);
      const list = await listKeys(m, cluster.dir);
      t.diagnostic(`objects in the store: ${list}`);
      load.check(t, 'store hang + store restart, then A→B');
    });
  } finally {
    await cluster.cleanup();
  }
});

async function listKeys(m: Minio, dir: string): Promise<number> {
  const client = new S3Client({ endpoint: m.endpoint, region: m.region, forcePathStyle: true, credentials: { accessKeyId: m.accessKeyId, secretAccessKey: m.secretAccessKey } });
  try {
    const r = await client.send(new ListObjectsV2Command({ Bucket: m.bucket, Prefix: path.basename(dir) + '/' }));
    return r.KeyCount ?? 0;
  } finally {
    client.destroy();
  }
}

test('release while a lease renewal is in flight: the old holder acknowledges no write after its release', { timeout: TIMEOUT }, async (t) => {
  const m = minio()!;
  const upstream = new URL(m.endpoint);
  const proxy = await startStoreProxy({ host: upstream.hostname, port: Number(upstream.port) });
  const cluster = await startCluster((dir) => minioStore(minio(), dir));
  try {
    const ttl = { host: { lease_ttl_s: 3, clock_skew_margin_s: 0.5 } };
    const a = await cluster.start('host-a', { ...ttl, aws: { endpoint: proxy.endpoint } });
    const b = await cluster.start('host-b', ttl);
    await withLogs([a, b], async () => {
      await createVolume(a, VOLUME, VOLUME_MIB);
      const load = new Load(a, new Map([[a, 'a'], [b, 'b']]), SEED ^ 0x5);
      t.after(() => load.stop()); // also when the test fails early
      load.start();
      await sleep(800);
      assert.equal((await load.api(a, 'drain')).status, 200); // A takes the lease
      const woke = await b.api('PUT', `/api/exports/${encodeURIComponent(VOLUME)}`, { size_gb: VOLUME_MIB / 1024 });
      assert.equal(woke.status, 200, woke.text);
      // A's next lease renewal is held until the release is under way; the release's
      // manifest PUT is slowed so that the renewal answers in the middle of it.
      let openGate!: () => void;
      const gate = new Promise<void>((resolve) => (openGate = resolve));
      let renewalHeld!: () => void;
      const held = new Promise<void>((resolve) => (renewalHeld = resolve));
      proxy.add({ match: /^PUT \S*\/lease[?\s]/, hold: () => gate, seen: renewalHeld });
      proxy.add({ match: /^PUT \S*\/manifest[?\s]/, hold: () => sleep(1000) });
      await held;
      const releasing = load.api(a, 'release');
      await sleep(300);
      openGate();
      const released = await releasing;
      assert.equal(released.status, 200, released.text);
      load.recorder.fault({ kind: 'handover', from: 'a', to: 'b', at: load.recorder.now() });
      await sleep(300); // the clients keep writing to A: every write must be refused
      const promoted = await promote(b);
      assert.equal(promoted.status, 200, promoted.text);
      load.target = b;
      await sleep(1000);
      await load.stop();
      await load.sweep(b);
      load.check(t, 'release during a lease renewal');
    });
  } finally {
    await cluster.cleanup();
    await proxy.close();
  }
});

test('a drain renews the lease while the timer\'s renewal is held: the late renewal does not take the host\'s own lease for a lost one', { timeout: TIMEOUT }, async (t) => {
  const m = minio()!;
  const upstream = new URL(m.endpoint);
  const proxy = await startStoreProxy({ host: upstream.hostname, port: Number(upstream.port) });
  const cluster = await startCluster((dir) => minioStore(minio(), dir));
  try {
    const a = await cluster.start('host-a', { host: { lease_ttl_s: 3, clock_skew_margin_s: 0.5 }, aws: { endpoint: proxy.endpoint } });
    await withLogs([a], async () => {
      await createVolume(a, VOLUME, VOLUME_MIB);
      const load = new Load(a, new Map([[a, 'a']]), SEED ^ 0x6);
      t.after(() => load.stop()); // also when the test fails early
      load.start();
      await sleep(500);
      assert.equal((await load.api(a, 'drain')).status, 200); // A takes the lease
      let openGate!: () => void;
      const gate = new Promise<void>((resolve) => (openGate = resolve));
      let renewalHeld!: () => void;
      const held = new Promise<void>((resolve) => (renewalHeld = resolve));
      proxy.add({ match: /^PUT \S*\/lease[?\s]/, hold: () => gate, seen: renewalHeld });
      await held;
      await sleep(1200); // less than a third of the lease is left: the next drain renews it first
      const drained = await load.api(a, 'drain');
      assert.equal(drained.status, 200, drained.text);
      openGate();
      await sleep(1500);
      const again = await load.api(a, 'drain');
      assert.equal(again.status, 200, `a drain after the held renewal answered: ${again.text}`);
      // While no renewal could land, the holder's own deadline (TTL less the skew margin)
      // passed and it refused writes, as it must; once the held renewal answered it holds
      // the lease again and takes every write.
      const renewed = load.recorder.now();
      await sleep(1000);
      await load.stop();
      await load.sweep(a);
      const refused = load.recorder.ops.filter((op) => op.kind === 'write' && op.outcome === 'fail' && op.start >= renewed);
      assert.deepEqual(refused.map((op) => `w${op.id} ${op.error}`), [], 'the host refused writes after its lease was renewed');
      load.check(t, 'drain renews the lease beside a held renewal');
    });
  } finally {
    await cluster.cleanup();
    await proxy.close();
  }
});

test('a manifest PUT that got no answer: once the store answers again, the volume drains and migrates', { timeout: TIMEOUT }, async (t) => {
  const m = minio()!;
  const upstream = new URL(m.endpoint);
  const proxy = await startStoreProxy({ host: upstream.hostname, port: Number(upstream.port) });
  const cluster = await startCluster((dir) => minioStore(minio(), dir));
  try {
    const a = await cluster.start('host-a', { aws: { endpoint: proxy.endpoint } });
    const b = await cluster.start('host-b');
    await withLogs([a, b], async () => {
      await createVolume(a, VOLUME, VOLUME_MIB);
      const load = new Load(a, new Map([[a, 'a'], [b, 'b']]), SEED ^ 0x7);
      t.after(() => load.stop()); // also when the test fails early
      load.start();
      await sleep(500);
      assert.equal((await load.api(a, 'drain')).status, 200);
      await sleep(300);
      // Every attempt of the next manifest PUT loses its connection: the drain cannot know whether it landed.
      proxy.add({ match: /^PUT \S*\/manifest[?\s]/, reset: true, times: 5 });
      const cut = await load.api(a, 'drain');
      assert.notEqual(cut.status, 200, cut.text);
      t.diagnostic(`drain whose manifest PUT got no answer: ${cut.status} ${cut.text}`);
      await sleep(300);
      const after = await load.api(a, 'drain');
      assert.equal(after.status, 200, `a drain once the store answers again: ${after.text}`);
      const woke = await b.api('PUT', `/api/exports/${encodeURIComponent(VOLUME)}`, { size_gb: VOLUME_MIB / 1024 });
      assert.equal(woke.status, 200, woke.text);
      const released = await load.api(a, 'release');
      assert.equal(released.status, 200, released.text);
      load.recorder.fault({ kind: 'handover', from: 'a', to: 'b', at: load.recorder.now() });
      assert.equal((await promote(b)).status, 200);
      load.target = b;
      await sleep(800);
      await load.stop();
      await load.sweep(b);
      load.check(t, 'manifest PUT without an answer, then A→B');
    });
  } finally {
    await cluster.cleanup();
    await proxy.close();
  }
});

test('A killed between its release\'s lease PUT and the answer, then restarted; B promotes: A acknowledges no write after that', { timeout: TIMEOUT }, async (t) => {
  const m = minio()!;
  const upstream = new URL(m.endpoint);
  const proxy = await startStoreProxy({ host: upstream.hostname, port: Number(upstream.port) });
  const cluster = await startCluster((dir) => minioStore(minio(), dir));
  try {
    const a = await cluster.start('host-a', { aws: { endpoint: proxy.endpoint } });
    const b = await cluster.start('host-b');
    await withLogs([a, b], async () => {
      await createVolume(a, VOLUME, VOLUME_MIB);
      const load = new Load(a, new Map([[a, 'a'], [b, 'b']]), SEED ^ 0x8);
      t.after(() => load.stop()); // also when the test fails early
      const pinned = load.client(9, 'tcp', new Rng(SEED ^ 0x88), () => (a.running ? a : null));
      load.clients.push(pinned);
      load.start();
      await sleep(500);
      assert.equal((await load.api(a, 'drain')).status, 200); // A takes the lease (renewed only after 10 s)
      const woke = await b.api('PUT', `/api/exports/${encodeURIComponent(VOLUME)}`, { size_gb: VOLUME_MIB / 1024 });
      assert.equal(woke.status, 200, woke.text);
      // The release's lease PUT: A is stopped as it goes out, the PUT lands, then A is killed.
      let landed!: () => void;
      const putLanded = new Promise<void>((resolve) => (landed = resolve));
      proxy.add({
        match: /^PUT \S*\/lease[?\s]/,
        seen: () => process.kill(a.pid, 'SIGSTOP'),
        hold: () => sleep(50).then(() => void setTimeout(landed, 300)),
      });
      const releasing = load.api(a, 'release');
      await putLanded;
      await a.kill9();
      load.recorder.fault({ kind: 'crash', host: 'a', at: load.recorder.now() });
      t.diagnostic(`release cut by the kill: ${(await releasing).status}`);
      await a.restart();
      const promoted = await promote(b);
      assert.equal(promoted.status, 200, promoted.text);
      load.recorder.fault({ kind: 'handover', from: 'a', to: 'b', at: load.recorder.now() });
      load.target = b;
      await sleep(2000); // the pinned client keeps writing to the restarted A
      await load.stop();
      await load.sweep(b);
      load.check(t, 'kill A in its release, restart, promote B');
    });
  } finally {
    await cluster.cleanup();
    await proxy.close();
  }
});
