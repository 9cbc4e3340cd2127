// Invariant 6 for blocks shared between volumes, through the real daemon and real NBD
// clients: volumes y and z hold the same data; y's drain puts it into packs, and z (within
// its dirty budget) uploads nothing: its seals deduplicate against y's packs, or y's upload
// takes the blocks z sealed first. y is then purged (nothing names its packs any more),
// another volume's writes push z's blocks out of a small cache, and GC (a one-second grace
// period, every second) runs meanwhile, once also with a SIGKILL and a restart between the
// seals and the upload. z must still read back what it was written, and drain.
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { test } from 'node:test';
import { createVolume, drain, exportInfo, metric, MiB, waitFor, withLogs } from './harness/cluster.js';
import { startDaemon } from './harness/daemon.js';
import { storeAudit } from './harness/gc.js';
import { requireTools, runOk, TOOLS } from './harness/tools.js';

const TOOL_TIMEOUT_MS = 120_000;
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

for (const [zFirst, crash] of [[false, false], [true, false], [true, true]]) {
  const order = zFirst ? `sealed before the other volume uploads them${crash ? ', across a SIGKILL and a restart,' : ''}` : 'deduplicated against another volume\'s packs';
  test(`a volume whose blocks were ${order} reads back and drains after that volume is purged, a small cache evicts its blocks and GC runs past a 1 s grace period`, { timeout: 300_000 }, async (t) => {
    if (!requireTools(t, [TOOLS.nbdcopy])) return;
    const d = await startDaemon({
      toml: {
        cache: { disk_size_gb: 0.1, memory_size_gb: 0.01 },
        volumes: { dirty_budget_gb: 0.05, seal_idle_ms: 200 },
        gc: { grace_period: '1s', interval: '1s' },
      },
    });
    try {
      await withLogs([d], async () => {
        for (const name of ['y', 'z']) await createVolume(d, name, 64);
        // w's own small budget uploads its writes, so the cache may evict them and fills up.
        await createVolume(d, 'w', 64, { dirty_budget_gb: 0.01 });
        const shared = randomBytes(16 * MiB);
        const source = path.join(d.dir, 'shared.img');
        await writeFile(source, shared);
        const writeZ = async () => {
          await runOk('nbdcopy', ['--flush', source, d.uri('z')], { timeoutMs: TOOL_TIMEOUT_MS });
          await waitFor('z to be sealed', async () => (await exportInfo(d, 'z')).dirty_bytes === 0);
        };
        // z seals the blocks before any pack holds them (y's upload then takes them), or after y's drain (dedup hits against y's packs).
        if (zFirst) await writeZ();
      if (crash) {
        // Both volumes' journals name the same pinned blocks; the restarted cache must still hold y's upload for z.
        await runOk('nbdcopy', ['--flush', source, d.uri('y')], { timeoutMs: TOOL_TIMEOUT_MS });
        await waitFor('y to be sealed', async () => (await exportInfo(d, 'y')).dirty_bytes === 0);
        await sleep(2000); // the idle volumes' journals are written back
        await d.kill9();
        await d.restart();
      }
        // y puts the data into packs in the store (its manifest names them).
        await runOk('nbdcopy', ['--flush', source, d.uri('y')], { timeoutMs: TOOL_TIMEOUT_MS });
        await drain(d, 'y');
        if (!zFirst) await writeZ();
        // (A restart forgets what the dirty budget counted: nothing of z's goes up then either.)
      if (!crash) assert.equal((await exportInfo(d, 'z')).store_dirty_bytes, 16 * MiB, 'z is not within its dirty budget');
        assert.deepEqual((await storeAudit(path.join(d.dir, 'store'))).dead, [], 'z uploaded blocks y stored');

        // Nothing names y's packs any more.
        assert.equal((await d.api('DELETE', '/api/exports/y?purge=true&force=true')).status, 200);
        // Another volume's writes push z's blocks out of the cache while GC runs past the grace period.
        const cycles = await metric(d, 'updraft_gc_cycles_total');
        const other = path.join(d.dir, 'w.img');
        for (let round = 0; round < 4; round++) {
          await writeFile(other, randomBytes(40 * MiB));
          await runOk('nbdcopy', ['--flush', other, d.uri('w')], { timeoutMs: TOOL_TIMEOUT_MS });
          await sleep(3000);
        }
        // The scenario only proves something if GC ran meanwhile and the cache evicted.
        assert.ok((await metric(d, 'updraft_gc_cycles_total')) >= cycles + 8, 'GC did not run its cycles');
        assert.ok((await metric(d, 'updraft_cache_evictions_total', { tier: 'disk' })) > 0, 'the disk cache evicted nothing');

        const gets = await metric(d, 'updraft_store_requests_total', { kind: 'get' });
        const back = path.join(d.dir, 'z.back');
        await runOk('nbdcopy', [d.uri('z'), back], { timeoutMs: TOOL_TIMEOUT_MS });
        assert.ok((await readFile(back)).subarray(0, shared.length).equals(shared), 'volume z reads back different bytes than were written');
        // z's blocks had left the cache: they came back from y's packs, which z's seals hold.
        assert.ok((await metric(d, 'updraft_store_requests_total', { kind: 'get' })) > gets, 'z was read without a store GET: its blocks were never evicted');
        await drain(d, 'z');
        const audit = await storeAudit(path.join(d.dir, 'store'));
        assert.deepEqual(audit.missing, [], 'z\'s manifest names packs that are not in the store');
        await runOk('nbdcopy', [d.uri('z'), back], { timeoutMs: TOOL_TIMEOUT_MS });
        assert.ok((await readFile(back)).subarray(0, shared.length).equals(shared), 'volume z reads back differently after its drain');
      });
    } finally {
      await d.cleanup();
    }
  });
}
