// Invariant 6 through the real daemon and real NBD clients: the dirty budget uploads a
// volume's oldest changed chunks as packs no manifest names yet, the block cache (small
// here) evicts their blocks because the store has them, and GC (a one-second grace
// period) runs meanwhile, and the daemon is killed and restarted in between. The volume,
// never drained, must still read back what was written and flushed; once it is drained and the other volume removed, GC frees what
// only the removed volume needed.
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { test } from 'node:test';
import { connect, createVolume, drain, exportInfo, metric, MiB, waitFor, withLogs, writeRandom } from './harness/cluster.js';
import { startDaemon } from './harness/daemon.js';
import { storeAudit } from './harness/gc.js';
import { requireTools, runOk, TOOLS } from './harness/tools.js';

const TOOL_TIMEOUT_MS = 120_000;
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

test('a volume over its dirty budget keeps every flushed byte across a SIGKILL while a small cache evicts its uploaded blocks and GC runs with a 1 s grace period; GC frees them once it is drained and what only a removed volume held', { timeout: 300_000 }, async (t) => {
  if (!requireTools(t, [TOOLS.nbdcopy])) return;
  const d = await startDaemon({
    toml: {
      cache: { disk_size_gb: 0.1, memory_size_gb: 0.01 },
      volumes: { dirty_budget_gb: 0.02, seal_idle_ms: 200 },
      gc: { grace_period: '1s', interval: '1s' },
    },
  });
  try {
    await withLogs([d], async () => {
      await createVolume(d, 'v', 64);
      await createVolume(d, 'w', 64);
      const written = randomBytes(48 * MiB);
      const source = path.join(d.dir, 'v.img');
      await writeFile(source, written);
      await runOk('nbdcopy', ['--flush', source, d.uri('v')], { timeoutMs: TOOL_TIMEOUT_MS });
      await sleep(5000);
      // A crash does not lose what the dirty budget's uploads hold: it is in the refcount database.
      assert.ok((await metric(d, 'updraft_store_requests_total', { kind: 'put' })) > 0, 'the dirty budget uploaded nothing');
      await d.kill9();
      await d.restart();
      // Another volume's writes push v's blocks out of the cache (and over w's own budget).
      const other = path.join(d.dir, 'w.img');
      for (let round = 0; round < 4; round++) {
        await writeFile(other, randomBytes(40 * MiB));
        await runOk('nbdcopy', ['--flush', other, d.uri('w')], { timeoutMs: TOOL_TIMEOUT_MS });
        await sleep(4000);
      }
      // The scenario only proves something if GC ran and the cache did evict.
      assert.ok((await metric(d, 'updraft_gc_cycles_total')) >= 10, 'GC did not run its cycles');
      assert.ok((await metric(d, 'updraft_cache_evictions_total', { tier: 'disk' })) > 0, 'the disk cache evicted nothing');
      const back = path.join(d.dir, 'v.back');
      await runOk('nbdcopy', [d.uri('v'), back], { timeoutMs: TOOL_TIMEOUT_MS });
      const read = await readFile(back);
      assert.equal(read.length, 64 * MiB);
      assert.ok(read.subarray(0, written.length).equals(written), 'volume v reads back different bytes than were written and flushed');

      // What the uploads held goes once nothing needs it: w removed from the host (never
      // drained, so none of its packs is named), v drained (its manifest names its packs).
      assert.equal((await d.api('DELETE', '/api/exports/w')).status, 200);
      await drain(d, 'v');
      await waitFor('GC to delete the packs only w needed', async () => {
        await d.api('POST', '/api/gc', { reconcile: true });
        return (await storeAudit(path.join(d.dir, 'store'))).dead.length === 0;
      });
      const audit = await storeAudit(path.join(d.dir, 'store'));
      assert.deepEqual(audit.missing, []);
      assert.ok(audit.live.size >= 48 / 3, `v's manifest names ${audit.live.size} packs`);
      await runOk('nbdcopy', [d.uri('v'), back], { timeoutMs: TOOL_TIMEOUT_MS });
      assert.ok((await readFile(back)).subarray(0, written.length).equals(written), 'volume v reads back differently after its drain and GC');
    });
  } finally {
    await d.cleanup();
  }
});

test('a volume removed from the host lets go of what its uploads held, also when the daemon dies between removing its folder and letting go', { timeout: 120_000 }, async () => {
  const d = await startDaemon({
    toml: { volumes: { seal_idle_ms: 200 }, gc: { grace_period: '0s', interval: '1s' } },
    env: { UPDRAFT_CRASH_AT: 'volume-removed' },
  });
  try {
    await withLogs([d], async () => {
      const budget = 2 * MiB;
      await createVolume(d, 'x', 16, { dirty_budget_gb: budget / 1024 ** 3 });
      const c = await connect(d, 'x');
      await writeRandom(c, 0, 8 * MiB);
      await c.flush();
      await c.disconnect();
      await waitFor('the dirty budget upload', async () => (await exportInfo(d, 'x')).store_dirty_bytes <= budget);
      // Held: GC runs (grace 0) and keeps them, though no manifest names them.
      await d.api('POST', '/api/gc', { reconcile: true });
      const held = await storeAudit(path.join(d.dir, 'store'));
      assert.ok(held.packs > 0 && held.dead.length === held.packs, `x's uploads: ${held.packs} packs, ${held.dead.length} unnamed`);
      await d.api('DELETE', '/api/exports/x').catch(() => undefined);
      await d.exited();
      assert.match(d.log(), /crashing at volume-removed/);
      await d.restart({});
      await waitFor('GC to delete what only the removed volume held', async () => {
        await d.api('POST', '/api/gc', { reconcile: true });
        return (await storeAudit(path.join(d.dir, 'store'))).packs === 0;
      });
      assert.match(d.log(), /let go of packs held for the uploads of a volume this host no longer has volume=x/);
    });
  } finally {
    await d.cleanup();
  }
});
