#!/usr/bin/env node
// The GC part of `npm run bench` (scripts/bench.sh, part "gc"):
//
//   reconcile  BENCH_GC_MANIFESTS (1000) manifests, each naming 64 blocks spread over 40
//              shared packs, in a file:// store and in MinIO on loopback; reconciliation
//              timed on an empty refcount database (every key counted from scratch) and
//              again in the steady state (nothing to correct). Reported per 1,000 manifests.
//   delete     BENCH_GC_PACKS (500) unreferenced packs at a zero grace period; one
//              deletion cycle: packs deleted per second, file:// and MinIO.
//   refcount   latency of one manifest write's refcount work (begin + commit, 2 packs added
//              and 2 dropped), median and p99 of 300, on SQLite and on PostgreSQL
//              (a server from Debian's packages, as the tests start it).
//
// Prints "gc KEY VALUE" lines on stdout. MinIO and PostgreSQL are started here and
// stopped by their pid; the scratch folders are removed.
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { ROOT } from './procs.mjs';

const dist = (p) => import(path.join(ROOT, 'dist', p));
const [{ PackRefcounts }, { openGcDatabase, PostgresDatabase }, { Collector }, { openObjectStore }, { encodeManifest, ManifestBuilder, manifestKey }, { encodePack }, { blockHash }, { parseCompression }, { createLogger }, { startMinio }, { startPostgres }] =
  await Promise.all([
    dist('src/gc/refcounts.js'), dist('src/gc/sql.js'), dist('src/gc/collector.js'), dist('src/objectstore/index.js'), dist('src/store/manifest.js'),
    dist('src/store/pack.js'), dist('src/crypto/hash.js'), dist('src/crypto/compress.js'), dist('src/log.js'), dist('test/harness/minio.js'),
    dist('test/harness/postgres.js'),
  ]);

const MANIFESTS = Number(process.env.BENCH_GC_MANIFESTS || 1000);
const DELETE_PACKS = Number(process.env.BENCH_GC_PACKS || 500);
const BLOCK = 65536;
const say = (s) => process.stderr.write(`bench gc: ${s}\n`);
const record = (key, value) => process.stdout.write(`gc ${key} ${value}\n`);
const log = createLogger('bench', 'error');
const scratch = fs.mkdtempSync(path.join(os.tmpdir(), 'updraft-bench-gc-'));
const lz4 = parseCompression('lz4');

const settings = (grace) => ({ gracePeriodMs: grace, intervalMs: 3_600_000, reconcileIntervalMs: 3_600_000, maxDeletionsPerCycle: 1_000_000, dryRun: false });

/** 40 packs of 25 blocks, then MANIFESTS manifests naming 64 of those blocks each. */
async function fillStore(store) {
  const locations = [];
  for (let p = 0; p < 40; p++) {
    const blocks = Array.from({ length: 25 }, () => {
      const data = randomBytes(BLOCK);
      return { hash: blockHash(data), data };
    });
    const pack = encodePack(blocks, lz4);
    await store.put(pack.key, pack.body);
    for (const e of pack.entries) locations.push({ hash: e.hash, loc: { pack: pack.id, offset: e.offset, length: e.length, rawLength: e.rawLength, codec: e.codec } });
  }
  let next = 0;
  const work = async () => {
    while (next < MANIFESTS) {
      const i = next++;
      const b = new ManifestBuilder({ format: 1, name: `bench-${i}`, size: 64 * BLOCK, blockSize: BLOCK, sequence: i, generation: 1, host: 'bench', created: new Date().toISOString() });
      for (let c = 0; c < 64; c++) {
        const { hash, loc } = locations[(i * 31 + c * 7) % locations.length];
        b.setChunk(c, hash, loc);
      }
      await store.put(manifestKey(`bench-${i}`), encodeManifest(b.build(), lz4));
    }
  };
  await Promise.all(Array.from({ length: 8 }, work));
}

async function reconcileBench(label, store) {
  say(`${label}: writing ${MANIFESTS} manifests`);
  await fillStore(store);
  const db = openGcDatabase('', path.join(scratch, `reconcile-${label}`));
  const refcounts = await PackRefcounts.open(db, { hostId: 'bench', store, settleMs: 60_000, log });
  const collector = new Collector(refcounts, store, settings(86_400_000), log);
  for (const phase of ['empty_db', 'steady']) {
    const t0 = performance.now();
    const { reconcile } = await collector.reconcile();
    const ms = performance.now() - t0;
    say(`${label} reconcile (${phase}): ${reconcile.manifests} manifests in ${ms.toFixed(0)} ms, ${reconcile.manifest_corrections} corrections`);
    record(`reconcile_${label}_${phase}_ms_per_1000`, Math.round((ms * 1000) / reconcile.manifests));
  }
  await db.close();
}

async function deleteBench(label, store) {
  const db = openGcDatabase('', path.join(scratch, `delete-${label}`));
  const refcounts = await PackRefcounts.open(db, { hostId: 'bench', store, settleMs: 60_000, log });
  const collector = new Collector(refcounts, store, settings(0), log);
  await collector.reconcile(); // a database must be reconciled once before it deletes
  const pack = () => {
    const data = randomBytes(BLOCK);
    return encodePack([{ hash: blockHash(data), data }], lz4);
  };
  let next = 0;
  await Promise.all(Array.from({ length: 8 }, async () => {
    while (next < DELETE_PACKS) {
      next++;
      const p = pack();
      await refcounts.registerPack(p.id);
      await store.put(p.key, p.body);
    }
  }));
  const t0 = performance.now();
  const cycle = await collector.cycle();
  const ms = performance.now() - t0;
  say(`${label} delete: ${cycle.deleted.length} packs in ${ms.toFixed(0)} ms`);
  record(`delete_${label}_packs_per_s`, Math.round(cycle.deleted.length / (ms / 1000)));
  await db.close();
}

async function refcountBench(label, db) {
  const refcounts = await PackRefcounts.open(db, { hostId: 'bench', store: openObjectStore(`file://${scratch}/none`, {}), settleMs: 60_000, log });
  const ids = () => randomBytes(16).toString('hex');
  let packs = new Set([ids(), ids(), ids(), ids()]);
  for (const p of packs) await refcounts.registerPack(p);
  let counted;
  const times = [];
  for (let i = 0; i < 300; i++) {
    const keep = [...packs].slice(2);
    const fresh = [ids(), ids()];
    for (const p of fresh) await refcounts.registerPack(p);
    packs = new Set([...keep, ...fresh]);
    const t0 = performance.now();
    const w = await refcounts.begin('volumes/bench/manifest', packs, `h${i}`, counted);
    counted = await refcounts.commit(w, `e${i}`);
    times.push(performance.now() - t0);
  }
  times.sort((a, b) => a - b);
  const median = times[Math.floor(times.length / 2)];
  const p99 = times[Math.floor(times.length * 0.99)];
  say(`${label} refcount update (begin + commit, 2 added, 2 dropped): median ${median.toFixed(2)} ms, p99 ${p99.toFixed(2)} ms`);
  record(`refcount_${label}_median_ms`, median.toFixed(2));
  record(`refcount_${label}_p99_ms`, p99.toFixed(2));
  await db.close();
}

let minio;
let postgres;
try {
  const fileStore = openObjectStore(`file://${path.join(scratch, 'store-reconcile')}`, {});
  fs.mkdirSync(path.join(scratch, 'store-reconcile'), { recursive: true });
  await reconcileBench('file', fileStore);
  minio = await startMinio();
  const aws = { accessKeyId: minio.accessKeyId, secretAccessKey: minio.secretAccessKey, endpoint: minio.endpoint, region: minio.region, allowHttp: true, forcePathStyle: true };
  await reconcileBench('minio', openObjectStore(`${minio.url}-reconcile`, aws));
  fs.mkdirSync(path.join(scratch, 'store-delete'), { recursive: true });
  await deleteBench('file', openObjectStore(`file://${path.join(scratch, 'store-delete')}`, {}));
  await deleteBench('minio', openObjectStore(`${minio.url}-delete`, aws));
  await refcountBench('sqlite', openGcDatabase('', path.join(scratch, 'latency')));
  postgres = await startPostgres();
  await refcountBench('postgres', new PostgresDatabase(await postgres.database('bench')));
} finally {
  await minio?.stop();
  await postgres?.stop();
  fs.rmSync(scratch, { recursive: true, force: true });
}
