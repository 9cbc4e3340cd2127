// A failed fdatasync is never followed by a successful FLUSH (DESIGN.md invariant 1).
//
// The volume's local state lives on a real ext4 filesystem whose disk fails writes on
// command (harness/failing-disk.ts). On Linux a failed writeback drops the dirty pages
// and reports EIO to one fdatasync; the next one succeeds without them. So after a FLUSH
// got EIO, a later FLUSH must not succeed over the lost writes: the volume fails, writes
// and flushes get EIO until it is reopened, reads go on, and the reopened volume is the
// last state a FLUSH acknowledged.

import assert from 'node:assert/strict';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { test } from 'node:test';
import { connect as connectTo, createVolume, drain, exportInfo, fileStore, startCluster, waitFor, withLogs } from './harness/cluster.js';
import { removeDir, scratchDir, startDaemon, type Daemon } from './harness/daemon.js';
import { startFailingDisk, type FailingDisk } from './harness/failing-disk.js';
import { canMountNbdDisks } from './harness/nbd-disk.js';
import { NbdClient, NbdCommandError } from './harness/nbd-client.js';

const VOLUME = 'fsyncgate';
const CHUNK = 128 * 1024;

function pattern(seed: number, length = 64 * 1024): Buffer {
  const data = Buffer.alloc(length);
  for (let i = 0; i < length; i += 4) data.writeUInt32LE((seed * 2654435761 + i) >>> 0, i);
  return data;
}

async function metricValue(daemon: Daemon, series: string): Promise<number> {
  const text = (await daemon.api('GET', '/metrics')).text;
  const line = text.split('\n').find((l) => l.startsWith(series + ' '));
  assert.ok(line !== undefined, `metric ${series} is exported`);
  return Number(line.slice(series.length + 1));
}

async function expectEio(what: string, run: () => Promise<unknown>): Promise<void> {
  try {
    await run();
  } catch (err) {
    assert.ok(err instanceof NbdCommandError, `${what}: an NBD error reply, got ${(err as Error).message}`);
    assert.equal(err.code, 'EIO', `${what}: EIO`);
    return;
  }
  assert.fail(`${what} succeeded; it must fail with EIO after a failed fdatasync`);
}

// 'overlay': a write larger than a FLUSH logs, so the FLUSH syncs the overlay (then the
// journal); 'journal': a small write, logged in the journal batch, whose sync is the FLUSH's one.
for (const file of ['overlay', 'journal'] as const) {
  test(`a FLUSH after a failed fdatasync of the ${file} gets EIO until the volume is reopened; reopened, it is the last flushed state`, { timeout: 600_000 }, async (t) => {
    if (!canMountNbdDisks(t)) return;
    let disk: FailingDisk | undefined;
    let daemon: Daemon | undefined;
    let client: NbdClient | undefined;
    try {
      disk = await startFailingDisk();
      const cacheDir = path.join(disk.mountDir, 'cache');
      // Seal never: the writes stay in the overlay, whose fdatasync is the one that fails.
      daemon = await startDaemon({ toml: { cache: { dir: cacheDir }, volumes: { seal_idle_ms: 3_600_000 } } });
      const connect = () => NbdClient.connect({ path: daemon!.socket, exportName: VOLUME });
      client = await connect();

      const flushed = pattern(1);
      await client.write(0, flushed);
      await client.flush();

      await disk.fail();
      await client.write(8 * CHUNK, pattern(2, file === 'overlay' ? 3 * CHUNK : 64 * 1024));
      await expectEio('FLUSH while the disk fails writes', () => client!.flush());

      await disk.heal();
      // The kernel dropped the failed pages and cleared the error: a retried fdatasync would succeed.
      await expectEio('FLUSH after the failed FLUSH, disk healthy again', () => client!.flush());
      await expectEio('WRITE after the failed FLUSH, disk healthy again', () => client!.write(16 * CHUNK, pattern(3)));
      await expectEio('FUA WRITE after the failed FLUSH', () => client!.write(16 * CHUNK, pattern(3), { fua: true }));
      assert.deepEqual(await client.read(0, flushed.length), flushed, 'flushed data still reads back');

      const view = (await daemon.api('GET', `/api/exports/${VOLUME}`)).json;
      assert.equal(view.failed, true, 'the API view says the volume failed');
      assert.match(view.failure, /fdatasync/, 'and why');
      assert.equal(await metricValue(daemon, `updraft_volume_failed{volume="${VOLUME}"}`), 1, 'updraft_volume_failed is 1');
      assert.ok((await metricValue(daemon, `updraft_fsync_failures_total{file="${file}"}`)) >= 1, `the failed ${file} sync is counted`);
      assert.match(daemon.log(), /volume failed: a sync of its local state failed/, 'the daemon logged the failure');

      // Reopen: a restart recovers the volume from its journal's last good batch.
      client.close();
      client = undefined;
      await daemon.restart();
      client = await connect();
      assert.deepEqual(await client.read(0, flushed.length), flushed, 'flushed data survives the reopen');
      assert.ok((await client.read(8 * CHUNK, 64 * 1024)).equals(Buffer.alloc(64 * 1024)), 'the write whose FLUSH failed is not in the reopened volume');
      const after = pattern(4);
      await client.write(24 * CHUNK, after);
      await client.flush();
      assert.deepEqual(await client.read(24 * CHUNK, after.length), after, 'the reopened volume takes writes again');
      assert.equal((await daemon.api('GET', `/api/exports/${VOLUME}`)).json.failed, false, 'the reopened volume is healthy');
    } finally {
      client?.close();
      await daemon?.cleanup();
      if (disk !== undefined) {
        await disk.heal();
        await disk.stop();
      }
    }
  });
}

async function waitUntil(what: string, check: () => Promise<boolean>): Promise<void> {
  const deadline = Date.now() + 60_000;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting until ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

// Through the page cache a slab write lands and the sync after it fails; past it (O_DIRECT)
// the write itself fails. Either way the volume that would name the block fails, and only it.
for (const mode of ['buffered', 'direct'] as const) {
  test(`a failed ${mode === 'buffered' ? 'sync' : 'direct write'} of the block cache slab fails the volumes whose unflushed blocks it may have lost, and only those`, { timeout: 600_000 }, async (t) => {
    if (!canMountNbdDisks(t)) return;
    let disk: FailingDisk | undefined;
    let daemon: Daemon | undefined;
    let volumesDir: string | undefined;
    const clients: NbdClient[] = [];
    try {
      disk = await startFailingDisk();
      // The block cache's slab on the failing disk; the volumes' overlays and journals elsewhere.
      const cacheDir = path.join(disk.mountDir, 'cache');
      volumesDir = await scratchDir('updraft-volumes-');
      await fsp.mkdir(cacheDir);
      await fsp.symlink(volumesDir, path.join(cacheDir, 'volumes'));
      // Seal as soon as a volume is idle: its writes become blocks in the slab.
      daemon = await startDaemon({ toml: { cache: { dir: cacheDir, direct_writes: mode === 'direct' }, volumes: { seal_idle_ms: 200 } } });
      assert.equal(await metricValue(daemon, 'updraft_cache_slab_direct_writes'), mode === 'direct' ? 1 : 0, `slab writes are ${mode}`);
      const connect = async (name: string) => {
        const client = await NbdClient.connect({ path: daemon!.socket, exportName: name });
        clients.push(client);
        return client;
      };
      const sealed = async (name: string) => (await daemon!.api('GET', `/api/exports/${name}/metrics`)).json.chunks_sealed as number;
      const view = async (name: string) => (await daemon!.api('GET', `/api/exports/${name}`)).json;
      const a = await connect('slab-a');
      const b = await connect('slab-b');
      const flushedA = pattern(10, CHUNK);
      await a.write(0, flushedA);
      await a.flush();
      await b.write(0, pattern(11, CHUNK));
      await b.flush();
      await waitUntil('both volumes sealed their first chunk', async () => (await sealed('slab-a')) >= 1 && (await sealed('slab-b')) >= 1);
      // Commit the seals (slab synced) before the disk fails: those blocks are safe.
      await a.flush();
      await b.flush();

      await disk.fail();
      await a.write(CHUNK, pattern(12, CHUNK));
      // A seals the chunk into the slab; the flush that follows the seal finds the slab sync failed.
      await waitUntil('volume slab-a failed', async () => (await view('slab-a')).failed === true);
      assert.match((await view('slab-a')).failure, /may be lost/, 'slab-a failed because its flush would name a lost block');

      await disk.heal();
      await expectEio('FLUSH of the volume whose sealed block the failed slab sync covered', () => a.flush());
      await expectEio('WRITE to it', () => a.write(2 * CHUNK, pattern(13, CHUNK)));
      assert.deepEqual(await a.read(0, CHUNK), flushedA, 'its flushed data still reads back');

      // B named no block the failed sync covered: it goes on, and its blocks go to the slab again.
      const laterB = pattern(14, CHUNK);
      await b.write(CHUNK, laterB);
      await b.flush();
      await waitUntil('slab-b sealed the new chunk', async () => (await sealed('slab-b')) >= 2);
      await b.flush();
      assert.deepEqual(await b.read(CHUNK, CHUNK), laterB, 'the healthy volume reads its write');
      assert.equal((await view('slab-b')).failed, false, 'slab-b did not fail');
      if (mode === 'buffered') assert.ok((await metricValue(daemon, 'updraft_fsync_failures_total{file="slab"}')) >= 1, 'the failed slab sync is counted');
      else assert.ok((await metricValue(daemon, 'updraft_cache_slab_write_failures_total')) >= 1, 'the failed slab write is counted');
      assert.equal(await metricValue(daemon, 'updraft_volumes_failed'), 1, 'one volume failed');

      // Reopen through the API (close, load from the journal), its client disconnected.
      const reopened = await daemon.api('POST', '/api/exports/slab-a/reopen?force=true');
      assert.equal(reopened.status, 200, reopened.text);
      assert.equal(reopened.json.failed, false, 'the reopened volume is healthy');
      assert.equal(await metricValue(daemon, 'updraft_volumes_failed'), 0, 'no volume is failed after the reopen');
      // Pinned now: slab-a's first chunk, slab-b's two; the block the failed sync lost was let go with the old instance.
      assert.equal(await metricValue(daemon, 'updraft_cache_pinned_blocks'), 3, 'the reopen released the blocks only the failed state held');
      const a2 = await connect('slab-a');
      assert.deepEqual(await a2.read(0, CHUNK), flushedA, 'slab-a reopened at its last flushed state');
      assert.ok((await a2.read(CHUNK, CHUNK)).equals(Buffer.alloc(CHUNK)), 'without the write whose flush failed');
      const laterA = pattern(15, CHUNK);
      await a2.write(2 * CHUNK, laterA);
      await a2.flush();

      for (const client of clients.splice(0)) client.close();
      await daemon.restart();
      const a3 = await connect('slab-a');
      assert.deepEqual(await a3.read(2 * CHUNK, CHUNK), laterA, 'slab-a kept the write flushed after the reopen across a restart');
      const b2 = await connect('slab-b');
      assert.deepEqual(await b2.read(CHUNK, CHUNK), laterB, 'slab-b kept its flushed write across the restart');
    } finally {
      for (const client of clients) client.close();
      await daemon?.cleanup();
      if (disk !== undefined) {
        await disk.heal();
        await disk.stop();
      }
      if (volumesDir !== undefined) await removeDir(volumesDir);
    }
  });
}

// A replica whose journal sync fails while it takes its writer's newer manifest holds that
// manifest in memory only: promoted as it was, a power cut would bring back the older state
// under the lease. It is refused until the volume is reopened; reopened, it follows the
// writer from what its disk holds, and promotes.
test('a replica whose sync failed as it followed its writer is not promoted until reopened; reopened, it follows on and promotes with the writer\'s last state', { timeout: 600_000 }, async (t) => {
  if (!canMountNbdDisks(t)) return;
  let disk: FailingDisk | undefined;
  const cluster = await startCluster(fileStore);
  try {
    disk = await startFailingDisk();
    // B's volumes (overlays, journals) on the failing disk; its block cache and pack index elsewhere.
    const cacheDir = path.join(cluster.dir, 'host-b-cache');
    await fsp.mkdir(path.join(disk.mountDir, 'volumes'));
    await fsp.mkdir(cacheDir);
    await fsp.symlink(path.join(disk.mountDir, 'volumes'), path.join(cacheDir, 'volumes'));
    const a = await cluster.start('host-a');
    const b = await cluster.start('host-b', { cache: { dir: cacheDir }, volumes: { replica_follow_interval_ms: 0 } });
    const name = 'failed-replica';
    const encoded = encodeURIComponent(name);
    await withLogs([a, b], async () => {
      await createVolume(a, name, 8);
      const ca = await connectTo(a, name);
      await ca.write(0, pattern(21, CHUNK));
      const first = await drain(a, name);
      await createVolume(b, name, 8, { replica_follow_interval_ms: 200 }, 200);
      await waitFor('the replica to load the first drain', async () => (await exportInfo(b, name)).sequence >= first.sequence);

      await disk!.fail();
      const written = pattern(22, CHUNK);
      await ca.write(0, written, { fua: true });
      const second = await drain(a, name);
      await waitFor('the replica to fail as it takes the second drain', async () => (await exportInfo(b, name)).failed === true);
      await disk!.heal();

      const released = await a.api('POST', `/api/exports/${encoded}/release`);
      assert.equal(released.status, 200, released.text);
      const refused = await b.api('POST', `/api/exports/${encoded}/promote`);
      assert.notEqual(refused.status, 200, `a failed replica was promoted: ${refused.text}`);
      assert.match(refused.text, /cannot promote: it has failed .*reopen it first/);

      const reopened = await b.api('POST', `/api/exports/${encoded}/reopen?force=true`);
      assert.equal(reopened.status, 200, reopened.text);
      await waitFor('the reopened replica to follow the second drain', async () => (await exportInfo(b, name)).sequence >= second.sequence);
      const promoted = await b.api('POST', `/api/exports/${encoded}/promote`);
      assert.equal(promoted.status, 200, promoted.text);
      const cb = await connectTo(b, name);
      assert.deepEqual(await cb.read(0, CHUNK), written, 'the promoted replica reads the writer\'s FUA write');
      await cb.write(CHUNK, pattern(23, CHUNK));
      await cb.flush();
      cb.close();
      ca.close();
      await b.restart();
      const again = await connectTo(b, name);
      assert.deepEqual(await again.read(0, CHUNK), written, 'the writer\'s FUA write survives the new writer\'s restart');
      again.close();
    });
  } finally {
    await cluster.cleanup();
    if (disk !== undefined) {
      await disk.heal();
      await disk.stop();
    }
  }
});
