// Failover and the old holder coming back (DESIGN.md invariant 4; docs/operations.md:
// Failover). Three hosts on one store: A writes and drains, B follows as a replica. A is
// SIGKILLed with writes no manifest carries, and its cache folder is kept aside. Once the
// lease expired B promotes with the last manifest's state, and C, woken from the store,
// sees the same. A restarted on its old cache folder finds it lost the lease: it writes
// nothing to the store for the volume, refuses new clients saying why (log and API), and
// an operator can fork its copy locally (the unflushed writes are there) and delete it.
// On the file:// store and on MinIO.
import assert from 'node:assert/strict';
import { cp, rm } from 'node:fs/promises';
import path from 'node:path';
import { test } from 'node:test';
import {
  CHUNK, connect, createVolume, drain, exportInfo, fileStore, metric, MiB, readAll, startCluster, waitFor, withLogs, writeRandom, type SharedStore,
} from './harness/cluster.js';
import type { Daemon } from './harness/daemon.js';
import { minioForTests, minioStore } from './harness/minio.js';
import { openObjectStore } from '../src/objectstore/index.js';
import type { ObjectStore } from '../src/objectstore/types.js';
import { decodeLease } from '../src/store/lease.js';
import { leaseKey } from '../src/store/manifest.js';

const TIMEOUT = 600_000;
const VOLUME = 'failover/vm';
const VOLUME_MIB = 8;
const TTL = { host: { lease_ttl_s: 6, clock_skew_margin_s: 1 } };

/** The cluster's store, opened by the test to list what is in it. */
function openShared(shared: SharedStore): ObjectStore {
  const storage = shared.toml.storage as { url: string };
  const aws = shared.toml.aws as { access_key_id: string; secret_access_key: string; endpoint: string; default_region: string } | undefined;
  return openObjectStore(storage.url, aws === undefined ? {} : {
    accessKeyId: aws.access_key_id, secretAccessKey: aws.secret_access_key, endpoint: aws.endpoint, region: aws.default_region, allowHttp: true, forcePathStyle: true,
  });
}

/**
 * Every object of the volume and every pack, by key, with its etag; the lease (its holder
 * renews it) by its holder and generation.
 */
async function volumeObjects(store: ObjectStore): Promise<Map<string, string>> {
  const out = new Map<string, string>();
  for (const prefix of [`volumes/${VOLUME}/`, 'packs/']) for (const o of await store.list(prefix)) out.set(o.key, o.etag);
  const key = leaseKey(VOLUME);
  const lease = await store.get(key);
  if (lease !== undefined) {
    const { owner, generation, released = false } = decodeLease(key, lease.body);
    out.set(key, JSON.stringify({ owner, generation, released }));
  }
  return out;
}

const post = (d: Daemon, name: string, action: string, body?: unknown) => d.api('POST', `/api/exports/${encodeURIComponent(name)}/${action}`, body);

async function failover(store: (dir: string) => SharedStore): Promise<void> {
  const cluster = await startCluster(store);
  const objects = openShared(cluster.store);
  try {
    const a = await cluster.start('host-a', TTL);
    const b = await cluster.start('host-b', { ...TTL, volumes: { replica_follow_interval_ms: 200 } });
    await withLogs([a, b], async () => {
      await createVolume(a, VOLUME, VOLUME_MIB);
      const ca = await connect(a, VOLUME);
      const first = await writeRandom(ca, 0, 2 * MiB);
      await ca.flush();
      await drain(a, VOLUME);
      const cb = await connect(b, VOLUME);
      const second = await writeRandom(ca, 2 * MiB, 2 * MiB);
      await ca.flush();
      const drained = await drain(a, VOLUME);
      await waitFor('B to follow the second drain', async () => (await exportInfo(b, VOLUME)).sequence === drained.sequence);
      // Written and flushed on A after its last drain: in no manifest.
      const unflushed = await writeRandom(ca, 4 * MiB, 2 * MiB);
      await ca.flush();
      const drainedState = Buffer.concat([first, second, Buffer.alloc((VOLUME_MIB - 4) * MiB)]);
      assert.ok((await readAll(cb, 0, VOLUME_MIB * MiB)).equals(drainedState), 'B serves the last manifest');

      // A dies; its cache folder is kept aside as it was at the kill, and taken from A.
      await a.kill9();
      const cacheDir = path.join(a.dir, 'cache');
      const kept = path.join(cluster.dir, 'host-a-cache-at-kill');
      await cp(cacheDir, kept, { recursive: true });
      await rm(cacheDir, { recursive: true, force: true });

      // B promotes once the lease expired: writable, with the last manifest's state.
      let promoted: any;
      await waitFor('the promotion of B once the lease expired', async () => {
        const r = await post(b, VOLUME, 'promote');
        if (r.status === 409) return false;
        assert.equal(r.status, 200, r.text);
        promoted = r.json;
        return true;
      }, 60_000, 250);
      assert.equal(promoted.sequence, drained.sequence, `promote answers the sequence of the last manifest: ${JSON.stringify(promoted)}`);
      assert.equal((await exportInfo(b, VOLUME)).read_only, false);
      assert.ok((await readAll(cb, 0, VOLUME_MIB * MiB)).equals(drainedState), 'B has the last manifest\'s state after the promotion');

      // C, woken from the store, sees the same.
      const c = await cluster.start('host-c', TTL);
      const cc = await connect(c, VOLUME);
      assert.ok((await readAll(cc, 0, VOLUME_MIB * MiB)).equals(drainedState), 'C sees the last manifest\'s state');
      await cc.disconnect();

      // B writes on and drains under its generation.
      const third = await writeRandom(cb, 6 * MiB, MiB);
      await cb.flush();
      const bDrained = await drain(b, VOLUME);
      const bState = Buffer.concat([first, second, Buffer.alloc(2 * MiB), third, Buffer.alloc(MiB)]);
      const before = await volumeObjects(objects);
      assert.ok(before.has(`volumes/${VOLUME}/manifest`));
      assert.equal(before.get(leaseKey(VOLUME)), JSON.stringify({ owner: 'host-b', generation: promoted.generation, released: false }));

      // A comes back on its cache folder as it was at the kill.
      await cp(kept, cacheDir, { recursive: true });
      await a.restart();
      await withLogs([a, b, c], async () => {
        await waitFor('A to find it lost the lease', async () => (await exportInfo(a, VOLUME)).out_of_service !== undefined);
        const info = await exportInfo(a, VOLUME);
        assert.equal(info.read_only, true);
        assert.match(info.lease_lost, /host-b/, JSON.stringify(info));
        assert.match(info.out_of_service, /no longer holds the lease/);
        assert.match(info.out_of_service, /writes no manifest in the store carries/);
        assert.equal(info.replica, undefined, 'a copy out of service follows nobody');
        assert.equal(await metric(a, 'updraft_volume_out_of_service', { volume: VOLUME }), 1);
        await waitFor('the lost lease in the log', async () => /lost the lease: volume is read-only on this host/.test(a.log()));
        // New clients are refused, saying why.
        await assert.rejects(connect(a, VOLUME), /out of service/);
        await waitFor('the refusal in the log', async () => /refused a client: the volume is out of service on this host .*no longer holds the lease/.test(a.log()));
        // Nothing reaches the store from A for the volume.
        const stale = await post(a, VOLUME, 'drain');
        assert.equal(stale.status, 409, `the old holder drained: ${stale.text}`);
        const consistent = await post(a, VOLUME, 'fork', { target: 'failover/not-this-way' });
        assert.equal(consistent.status, 409, `a consistent fork needs the lease: ${consistent.text}`);

        // A local fork shows what A never flushed to the store, and touches no store object of the volume.
        const forked = await post(a, VOLUME, 'fork', { target: 'failover/inspect', mode: 'local' });
        assert.equal(forked.status, 201, forked.text);
        assert.equal(forked.json.mode, 'local');
        const inspect = await connect(a, 'failover/inspect');
        const local = await readAll(inspect, 0, VOLUME_MIB * MiB);
        assert.ok(local.subarray(4 * MiB, 6 * MiB).equals(unflushed), 'the local fork has the writes A never drained');
        assert.ok(local.subarray(0, 4 * MiB).equals(Buffer.concat([first, second])), 'and what it drained before');
        await inspect.disconnect();

        // Deleting A's copy works and writes nothing either.
        const removed = await a.api('DELETE', `/api/exports/${encodeURIComponent(VOLUME)}`);
        assert.equal(removed.status, 200, removed.text);
        assert.equal((await a.api('GET', `/api/exports/${encodeURIComponent(VOLUME)}`)).status, 404);

        const afterAll = await volumeObjects(objects);
        assert.deepEqual([...afterAll].sort(), [...before].sort(), 'A changed the volume\'s objects or the packs in the store');
        assert.ok((await readAll(cb, 0, VOLUME_MIB * MiB)).equals(bState), 'B\'s data is untouched');
        assert.equal((await exportInfo(b, VOLUME)).manifest_sequence, bDrained.sequence);
      });
      await cb.disconnect();
      await ca.disconnect().catch(() => undefined);
    });
  } finally {
    await objects.close();
    await cluster.cleanup();
  }
}

const minio = minioForTests();

test('failover on the file:// store: B promotes with the last manifest, C sees it, the old holder comes back out of service and writes nothing', { timeout: TIMEOUT }, async () => {
  await failover(fileStore);
});

test('failover on MinIO: B promotes with the last manifest, C sees it, the old holder comes back out of service and writes nothing', { timeout: TIMEOUT }, async () => {
  await failover((dir) => minioStore(minio(), dir));
});

// CHUNK is the chunk the volume's regions are laid out in (every region is a whole number of them).
assert.equal((2 * MiB) % CHUNK, 0);
