// The GC behaviours every refcount database must show, run by gc-sqlite.test.ts (the
// embedded default) and gc-postgres.test.ts (a real PostgreSQL server): a seeded random
// lifecycle with GC running at a zero grace period, SIGKILL inside a manifest write's
// refcount transaction and inside a deletion cycle, the SQL cost of a flush with 1
// and with 1,000 volumes registered, a lazy fork's shared pack set, and the holds of
// blocks sealed while the store had them (gc-seal-holds.ts).
import { prng } from '../../src/objectstore/faults.js';
import { PLAINTEXT } from '../../src/crypto/cipher.js';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import path from 'node:path';
import { test } from 'node:test';
import { Collector } from '../../src/gc/collector.js';
import { PackRefcounts } from '../../src/gc/refcounts.js';
import { uploadsKey } from '../../src/gc/uploads.js';
import { openGcDatabase } from '../../src/gc/sql.js';
import { createLogger } from '../../src/log.js';
import { openObjectStore } from '../../src/objectstore/index.js';
import { decodeManifest } from '../../src/store/manifest-decode.js';
import { packIdFromKey, packKey } from '../../src/store/pack.js';
import { CHUNK, connect, metric, MiB, readAll, waitFor, withLogs } from './cluster.js';
import { startDaemon, type Daemon, type TomlTable } from './daemon.js';
import type { NbdClient } from './nbd-client.js';
import { DAEMON_MAIN } from './daemon.js';
import { defineSealHoldTests } from './gc-seal-holds.js';
import { run } from './tools.js';
import { gcScratch } from './gc-scratch.js';

const TIMEOUT = 600_000;
const SIZE = 2 * MiB;
const CHUNKS = SIZE / CHUNK;

export interface GcBackend {
  label: string;
  /** The [gc] keys that select this database, for a fresh database named `name`. */
  gcToml(name: string): Promise<TomlTable>;
}

/** What the store holds: packs named by a manifest or checkpoint (live), packs nothing names (dead), named packs that are missing. */
export async function storeAudit(storeDir: string): Promise<{ manifests: number; packs: number; live: Set<string>; dead: string[]; missing: string[] }> {
  const store = openObjectStore(`file://${storeDir}`, {});
  try {
    const live = new Set<string>();
    let manifests = 0;
    for (const o of await store.list('volumes/')) {
      if (!/\/(manifest|checkpoints\/[^/]+)$/.test(o.key)) continue;
      const object = await store.get(o.key);
      if (object === undefined) continue;
      manifests++;
      for (const b of decodeManifest(o.key, object.body, PLAINTEXT).blocks) live.add(b.pack);
    }
    const packs = new Set((await store.list('packs/')).map((o) => packIdFromKey(o.key)!).filter(Boolean));
    return {
      manifests, packs: packs.size, live,
      dead: [...packs].filter((p) => !live.has(p)),
      missing: [...live].filter((p) => !packs.has(p)),
    };
  } finally {
    await store.close();
  }
}

async function api(d: Daemon, method: string, url: string, body?: unknown, expect = 200): Promise<any> {
  const r = await d.api(method, url, body);
  assert.equal(r.status, expect, `${method} ${url}: ${r.text}`);
  return r.json;
}

/** `updraft scrub -c CONFIG`: exit code and report. */
export async function scrub(d: Daemon): Promise<{ code: number | null; report: any; stderr: string }> {
  const r = await run(process.execPath, [DAEMON_MAIN, 'scrub', '-c', d.configPath], { timeoutMs: 120_000 });
  return { code: r.code, report: r.stdout.trim() ? JSON.parse(r.stdout) : null, stderr: r.stderr };
}

function baseToml(gc: TomlTable, extra: TomlTable = {}): TomlTable {
  return {
    host: { id: 'gc-host' },
    volumes: { seal_idle_ms: 200 },
    servers: { nbd: { auto_create_size_gb: 0 } },
    gc: { grace_period: '0s', interval: '1s', reconcile_interval: '1h', ...gc },
    ...extra,
  };
}

/** The volume in the model: what reads must return, locally and from the store. */
interface Model {
  live: Buffer;
  /** The content of its manifest in the store, when it has one. */
  stored?: Buffer;
  open: boolean;
  client?: NbdClient;
  checkpoints: Map<string, Buffer>;
}

export function defineGcTests(backend: GcBackend): void {
  const label = backend.label;
  defineSealHoldTests(backend, (gc) => baseToml(gc), 'gc-host');

  test(`${label}: 500+ seeded lifecycle events over 20+ volumes with GC at a zero grace period: every volume and checkpoint reads back, no dead pack is left`, { timeout: TIMEOUT }, async (t) => {
    const seed = Number(process.env.UPDRAFT_GC_SEED ?? Math.floor(Math.random() * 2 ** 31));
    t.diagnostic(`seed ${seed} (UPDRAFT_GC_SEED=${seed} replays it)`);
    const rand = prng(seed);
    const pick = <T>(items: T[]): T => items[Math.floor(rand() * items.length)];
    const d = await startDaemon({ toml: baseToml(await backend.gcToml(`life${seed}`)) });
    try {
      await withLogs([d], async () => {
        // Shared blocks, so volumes dedup against each other's packs (and GC races dedup).
        const pool = Array.from({ length: 24 }, () => randomBytes(CHUNK));
        const volumes = new Map<string, Model>();
        let names = 0;
        let checkpoints = 0;
        const counts: Record<string, number> = {};
        const openNames = () => [...volumes].filter(([, m]) => m.open).map(([n]) => n);
        const closeClient = async (m: Model) => {
          await m.client?.disconnect().catch(() => undefined);
          m.client = undefined;
        };
        const clientOf = async (name: string, m: Model) => (m.client ??= await connect(d, name));
        const create = async () => {
          const name = `v${names++}`;
          await api(d, 'PUT', `/api/exports/${name}`, { size_gb: SIZE / 1024 ** 3 }, 201);
          volumes.set(name, { live: Buffer.alloc(SIZE), open: true, checkpoints: new Map() });
        };
        for (let i = 0; i < 20; i++) await create();
        const events = 520;
        for (let e = 0; e < events; e++) {
          const roll = rand();
          const open = openNames();
          let kind: string;
          if (roll < 0.04 && volumes.size < 40) {
            kind = 'create';
            await create();
          } else if (roll < 0.42 && open.length > 0) {
            kind = 'write';
            const name = pick(open);
            const m = volumes.get(name)!;
            const c = await clientOf(name, m);
            for (let n = 1 + Math.floor(rand() * 4); n > 0; n--) {
              const chunk = Math.floor(rand() * CHUNKS);
              const data = rand() < 0.7 ? pick(pool) : randomBytes(CHUNK);
              await c.write(chunk * CHUNK, data);
              data.copy(m.live, chunk * CHUNK);
            }
            if (rand() < 0.3) await c.flush();
          } else if (roll < 0.6 && open.length > 0) {
            kind = 'drain';
            const name = pick(open);
            await api(d, 'POST', `/api/exports/${name}/drain`);
            volumes.get(name)!.stored = Buffer.from(volumes.get(name)!.live);
          } else if (roll < 0.66 && open.length > 0) {
            kind = 'fork';
            const source = pick(open);
            const target = `f${names++}`;
            await api(d, 'POST', `/api/exports/${source}/fork`, { target }, 201);
            const content = Buffer.from(volumes.get(source)!.live);
            volumes.set(target, { live: content, stored: Buffer.from(content), open: true, checkpoints: new Map() });
          } else if (roll < 0.7) {
            const sources = [...volumes].filter(([, m]) => m.stored !== undefined).map(([n]) => n);
            if (sources.length === 0) continue;
            kind = 'lazy-fork';
            const source = pick(sources);
            const target = `f${names++}`;
            await api(d, 'POST', `/api/exports/${source}/fork`, { target, mode: 'lazy' }, 201);
            const content = Buffer.from(volumes.get(source)!.stored!);
            volumes.set(target, { live: content, stored: Buffer.from(content), open: true, checkpoints: new Map() });
          } else if (roll < 0.77 && open.length > 0) {
            kind = 'checkpoint';
            const name = pick(open);
            const cp = `cp${checkpoints++}`;
            await api(d, 'POST', `/api/exports/${name}/checkpoints`, { name: cp });
            volumes.get(name)!.checkpoints.set(cp, Buffer.from(volumes.get(name)!.live));
          } else if (roll < 0.8) {
            const withCp = [...volumes].filter(([, m]) => m.checkpoints.size > 0).map(([n]) => n);
            if (withCp.length === 0) continue;
            kind = 'checkpoint-delete';
            const name = pick(withCp);
            const cp = pick([...volumes.get(name)!.checkpoints.keys()]);
            await api(d, 'DELETE', `/api/exports/${name}/checkpoints/${cp}`);
            const m = volumes.get(name)!;
            m.checkpoints.delete(cp);
            // A volume deleted before any drain lived on only in its checkpoints: with the last one gone, nothing is left to purge.
            if (!m.open && m.stored === undefined && m.checkpoints.size === 0) volumes.delete(name);
          } else if (roll < 0.85 && open.length > 8) {
            kind = 'delete';
            const name = pick(open);
            const m = volumes.get(name)!;
            await closeClient(m);
            await api(d, 'DELETE', `/api/exports/${name}`);
            // A volume in the store is drained as it is released; one never stored is gone.
            m.open = false;
            if (m.stored !== undefined) m.stored = Buffer.from(m.live);
            else if (m.checkpoints.size === 0) volumes.delete(name);
          } else if (roll < 0.88) {
            const closed = [...volumes].filter(([, m]) => !m.open && m.stored !== undefined).map(([n]) => n);
            if (closed.length === 0) continue;
            kind = 'wake';
            const name = pick(closed);
            await api(d, 'PUT', `/api/exports/${name}`, { size_gb: SIZE / 1024 ** 3 });
            const m = volumes.get(name)!;
            m.open = true;
            m.live = Buffer.from(m.stored!);
          } else if (roll < 0.93 && volumes.size > 20) {
            kind = 'purge';
            const name = pick([...volumes.keys()]);
            const m = volumes.get(name)!;
            await closeClient(m);
            const r = await d.api('DELETE', `/api/exports/${name}?purge=true&force=true`);
            // A volume neither open nor in the store (deleted before any drain, only checkpoints) still purges them.
            assert.ok(r.status === 200, `purge ${name}: ${r.text}`);
            volumes.delete(name);
          } else {
            kind = 'gc';
            await api(d, 'POST', '/api/gc', { reconcile: rand() < 0.2 });
          }
          counts[kind] = (counts[kind] ?? 0) + 1;
        }
        const total = Object.values(counts).reduce((a, b) => a + b, 0);
        t.diagnostic(`events: ${JSON.stringify(counts)} (${total}); volumes now ${volumes.size}`);
        assert.ok(total >= 500, `only ${total} events ran`);
        for (const m of volumes.values()) await closeClient(m);
        // An open volume's uploads since its last manifest (a fork's or checkpoint's capture)
        // stay held while it is served here: its drain names what it needs and lets go of the rest.
        for (const [name, m] of volumes) {
          if (!m.open) continue;
          await api(d, 'POST', `/api/exports/${name}/drain`);
          m.stored = Buffer.from(m.live);
        }

        // Reconcile and delete what is dead (grace 0): the store then holds exactly the live packs.
        const gc = await api(d, 'POST', '/api/gc', { reconcile: true });
        assert.equal(gc.cycle.skipped, undefined, JSON.stringify(gc));
        // The counts kept write by write (forks sharing pack sets included) needed no correction, in any reconciliation.
        const corrections = Object.fromEntries(await Promise.all(['manifest', 'set', 'refcount'].map(async (k) => [k, await metric(d, `updraft_gc_${k}_corrections_total`)])));
        assert.deepEqual(corrections, { manifest: 0, set: 0, refcount: 0 }, 'reconciliation corrected counts kept write by write');
        const audit = await storeAudit(path.join(d.dir, 'store'));
        assert.deepEqual(audit.missing, [], 'manifests name packs that are not in the store');
        assert.deepEqual(audit.dead, [], 'packs no manifest or checkpoint names are left after reconciliation');
        const deletedLive = await metric(d, 'updraft_gc_packs_deleted_total');
        t.diagnostic(`store: ${audit.manifests} manifests and checkpoints, ${audit.packs} packs; GC deleted ${deletedLive} packs while volumes lived`);
        const scrubbed = await scrub(d);
        assert.equal(scrubbed.code, 0, `scrub: ${scrubbed.stderr}`);

        // Every surviving volume and checkpoint reads back exactly.
        for (const [name, m] of volumes) {
          if (!m.open && m.stored !== undefined) {
            await api(d, 'PUT', `/api/exports/${name}`, { size_gb: SIZE / 1024 ** 3 });
            m.live = m.stored;
            m.open = true;
          }
          if (m.open) {
            const c = await connect(d, name);
            assert.ok((await readAll(c, 0, SIZE)).equals(m.live), `volume ${name} reads back differently`);
            await c.disconnect();
          }
          for (const [cp, content] of m.checkpoints) {
            const c = await connect(d, `${name}@${cp}`);
            assert.ok((await readAll(c, 0, SIZE)).equals(content), `checkpoint ${name}@${cp} reads back differently`);
            await c.disconnect();
          }
        }

        // Every volume purged (its checkpoints too): nothing names or holds a pack any more, so GC
        // deletes every one. A run may free none while volumes live (blocks shared through the pool
        // keep most packs named), so this is where every hold is shown to be let go of.
        for (const name of volumes.keys()) {
          const r = await d.api('DELETE', `/api/exports/${name}?purge=true&force=true`);
          assert.ok(r.status === 200, `purge ${name}: ${r.text}`);
        }
        const freed = await api(d, 'POST', '/api/gc', { reconcile: true });
        assert.equal(freed.cycle.skipped, undefined, JSON.stringify(freed));
        const empty = await storeAudit(path.join(d.dir, 'store'));
        assert.equal(empty.manifests, 0, 'manifests or checkpoints are left after every volume was purged');
        assert.deepEqual(empty.dead, [], 'packs are left after every volume was purged: something still holds them');
        const deleted = await metric(d, 'updraft_gc_packs_deleted_total');
        t.diagnostic(`every volume purged: GC deleted ${deleted - deletedLive} packs more (${deleted} in all)`);
        assert.ok(deleted - deletedLive >= audit.packs, `GC deleted ${deleted - deletedLive} packs after every volume was purged; the store held ${audit.packs}`);
        assert.ok(deleted > 0, 'GC deleted nothing: the test proved nothing');
      });
    } finally {
      await d.cleanup();
    }
  });

  /** Continuous volumes written (each write flushed) until the daemon kills itself at `point`. */
  const crashTest = (title: string, points: string[], garbage: boolean) =>
    test(`${label}: ${title}`, { timeout: TIMEOUT }, async (t) => {
      const seed = Number(process.env.UPDRAFT_GC_SEED ?? Math.floor(Math.random() * 2 ** 31));
      const rand = prng(seed);
      for (const point of points) {
        const nth = 1 + Math.floor(rand() * 4);
        t.diagnostic(`seed ${seed}: SIGKILL at ${point} #${nth}`);
        const gc = await backend.gcToml(`crash${seed}${point.replace(/-/g, '')}`);
        const d = await startDaemon({
          toml: baseToml(gc, { volumes: { seal_idle_ms: 200, flush_mode: 'continuous', continuous_block_interval_ms: 200, continuous_manifest_interval_ms: 400 } }),
          env: { UPDRAFT_CRASH_AT: `${point}:${nth}` },
        });
        try {
          await withLogs([d], async () => {
            const names = ['c0', 'c1', 'c2', 'c3'];
            const live = new Map<string, Buffer>();
            // Chunks whose last write was not acknowledged when the daemon died: either content is right.
            const unsure = new Map<string, Map<number, Buffer>>();
            for (const name of names) {
              await api(d, 'PUT', `/api/exports/${name}`, { size_gb: SIZE / 1024 ** 3 }, 201);
              live.set(name, Buffer.alloc(SIZE));
              unsure.set(name, new Map());
            }
            const clients = new Map<string, NbdClient>();
            for (const name of names) clients.set(name, await connect(d, name));
            const deadline = Date.now() + 60_000;
            let round = 0;
            /**
             * A volume written, drained and purged: its packs become garbage at once. (Overwritten
             * chunks alone make little: an incremental manifest keeps naming replaced blocks until
             * its next full layout.) False once the daemon died on the way.
             */
            const churn = async (): Promise<boolean> => {
              const name = `g${round}`;
              try {
                await api(d, 'PUT', `/api/exports/${name}`, { size_gb: SIZE / 1024 ** 3 }, 201);
                const c = await connect(d, name);
                for (let chunk = 0; chunk < 4; chunk++) await c.write(chunk * CHUNK, randomBytes(CHUNK));
                await c.flush();
                await c.disconnect();
                await api(d, 'POST', `/api/exports/${name}/drain`);
                await api(d, 'DELETE', `/api/exports/${name}?purge=true&force=true`);
                return true;
              } catch (err) {
                await Promise.race([d.exited(), new Promise((r) => setTimeout(r, 5000))]);
                if (d.running) throw err;
                return false;
              }
            };
            while (d.running && Date.now() < deadline) {
              for (const name of names) {
                // Overwrite most chunks each round (the garbage variant).
                const chunks = garbage ? Array.from({ length: CHUNKS }, (_, i) => i).filter(() => rand() < 0.8) : [Math.floor(rand() * CHUNKS)];
                for (const chunk of chunks) {
                  const data = randomBytes(CHUNK);
                  try {
                    await clients.get(name)!.write(chunk * CHUNK, data);
                    await clients.get(name)!.flush();
                    data.copy(live.get(name)!, chunk * CHUNK);
                  } catch {
                    unsure.get(name)!.set(chunk, data);
                    break;
                  }
                }
                if (!d.running) break;
              }
              if (garbage && d.running && !(await churn())) break;
              round++;
              await new Promise((r) => setTimeout(r, 250 + rand() * 500));
            }
            await d.exited();
            assert.match(d.log(), new RegExp(`crashing at ${point}`), `the daemon did not reach ${point} in ${round} rounds`);
            await d.restart({});
            // A churn volume the crash left behind goes as it would have.
            for (const { name } of (await api(d, 'GET', '/api/exports')) as Array<{ name: string }>) {
              if (!names.includes(name)) await api(d, 'DELETE', `/api/exports/${name}?purge=true&force=true`);
            }
            const result = await api(d, 'POST', '/api/gc', { reconcile: true });
            assert.equal(result.cycle.skipped, undefined, JSON.stringify(result));
            // Nothing live lost, nothing dead left (grace 0): drain each volume, reconcile again, audit.
            for (const name of names) await api(d, 'POST', `/api/exports/${name}/drain`);
            await api(d, 'POST', '/api/gc', { reconcile: true });
            const audit = await storeAudit(path.join(d.dir, 'store'));
            assert.deepEqual(audit.missing, [], 'manifests name packs that are not in the store');
            assert.deepEqual(audit.dead, [], 'dead packs are left after reconciliation');
            assert.equal((await scrub(d)).code, 0);
            for (const name of names) {
              const c = await connect(d, name);
              const got = await readAll(c, 0, SIZE);
              await c.disconnect();
              const want = live.get(name)!;
              for (const [chunk, data] of unsure.get(name)!) {
                if (got.subarray(chunk * CHUNK, (chunk + 1) * CHUNK).equals(data)) data.copy(want, chunk * CHUNK);
              }
              assert.ok(got.equals(want), `volume ${name} lost acknowledged writes across the crash at ${point}`);
            }
          });
        } finally {
          await d.cleanup();
        }
      }
    });

  crashTest('SIGKILL inside a continuous flush\'s refcount transaction (before and after the manifest PUT): restart, reconcile, nothing live lost, nothing dead left', ['manifest-put', 'manifest-commit'], false);
  crashTest('SIGKILL inside a deletion cycle (between deletes, and before the rows are forgotten): restart, reconcile, nothing live lost, nothing dead left', ['pack-delete', 'pack-forget'], true);

  test(`${label}: a lazy fork holds its source's pack set: the same few SQL rows for a source of 1 pack and of 10, and for a consistent fork with nothing new; the source's next drain and the deletes then release exactly`, { timeout: TIMEOUT }, async (t) => {
    const gc = await backend.gcToml(`share${Date.now().toString(36)}`);
    const d = await startDaemon({ toml: baseToml({ ...gc, interval: '1h' }) });
    try {
      await withLogs([d], async () => {
        await waitFor('the first GC cycle', async () => (await metric(d, 'updraft_gc_cycles_total')) >= 1);
        const content = new Map<string, Buffer>();
        for (const [name, chunks] of [['small', 1], ['big', 250]] as const) {
          await api(d, 'PUT', `/api/exports/${name}`, { size_gb: 32 / 1024 }, 201);
          const c = await connect(d, name);
          const data = randomBytes(chunks * CHUNK);
          await c.write(0, data);
          await c.flush();
          await c.disconnect();
          await api(d, 'POST', `/api/exports/${name}/drain`);
          content.set(name, data);
        }
        const packsOf = async (name: string) => {
          const store = openObjectStore(`file://${path.join(d.dir, 'store')}`, {});
          const key = `volumes/${name}/manifest`;
          const object = (await store.get(key))!;
          await store.close();
          return new Set(decodeManifest(key, object.body, PLAINTEXT).blocks.map((b) => b.pack));
        };
        assert.equal((await packsOf('small')).size, 1);
        assert.equal((await packsOf('big')).size, 10);
        const forkRows = async (source: string, target: string, mode: string) => {
          const rows0 = await metric(d, 'updraft_gc_sql_rows_written_total');
          await api(d, 'POST', `/api/exports/${source}/fork`, { target, mode }, 201);
          return (await metric(d, 'updraft_gc_sql_rows_written_total')) - rows0;
        };
        const small = await forkRows('small', 'small-fork', 'lazy');
        const big = await forkRows('big', 'big-fork', 'lazy');
        // A consistent fork of a volume with nothing new since its drain names the same packs: it shares too.
        const consistent = await forkRows('big', 'big-c', 'consistent');
        t.diagnostic(`SQL rows written by a fork: lazy ${small} of a 1-pack volume, ${big} of a 10-pack volume; consistent ${consistent} of the 10-pack one`);
        // Source row locked, set held, intent in and out, the target's row: about 5, none per pack.
        assert.ok(small <= 8, `${small} rows for a lazy fork`);
        assert.equal(big, small, 'the rows a lazy fork writes grew with the packs of its source');
        assert.equal(consistent, small, 'a consistent fork with nothing new counted its packs again');

        // The source changes: its next drain starts a set of its own; the fork's stays as it was.
        const c = await connect(d, 'big');
        await c.write(0, randomBytes(25 * CHUNK)); // a new first pack; the old one is the fork's alone
        await c.flush();
        await c.disconnect();
        await api(d, 'POST', `/api/exports/big/drain`);
        const result = await api(d, 'POST', '/api/gc', { reconcile: true });
        assert.equal(result.reconcile.manifest_corrections, 0, JSON.stringify(result));
        assert.equal(result.reconcile.set_corrections, 0, JSON.stringify(result));
        assert.equal(result.reconcile.refcount_corrections, 0, JSON.stringify(result));
        assert.deepEqual(result.cycle.deleted, [], 'GC deleted a pack the fork still names');
        for (const name of ['big-fork', 'big-c']) {
          const f = await connect(d, name);
          assert.ok((await readAll(f, 0, 250 * CHUNK)).equals(content.get('big')!), `${name} reads back differently`);
          await f.disconnect();
        }

        // Deleting the sources leaves the forks whole; deleting the forks then frees every pack.
        for (const name of ['big', 'small']) assert.equal((await d.api('DELETE', `/api/exports/${name}?purge=true&force=true`)).status, 200);
        const afterSources = await api(d, 'POST', '/api/gc', { reconcile: true });
        assert.equal(afterSources.cycle.deleted.length, 1, `only big's new first pack is dead: ${JSON.stringify(afterSources.cycle)}`);
        assert.deepEqual((await storeAudit(path.join(d.dir, 'store'))).dead, []);
        for (const name of ['big-fork', 'big-c', 'small-fork']) assert.equal((await d.api('DELETE', `/api/exports/${name}?purge=true&force=true`)).status, 200);
        const afterForks = await api(d, 'POST', '/api/gc', { reconcile: true });
        assert.equal(afterForks.cycle.deleted.length, 11, JSON.stringify(afterForks.cycle));
        const audit = await storeAudit(path.join(d.dir, 'store'));
        assert.equal(audit.packs, 0, `packs left: ${audit.dead.join(' ')}`);
      });
    } finally {
      await d.cleanup();
    }
  });

  test(`${label}: packs registered at once share one transaction; each call returns once its row is in, and one being deleted waits for the deletion`, { timeout: TIMEOUT }, async (t) => {
    const { db, store } = await gcScratch(t, backend, 'register');
    const refcounts = await PackRefcounts.open(db, { hostId: 'register', store, settleMs: 0, log: createLogger('test', 'error') });
    const rows = (ids: string[]) =>
      db.tx((tx) => tx.all<{ id: string; refs: number; state: string }>(`SELECT id, refs, state FROM gc_packs WHERE id IN (${ids.map((_, i) => `$${i + 1}`).join(', ')})`, ids));
    const tx = db.tx.bind(db);
    let transactions = 0;
    db.tx = (work) => {
      transactions++;
      return tx(work);
    };
    const packs = Array.from({ length: 8 }, () => randomBytes(16).toString('hex'));
    await Promise.all(packs.map((id) => refcounts.registerPack(id)));
    assert.equal(transactions, 1, 'eight registrations at once took more than one transaction');
    const got = await rows(packs);
    assert.deepEqual(got.map((r) => [r.id, Number(r.refs), r.state]).sort(), packs.map((id) => [id, 0, 'live']).sort());

    const deleting = randomBytes(16).toString('hex');
    await db.tx((tx) => tx.run(`INSERT INTO gc_packs (id, refs, state, zero_since) VALUES ($1, 0, 'deleting', 0)`, [deleting]));
    let registered = false;
    const waiting = refcounts.registerPack(deleting).then(() => {
      registered = true;
    });
    const other = randomBytes(16).toString('hex');
    await refcounts.registerPack(other);
    await new Promise((resolve) => setTimeout(resolve, 300));
    assert.equal(registered, false, 'a pack being deleted was registered before its deletion finished');
    await db.tx((tx) => tx.run(`DELETE FROM gc_packs WHERE id = $1`, [deleting]));
    await waiting;
    assert.deepEqual((await rows([deleting, other])).map((r) => [r.id, r.state]).sort(), [[deleting, 'live'], [other, 'live']].sort());
  });

  test(`${label}: packs uploaded for a volume before any manifest names them outlive the grace period, reconciliation and a restart; a manifest naming them and then its successor, or the volume's removal or purge, let them go`, { timeout: TIMEOUT }, async (t) => {
    const { db, store } = await gcScratch(t, backend, 'held');
    const log = createLogger('test', 'error');
    let clock = 1_000_000;
    const open = () => PackRefcounts.open(db, { hostId: 'h1', store, settleMs: 0, log, now: () => clock });
    let refcounts = await open();
    const settings = { gracePeriodMs: 1000, intervalMs: 1000, reconcileIntervalMs: 3_600_000, maxDeletionsPerCycle: 100, dryRun: false };
    const collector = () => new Collector(refcounts, store, PLAINTEXT, settings, log);
    const pack = async () => {
      const id = randomBytes(16).toString('hex');
      await store.put(packKey(id), randomBytes(64));
      return id;
    };
    const inStore = async (ids: string[]) => (await Promise.all(ids.map(async (id) => (await store.head(packKey(id))) !== undefined)));
    const refs = async (id: string) => Number((await db.tx((tx) => tx.all<{ refs: number }>(`SELECT refs FROM gc_packs WHERE id = $1`, [id])))[0]?.refs);
    const holdA = uploadsKey('h1', 'a');
    const holdB = uploadsKey('h1', 'b');
    const holdOther = uploadsKey('h2', 'b');

    // Volume a's dirty budget uploads two packs and relies on a third another upload made; b
    // uploads one on h1 and one on h2; one more upload is held by nothing.
    const [a1, a2, shared, b1, b2, loose] = await Promise.all(Array.from({ length: 6 }, pack));
    await Promise.all([refcounts.registerPack(a1, holdA), refcounts.registerPack(a2, holdA), refcounts.registerPack(b1, holdB), refcounts.registerPack(b2, holdOther)]);
    await refcounts.registerPack(shared);
    await refcounts.registerPack(loose);
    assert.deepEqual(await refcounts.holdUploads(holdA, [a1, shared]), []);
    assert.deepEqual([await refs(a1), await refs(a2), await refs(shared), await refs(b1), await refs(loose)], [1, 1, 1, 1, 0]);

    // Past the grace period, reconciliation corrects nothing and the cycle takes only the unheld upload.
    clock += 60_000;
    const first = await collector().reconcile();
    assert.deepEqual(
      [first.reconcile.manifest_corrections, first.reconcile.set_corrections, first.reconcile.refcount_corrections, first.reconcile.packs_adopted],
      [0, 0, 0, 0],
      JSON.stringify(first.reconcile),
    );
    assert.deepEqual(first.cycle.deleted, [loose]);
    assert.deepEqual(await inStore([a1, a2, shared, b1, b2, loose]), [true, true, true, true, true, false]);

    // A restart finds what its host holds.
    refcounts = await open();
    assert.deepEqual((await refcounts.heldUploads('h1')).sort(), ['a', 'b']);
    assert.deepEqual(await refcounts.heldUploads('h2'), ['b']);

    // Volume a's manifest names its uploads; once it is committed the hold goes, the manifest keeps them.
    const put = async (key: string, packs: string[], body: string) => refcounts.commit(await refcounts.begin(key, new Set(packs), body), `etag-${body}`);
    await put('volumes/a/manifest', [a1, a2, shared], 'a-1');
    assert.equal(await refcounts.settleUploads(holdA), 3);
    clock += 60_000;
    assert.deepEqual((await collector().cycle()).deleted, []);
    assert.deepEqual([await refs(a1), await refs(a2), await refs(shared)], [1, 1, 1]);

    // Its next manifest no longer names a1 and a2: they go after the grace period, not before.
    const a3 = await pack();
    await refcounts.registerPack(a3, holdA);
    await put('volumes/a/manifest', [a3, shared], 'a-2');
    assert.equal(await refcounts.settleUploads(holdA), 1);
    assert.deepEqual((await collector().cycle()).deleted, [], 'packs went at once, without a grace period');
    clock += 60_000;
    assert.deepEqual((await collector().cycle()).deleted.sort(), [a1, a2].sort());
    assert.deepEqual(await inStore([a1, a2, a3, shared]), [false, false, true, true]);

    // A pack being deleted cannot be held: the caller uploads its blocks again.
    const doomed = await pack();
    await db.tx((tx) => tx.run(`INSERT INTO gc_packs (id, refs, state, zero_since) VALUES ($1, 0, 'deleting', 0)`, [doomed]));
    assert.deepEqual(await refcounts.holdUploads(holdB, [b1, doomed]), [doomed]);
    assert.equal(await refs(b1), 1, 'a refused hold changed a refcount');

    // Volume b removed from h1 lets go of h1's hold only; a purge lets go of every host's.
    assert.equal(await refcounts.releaseUploads(holdB), 1);
    clock += 60_000;
    assert.deepEqual((await collector().cycle()).deleted.filter((id) => id !== doomed), [b1]);
    assert.deepEqual(await inStore([b2]), [true]);
    assert.equal(await refcounts.releaseUploadsOfVolume('b'), 1);
    clock += 60_000;
    assert.deepEqual((await collector().cycle()).deleted, [b2]);
    assert.deepEqual(await refcounts.heldUploads('h2'), []);
    // Volume a leaves the host: its emptied hold goes too, and what its manifest names stays.
    assert.equal(await refcounts.releaseUploads(holdA), 0);
    assert.deepEqual(await refcounts.heldUploads('h1'), []);
    assert.deepEqual([await refs(a3), await refs(shared)], [1, 1]);
    const last = await collector().reconcile();
    assert.equal(last.reconcile.set_corrections + last.reconcile.refcount_corrections, 0, JSON.stringify(last.reconcile));
  });

  test(`${label}: a continuous flush that adds 2 packs touches the same few SQL rows with 1 and with 1,000 volumes registered`, { timeout: TIMEOUT }, async (t) => {
    const gc = await backend.gcToml(`rows${Date.now().toString(36)}`);
    const d = await startDaemon({
      // Long intervals: the flush comes once the writes stop for a second, one per batch of 50 chunks.
      toml: baseToml({ ...gc, interval: '1h' }, {
        volumes: { seal_idle_ms: 200, flush_mode: 'continuous', continuous_block_interval_ms: 60_000, continuous_manifest_interval_ms: 60_000 },
      }),
    });
    try {
      await withLogs([d], async () => {
        await waitFor('the first GC cycle', async () => (await metric(d, 'updraft_gc_cycles_total')) >= 1);
        await api(d, 'PUT', '/api/exports/hot', { size_gb: 16 / 1024 }, 201);
        const c = await connect(d, 'hot');
        let next = 0;
        /** Write 50 new chunks (2 packs of 25) and wait for the continuous flush; the rows it wrote. */
        const flushTwoPacks = async () => {
          const before = await d.api('GET', '/api/exports/hot');
          const rows0 = await metric(d, 'updraft_gc_sql_rows_written_total');
          for (let i = 0; i < 50; i++) await c.write((next++ % 128) * CHUNK, randomBytes(CHUNK));
          await c.flush();
          const sequence = (await d.api('GET', '/api/exports/hot')).json.sequence;
          await waitFor('the continuous flush', async () => (await d.api('GET', '/api/exports/hot')).json.manifest_sequence === sequence, 30_000);
          assert.ok(sequence > before.json.sequence);
          return (await metric(d, 'updraft_gc_sql_rows_written_total')) - rows0;
        };
        await flushTwoPacks(); // the first manifest of the volume (and its lease)
        const alone = await flushTwoPacks();
        // 999 more volumes' manifests in the same database, each naming 4 packs.
        const db = openGcDatabase(typeof gc.database_url === 'string' ? gc.database_url : '', path.join(d.dir, 'cache'));
        const store = openObjectStore(`file://${path.join(d.dir, 'store')}`, {});
        const refcounts = await PackRefcounts.open(db, { hostId: 'filler', store, settleMs: 60_000, log: createLogger('test', 'error') });
        const fillerPacks = Array.from({ length: 64 }, () => randomBytes(16).toString('hex'));
        for (const p of fillerPacks) await refcounts.registerPack(p);
        for (let i = 0; i < 999; i++) {
          const packs = new Set(Array.from({ length: 4 }, (_, k) => fillerPacks[(i * 7 + k * 13) % fillerPacks.length]));
          const w = await refcounts.begin(`volumes/filler-${i}/manifest`, packs, `hash${i}`);
          await refcounts.commit(w, `etag${i}`);
        }
        assert.equal((await refcounts.countedKeys()).size, 1000);
        await db.close();
        await store.close();
        const crowded = await flushTwoPacks();
        t.diagnostic(`SQL rows written by a continuous flush adding 2 packs: ${alone} with 1 volume, ${crowded} with 1,000`);
        // Pack rows (2 registered + 2 incremented), key row locked, intent in and out, manifest etag, set rows (2), lease-free: about 10;
        // and the volume's uploads holding the 2 packs from registration to the manifest's commit: its row locked, its set rows
        // (2 in, 2 out), the 2 packs let go: about 18.
        assert.ok(alone >= 4 && alone <= 20, `${alone} rows for a flush adding 2 packs`);
        assert.equal(crowded, alone, 'the rows a flush touches grew with the number of volumes');
        await c.disconnect();
      });
    } finally {
      await d.cleanup();
    }
  });
}
