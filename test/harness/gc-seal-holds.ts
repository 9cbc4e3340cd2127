// Part of the shared GC suite (gc.ts): a volume whose seals deduplicate against packs
// another volume uploaded holds those packs in its uploads set (invariant 6), on SQLite
// and PostgreSQL alike; and a drain's settle keeps the packs blocks sealed after its cut
// rely on.
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import path from 'node:path';
import { test } from 'node:test';
import { PackRefcounts } from '../../src/gc/refcounts.js';
import { uploadsKey } from '../../src/gc/uploads.js';
import { openGcDatabase, type SqlDatabase } from '../../src/gc/sql.js';
import { createLogger } from '../../src/log.js';
import { openObjectStore } from '../../src/objectstore/index.js';
import { CHUNK, connect, exportInfo, metric, MiB, readAll, waitFor, withLogs } from './cluster.js';
import { startDaemon, type TomlTable } from './daemon.js';
import type { GcBackend } from './gc.js';
import { storeAudit } from './gc.js';
import { gcScratch } from './gc-scratch.js';

const TIMEOUT = 600_000;

export function defineSealHoldTests(backend: GcBackend, baseToml: (gc: TomlTable) => TomlTable, hostId: string): void {
  const label = backend.label;

  test(`${label}: a volume whose seals deduplicate against another volume's pack holds it: the other's purge and GC at a zero grace period leave it, the volume's drain uploads nothing and lets go, its purge frees it`, { timeout: TIMEOUT }, async () => {
    const gc = await backend.gcToml(`dedup${Date.now().toString(36)}`);
    const d = await startDaemon({ toml: baseToml({ ...gc, interval: '1h' }) });
    let db: SqlDatabase | undefined;
    const store = openObjectStore(`file://${path.join(d.dir, 'store')}`, {});
    try {
      await withLogs([d], async () => {
        // From then on only the cycles asked for run (interval 1h).
        await waitFor('the first GC cycle', async () => (await metric(d, 'updraft_gc_cycles_total')) >= 1);
        db = openGcDatabase(typeof gc.database_url === 'string' ? gc.database_url : '', path.join(d.dir, 'cache'));
        const refcounts = await PackRefcounts.open(db, { hostId: 'reader', store, settleMs: 60_000, log: createLogger('test', 'error') });
        const heldFor = async (volume: string) => [...((await refcounts.counted(uploadsKey(hostId, volume)))?.packs ?? [])].sort();
        const shared = randomBytes(25 * CHUNK); // one pack
        for (const name of ['y', 'z']) assert.equal((await d.api('PUT', `/api/exports/${name}`, { size_gb: 8 / 1024 })).status, 201);
        const write = async (name: string) => {
          const c = await connect(d, name);
          await c.write(0, shared);
          await c.flush();
          await c.disconnect();
        };
        await write('y');
        assert.equal((await d.api('POST', '/api/exports/y/drain')).status, 200);
        const packs = [...(await storeAudit(path.join(d.dir, 'store'))).live].sort();
        assert.equal(packs.length, 1);
        assert.deepEqual(await heldFor('y'), [], 'y\'s drain let go of its uploads');

        // z writes the same blocks: no upload, and the seals hold y's pack for z.
        const puts = await metric(d, 'updraft_store_requests_total', { kind: 'put' });
        await write('z');
        await waitFor('z to be sealed and its holds committed', async () => (await exportInfo(d, 'z')).dirty_bytes === 0 && (await heldFor('z')).length > 0);
        assert.deepEqual(await heldFor('z'), packs, 'z\'s seals hold the pack they deduplicated against');
        assert.equal(await metric(d, 'updraft_store_requests_total', { kind: 'put' }), puts, 'z uploaded blocks the store had');

        // y purged: no manifest names the pack, and GC (grace 0) keeps it for z.
        assert.equal((await d.api('DELETE', '/api/exports/y?purge=true&force=true')).status, 200);
        const kept = (await d.api('POST', '/api/gc', { reconcile: true })).json;
        assert.deepEqual(kept.cycle.deleted, [], 'GC deleted the pack z\'s blocks are in');
        assert.equal(kept.reconcile.refcount_corrections + kept.reconcile.set_corrections, 0, JSON.stringify(kept.reconcile));
        assert.deepEqual((await storeAudit(path.join(d.dir, 'store'))).dead, packs);

        // z's drain names the pack (nothing uploaded again) and lets go of its hold.
        const drained = (await d.api('POST', '/api/exports/z/drain')).json;
        assert.equal(drained.packs_uploaded, 0, JSON.stringify(drained));
        assert.deepEqual(await heldFor('z'), []);
        assert.deepEqual([...(await storeAudit(path.join(d.dir, 'store'))).live].sort(), packs);
        const c = await connect(d, 'z');
        assert.ok((await readAll(c, 0, shared.length)).equals(shared), 'z reads back differently');
        await c.disconnect();

        // z purged too: the pack goes.
        assert.equal((await d.api('DELETE', '/api/exports/z?purge=true&force=true')).status, 200);
        const freed = (await d.api('POST', '/api/gc', { reconcile: true })).json;
        assert.deepEqual(freed.cycle.deleted, packs, JSON.stringify(freed.cycle));
        assert.equal((await storeAudit(path.join(d.dir, 'store'))).packs, 0);
      });
    } finally {
      await db?.close();
      await store.close();
      await d.cleanup();
    }
  });

  test(`${label}: settling a volume's uploads keeps the packs it is told to keep (blocks sealed after the manifest's cut) and lets go of the rest`, { timeout: TIMEOUT }, async (t) => {
    const { db, store } = await gcScratch(t, backend, 'keep');
    const refcounts = await PackRefcounts.open(db, { hostId: 'h1', store, settleMs: 0, log: createLogger('test', 'error') });
    const refs = async (id: string) => Number((await db.tx((tx) => tx.all<{ refs: number }>(`SELECT refs FROM gc_packs WHERE id = $1`, [id])))[0]?.refs);
    const hold = uploadsKey('h1', 'v');
    const [early, late, both] = Array.from({ length: 3 }, () => randomBytes(16).toString('hex'));
    for (const id of [early, late, both]) {
      await store.put(`packs/${id.slice(0, 2)}/${id}`, randomBytes(64));
      await refcounts.registerPack(id);
    }
    assert.deepEqual(await refcounts.holdUploads(hold, [early, both]), []);
    assert.deepEqual(await refcounts.holdUploads(hold, [late, both]), []);
    assert.deepEqual([await refs(early), await refs(late), await refs(both)], [1, 1, 1], 'a pack held twice by one key counted twice');
    assert.equal(await refcounts.settleUploads(hold, [late, both]), 1);
    assert.deepEqual([await refs(early), await refs(late), await refs(both)], [0, 1, 1]);
    assert.deepEqual([...(await refcounts.counted(hold))!.packs].sort(), [late, both].sort());
    // The next settle with nothing to keep lets go of the rest.
    assert.equal(await refcounts.settleUploads(hold), 2);
    assert.deepEqual([await refs(late), await refs(both)], [0, 0]);
  });
}
