// GC on the embedded default (SQLite in the cache folder), through real daemons and NBD
// clients: the shared GC suite, scrub, the background cache scrub, and bad config.
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { connect, metric, MiB, readAll, waitFor, withLogs } from './harness/cluster.js';
import { DAEMON_MAIN, scratchDir, removeDir, startDaemon } from './harness/daemon.js';
import { defineIntentTests } from './harness/gc-intents.js';
import { defineGcTests, scrub, storeAudit } from './harness/gc.js';
import { run } from './harness/tools.js';

const sqlite = { label: 'gc on SQLite', gcToml: async () => ({}) };
defineGcTests(sqlite);
defineIntentTests(sqlite);

test('updraft scrub finds a corrupted and a missing pack and names the volumes and checkpoints that need them; the cache scrub evicts a corrupt cached block', { timeout: 180_000 }, async () => {
  const d = await startDaemon({ toml: { host: { id: 'scrub-host' }, cache: { scrub_blocks_per_second: 2000 }, volumes: { seal_idle_ms: 200 } } });
  try {
    await withLogs([d], async () => {
      const shared = randomBytes(25 * 128 * 1024); // one pack's worth, written to both volumes
      for (const name of ['alpha', 'beta']) {
        assert.equal((await d.api('PUT', `/api/exports/${name}`, { size_gb: 8 / 1024 })).status, 201);
        const c = await connect(d, name);
        await c.write(0, shared);
        await c.write(4 * MiB, randomBytes(MiB));
        await c.flush();
        await c.disconnect();
        assert.equal((await d.api('POST', `/api/exports/${name}/drain`)).status, 200);
      }
      assert.equal((await d.api('POST', '/api/exports/alpha/checkpoints', { name: 'gold' })).status, 200);
      const clean = await scrub(d);
      assert.equal(clean.code, 0, clean.stderr);
      assert.equal(clean.report.ok, true);
      const audit = await storeAudit(path.join(d.dir, 'store'));
      // The pack both volumes share: the one named by every manifest.
      const packFile = (id: string) => path.join(d.dir, 'store', 'packs', id.slice(0, 2), id);
      const store = path.join(d.dir, 'store');
      const manifests = ['alpha/manifest', 'beta/manifest', 'alpha/checkpoints/gold'];
      const { decodeManifest } = await import('../src/store/manifest-decode.js');
      const { PLAINTEXT } = await import('../src/crypto/cipher.js');
      const packsOf = (key: string) => new Set(decodeManifest(key, fs.readFileSync(path.join(store, 'volumes', key)), PLAINTEXT).blocks.map((b) => b.pack));
      const sets = manifests.map(packsOf);
      const sharedPack = [...sets[0]].find((p) => sets.every((s) => s.has(p)))!;
      const betaOnly = [...sets[1]].find((p) => !sets[0].has(p))!;
      assert.ok(sharedPack && betaOnly, `packs: ${[...audit.live].join(' ')}`);
      const body = fs.readFileSync(packFile(sharedPack));
      body[body.length - 100] ^= 0xff;
      fs.writeFileSync(packFile(sharedPack), body);
      fs.rmSync(packFile(betaOnly));
      const found = await scrub(d);
      assert.equal(found.code, 1, 'scrub exits non-zero when packs are damaged');
      assert.deepEqual(found.report.corrupt.map((p: { pack: string }) => p.pack), [`packs/${sharedPack.slice(0, 2)}/${sharedPack}`]);
      assert.deepEqual(found.report.corrupt[0].needed_by, ['alpha', 'alpha@gold', 'beta']);
      assert.deepEqual(found.report.missing.map((p: { pack: string; needed_by: string[] }) => [p.pack, p.needed_by]), [[`packs/${betaOnly.slice(0, 2)}/${betaOnly}`, ['beta']]]);
      assert.match(found.stderr, new RegExp(`${sharedPack}.*needed by alpha, alpha@gold, beta`));

      // The cache scrub: flip a byte of a cached block that the store holds; it is evicted, and reads stay right.
      const slab = path.join(d.dir, 'cache', 'blocks', 'blocks.slab');
      const fd = fs.openSync(slab, 'r+');
      const one = Buffer.alloc(1);
      fs.readSync(fd, one, 0, 1, 4 * 128 * 1024 + 77);
      one[0] ^= 0x5a;
      fs.writeSync(fd, one, 0, 1, 4 * 128 * 1024 + 77);
      fs.closeSync(fd);
      await waitFor('the cache scrub to evict the corrupt block', async () => (await metric(d, 'updraft_cache_scrub_evictions_total')) >= 1, 30_000);
      assert.match(d.log(), /cache scrub: a cached block does not match its name; dropped/);
    });
  } finally {
    await d.cleanup();
  }
});

test('bad GC config: a bad grace period and a bad database_url fail start-up naming the key and the value', { timeout: 60_000 }, async () => {
  const dir = await scratchDir('updraft-gc-bad-');
  try {
    const cases: Array<[string, RegExp]> = [
      ['[gc]\ngrace_period = "a day"\n', /gc\.grace_period = "a day" is not allowed: a duration/],
      ['[gc]\ngrace_period = "-5s"\n', /gc\.grace_period = "-5s" is not allowed/],
      ['[gc]\ndatabase_url = "mysql://db.example/updraft"\n', /gc\.database_url = "mysql:\/\/db\.example\/updraft" is not allowed: .*postgres:\/\/ or postgresql:\/\//],
      ['[gc]\nmax_deletions_per_cycle = 0\n', /gc\.max_deletions_per_cycle = 0 is not allowed: an integer from 1 to 1000000/],
    ];
    for (const [toml, expected] of cases) {
      const file = path.join(dir, 'updraft.toml');
      fs.writeFileSync(file, toml);
      for (const command of [['run'], ['gc']]) {
        const r = await run(process.execPath, [DAEMON_MAIN, ...command, '-c', file], { timeoutMs: 30_000, cwd: dir });
        assert.equal(r.code, 2, `${command[0]} with ${toml}: ${r.stderr}`);
        assert.match(r.stderr, expected);
      }
    }
  } finally {
    await removeDir(dir);
  }
});

test('updraft gc and updraft delete ask the running daemon, and work on the database directly when no daemon runs', { timeout: 120_000 }, async () => {
  const d = await startDaemon({ toml: { host: { id: 'cli-host' }, volumes: { seal_idle_ms: 200 }, gc: { grace_period: '0s', interval: '1h' } } });
  try {
    await withLogs([d], async () => {
      const cli = async (...args: string[]) => {
        const r = await run(process.execPath, [DAEMON_MAIN, ...args, '-c', d.configPath], { timeoutMs: 60_000 });
        assert.equal(r.code, 0, `updraft ${args.join(' ')}: ${r.stderr}`);
        return JSON.parse(r.stdout);
      };
      for (const name of ['keep', 'doomed']) {
        assert.equal((await d.api('PUT', `/api/exports/${name}`, { size_gb: 4 / 1024 })).status, 201);
        const c = await connect(d, name);
        await c.write(0, randomBytes(MiB));
        await c.disconnect();
        assert.equal((await d.api('POST', `/api/exports/${name}/drain`)).status, 200);
      }
      const keep = await readAll(await connect(d, 'keep'), 0, MiB);
      // The daemon's own first cycle (1 s after start) has run: from here only the commands delete.
      await waitFor('the first GC cycle', async () => (await metric(d, 'updraft_gc_cycles_total')) >= 1);
      const purged = await cli('delete', 'doomed');
      assert.equal(purged.purged, true);
      assert.ok(purged.packs_released > 0, JSON.stringify(purged));
      assert.equal((await d.api('GET', '/api/exports/doomed')).status, 404);
      const dry = await cli('gc', '--reconcile', '--dry-run');
      assert.equal(dry.reconcile.manifests, 1, JSON.stringify(dry));
      assert.ok(dry.cycle.dry_run && dry.cycle.deleted.length > 0, JSON.stringify(dry));
      assert.equal(await metric(d, 'updraft_gc_reconciliations_total'), 1, 'the command did not go through the daemon');
      assert.equal((await storeAudit(path.join(d.dir, 'store'))).dead.length, dry.cycle.deleted.length, 'a dry run deleted something');
      await d.stop();
      // No daemon: the command opens the embedded database itself.
      const offline = await cli('gc', '--reconcile');
      assert.equal(offline.reconcile.manifests, 1);
      assert.equal(offline.cycle.deleted.length, dry.cycle.deleted.length);
      const audit = await storeAudit(path.join(d.dir, 'store'));
      assert.deepEqual(audit.dead, []);
      await d.restart();
      const c = await connect(d, 'keep');
      assert.ok((await readAll(c, 0, MiB)).equals(keep));
      await c.disconnect();
    });
  } finally {
    await d.cleanup();
  }
});

test('a refcount database of schema 1 (packs counted per key, an intent unresolved) is migrated to pack sets (and intents with conditions) at start-up: nothing live lost, the intent reverted, counts exact; a wrong set holder count is corrected', { timeout: 120_000 }, async () => {
  const d = await startDaemon({ toml: { host: { id: 'migrate-host' }, volumes: { seal_idle_ms: 200 }, gc: { grace_period: '0s', interval: '1h' } } });
  try {
    await withLogs([d], async () => {
      const content = new Map<string, Buffer>();
      for (const name of ['keep', 'doomed']) {
        assert.equal((await d.api('PUT', `/api/exports/${name}`, { size_gb: 4 / 1024 })).status, 201);
        const c = await connect(d, name);
        content.set(name, randomBytes(MiB));
        await c.write(0, content.get(name)!);
        await c.disconnect();
        assert.equal((await d.api('POST', `/api/exports/${name}/drain`)).status, 200);
      }
      await d.stop();
      // Back to schema 1: rows per key, no sets, no version; plus the intent of a write of
      // a new key that died before its PUT, holding one of keep's packs up.
      const Sqlite = (await import('better-sqlite3')).default;
      const db = new Sqlite(path.join(d.dir, 'cache', 'gc.sqlite'));
      const held = (db.prepare(`SELECT pack FROM gc_set_packs p JOIN gc_manifests m ON m.set_id = p.set_id WHERE m.key = 'volumes/keep/manifest' LIMIT 1`).get() as { pack: string }).pack;
      db.exec(`
        CREATE TABLE gc_manifest_packs (key TEXT NOT NULL, pack TEXT NOT NULL, PRIMARY KEY (key, pack));
        INSERT INTO gc_manifest_packs SELECT m.key, p.pack FROM gc_manifests m JOIN gc_set_packs p ON p.set_id = m.set_id;
        DROP TABLE gc_set_packs; DROP TABLE gc_sets;
        ALTER TABLE gc_manifests DROP COLUMN set_id; ALTER TABLE gc_intents DROP COLUMN set_id; ALTER TABLE gc_intents DROP COLUMN put_condition;
        DELETE FROM gc_meta WHERE name = 'schema';
        UPDATE gc_packs SET refs = refs + 1 WHERE id = '${held}';
        INSERT INTO gc_intents (id, key, body_hash, host, created, added, dropped) VALUES ('lost', 'volumes/ghost/manifest', 'x', 'migrate-host', 0, '${held}', '');
      `);
      db.close();
      await d.restart();
      assert.match(d.log(), /migrated the refcount schema 1 -> 2/);
      assert.match(d.log(), /migrated the refcount schema 2 -> 3/);
      const gc = await d.api('POST', '/api/gc', { reconcile: true });
      assert.equal(gc.status, 200, gc.text);
      const r = gc.json.reconcile;
      assert.deepEqual([r.manifests, r.manifest_corrections, r.set_corrections, r.refcount_corrections], [2, 0, 0, 0], JSON.stringify(r));
      assert.deepEqual(gc.json.cycle.deleted, []);
      for (const [name, data] of content) {
        const c = await connect(d, name);
        assert.ok((await readAll(c, 0, MiB)).equals(data), `${name} reads back differently after the migration`);
        await c.disconnect();
      }
      // A set whose holder count is wrong (too high: its packs would never be freed) is put right by reconciliation.
      await d.stop();
      const drift = new Sqlite(path.join(d.dir, 'cache', 'gc.sqlite'));
      drift.exec(`UPDATE gc_sets SET refs = refs + 3 WHERE id = (SELECT set_id FROM gc_manifests WHERE key = 'volumes/doomed/manifest')`);
      drift.close();
      await d.restart();
      const fixed = await d.api('POST', '/api/gc', { reconcile: true });
      assert.equal(fixed.json.reconcile.set_corrections, 1, JSON.stringify(fixed.json));
      assert.equal(await metric(d, 'updraft_gc_set_corrections_total'), 1);
      const purged = await d.api('DELETE', '/api/exports/doomed?purge=true&force=true');
      assert.equal(purged.status, 200, `the purge failed: ${purged.text}\n${d.log().split('\n').slice(-20).join('\n')}`);
      const after = await d.api('POST', '/api/gc', {});
      assert.ok(after.json.cycle.deleted.length > 0, JSON.stringify(after.json));
      assert.deepEqual((await storeAudit(path.join(d.dir, 'store'))).dead, []);
      await d.stop();
      const check = new Sqlite(path.join(d.dir, 'cache', 'gc.sqlite'));
      assert.equal((check.prepare(`SELECT value FROM gc_meta WHERE name = 'schema'`).get() as { value: string }).value, '3');
      assert.deepEqual(check.prepare(`SELECT id FROM gc_sets WHERE refs <> 1`).all(), []);
      check.close();
    });
  } finally {
    await d.cleanup();
  }
});
