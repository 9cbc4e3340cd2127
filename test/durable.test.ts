// The `durable` flush mode (DESIGN.md: flush mode; docs/architecture.md: the durable log):
// a FLUSH is acknowledged only once the store holds every write acknowledged before it, so
// a host that dies with its cache loses nothing that was flushed; a stale holder's log is
// never replayed; a hung store fails the FLUSH within its bound; log PUTs are shared by the
// FLUSHes of every durable volume of a host and sealed like packs.
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import {
  connect, createVolume, exportInfo, fileStore, metric, MiB, pauseOutsideStoreLocks, readAll, startCluster, waitFor, withLogs, type SharedStore,
} from './harness/cluster.js';
import { removeDir, scratchDir, type Daemon } from './harness/daemon.js';
import { assertVerified, fio, verifyArgs } from './harness/fio.js';
import { TOOLS, requireTools } from './harness/tools.js';
import { minioForTests, minioStore } from './harness/minio.js';
import { NbdCommandError, type NbdClient } from './harness/nbd-client.js';
import { openObjectStore } from '../src/objectstore/index.js';
import { encodeLog, logKey } from '../src/store/log.js';
import { PLAINTEXT } from '../src/crypto/cipher.js';
import { parseCompression } from '../src/crypto/compress.js';
import { createLogger } from '../src/log.js';

const TIMEOUT = 300_000;
const SIZE_MIB = 16;
/** A short lease, so that a dead holder's lease runs out within seconds. */
const SHORT_LEASE = { host: { lease_ttl_s: 4, clock_skew_margin_s: 1 } };
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));
const post = (d: Daemon, name: string, action: string) => d.api('POST', `/api/exports/${encodeURIComponent(name)}/${action}`);

const minio = minioForTests();

/**
 * Batches of writes (unaligned small ones, sector-sized ones, a zeroed range, a large one),
 * each followed by a FLUSH, then a write with FUA; returns the image as of that. A last
 * write is neither flushed nor FUA (it need not survive).
 */
async function writeFlushedBatches(client: NbdClient, image: Buffer, batches: number): Promise<Buffer> {
  const put = async (offset: number, data: Buffer) => {
    await client.write(offset, data);
    data.copy(image, offset);
  };
  for (let batch = 0; batch < batches; batch++) {
    const base = (batch * 1.5 * MiB) % (SIZE_MIB * MiB - 2 * MiB);
    await put(base + 512 + batch * 7, randomBytes(3000));
    await put(base + 64 * 1024, randomBytes(4096));
    await put(base + 300 * 1024, randomBytes(256 * 1024));
    await client.writeZeroes(base + 128 * 1024, 128 * 1024);
    image.fill(0, base + 128 * 1024, base + 256 * 1024);
    await put(base + 700 * 1024, randomBytes(16 * 1024));
    await client.flush();
  }
  // A write with FUA is durable on its own, as a FLUSH after it would make it.
  const fua = randomBytes(4096);
  await client.write(SIZE_MIB * MiB - 128 * 1024, fua, { fua: true });
  fua.copy(image, SIZE_MIB * MiB - 128 * 1024);
  const flushed = Buffer.from(image);
  await put(SIZE_MIB * MiB - 64 * 1024, randomBytes(8192));
  return flushed;
}

/** 4 KiB sectors where `got` differs from `want`. */
function sectorsDiffering(got: Buffer, want: Buffer): number {
  let n = 0;
  for (let at = 0; at < want.length; at += 4096) if (!got.subarray(at, at + 4096).equals(want.subarray(at, at + 4096))) n++;
  return n;
}

/**
 * Host A serves the volume in `mode`; B follows it read-only. A writes and flushes, then is
 * SIGKILLed and its cache folder deleted. Once the lease has run out B promotes; then a
 * third host C wakes the volume from the store. Returns the sectors of the last FLUSH's
 * image that B and C lost, and B's promotion answer.
 */
async function killTheHolder(store: SharedStore | ((dir: string) => SharedStore), mode: 'durable' | 'demand') {
  const cluster = await startCluster(store);
  try {
    const settings = { ...SHORT_LEASE, volumes: { flush_mode: mode } };
    const a = await cluster.start('host-a', settings);
    const b = await cluster.start('host-b', settings);
    let result: { lostOnB: number; lostOnC: number; promoted: any; puts: number } | undefined;
    await withLogs([a, b], async () => {
      const name = `killed-${mode}`;
      await createVolume(a, name, SIZE_MIB, { flush_mode: mode });
      const ca = await connect(a, name);
      const image = Buffer.alloc(SIZE_MIB * MiB);
      // A first FLUSHed batch and a drain: the store has a manifest either way.
      await writeFlushedBatches(ca, image, 1);
      const drained = await post(a, name, 'drain');
      assert.equal(drained.status, 200, drained.text);
      const cb = await connect(b, name);
      assert.equal((await exportInfo(b, name)).read_only, true);
      const flushed = await writeFlushedBatches(ca, image, 6);
      if (mode === 'durable') {
        // B follows the log as well as the manifests: it serves every FLUSHed write before A dies
        // (the write after the last FUA, never flushed, is left out of the comparison).
        const unflushed = (b: Buffer) => Buffer.from(b).fill(0, SIZE_MIB * MiB - 64 * 1024, SIZE_MIB * MiB - 56 * 1024);
        await waitFor('B, following the log, to serve every FLUSHed write', async () =>
          sectorsDiffering(unflushed(await readAll(cb, 0, SIZE_MIB * MiB)), unflushed(flushed)) === 0, 30_000, 200);
      }
      const puts = await metric(a, 'updraft_durable_log_puts_total');
      await a.kill9();
      fs.rmSync(path.join(a.dir, 'cache'), { recursive: true, force: true });
      // The lease runs out on the store's clock (4 s after A's last renewal).
      await sleep(5_000);
      let promoted: any;
      await waitFor('B to promote the volume', async () => {
        const r = await post(b, name, 'promote');
        promoted = r.json;
        return r.status === 200;
      }, 30_000, 500);
      const onB = await readAll(cb, 0, SIZE_MIB * MiB);
      await cb.disconnect();
      if (cluster.store.label === 'file://' && mode === 'durable') {
        // B's manifest covers A's log: its objects are deleted, not left behind.
        const logDir = path.join(cluster.dir, 'store', 'log', 'host-a');
        await waitFor("A's log objects to be deleted once B's manifest covers them", async () =>
          !fs.existsSync(logDir) || fs.readdirSync(logDir).filter((f) => !f.startsWith('.')).length === 0);
      }
      const c = await cluster.start('host-c', settings);
      const cc = await connect(c, name);
      assert.equal((await exportInfo(c, name)).read_only, true, 'C must follow the volume B writes');
      const onC = await readAll(cc, 0, SIZE_MIB * MiB);
      await cc.disconnect();
      result = { lostOnB: sectorsDiffering(onB, flushed), lostOnC: sectorsDiffering(onC, flushed), promoted, puts };
    });
    return result!;
  } finally {
    await cluster.cleanup();
  }
}

for (const [label, store] of [['s3:// (MinIO)', (dir: string) => minioStore(minio(), dir)], ['file://', fileStore]] as const) {
  test(`${label}: a durable volume's flushed writes survive the holder's SIGKILL with its cache deleted; B promotes and replays the log, C wakes the same; a demand volume loses them`, { timeout: TIMEOUT }, async () => {
    const durable = await killTheHolder(store, 'durable');
    assert.ok(durable.puts > 0, 'the durable holder put no log object');
    assert.equal(durable.lostOnB, 0, `B lost ${durable.lostOnB} flushed sectors after promoting`);
    assert.equal(durable.lostOnC, 0, `C lost ${durable.lostOnC} flushed sectors`);
    assert.ok(durable.promoted.replayed?.records > 0, `the promotion replayed no log record: ${JSON.stringify(durable.promoted)}`);
    assert.equal(durable.promoted.sequence, durable.promoted.replayed.sequence, 'the promotion answers with the sequence it recovered to');

    // The same run in demand mode: the store has only the drained batch.
    const demand = await killTheHolder(store, 'demand');
    assert.equal(demand.puts, 0);
    assert.ok(demand.lostOnB > 0, 'a demand volume kept its flushed writes without the store: the run proves nothing');
    assert.equal(demand.promoted.replayed, undefined);
  });
}

/**
 * fio writes a durable volume on A with crc32c verify headers, a FLUSH after every 16
 * writes and one at the end; B, a replica, verifies every block while A is still up
 * (it follows A's log, not only its manifest). A is SIGKILLed and its cache deleted, B
 * promotes once the lease runs out and verifies again, and so does C, woken from the store.
 */
async function fioThroughFailover(store: SharedStore | ((dir: string) => SharedStore)): Promise<void> {
  const cluster = await startCluster(store);
  const cwd = await scratchDir('updraft-durable-fio-');
  try {
    const settings = { ...SHORT_LEASE, volumes: { flush_mode: 'durable' } };
    const a = await cluster.start('host-a', settings);
    const b = await cluster.start('host-b', settings);
    await withLogs([a, b], async () => {
      const name = 'durable-fio';
      await createVolume(a, name, SIZE_MIB * 2, { flush_mode: 'durable' });
      // A manifest first, so B can open the volume as a replica.
      const drained = await post(a, name, 'drain');
      assert.equal(drained.status, 200, drained.text);
      const cb = await connect(b, name);
      assert.equal((await exportInfo(b, name)).read_only, true);
      const job = ['--name=durable', '--rw=randwrite', '--bs=4k', '--iodepth=16', `--size=${SIZE_MIB}M`, '--fsync=16', '--end_fsync=1'];
      const written = await fio(cwd, [...job, ...verifyArgs(a.uri(name)), '--do_verify=1']);
      assertVerified(written);
      assert.ok((await metric(a, 'updraft_durable_log_puts_total')) > 0, 'A put no log object');
      const verifyOn = async (d: Daemon, what: string) => {
        const verified = await fio(cwd, [...job, ...verifyArgs(d.uri(name)), '--verify_only']);
        assert.equal(verified.code, 0, `fio's verify on ${what} failed\n${verified.output}`);
        assert.equal(verified.jobs[0].error, 0, `fio's verify on ${what}: error ${verified.jobs[0].error}\n${verified.output}`);
        assert.equal(verified.jobs[0].read.io_bytes, SIZE_MIB * MiB, `fio's verify on ${what} did not read every block\n${verified.output}`);
      };
      // No drain since the first: B serves the FLUSHed writes from A's log, up to the last sequence the store holds.
      const stored = (await exportInfo(a, name)).durable_sequence as number;
      await waitFor(`B to follow A's log up to sequence ${stored}`, async () => (await exportInfo(b, name)).sequence >= stored, 30_000, 200);
      assert.ok((await exportInfo(b, name)).replica?.log !== null, 'B serves A\'s log past the manifest');
      await verifyOn(b, 'the replica B while A is up');
      await a.kill9();
      fs.rmSync(path.join(a.dir, 'cache'), { recursive: true, force: true });
      await sleep(5_000);
      await waitFor('B to promote the volume', async () => (await post(b, name, 'promote')).status === 200, 30_000, 500);
      await verifyOn(b, 'B after promoting');
      const c = await cluster.start('host-c', settings);
      await verifyOn(c, 'C, woken from the store');
      await cb.disconnect();
    });
  } finally {
    await cluster.cleanup();
    await removeDir(cwd);
  }
}

for (const [label, store] of [['s3:// (MinIO)', (dir: string) => minioStore(minio(), dir)], ['file://', fileStore]] as const) {
  test(`${label}: fio writes a durable volume with verify and a FLUSH every 16 writes; the replica verifies before the holder dies, and after it promotes, and so does a third host`, { timeout: TIMEOUT }, async (t) => {
    if (!requireTools(t, [TOOLS.fio])) return;
    await fioThroughFailover(store);
  });
}

test('a volume switched to durable at run time (POST flush-mode): its next FLUSH drains, later ones log, a dead holder loses none of them, and the next host keeps it durable', { timeout: TIMEOUT }, async () => {
  const cluster = await startCluster(fileStore);
  try {
    const a = await cluster.start('host-a', SHORT_LEASE);
    // B's own default is demand: the volume's mode comes with its manifest.
    const b = await cluster.start('host-b', SHORT_LEASE);
    await withLogs([a, b], async () => {
      const name = 'switched';
      await createVolume(a, name, SIZE_MIB);
      const ca = await connect(a, name);
      const image = Buffer.alloc(SIZE_MIB * MiB);
      await writeFlushedBatches(ca, image, 1);
      assert.equal((await exportInfo(a, name)).flush_mode, 'demand');
      const switched = await a.api('POST', `/api/exports/${name}/flush-mode`, { flush_mode: 'durable' });
      assert.equal(switched.status, 200, switched.text);
      const flushed = await writeFlushedBatches(ca, image, 3);
      const info = await exportInfo(a, name);
      assert.equal(info.flush_mode, 'durable');
      assert.ok(info.durable_sequence >= info.manifest_sequence && info.durable_sequence > 0, JSON.stringify(info));
      assert.ok(await metric(a, 'updraft_durable_log_puts_total') > 0, 'the FLUSHes after the first one put no log object');
      await a.kill9();
      fs.rmSync(path.join(a.dir, 'cache'), { recursive: true, force: true });
      await sleep(5_000);
      const cb = await connect(b, name);
      const onB = await exportInfo(b, name);
      assert.equal(onB.read_only, false);
      assert.equal(onB.flush_mode, 'durable', 'the volume came to host B in its own default mode, not in the durable mode its manifest names');
      assert.equal(sectorsDiffering(await readAll(cb, 0, SIZE_MIB * MiB), flushed), 0, 'B lost flushed writes of the switched volume');
      await cb.disconnect();
    });
  } finally {
    await cluster.cleanup();
  }
});

test('a switch to durable whose settings file cannot be saved fails, names the file, and changes nothing: the volume reports its old mode and its FLUSHes put no log', { timeout: TIMEOUT }, async () => {
  const cluster = await startCluster(fileStore);
  try {
    const a = await cluster.start('host-a');
    await withLogs([a], async () => {
      const name = 'unsaved';
      await createVolume(a, name, SIZE_MIB);
      const c = await connect(a, name);
      await c.write(0, randomBytes(64 * 1024));
      await c.flush();
      // A directory where the settings file's new copy is written: the save fails.
      const blocker = path.join(a.dir, 'cache', 'volumes', name, '@', 'store.json.tmp');
      fs.mkdirSync(blocker);
      const refused = await a.api('POST', `/api/exports/${name}/flush-mode`, { flush_mode: 'durable' });
      assert.equal(refused.status, 500, refused.text);
      assert.match(refused.json.error, /settings could not be saved, so they are unchanged: .*store\.json\.tmp/);
      const info = await exportInfo(a, name);
      assert.equal(info.flush_mode, 'demand', 'the volume reports the mode whose switch failed');
      // A setting the volume did not hold yet, refused the same way, is not held afterwards either.
      const followRefused = await a.api('PUT', `/api/exports/${name}`, { size_gb: SIZE_MIB / 1024, replica_follow_interval_ms: 250 });
      assert.equal(followRefused.status, 500, followRefused.text);
      await c.write(MiB, randomBytes(64 * 1024));
      await c.flush();
      assert.equal(await metric(a, 'updraft_durable_log_puts_total'), 0);
      // Once the file can be written, the same switch goes through.
      fs.rmdirSync(blocker);
      const switched = await a.api('POST', `/api/exports/${name}/flush-mode`, { flush_mode: 'durable' });
      assert.equal(switched.status, 200, switched.text);
      assert.equal((await exportInfo(a, name)).flush_mode, 'durable');
      const saved = JSON.parse(fs.readFileSync(path.join(a.dir, 'cache', 'volumes', name, '@', 'store.json'), 'utf8'));
      assert.equal(saved.replicaFollowIntervalMs, undefined, 'the refused follow interval was saved with the next settings change');
      await c.disconnect();
    });
  } finally {
    await cluster.cleanup();
  }
});

test('a holder paused past its lease while another host promotes: its later FLUSHes fail, and its log records are never replayed', { timeout: TIMEOUT }, async () => {
  const cluster = await startCluster(fileStore);
  const storeDir = path.join(cluster.dir, 'store');
  let paused: number | undefined;
  try {
    const settings = { ...SHORT_LEASE, volumes: { flush_mode: 'durable' } };
    const a = await cluster.start('host-a', settings);
    const b = await cluster.start('host-b', settings);
    await withLogs([a, b], async () => {
      const name = 'stale-holder';
      await createVolume(a, name, SIZE_MIB, { flush_mode: 'durable' });
      const ca = await connect(a, name);
      const first = randomBytes(MiB);
      await ca.write(0, first);
      await ca.flush();
      const logged = randomBytes(64 * 1024);
      await ca.write(2 * MiB, logged);
      await ca.flush();
      const aInfo = await exportInfo(a, name);
      const cb = await connect(b, name);

      paused = a.pid;
      await pauseOutsideStoreLocks(a.pid, storeDir);
      await sleep(5_000);
      const promoted = await post(b, name, 'promote');
      assert.equal(promoted.status, 200, promoted.text);
      assert.ok((await readAll(cb, 2 * MiB, 64 * 1024)).equals(logged), "B did not replay the holder's flushed write");
      const bData = randomBytes(64 * 1024);
      await cb.write(4 * MiB, bData);
      await cb.flush();

      // A record of A's generation as a stale holder would put it after B took over.
      const store = openObjectStore(`file://${storeDir}`, {}, createLogger('error'));
      const key = logKey('host-a', Date.now(), 99);
      const forged = randomBytes(64 * 1024);
      await store.put(key, encodeLog(key, {
        host: 'host-a', created: Date.now(),
        entries: [{ volume: name, generation: aInfo.lease_generation, manifestSequence: aInfo.manifest_sequence, sequence: aInfo.sequence + 1000, size: SIZE_MIB * MiB, extents: [{ offset: 4 * MiB, length: forged.length, zero: false, data: forged }] }],
      }, parseCompression('lz4'), PLAINTEXT));
      await store.close();

      // A resumes: a write it takes is never acknowledged by a FLUSH.
      process.kill(a.pid, 'SIGCONT');
      paused = undefined;
      const late = randomBytes(64 * 1024);
      const wrote = await ca.write(4 * MiB, late).then(() => true, (err: unknown) => {
        assert.ok(err instanceof NbdCommandError && err.code === 'EPERM', `unexpected error: ${String(err)}`);
        return false;
      });
      if (wrote) await assert.rejects(ca.flush(), (err: unknown) => err instanceof NbdCommandError && err.code === 'EIO', 'the stale holder acknowledged a FLUSH');
      await ca.disconnect().catch(() => undefined);
      assert.ok((await readAll(cb, 4 * MiB, 64 * 1024)).equals(bData), "the stale holder changed B's data");

      // B dies; C takes over from the store and replays B's log only.
      await b.kill9();
      await sleep(5_000);
      const c = await cluster.start('host-c', settings);
      const cc = await connect(c, name);
      assert.equal((await exportInfo(c, name)).read_only, false, 'C should have taken the expired lease');
      assert.ok((await readAll(cc, 4 * MiB, 64 * 1024)).equals(bData), "C does not see B's flushed write (or replayed the stale holder's record)");
      assert.ok((await readAll(cc, 0, MiB)).equals(first));
      assert.ok((await readAll(cc, 2 * MiB, 64 * 1024)).equals(logged));
      await cc.disconnect();
    });
  } finally {
    if (paused !== undefined) process.kill(paused, 'SIGCONT');
    await cluster.cleanup();
  }
});

test('a hung store: a durable FLUSH fails with EIO after durable_flush_timeout_ms, acknowledged writes stay readable, and once the store answers a FLUSH puts everything', { timeout: TIMEOUT }, async () => {
  const cluster = await startCluster((dir) => minioStore(minio(), dir));
  try {
    const settings = {
      host: { lease_ttl_s: 8, clock_skew_margin_s: 2 },
      storage: { request_timeout_s: 1, request_deadline_s: 3 },
      volumes: { flush_mode: 'durable', durable_flush_timeout_ms: 1500 },
    };
    const a = await cluster.start('host-a', settings);
    await withLogs([a], async () => {
      const name = 'hung-store';
      await createVolume(a, name, SIZE_MIB, { flush_mode: 'durable' });
      const ca = await connect(a, name);
      const before = randomBytes(MiB);
      await ca.write(0, before);
      await ca.flush();
      const during = randomBytes(256 * 1024);
      minio()!.pause();
      try {
        await ca.write(MiB, during);
        const started = Date.now();
        await assert.rejects(ca.flush(), (err: unknown) => err instanceof NbdCommandError && err.code === 'EIO', 'a FLUSH succeeded while the store hung');
        assert.ok(Date.now() - started < 10_000, 'the FLUSH was not bounded by durable_flush_timeout_ms');
        assert.ok((await ca.read(MiB, during.length)).equals(during), 'an acknowledged write is not readable while the store hangs');
        // Past request_deadline_s: the log PUT in flight fails, and its sectors wait for the next one.
        await sleep(4_000);
      } finally {
        minio()!.resume();
      }
      await waitFor('a durable FLUSH to succeed once the store answers', () => ca.flush().then(() => true, () => false), 30_000, 500);
      assert.ok(await metric(a, 'updraft_durable_log_put_failures_total') > 0);
      await a.kill9();
      fs.rmSync(path.join(a.dir, 'cache'), { recursive: true, force: true });
      await sleep(9_000);
      const b = await cluster.start('host-b', settings);
      const cb = await connect(b, name);
      assert.ok((await readAll(cb, 0, MiB)).equals(before));
      assert.ok((await readAll(cb, MiB, during.length)).equals(during), 'the write acknowledged during the hang is not in the store after the FLUSH that succeeded');
      await cb.disconnect();
    });
  } finally {
    try {
      minio()?.resume();
    } catch {
      // Not paused.
    }
    await cluster.cleanup();
  }
});

test('group commit: FLUSHes of several durable volumes share log PUTs; on an encrypted store a log object holds no plaintext', { timeout: TIMEOUT }, async () => {
  const cluster = await startCluster(fileStore);
  const storeDir = path.join(cluster.dir, 'store');
  try {
    const a = await cluster.start('host-a', {
      storage: { encryption_password: 'durable log test password' },
      volumes: { flush_mode: 'durable', continuous_manifest_interval_ms: 600_000 },
    }, { UPDRAFT_STORE_FAULTS: 'seed=1,latency=20' });
    await withLogs([a], async () => {
      const names = ['group-0', 'group-1', 'group-2', 'group-3'];
      const clients: NbdClient[] = [];
      for (const name of names) {
        await createVolume(a, name, SIZE_MIB, { flush_mode: 'durable' });
        const client = await connect(a, name);
        // The first FLUSH drains (the volume takes its lease and first manifest).
        await client.write(0, Buffer.alloc(4096, 1));
        await client.flush();
        clients.push(client);
      }
      const puts0 = await metric(a, 'updraft_durable_log_puts_total');
      const flushes0 = await metric(a, 'updraft_durable_flushes_committed_total');
      // Random data: stored raw when not sealed (it does not compress), so a slice of it would show.
      const written: Buffer[] = [];
      await Promise.all(clients.map(async (client, v) => {
        for (let i = 0; i < 15; i++) {
          const data = randomBytes(4096);
          written.push(data);
          await client.write((v * 64 + i) * 4096 + MiB, data);
          await client.flush();
        }
      }));
      const puts = (await metric(a, 'updraft_durable_log_puts_total')) - puts0;
      const flushes = (await metric(a, 'updraft_durable_flushes_committed_total')) - flushes0;
      assert.equal(flushes, 60);
      assert.ok(puts > 0 && puts < flushes, `${puts} log PUTs for ${flushes} FLUSHes: no group commit`);
      for (const name of names) assert.ok((await exportInfo(a, name)).durable_sequence > 0);

      const logDir = path.join(storeDir, 'log');
      const objects = fs.readdirSync(logDir, { recursive: true, withFileTypes: true }).filter((e) => e.isFile() && !e.name.startsWith('.'));
      assert.ok(objects.length > 0, 'no log object in the store');
      for (const entry of objects) {
        const body = fs.readFileSync(path.join(entry.parentPath ?? (entry as any).path, entry.name));
        for (const data of written) assert.equal(body.indexOf(data.subarray(0, 64)), -1, `log object ${entry.name} holds written plaintext`);
      }
      for (const client of clients) await client.disconnect();
    });
  } finally {
    await cluster.cleanup();
    await removeDir(storeDir).catch(() => undefined);
  }
});
