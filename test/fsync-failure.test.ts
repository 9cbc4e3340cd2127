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
import { startDaemon, type Daemon } from './harness/daemon.js';
import { canFailDisks, startFailingDisk, type FailingDisk } from './harness/failing-disk.js';
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

test('a FLUSH after a failed fdatasync of the overlay gets EIO until the volume is reopened; reopened, it is the last flushed state', { timeout: 600_000 }, async (t) => {
  if (!canFailDisks(t)) return;
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
    await client.write(8 * CHUNK, pattern(2));
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
    assert.ok((await metricValue(daemon, 'updraft_fsync_failures_total{file="overlay"}')) >= 1, 'the failed overlay sync is counted');
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
