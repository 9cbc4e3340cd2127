// PostgreSQL on a durable volume loses no committed transaction when its host dies.
//
// Host A serves a durable volume (every FLUSH acknowledged only once the store has the
// writes before it); ext4 on it through nbdfuse and a loop device holds a PostgreSQL
// cluster with fsync on, and pgbench runs against it. While pgbench is still running, the
// test reads how many transactions are committed (rows of pgbench_history), then SIGKILLs
// A's daemon and deletes its cache folder: nothing of A's local disk survives. Host B,
// which followed the volume read-only, promotes it once A's lease expires; PostgreSQL
// starts on B's copy, recovers, and must hold at least as many committed transactions,
// with pgbench's balance invariants intact. Host C, woken from the store after B drained,
// reads the same bytes as B.
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync } from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { test, type TestContext } from 'node:test';
import pg from 'pg';
import { attach, isMounted, mount, processAlive, Undo } from './harness/block-device.js';
import { connect, createVolume, drain, MiB, startCluster, waitFor, withLogs, type Cluster } from './harness/cluster.js';
import { removeDir, type Daemon } from './harness/daemon.js';
import { minioForTests, minioStore } from './harness/minio.js';
import { postgresBin, startPostgres, type Postgres } from './harness/postgres.js';
import { TOOLS, requireRoot, requireTools, run, runOk, tail } from './harness/tools.js';

const VOLUME = 'pgdata';
const SIZE = 512 * MiB;
const TIMEOUT = 900_000;

const minio = minioForTests();

/** pgbench as a child process (stopped by its pid at the end). */
function pgbench(bin: string, port: number, args: string[]): { child: ChildProcess; output: () => string; done: Promise<number | null> } {
  const child = spawn(path.join(bin, 'pgbench'), ['-h', '127.0.0.1', '-p', String(port), '-U', 'updraft', ...args, 'bench'], { stdio: ['ignore', 'pipe', 'pipe'] });
  let output = '';
  child.stdout!.on('data', (c: Buffer) => (output = (output + c.toString()).slice(-65536)));
  child.stderr!.on('data', (c: Buffer) => (output = (output + c.toString()).slice(-65536)));
  const done = new Promise<number | null>((resolve) => child.once('close', (code) => resolve(code)));
  return { child, output: () => output, done };
}

async function query(pgUrl: string, sql: string): Promise<Record<string, unknown>> {
  const client = new pg.Client({ connectionString: pgUrl });
  await client.connect();
  try {
    return (await client.query(sql)).rows[0] as Record<string, unknown>;
  } finally {
    await client.end();
  }
}

/** Committed transactions and the four balance sums pgbench keeps equal. */
async function ledger(pgUrl: string): Promise<{ history: number; accounts: string; branches: string; tellers: string; deltas: string }> {
  const row = await query(pgUrl, `SELECT
      (SELECT count(*) FROM pgbench_history) AS history,
      (SELECT coalesce(sum(abalance), 0) FROM pgbench_accounts)::text AS accounts,
      (SELECT coalesce(sum(bbalance), 0) FROM pgbench_branches)::text AS branches,
      (SELECT coalesce(sum(tbalance), 0) FROM pgbench_tellers)::text AS tellers,
      (SELECT coalesce(sum(delta), 0) FROM pgbench_history)::text AS deltas`);
  return { history: Number(row.history), accounts: String(row.accounts), branches: String(row.branches), tellers: String(row.tellers), deltas: String(row.deltas) };
}

/** SHA-256 of the whole export, read with nbdcopy. */
async function exportHash(uri: string): Promise<string> {
  const child = spawn('nbdcopy', [uri, '-'], { stdio: ['ignore', 'pipe', 'pipe'] });
  const hash = createHash('sha256');
  let err = '';
  child.stdout!.on('data', (c: Buffer) => hash.update(c));
  child.stderr!.on('data', (c: Buffer) => (err += c.toString()));
  const code = await new Promise<number | null>((resolve) => child.once('close', resolve));
  assert.equal(code, 0, `nbdcopy ${uri} - failed: ${tail(err, 10)}`);
  return hash.digest('hex');
}

/** A folder for a host's mounts: fuse/ (nbdfuse) and mnt/ (ext4). */
async function mountDirs(cluster: Cluster, host: string, undo: Undo): Promise<{ fuse: string; mnt: string }> {
  const base = path.join(cluster.dir, `${host}-mounts`);
  const dirs = { fuse: path.join(base, 'fuse'), mnt: path.join(base, 'mnt') };
  await fsp.mkdir(dirs.fuse, { recursive: true });
  await fsp.mkdir(dirs.mnt, { recursive: true });
  // PostgreSQL runs as its own user (not root): it must reach its data folder below these.
  for (const dir of [cluster.dir, base, dirs.mnt]) await fsp.chmod(dir, 0o755);
  undo.push(`check ${base} is unmounted`, async () => {
    if (isMounted(dirs.fuse) || isMounted(dirs.mnt)) throw new Error(`${base} is still mounted`);
  });
  return dirs;
}

test('PostgreSQL on a durable volume: the host dies with its cache mid-pgbench, another host promotes and recovers every committed transaction', { timeout: TIMEOUT }, async (t: TestContext) => {
  if (!requireRoot(t, 'losetup, mount')) return;
  if (!requireTools(t, [TOOLS.nbdfuse, TOOLS.nbdcopy, TOOLS.fusermount3, TOOLS.losetup, TOOLS.mkfsExt4, TOOLS.e2fsck, TOOLS.mount])) return;
  const bin = postgresBin();
  if (bin === undefined || !existsSync('/dev/fuse')) {
    if (process.env.CI) throw new Error('needs PostgreSQL and /dev/fuse (CI is set, so this is a failure, not a skip)');
    t.skip('needs PostgreSQL and /dev/fuse');
    return;
  }
  const undo = new Undo();
  const cluster = await startCluster((dir) => minioStore(minio(), dir));
  undo.push('stop the hosts', () => cluster.cleanup());
  t.after(async () => {
    const problems = await undo.runAll();
    if (problems.length > 0) throw new Error(`cleanup failed:\n${problems.join('\n')}`);
  });
  const ttl = { host: { lease_ttl_s: 6, clock_skew_margin_s: 1 } };
  const a = await cluster.start('host-a', ttl);
  const b = await cluster.start('host-b', ttl);
  await withLogs([a, b], async () => {
    await createVolume(a, VOLUME, SIZE / MiB, { flush_mode: 'durable' });
    // The volume's first manifest; everything after it reaches the store through FLUSHes.
    await drain(a, VOLUME);
    const follower = await connect(b, VOLUME);
    t.after(() => follower.disconnect().catch(() => undefined));

    // ---- host A: ext4, PostgreSQL, pgbench ------------------------------------------------
    const dirsA = await mountDirs(cluster, 'host-a', undo);
    const attachedA = await attach(a.uri(VOLUME), SIZE, dirsA.fuse, undo);
    await runOk('mkfs.ext4', ['-q', attachedA.loop], { timeoutMs: 180_000 });
    const umountA = await mount(attachedA.loop, dirsA.mnt, undo, false);
    const dataDir = path.join(dirsA.mnt, 'pg');
    await fsp.mkdir(dataDir, { mode: 0o700 });
    let pgA: Postgres | undefined = await startPostgres({ data: dataDir, durable: true });
    const stopPgA = undo.push('stop PostgreSQL on host A', async () => pgA?.stop());
    await pgA.database('bench');
    await runOk(path.join(bin, 'pgbench'), ['-h', '127.0.0.1', '-p', String(pgA.port), '-U', 'updraft', '-i', '-s', '2', '-q', 'bench'], { timeoutMs: 300_000 });
    const load = pgbench(bin, pgA.port, ['-c', '4', '-j', '2', '-T', '600', '-n']);
    undo.push('stop pgbench', async () => {
      if (load.child.exitCode === null && load.child.pid !== undefined && processAlive(load.child.pid)) load.child.kill('SIGKILL');
      await load.done;
    });
    const urlA = `${pgA.baseUrl}bench`;
    await waitFor('pgbench to commit 300 transactions', async () => (await ledger(urlA)).history >= 300, 300_000, 500);

    // ---- A dies: what pgbench has committed now must survive ------------------------------
    const committed = (await ledger(urlA)).history;
    await a.kill9();
    t.diagnostic(`host A killed with ${committed} transactions committed`);
    // Everything of A's that still runs goes the way a dead host's would; its cache folder with it.
    pgA.kill9();
    load.child.kill('SIGKILL');
    await load.done;
    await stopPgA();
    pgA = undefined;
    await run('umount', ['-l', dirsA.mnt], { timeoutMs: 60_000 });
    await umountA();
    await attachedA.detach();
    await removeDir(path.join(cluster.dir, 'host-a', 'cache'));

    // ---- B promotes once A's lease expired, PostgreSQL recovers there ----------------------
    let promoted: any;
    await waitFor('host B to promote once host A\'s lease expired', async () => {
      const r = await b.api('POST', `/api/exports/${VOLUME}/promote`);
      if (r.status === 200) promoted = r.json;
      return r.status === 200;
    }, 120_000, 500);
    t.diagnostic(`host B promoted: ${JSON.stringify(promoted)}`);
    await follower.disconnect();
    const dirsB = await mountDirs(cluster, 'host-b', undo);
    const attachedB = await attach(b.uri(VOLUME), SIZE, dirsB.fuse, undo);
    // A rw mount replays ext4's journal, as after any crash.
    const umountB = await mount(attachedB.loop, dirsB.mnt, undo, false);
    const pgB = await startPostgres({ data: path.join(dirsB.mnt, 'pg'), durable: true });
    const stopPgB = undo.push('stop PostgreSQL on host B', () => pgB.stop());
    const recovered = await ledger(`${pgB.baseUrl}bench`);
    t.diagnostic(`host B recovered ${recovered.history} transactions (${committed} were committed at the kill)`);
    assert.ok(recovered.history >= committed, `host B recovered ${recovered.history} transactions; ${committed} were committed before host A died`);
    assert.equal(recovered.accounts, recovered.deltas, 'sum(abalance) = sum(delta) after recovery');
    assert.equal(recovered.branches, recovered.deltas, 'sum(bbalance) = sum(delta) after recovery');
    assert.equal(recovered.tellers, recovered.deltas, 'sum(tbalance) = sum(delta) after recovery');
    // B writes on: the promoted volume is a working database.
    await runOk(path.join(bin, 'pgbench'), ['-h', '127.0.0.1', '-p', String(pgB.port), '-U', 'updraft', '-t', '50', '-n', 'bench'], { timeoutMs: 300_000 });
    const afterB = await ledger(`${pgB.baseUrl}bench`);
    assert.equal(afterB.history, recovered.history + 50, 'pgbench committed 50 more transactions on host B');
    await stopPgB();
    await umountB();
    await attachedB.detach();

    // ---- C, woken from the store, reads what B holds ---------------------------------------
    await drain(b, VOLUME);
    const hashB = await exportHash(b.uri(VOLUME));
    const c = await cluster.start('host-c', ttl);
    assert.equal(await exportHash(c.uri(VOLUME)), hashB, 'host C, woken from the store, reads other bytes than host B');
  });
});
