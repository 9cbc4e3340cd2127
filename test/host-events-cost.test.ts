// The pieces under the dashboard, without a daemon: the host event ring keeps its last
// `capacity` events in order and hands out what came after an id; error log lines become
// events; store requests are counted per volume (by caller and by key); the cost model
// prices them.
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { costOf, S3_STANDARD_PRICES } from '../src/host/cost.js';
import { HostEvents, recordingErrors } from '../src/host/events.js';
import type { Logger } from '../src/log.js';
import { onBehalfOf, withMetering } from '../src/objectstore/metered.js';
import type { ObjectStore } from '../src/objectstore/types.js';

describe('host events', () => {
  test('the ring keeps the last events in order and answers what came after an id', () => {
    const events = new HostEvents(4);
    for (let i = 1; i <= 6; i++) events.record('drain', `v${i}`, `drain ${i}`);
    assert.deepEqual(events.since().map((e) => e.message), ['drain 3', 'drain 4', 'drain 5', 'drain 6']);
    assert.deepEqual(events.since(4).map((e) => e.id), [5, 6]);
    assert.deepEqual(events.since(6), []);
    assert.equal(events.nextId, 7);
  });

  test('track records a success as its kind and a failure as an error, and passes both on', async () => {
    const events = new HostEvents();
    assert.equal(await events.track('fork', 'a', Promise.resolve(3), (n) => `forked at ${n}`), 3);
    await assert.rejects(events.track('drain', 'a', Promise.reject(new Error('store down')), () => 'never'), /store down/);
    assert.deepEqual(events.since().map((e) => [e.kind, e.volume, e.message]), [
      ['fork', 'a', 'forked at 3'],
      ['error', 'a', 'drain failed: store down'],
    ]);
  });

  test('error lines of the logger and its children become events; fencing lines are fencing', () => {
    const events = new HostEvents();
    const lines: string[] = [];
    const base: Logger = {
      debug: () => undefined, info: (m) => lines.push(`info ${m}`), warn: (m) => lines.push(`warn ${m}`), error: (m) => lines.push(`error ${m}`),
      child: () => base,
    };
    const log = recordingErrors(base, events).child('store');
    log.info('drained volume', { volume: 'a' });
    log.error('fenced: volume is read-only on this host', { volume: 'a', why: 'another host wrote its manifest' });
    log.error('background flush failed', { volume: 'b', error: 'EIO' });
    assert.deepEqual(lines, ['info drained volume', 'error fenced: volume is read-only on this host', 'error background flush failed']);
    assert.deepEqual(events.since().map((e) => [e.kind, e.volume, e.message]), [
      ['fencing', 'a', 'fenced: volume is read-only on this host: another host wrote its manifest'],
      ['error', 'b', 'background flush failed: EIO'],
    ]);
  });
});

describe('cost', () => {
  test('store requests are counted for the volume that made them or whose key they are', async () => {
    const objects = new Map<string, Buffer>();
    const backend: Partial<ObjectStore> = {
      description: 'memory',
      put: async (key, body) => {
        objects.set(key, body);
        return 'etag';
      },
      get: async (key) => (objects.has(key) ? { key, size: objects.get(key)!.length, body: objects.get(key)!, etag: 'etag', lastModified: new Date() } : undefined),
      head: async () => undefined,
    };
    const store = withMetering(backend as ObjectStore);
    await onBehalfOf('web/disk', async () => {
      await store.put('packs/ab/abcdef', Buffer.alloc(10));
      await new Promise((resolve) => setTimeout(resolve, 1));
      await store.put('packs/cd/cdef01', Buffer.alloc(10));
    });
    await store.get('volumes/web/disk/lease');
    await store.head('volumes/db/checkpoints/nightly');
    await store.get('packs/ab/abcdef');
    assert.deepEqual(store.volumeRequests('web/disk'), { get: 1, get_range: 0, put: 2, head: 0, list: 0, delete: 0 });
    assert.deepEqual(store.volumeRequests('db'), { get: 0, get_range: 0, put: 0, head: 1, list: 0, delete: 0 });
    assert.equal(store.counters().requests.get, 2, 'the host counts every request');
  });

  test('storage is priced per GB-month and requests per thousand, LIST as a PUT and HEAD as a GET', () => {
    const cost = costOf(S3_STANDARD_PRICES, 200e9, { put: 1000, list: 1000, get: 5000, get_range: 3000, head: 2000, delete: 7 });
    assert.equal(cost.currency, 'USD');
    assert.ok(Math.abs(cost.storage_per_month - 4.6) < 1e-9, `storage ${cost.storage_per_month}`);
    assert.deepEqual(cost.requests, { put: 2000, get: 10000, delete: 7 });
    assert.ok(Math.abs(cost.requests_cost - (2 * 0.005 + 10 * 0.0004)) < 1e-12, `requests ${cost.requests_cost}`);
    const own = costOf({ currency: 'EUR', storageGbMonth: 0.01, putPer1000: 0.01, getPer1000: 0.001, deletePer1000: 0.1 }, 1e9, { put: 0, list: 0, get: 0, get_range: 0, head: 0, delete: 1000 });
    assert.deepEqual([own.currency, own.storage_per_month, own.requests_cost], ['EUR', 0.01, 0.1]);
  });
});
