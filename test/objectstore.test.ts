// The object store (src/objectstore/): one conformance suite run against file:// (a temp
// folder), s3:// (a real MinIO, see harness/minio.ts), gs:// (fake-gcs-server, see
// harness/fake-gcs.ts) and az:// (Azurite, see harness/azurite.ts), then what only one
// backend has: cross-process locking of the file store, S3 errors and time limits, and the
// fault, retry and metering wrappers.

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import http from 'node:http';
import { createHash, randomBytes } from 'node:crypto';
import { mkdir, readdir, utimes, writeFile } from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { after, test, type TestContext } from 'node:test';
import { fileURLToPath } from 'node:url';
import { scratchDir, removeDir } from './harness/daemon.js';
import { startMinio, type Minio } from './harness/minio.js';
import { startFakeGcs, type FakeGcs } from './harness/fake-gcs.js';
import { startAzurite, type Azurite } from './harness/azurite.js';
import { startStoreProxy } from './harness/store-proxy.js';
import { requireRoot, requireTools, runOk, TOOLS } from './harness/tools.js';
import {
  FileObjectStore,
  isPreconditionFailed,
  ObjectStoreError,
  openObjectStore,
  parseFaultSpec,
  probeObjectStore,
  withFaults,
  withMetering,
  withRetries,
  keyProblem,
  type ObjectStore,
  type ObjectStoreErrorCode,
  type S3Options,
} from '../src/objectstore/index.js';

const KiB = 1024;
const MiB = 1024 * KiB;

// ---------------------------------------------------------------------------
// Backends

let minio: Promise<Minio> | undefined;

/** One MinIO for the whole file, started by the first test that needs it. */
function sharedMinio(): Promise<Minio> {
  minio ??= startMinio();
  return minio;
}

let fakeGcs: Promise<FakeGcs> | undefined;
let azurite: Promise<Azurite> | undefined;

/** One fake-gcs-server and one Azurite for the whole file, each started by the first test that needs it. */
function sharedFakeGcs(): Promise<FakeGcs> {
  fakeGcs ??= startFakeGcs();
  return fakeGcs;
}
function sharedAzurite(): Promise<Azurite> {
  azurite ??= startAzurite();
  return azurite;
}

after(async () => {
  if (minio) await (await minio.catch(() => undefined))?.stop();
  if (fakeGcs) await (await fakeGcs.catch(() => undefined))?.stop();
  if (azurite) await (await azurite.catch(() => undefined))?.stop();
});

function awsOf(m: Minio, extra: S3Options = {}): S3Options {
  return { endpoint: m.endpoint, accessKeyId: m.accessKeyId, secretAccessKey: m.secretAccessKey, region: m.region, allowHttp: true, ...extra };
}

let prefixes = 0;
function freshPrefix(): string {
  return `t${++prefixes}-${randomBytes(4).toString('hex')}`;
}

async function fileStore(t: TestContext): Promise<FileObjectStore> {
  const dir = await scratchDir('updraft-store-');
  t.after(() => removeDir(dir));
  return new FileObjectStore(dir);
}

async function s3Store(t: TestContext, extra: S3Options = {}): Promise<ObjectStore> {
  const m = await sharedMinio();
  const store = openObjectStore(`s3://${m.bucket}/${freshPrefix()}`, awsOf(m, extra));
  t.after(() => store.close());
  return store;
}

/** A gs:// store on the shared fake-gcs-server under a fresh prefix; `endpoint` replaces the server's (a proxy in front of it). */
async function gcsStore(t: TestContext, endpoint?: string): Promise<ObjectStore> {
  const gcs = await sharedFakeGcs();
  const store = openObjectStore(`gs://${gcs.bucket}/${freshPrefix()}`, {}, undefined, { gcs: { endpoint: endpoint ?? gcs.endpoint, allowHttp: true } });
  t.after(() => store.close());
  return store;
}

/** An az:// store on the shared Azurite under a fresh prefix; `endpoint` replaces Azurite's (a proxy in front of it). */
async function azureStore(t: TestContext, endpoint?: string): Promise<ObjectStore> {
  const az = await sharedAzurite();
  const url = endpoint === undefined ? az.endpoint : `${endpoint}/${az.account}`;
  const store = openObjectStore(`az://${az.container}/${freshPrefix()}`, {}, undefined, {
    azure: { accountName: az.account, accountKey: az.key, endpoint: url, allowHttp: true },
  });
  t.after(() => store.close());
  return store;
}

interface Backend {
  name: string;
  /** An empty store of this kind, closed and removed after the test. */
  open(t: TestContext): Promise<ObjectStore>;
  /** Most keys one page of a listing holds, for a backend that pages. */
  listPage?: number;
  /** For a store behind an HTTP endpoint: the same store reached through `endpoint` (a proxy), and the real endpoint. */
  viaProxy?: { upstream(): Promise<string>; open(t: TestContext, endpoint: string): Promise<ObjectStore> };
}

const BACKENDS: Backend[] = [
  { name: 'file://', open: fileStore },
  {
    name: 's3:// (MinIO)',
    open: s3Store,
    listPage: 1000,
    viaProxy: { upstream: async () => (await sharedMinio()).endpoint, open: (t, endpoint) => s3Store(t, { endpoint }) },
  },
  {
    name: 'gs:// (fake-gcs-server)',
    open: (t) => gcsStore(t),
    listPage: 1000,
    viaProxy: { upstream: async () => (await sharedFakeGcs()).endpoint, open: gcsStore },
  },
  {
    name: 'az:// (Azurite)',
    open: (t) => azureStore(t),
    listPage: 1000,
    viaProxy: { upstream: async () => new URL((await sharedAzurite()).endpoint).origin, open: azureStore },
  },
];

// ---------------------------------------------------------------------------
// Helpers

/** Asserts that `promise` rejects with an ObjectStoreError of `code` whose message holds every string in `mentions`. */
async function rejectsWith(promise: Promise<unknown>, code: ObjectStoreErrorCode, mentions: string[] = []): Promise<ObjectStoreError> {
  let caught: unknown;
  await assert.rejects(promise, (err) => {
    caught = err;
    return true;
  });
  assert.ok(caught instanceof ObjectStoreError, `expected an ObjectStoreError, got ${String(caught)}`);
  assert.equal(caught.code, code, `expected ${code}, got ${caught.code}: ${caught.message}`);
  for (const text of mentions) assert.ok(caught.message.includes(text), `message ${JSON.stringify(caught.message)} does not mention ${JSON.stringify(text)}`);
  return caught;
}

/** Runs `jobs` with at most `depth` in flight. */
async function inPool<T>(depth: number, jobs: Array<() => Promise<T>>): Promise<T[]> {
  const out: T[] = new Array(jobs.length);
  let next = 0;
  await Promise.all(
    Array.from({ length: Math.min(depth, jobs.length) }, async () => {
      while (next < jobs.length) {
        const i = next++;
        out[i] = await jobs[i]();
      }
    }),
  );
  return out;
}

/** Keys sorted as S3 lists them: by UTF-8 bytes. */
function byteOrder(keys: string[]): string[] {
  return [...keys].sort((a, b) => Buffer.compare(Buffer.from(a), Buffer.from(b)));
}

// ---------------------------------------------------------------------------
// Conformance: every backend

for (const backend of BACKENDS) {
  const name = backend.name;

  test(`${name}: put, get and head agree on body, size and etag; a new body gets a new etag`, async (t) => {
    const store = await backend.open(t);
    const first = randomBytes(3000);
    const etag1 = await store.put('volumes/a/manifest', first);
    const got = await store.get('volumes/a/manifest');
    assert.ok(got);
    assert.ok(got.body.equals(first));
    assert.equal(got.size, first.length);
    assert.equal(got.etag, etag1);
    assert.equal(got.key, 'volumes/a/manifest');
    const info = await store.head('volumes/a/manifest');
    assert.deepEqual({ size: info?.size, etag: info?.etag }, { size: first.length, etag: etag1 });
    assert.ok(Math.abs(info!.lastModified.getTime() - Date.now()) < 60_000, `lastModified ${info!.lastModified.toISOString()} is not now`);

    const second = randomBytes(10);
    const etag2 = await store.put('volumes/a/manifest', second);
    assert.notEqual(etag2, etag1);
    assert.ok((await store.get('volumes/a/manifest'))?.body.equals(second));

    const etagEmpty = await store.put('empty', Buffer.alloc(0));
    const empty = await store.get('empty');
    assert.equal(empty?.size, 0);
    assert.equal(empty?.body.length, 0);
    assert.equal(empty?.etag, etagEmpty);

    // Unusual but valid keys: spaces, non-ASCII, dots inside segments.
    const odd = 'sp ace/ünïcødé/a.b-c_d/..x';
    await store.put(odd, Buffer.from('odd'));
    assert.equal((await store.get(odd))?.body.toString(), 'odd');
  });

  test(`${name}: a missing key is undefined from get, getRange and head; deleting it is fine`, async (t) => {
    const store = await backend.open(t);
    assert.equal(await store.get('nope/never'), undefined);
    assert.equal(await store.getRange('nope/never', 0, 10), undefined);
    assert.equal(await store.getRange('nope/never', 0, 0), undefined);
    assert.equal(await store.head('nope/never'), undefined);
    await store.delete('nope/never');
  });

  test(`${name}: getRange returns the bytes asked for, clipped at the object's end`, async (t) => {
    const store = await backend.open(t);
    const body = randomBytes(1000);
    await store.put('packs/ab/pack', body);
    const range = (offset: number, length: number) => store.getRange('packs/ab/pack', offset, length);
    assert.ok((await range(0, 1000))?.equals(body));
    assert.ok((await range(100, 50))?.equals(body.subarray(100, 150)));
    assert.ok((await range(990, 100))?.equals(body.subarray(990)), 'a range past the end is clipped');
    assert.equal((await range(999, 1))?.length, 1);
    assert.equal((await range(1000, 5))?.length, 0, 'a range starting at the end is empty');
    assert.equal((await range(5000, 5))?.length, 0, 'a range starting past the end is empty');
    assert.equal((await range(10, 0))?.length, 0);
    await store.put('empty', Buffer.alloc(0));
    assert.equal((await store.getRange('empty', 0, 10))?.length, 0);
    await rejectsWith(range(-1, 10), 'Invalid', ['get_range', 'packs/ab/pack']);
    await rejectsWith(range(0, 1.5), 'Invalid', ['get_range']);
  });

  test(`${name}: list returns the keys under a prefix in byte order, with head's size and etag`, async (t) => {
    const store = await backend.open(t);
    const keys = ['list/b', 'list/a/2', 'list/a/10', 'list/a/1', 'list/ab', 'list/a-', 'list/Z', 'list/é', 'other/x', 'listing'];
    await Promise.all(keys.map((key, i) => store.put(key, Buffer.alloc(i + 1, i))));
    const keysOf = async (prefix: string) => (await store.list(prefix)).map((info) => info.key);

    assert.deepEqual(await keysOf('list/'), byteOrder(keys.filter((k) => k.startsWith('list/'))));
    assert.deepEqual(await keysOf('list/a'), ['list/a-', 'list/a/1', 'list/a/10', 'list/a/2', 'list/ab']);
    assert.deepEqual(await keysOf('list/a/'), ['list/a/1', 'list/a/10', 'list/a/2']);
    assert.deepEqual(await keysOf('list'), byteOrder(keys.filter((k) => k.startsWith('list'))));
    assert.deepEqual(await keysOf(''), byteOrder(keys));
    assert.deepEqual(await keysOf('nothing/'), []);
    assert.deepEqual(await keysOf('list/a/1/'), []);

    for (const info of await store.list('')) {
      const head = await store.head(info.key);
      assert.deepEqual({ size: info.size, etag: info.etag }, { size: head?.size, etag: head?.etag }, info.key);
      assert.equal(info.size, keys.indexOf(info.key) + 1);
    }
    await rejectsWith(store.list('a//'), 'Invalid', ['list', '"a//"']);
  });

  test(`${name}: delete removes the key from get, head and list`, async (t) => {
    const store = await backend.open(t);
    await store.put('volumes/v/lease', Buffer.from('lease'));
    await store.put('volumes/v/manifest', Buffer.from('manifest'));
    await store.delete('volumes/v/lease');
    assert.equal(await store.get('volumes/v/lease'), undefined);
    assert.equal(await store.head('volumes/v/lease'), undefined);
    assert.deepEqual((await store.list('volumes/')).map((i) => i.key), ['volumes/v/manifest']);
    await store.delete('volumes/v/manifest');
    assert.deepEqual(await store.list(''), []);
    // The key can be created again, with If-None-Match even.
    await store.put('volumes/v/lease', Buffer.from('again'), { ifNoneMatch: '*' });
    assert.equal((await store.get('volumes/v/lease'))?.body.toString(), 'again');
  });

  test(`${name}: If-None-Match: of 12 concurrent creates of one key exactly one wins`, async (t) => {
    const store = await backend.open(t);
    for (let round = 0; round < 3; round++) {
      const key = `volumes/race${round}/manifest`;
      const bodies = Array.from({ length: 12 }, (_, i) => Buffer.from(`writer ${i} round ${round}`));
      const results = await Promise.allSettled(bodies.map((body) => store.put(key, body, { ifNoneMatch: '*' })));
      const winners = results.flatMap((r, i) => (r.status === 'fulfilled' ? [{ i, etag: r.value }] : []));
      assert.equal(winners.length, 1, `round ${round}: ${winners.length} winners`);
      for (const r of results) {
        if (r.status === 'rejected') assert.ok(isPreconditionFailed(r.reason), `a loser failed otherwise: ${r.reason}`);
      }
      const stored = await store.get(key);
      assert.ok(stored?.body.equals(bodies[winners[0].i]), 'the stored body is the winner');
      assert.equal(stored?.etag, winners[0].etag);
    }
    const lost = await rejectsWith(store.put('volumes/race0/manifest', Buffer.from('late'), { ifNoneMatch: '*' }), 'PreconditionFailed', [
      'put',
      'volumes/race0/manifest',
    ]);
    assert.match(lost.message, /If-None-Match/);
  });

  test(`${name}: If-Match: the current etag wins, a stale one or a missing key loses, one of 8 racers wins`, async (t) => {
    const store = await backend.open(t);
    const key = 'volumes/v/manifest';
    const etag1 = await store.put(key, Buffer.from('v1'));
    const etag2 = await store.put(key, Buffer.from('v2'), { ifMatch: etag1 });
    await rejectsWith(store.put(key, Buffer.from('stale'), { ifMatch: etag1 }), 'PreconditionFailed', ['put', key]);
    assert.equal((await store.get(key))?.body.toString(), 'v2');
    await rejectsWith(store.put('volumes/none/manifest', Buffer.from('x'), { ifMatch: etag2 }), 'PreconditionFailed', ['volumes/none/manifest']);
    assert.equal(await store.head('volumes/none/manifest'), undefined);

    const bodies = Array.from({ length: 8 }, (_, i) => Buffer.from(`v3 by ${i}`));
    const results = await Promise.allSettled(bodies.map((body) => store.put(key, body, { ifMatch: etag2 })));
    const winners = results.flatMap((r, i) => (r.status === 'fulfilled' ? [{ i, etag: r.value }] : []));
    assert.equal(winners.length, 1, `${winners.length} winners`);
    for (const r of results) if (r.status === 'rejected') assert.ok(isPreconditionFailed(r.reason), String(r.reason));
    const stored = await store.get(key);
    assert.ok(stored?.body.equals(bodies[winners[0].i]));
    assert.equal(stored?.etag, winners[0].etag);
    // Deleted, the key fails If-Match too.
    await store.delete(key);
    await rejectsWith(store.put(key, Buffer.from('x'), { ifMatch: winners[0].etag }), 'PreconditionFailed', [key]);
  });

  test(`${name}: a reader never sees part of an object being replaced`, async (t) => {
    const store = await backend.open(t);
    const size = 4 * MiB;
    const versions = [Buffer.alloc(size, 0xaa), Buffer.alloc(size, 0x55), Buffer.alloc(size, 0x0f)];
    await store.put('packs/big', versions[0]);
    let writing = true;
    const writer = (async () => {
      try {
        for (let i = 1; i <= 6; i++) await store.put('packs/big', versions[i % versions.length]);
      } finally {
        writing = false;
      }
    })();
    let reads = 0;
    while (writing) {
      const [whole, tailBytes] = await Promise.all([store.get('packs/big'), store.getRange('packs/big', size - 100, 100)]);
      assert.ok(whole, 'the key never disappears while replaced');
      assert.equal(whole.body.length, size);
      assert.ok(versions.some((v) => v.equals(whole.body)), `read ${reads} is a mix of versions`);
      assert.equal(whole.size, size);
      assert.ok(tailBytes?.length === 100 && tailBytes.every((b) => b === tailBytes[0]), 'a range read is within one version');
      reads++;
    }
    await writer;
    assert.ok(reads >= 2, `only ${reads} reads overlapped the writes`);
  });

  test(`${name}: list pages past 1000 keys`, { timeout: 60_000 }, async (t) => {
    const store = await backend.open(t);
    const keys = Array.from({ length: 1100 }, (_, i) => `many/${String(i).padStart(5, '0')}`);
    await inPool(32, keys.map((key) => () => store.put(key, Buffer.from(key))));
    await store.put('manz', Buffer.from('not under many/'));
    let pages = 0;
    const listed = await store.list('many/', { onPage: () => pages++ });
    assert.equal(listed.length, keys.length);
    if (backend.listPage) assert.ok(pages >= Math.ceil(keys.length / backend.listPage), `${pages} pages`);
    assert.deepEqual(
      listed.map((info) => info.key),
      keys,
    );
  });

  test(`${name}: invalid keys are refused by every request, naming the operation and the key`, async (t) => {
    const store = await backend.open(t);
    const bad = ['', '/abs', 'a//b', 'trailing/', 'a/./b', 'a/../b', '..', 'new\nline', 'nul\u0000', 'del\u007f', '.~lock.x', 'a/.~tmp', 'x'.repeat(201), 'ab/'.repeat(400) + 'c'];
    for (const key of bad) {
      const named = JSON.stringify(key);
      await rejectsWith(store.put(key, Buffer.from('x')), 'Invalid', ['put', named]);
      await rejectsWith(store.get(key), 'Invalid', ['get', named]);
      await rejectsWith(store.getRange(key, 0, 1), 'Invalid', ['get_range', named]);
      await rejectsWith(store.head(key), 'Invalid', ['head', named]);
      await rejectsWith(store.delete(key), 'Invalid', ['delete', named]);
    }
    assert.deepEqual(await store.list(''), [], 'nothing was stored');
  });

  test(`${name}: probeObjectStore passes on a working store`, async (t) => {
    const store = await backend.open(t);
    await probeObjectStore(store);
  });

  test(`${name}: keys with every allowed character, alone, first and last in a segment, and at the length limits, round-trip and list`, { timeout: 120_000 }, async (t) => {
    const store = await backend.open(t);
    const printable = Array.from({ length: 0x7f - 0x20 }, (_, i) => String.fromCharCode(0x20 + i)).filter((c) => c !== '/');
    const unicode = ['\u00a0', 'é', 'ß', '\u00ff', '\u0100', '日', '\u200b', '\ufeff', '\ufffd', '😀', '\u{10ffff}'];
    const keys = new Set<string>([`all/${printable.join('')}`, `all/${unicode.join('')}`]);
    for (const c of [...printable, ...unicode]) {
      if (c !== '.') keys.add(`alone/${c}`);
      keys.add(`first/${c}x`);
      keys.add(`last/x${c}`);
      keys.add(`mid/x${c}x/${c}${c}${c}`);
    }
    keys.add(`long/${'é'.repeat(100)}`); // a 200-byte segment
    const segment = 'k'.repeat(199);
    // 960 bytes: a cloud store's key prefix counts against its 1024-byte limit too.
    keys.add(`${segment}/${segment}/${segment}/${segment}/${'z'.repeat(160)}`);
    for (const key of keys) assert.equal(keyProblem(key), undefined, `the test's own key ${JSON.stringify(key)} is not valid`);
    const all = [...keys];
    await inPool(16, all.map((key) => () => store.put(key, Buffer.from(key))));
    await inPool(16, all.map((key) => async () => {
      assert.equal((await store.get(key))?.body.toString(), key, `get ${JSON.stringify(key)}`);
      assert.equal((await store.head(key))?.size, Buffer.byteLength(key), `head ${JSON.stringify(key)}`);
      assert.equal((await store.getRange(key, 1, 3))?.toString(), Buffer.from(key).subarray(1, 4).toString(), `get_range ${JSON.stringify(key)}`);
    }));
    assert.deepEqual((await store.list('')).map((i) => i.key), byteOrder(all));
    assert.deepEqual((await store.list('last/x')).length, printable.length + unicode.length);
    // Prefixes ending inside a segment, after a dot (MinIO refuses a listing of a "first/." prefix: a "." component).
    assert.deepEqual((await store.list('mid/x.')).map((i) => i.key), ['mid/x.x/...']);
    assert.deepEqual((await store.list('last/x.')).map((i) => i.key), ['last/x.']);
    assert.deepEqual((await store.list('mid/x%x/%')).map((i) => i.key), ['mid/x%x/%%%']);
    const etag = (await store.head('alone/?'))!.etag;
    await store.put('alone/?', Buffer.from('again'), { ifMatch: etag });
    await rejectsWith(store.put('alone/#', Buffer.from('x'), { ifNoneMatch: '*' }), 'PreconditionFailed', ['alone/#']);
    await inPool(16, all.map((key) => () => store.delete(key)));
    assert.deepEqual(await store.list(''), []);
  });

  test(`${name}: a 40 MiB object round-trips whole and by ranges at its start, middle and end`, { timeout: 120_000 }, async (t) => {
    const store = await backend.open(t);
    const body = randomBytes(40 * MiB + 3);
    const etag = await store.put('packs/ff/large', body, { selfVerifying: true });
    const got = await store.get('packs/ff/large');
    assert.equal(got?.etag, etag);
    assert.ok(got?.body.equals(body), 'the whole object differs');
    for (const [offset, length] of [[0, MiB], [17 * MiB + 5, 3 * MiB], [40 * MiB - 7, 64 * KiB]]) {
      assert.ok((await store.getRange('packs/ff/large', offset, length))?.equals(body.subarray(offset, offset + length)), `range ${offset}+${length}`);
    }
    assert.equal((await store.head('packs/ff/large'))?.size, body.length);
  });

  test(`${name}: a conditional put whose reply is lost after it landed: retried, it meets itself and fails PreconditionFailed; the object is the caller's`, async (t) => {
    const inner = await backend.open(t);
    const store = withRetries(withFaults(inner, { seed: 11, lostPutRate: 1 }), { attempts: 3, baseDelayMs: 1 });
    await rejectsWith(store.put('v/lease', Buffer.from('create'), { ifNoneMatch: '*' }), 'PreconditionFailed', ['v/lease']);
    const created = await inner.get('v/lease');
    assert.equal(created?.body.toString(), 'create', 'the object there is our own');
    await rejectsWith(store.put('v/lease', Buffer.from('replace'), { ifMatch: created!.etag }), 'PreconditionFailed', ['v/lease']);
    const replaced = await inner.get('v/lease');
    assert.equal(replaced?.body.toString(), 'replace');
    assert.notEqual(replaced?.etag, created?.etag);
  });

  if (backend.viaProxy) {
    const viaProxy = backend.viaProxy;
    test(`${name}: a conditional put whose HTTP answer is lost on the wire fails PreconditionFailed once the key shows it landed, never 'Unavailable' forever`, async (t) => {
      const upstream = new URL(await viaProxy.upstream());
      const proxy = await startStoreProxy({ host: upstream.hostname, port: Number(upstream.port) });
      t.after(() => proxy.close());
      const store = await viaProxy.open(t, proxy.endpoint);
      const upload = /^(PUT|POST) /;
      proxy.add({ match: upload, answerLost: true });
      await rejectsWith(store.put('v/manifest', Buffer.from('first'), { ifNoneMatch: '*' }), 'PreconditionFailed', ['put', 'v/manifest']);
      const first = await store.get('v/manifest');
      assert.equal(first?.body.toString(), 'first', 'the put was carried out');
      proxy.add({ match: upload, answerLost: true });
      await rejectsWith(store.put('v/manifest', Buffer.from('second'), { ifMatch: first!.etag }), 'PreconditionFailed', ['put', 'v/manifest']);
      assert.equal((await store.get('v/manifest'))?.body.toString(), 'second', 'the replacing put was carried out');
      // A lost answer to a put whose condition still holds (nothing landed) stays Unavailable: a retry may succeed.
      proxy.add({ match: upload, reset: true });
      await rejectsWith(store.put('v/other', Buffer.from('x'), { ifNoneMatch: '*' }), 'Unavailable', ['put', 'v/other']);
      assert.equal(await store.head('v/other'), undefined);
    });
  }
}

// ---------------------------------------------------------------------------
// file:// only

test('file://: putting identical bytes again gives a new etag (If-Match sees every put)', async (t) => {
  const store = await fileStore(t);
  const body = Buffer.from('same');
  const etags = new Set<string>();
  for (let i = 0; i < 20; i++) etags.add(await store.put('k', body));
  assert.equal(etags.size, 20);
  const [first] = etags;
  await rejectsWith(store.put('k', body, { ifMatch: first }), 'PreconditionFailed', ['k']);
});

test('file://: a missing root folder is NoSuchBucket naming the path, for every request and the probe', async (t) => {
  const dir = await scratchDir('updraft-store-');
  t.after(() => removeDir(dir));
  const root = path.join(dir, 'missing');
  const store = openObjectStore(`file://${root}`, {});
  await rejectsWith(store.get('k'), 'NoSuchBucket', ['get', 'k', root]);
  await rejectsWith(store.getRange('k', 0, 1), 'NoSuchBucket', [root]);
  await rejectsWith(store.head('k'), 'NoSuchBucket', ['head', root]);
  await rejectsWith(store.put('a/k', Buffer.from('x')), 'NoSuchBucket', ['put', 'a/k', root]);
  await rejectsWith(store.list(''), 'NoSuchBucket', ['list', root]);
  await rejectsWith(store.delete('k'), 'NoSuchBucket', ['delete', root]);
  await rejectsWith(probeObjectStore(store), 'NoSuchBucket', [`folder ${root} does not exist`]);
  assert.deepEqual(await readdir(dir), [], 'nothing created the root');
});

test('file://: a key cannot be both an object and a folder of objects', async (t) => {
  const store = await fileStore(t);
  await store.put('a/b', Buffer.from('x'));
  await rejectsWith(store.put('a/b/c', Buffer.from('y')), 'Invalid', ['put', 'a/b/c']);
  await rejectsWith(store.put('a', Buffer.from('y')), 'Invalid', ['put', 'a']);
  assert.equal(await store.get('a'), undefined, 'a folder is not an object');
  assert.equal(await store.head('a'), undefined);
  assert.equal(await store.get('a/b/c'), undefined, 'under an object there is nothing');
  await store.delete('a'); // a folder: no such object, nothing removed
  assert.equal((await store.get('a/b'))?.body.toString(), 'x');
  // Once a/b is gone its folder goes too, and `a` is free for an object.
  await store.delete('a/b');
  await store.put('a', Buffer.from('now an object'));
  assert.deepEqual((await store.list('')).map((i) => i.key), ['a']);
});

test('file://: list skips temp and lock files, and failed puts leave none behind', async (t) => {
  const store = await fileStore(t);
  await store.put('v/manifest', Buffer.from('1'));
  for (let i = 0; i < 5; i++) await rejectsWith(store.put('v/manifest', Buffer.from('2'), { ifNoneMatch: '*' }), 'PreconditionFailed');
  await rejectsWith(store.put('v/manifest', Buffer.from('2'), { ifMatch: 'nope' }), 'PreconditionFailed');
  assert.deepEqual(await readdir(path.join(store.root, 'v')), ['manifest']);
  // Debris of a writer killed mid-put is not an object.
  await writeFile(path.join(store.root, 'v', '.~tmp.manifest.dead'), 'partial');
  await writeFile(path.join(store.root, '.~lock.top'), '{}');
  assert.deepEqual((await store.list('')).map((i) => i.key), ['v/manifest']);
});

test('file://: a lock whose holder died is broken; a live holder makes the writer wait, then give up naming the lock', async (t) => {
  const dir = await scratchDir('updraft-store-');
  t.after(() => removeDir(dir));
  const store = new FileObjectStore(dir, { lockTimeoutMs: 300, staleLockMs: 5_000 });
  const lockFile = store.lockFileOf('volumes/v/manifest');
  await mkdir(path.dirname(lockFile), { recursive: true });
  assert.equal(path.dirname(lockFile), path.join(dir, 'volumes', 'v'));

  // A live holder: a process that is still running.
  const holder = spawn(process.execPath, ['-e', 'setTimeout(() => {}, 60000)'], { stdio: 'ignore' });
  const holderExit = new Promise((resolve) => holder.once('exit', resolve));
  t.after(() => holder.kill('SIGKILL'));
  const lock = (pid: number, host: string) => JSON.stringify({ pid, host, start: null, nonce: 'theirs', at: Date.now() });
  await writeFile(lockFile, lock(holder.pid!, os.hostname()));
  const started = Date.now();
  await rejectsWith(store.put('volumes/v/manifest', Buffer.from('x')), 'Unavailable', ['put', 'volumes/v/manifest', lockFile, `pid ${holder.pid}`]);
  assert.ok(Date.now() - started >= 300, 'gave up before lockTimeoutMs');
  await rejectsWith(store.delete('volumes/v/manifest'), 'Unavailable', ['delete', lockFile]);
  assert.equal(await store.head('volumes/v/manifest'), undefined);

  // The holder dies (SIGKILL inside its critical section): the next writer breaks its lock.
  holder.kill('SIGKILL');
  await holderExit;
  await store.put('volumes/v/manifest', Buffer.from('after'));
  assert.equal((await store.get('volumes/v/manifest'))?.body.toString(), 'after');
  assert.deepEqual(await readdir(path.dirname(lockFile)), ['manifest'], 'the stale lock is gone');

  // A holder on another host cannot be asked: its lock is stale only when old.
  await writeFile(lockFile, lock(1, 'some-other-host'));
  await rejectsWith(store.put('volumes/v/manifest', Buffer.from('y')), 'Unavailable', ['some-other-host']);
  const old = new Date(Date.now() - 60_000);
  await utimes(lockFile, old, old);
  await store.put('volumes/v/manifest', Buffer.from('y'));
  assert.equal((await store.get('volumes/v/manifest'))?.body.toString(), 'y');
});

/** The child of the cross-process test: races If-None-Match creates and If-Match increments against its twin. */
const RACER = `
import { FileObjectStore } from ${JSON.stringify(new URL('../src/objectstore/file.js', import.meta.url).href)};
import { isPreconditionFailed } from ${JSON.stringify(new URL('../src/objectstore/types.js', import.meta.url).href)};
const [root, id, rounds, startAt] = process.argv.slice(2);
const store = new FileObjectStore(root, { lockTimeoutMs: 30000 });
while (Date.now() < Number(startAt)) await new Promise((r) => setTimeout(r, 1));
const won = [];
let conflicts = 0;
for (let round = 0; round < Number(rounds); round++) {
  try {
    await store.put('race/' + round, Buffer.from(id), { ifNoneMatch: '*' });
    won.push(round);
  } catch (err) {
    if (!isPreconditionFailed(err)) throw err;
  }
  for (;;) {
    const counter = await store.get('counter');
    const next = Buffer.from(String(counter ? Number(counter.body.toString()) + 1 : 1));
    try {
      await store.put('counter', next, counter ? { ifMatch: counter.etag } : { ifNoneMatch: '*' });
      break;
    } catch (err) {
      if (!isPreconditionFailed(err)) throw err;
      conflicts++;
    }
  }
}
process.stdout.write(JSON.stringify({ won, conflicts }));
`;

test('file://: two processes racing conditional puts: one winner per key, no lost increment', { timeout: 60_000 }, async (t) => {
  const store = await fileStore(t);
  const script = path.join(store.root, '..', `racer-${randomBytes(4).toString('hex')}.mjs`);
  await writeFile(script, RACER);
  t.after(() => removeDir(script));
  const rounds = 300;
  const startAt = Date.now() + 1000;
  const racers = ['A', 'B'].map((id) => runOk(process.execPath, [script, store.root, id, String(rounds), String(startAt)], { timeoutMs: 55_000 }));
  const [a, b] = (await Promise.all(racers)).map((r) => JSON.parse(r.stdout) as { won: number[]; conflicts: number });

  const winners = new Map<number, string>();
  for (const [id, result] of [['A', a], ['B', b]] as const) {
    for (const round of result.won) {
      assert.ok(!winners.has(round), `round ${round} won by both processes`);
      winners.set(round, id);
    }
  }
  assert.equal(winners.size, rounds, 'every round has a winner');
  for (const [round, id] of winners) assert.equal((await store.get(`race/${round}`))?.body.toString(), id, `race/${round}`);
  assert.equal((await store.get('counter'))?.body.toString(), String(2 * rounds), 'an If-Match increment was lost');
  assert.ok(a.conflicts + b.conflicts > 0, 'the processes never contended, so this proved nothing');
  assert.deepEqual(
    (await readdir(path.join(store.root, 'race'))).filter((n) => n.startsWith('.~')),
    [],
    'temp or lock files left behind',
  );
});

test('file://: a full disk fails the put as Unavailable naming the key, and leaves no temp file', async (t) => {
  if (!requireRoot(t, 'mounts a small tmpfs') || !requireTools(t, [TOOLS.mount])) return;
  const dir = await scratchDir('updraft-store-');
  let mounted = false;
  t.after(async () => {
    if (mounted) await runOk('umount', [dir], { timeoutMs: 10_000 });
    await removeDir(dir);
  });
  await runOk('mount', ['-t', 'tmpfs', '-o', 'size=256k', 'tmpfs', dir], { timeoutMs: 10_000 });
  mounted = true;
  const store = new FileObjectStore(dir);
  await store.put('small', Buffer.alloc(1000));
  await rejectsWith(store.put('packs/big', Buffer.alloc(MiB)), 'Unavailable', ['put', 'packs/big', 'ENOSPC']);
  assert.deepEqual(await readdir(path.join(dir, 'packs')), []);
  assert.equal((await store.get('small'))?.size, 1000, 'what was stored before is intact');
});

// ---------------------------------------------------------------------------
// s3:// only: errors and time limits

test('s3://: wrong credentials are AccessDenied', async (t) => {
  const m = await sharedMinio();
  const store = openObjectStore(m.url, awsOf(m, { secretAccessKey: 'not-the-secret' }));
  t.after(() => store.close());
  await rejectsWith(store.get('k'), 'AccessDenied', ['get', 'k', 'access denied']);
  await rejectsWith(store.put('k', Buffer.from('x')), 'AccessDenied', ['put', 'k']);
  await rejectsWith(store.list('p/'), 'AccessDenied', ['list']);
  await rejectsWith(probeObjectStore(store), 'AccessDenied', [`object store ${store.description}: access denied`]);
});

test('s3://: a missing bucket is NoSuchBucket, and the probe says which', async (t) => {
  const m = await sharedMinio();
  const store = openObjectStore('s3://no-such-bucket/p', awsOf(m));
  t.after(() => store.close());
  await rejectsWith(store.get('k'), 'NoSuchBucket', ['get', 'k', 'bucket no-such-bucket does not exist']);
  await rejectsWith(store.put('k', Buffer.from('x')), 'NoSuchBucket', ['put', 'k']);
  await rejectsWith(store.list(''), 'NoSuchBucket', ['list']);
  await rejectsWith(probeObjectStore(store), 'NoSuchBucket', ['object store s3://no-such-bucket/p: bucket no-such-bucket does not exist']);
});

test('s3://: a closed port is Unavailable at once, retried and counted, never a hang', async (t) => {
  const server = net.createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as net.AddressInfo).port;
  await new Promise<void>((resolve) => server.close(() => resolve()));
  const raw = openObjectStore('s3://bucket/p', { endpoint: `http://127.0.0.1:${port}`, allowHttp: true, accessKeyId: 'a', secretAccessKey: 'b', connectTimeoutMs: 500, requestTimeoutMs: 500 });
  const metered = withMetering(raw);
  const store = withRetries(metered, { attempts: 3, baseDelayMs: 10 });
  t.after(() => store.close());
  const started = Date.now();
  await rejectsWith(store.get('k'), 'Unavailable', ['get', 'k', 'ECONNREFUSED', 'after 3 attempts']);
  await rejectsWith(probeObjectStore(raw), 'Unavailable', ['object store s3://bucket/p is unreachable']);
  assert.ok(Date.now() - started < 5_000, `took ${Date.now() - started} ms`);
  assert.equal(metered.counters().requests.get, 3);
  assert.equal(metered.counters().errors.get, 3);
});

test('s3://: a server that accepts and never answers is Unavailable after requestTimeoutMs', async (t) => {
  const sockets = new Set<net.Socket>();
  const server = net.createServer((socket) => {
    sockets.add(socket);
    socket.on('error', () => {});
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.after(() => {
    for (const socket of sockets) socket.destroy();
    server.close();
  });
  const port = (server.address() as net.AddressInfo).port;
  const store = openObjectStore('s3://bucket/p', { endpoint: `http://127.0.0.1:${port}`, allowHttp: true, accessKeyId: 'a', secretAccessKey: 'b', connectTimeoutMs: 500, requestTimeoutMs: 700 });
  t.after(() => store.close());
  for (const request of [() => store.get('k'), () => store.put('k', Buffer.alloc(100 * KiB)), () => store.head('k'), () => store.list('')]) {
    const started = Date.now();
    await rejectsWith(request(), 'Unavailable', ['on s3://bucket/p']);
    const took = Date.now() - started;
    assert.ok(took >= 600 && took < 3_000, `failed after ${took} ms, want about 700`);
  }
});

test('s3://: an http endpoint without allowHttp is Invalid naming it; half the credentials are Invalid', () => {
  const endpoint = 'http://127.0.0.1:9000';
  assert.throws(
    () => openObjectStore('s3://b/p', { endpoint, accessKeyId: 'a', secretAccessKey: 'b' }),
    (err: unknown) => err instanceof ObjectStoreError && err.code === 'Invalid' && err.message.includes(endpoint) && err.message.includes('allowHttp'),
  );
  assert.throws(
    () => openObjectStore('s3://b/p', { endpoint: 'https://s3.example', accessKeyId: 'a' }),
    (err: unknown) => err instanceof ObjectStoreError && err.code === 'Invalid' && err.message.includes('secretAccessKey'),
  );
});

test('openObjectStore refuses unknown schemes and malformed URLs, naming the URL and the accepted forms', async (t) => {
  for (const url of ['ftp://x', 'x', '/abs/path', 'file://relative/path', 's3://', 's3:bucket', 's3://b/a//b', 'S4://b']) {
    assert.throws(
      () => openObjectStore(url, {}),
      (err: unknown) => err instanceof ObjectStoreError && err.code === 'Invalid' && err.message.includes(url),
      url,
    );
  }
  const err = (() => {
    try {
      openObjectStore('ftp://x', {});
    } catch (e) {
      return e as Error;
    }
    return undefined;
  })();
  assert.match(err?.message ?? '', /"ftp:\/\/x".*file:\/\/\/absolute\/path.*s3:\/\/bucket/);
  assert.doesNotMatch(
    (() => {
      try {
        openObjectStore('ftp://user:secret@x', {});
      } catch (e) {
        return (e as Error).message;
      }
      return '';
    })(),
    /secret/,
    'credentials in a URL are not repeated',
  );
  // The accepted forms open.
  const dir = await scratchDir('updraft-store-');
  t.after(() => removeDir(dir));
  const file = openObjectStore(`file://${dir}`, {});
  assert.equal(file.description, `file://${dir}`);
  assert.ok(file instanceof FileObjectStore);
  assert.equal(fileURLToPath(file.description), dir);
  const s3 = openObjectStore('s3://bucket/some/prefix/', { region: 'eu-west-1' });
  assert.equal(s3.description, 's3://bucket/some/prefix');
  await s3.close();
});

// ---------------------------------------------------------------------------
// Wrappers: faults, retries, metering

/** Runs a fixed mix of 150 requests through a faulty store; returns what each one did. */
async function faultOutcomes(t: TestContext, seed: number): Promise<string[]> {
  const inner = await fileStore(t);
  await inner.put('k0', Buffer.alloc(100, 1));
  const faulty = withFaults(inner, { seed, errorRate: 0.15, serverErrorRate: 0.1, truncateRate: 0.3, lostPutRate: 0.3 });
  const seen: string[] = [];
  for (let i = 0; i < 150; i++) {
    try {
      if (i % 3 === 0) {
        await faulty.put(`k${i % 5}`, Buffer.alloc(100, i));
        seen.push('put ok');
      } else if (i % 3 === 1) {
        seen.push(`get ${(await faulty.get('k0'))?.body.length}`);
      } else {
        seen.push(`range ${(await faulty.getRange('k0', 0, 100))?.length}`);
      }
    } catch (err) {
      assert.ok(err instanceof ObjectStoreError);
      seen.push(`${err.code}: ${err.message.replace(inner.description, 'STORE')}`);
    }
  }
  return seen;
}

test('faults: the same seed replays the same outcomes; another seed does not', async (t) => {
  const first = await faultOutcomes(t, 7);
  const again = await faultOutcomes(t, 7);
  const other = await faultOutcomes(t, 8);
  assert.deepEqual(again, first);
  assert.notDeepEqual(other, first);
  // The schedule has every kind of fault in it, so the comparison above means something.
  assert.ok(first.some((o) => o.includes('connection reset')));
  assert.ok(first.some((o) => o.includes('simulated 503')));
  assert.ok(first.some((o) => o.includes('response was lost')));
  assert.ok(first.some((o) => /^(get|range) \d+$/.test(o) && o !== 'get 100' && o !== 'range 100'), 'no truncated body');
  assert.ok(first.some((o) => o === 'get 100'));
});

test('faults: withRetries over 30% failed requests succeeds, and metering counts every attempt', async (t) => {
  const inner = await fileStore(t);
  const faulty = withFaults(inner, { seed: 3, errorRate: 0.3 });
  const metered = withMetering(faulty);
  const store = withRetries(metered, { attempts: 10, baseDelayMs: 1, maxDelayMs: 5 });
  for (let i = 0; i < 40; i++) {
    const body = Buffer.from(`object ${String(i).padStart(3, '0')}`); // 10 bytes
    await store.put(`k/${i}`, body);
    assert.ok((await store.get(`k/${i}`))?.body.equals(body));
  }
  const c = metered.counters();
  assert.equal(c.requests.put - c.errors.put, 40);
  assert.equal(c.requests.get - c.errors.get, 40);
  assert.equal(c.errors.put + c.errors.get, faulty.injected.error);
  assert.ok(faulty.injected.error >= 10, `only ${faulty.injected.error} faults injected`);
  assert.equal(c.bytesDown, 40 * 10);
  assert.equal(c.bytesUp, c.requests.put * 10, 'every put attempt counts its bytes up');
  assert.ok(c.errors.put > 0, 'no put was retried');
  assert.equal(c.requests.head + c.requests.list + c.requests.delete + c.requests.get_range, 0);
});

test('faults: retries give up after N attempts, and never retry PreconditionFailed or Invalid', async (t) => {
  const inner = await fileStore(t);
  const faulty = withFaults(inner, { seed: 1, errorRate: 1 });
  const metered = withMetering(faulty);
  const store = withRetries(metered, { attempts: 5, baseDelayMs: 1 });
  await rejectsWith(store.put('k', Buffer.from('x')), 'Unavailable', ['put', 'k', 'after 5 attempts', 'connection reset']);
  assert.equal(metered.counters().requests.put, 5);
  assert.equal(await inner.head('k'), undefined);

  // Healed at run time: the same wrapper now passes requests through.
  faulty.options.errorRate = 0;
  await store.put('k', Buffer.from('x'));
  await rejectsWith(store.put('k', Buffer.from('y'), { ifNoneMatch: '*' }), 'PreconditionFailed', ['k']);
  await rejectsWith(store.get('a//b'), 'Invalid', ['"a//b"']);
  const c = metered.counters();
  assert.equal(c.requests.put, 7, 'the failed condition was not retried');
  assert.equal(c.requests.get, 1, 'the invalid key was not retried');
});

test('faults: a lost put is stored though reported failed; retried with If-None-Match it meets itself', async (t) => {
  const inner = await fileStore(t);
  const faulty = withFaults(inner, { seed: 5, lostPutRate: 1 });
  await rejectsWith(faulty.put('v/manifest', Buffer.from('mine')), 'Unavailable', ['put', 'v/manifest', 'response was lost']);
  assert.equal((await inner.get('v/manifest'))?.body.toString(), 'mine');
  const store = withRetries(faulty, { attempts: 3, baseDelayMs: 1 });
  await rejectsWith(store.put('v/lease', Buffer.from('mine'), { ifNoneMatch: '*' }), 'PreconditionFailed', ['v/lease']);
  assert.equal((await inner.get('v/lease'))?.body.toString(), 'mine', 'the object there is our own');
  assert.equal(faulty.injected.lostPut, 2);
});

test('faults: truncate returns a shorter body than the object; latency delays each request', async (t) => {
  const inner = await fileStore(t);
  await inner.put('p', randomBytes(1000));
  const faulty = withFaults(inner, { seed: 9, truncateRate: 1, latencyMs: 30, latencyJitterMs: 10 });
  const started = Date.now();
  const got = await faulty.get('p');
  assert.equal(got?.size, 1000);
  assert.ok(got!.body.length < 1000, `body of ${got!.body.length} bytes`);
  assert.ok((await faulty.getRange('p', 100, 500))!.length < 500);
  assert.ok(Date.now() - started >= 60, 'two requests took less than twice the latency');
  assert.equal(faulty.injected.truncate, 2);
});

test('parseFaultSpec reads every item and names a bad one', () => {
  assert.deepEqual(parseFaultSpec('seed=7,error=0.1,server_error=0.05,latency=20,jitter=5,truncate=0.02,lost_put=0.1'), {
    seed: 7,
    errorRate: 0.1,
    serverErrorRate: 0.05,
    latencyMs: 20,
    latencyJitterMs: 5,
    truncateRate: 0.02,
    lostPutRate: 0.1,
  });
  assert.deepEqual(parseFaultSpec(' error = 0.5 '), { seed: 0, errorRate: 0.5 });
  for (const [spec, item] of [
    ['seed=7,error=2', 'error=2'],
    ['seed=7,bogus=1', 'bogus=1'],
    ['seed', 'seed'],
    ['latency=-1', 'latency=-1'],
    ['seed=1.5', 'seed=1.5'],
    ['truncate=', 'truncate='],
    ['seed=1,seed=2', 'seed=2'],
  ]) {
    assert.throws(
      () => parseFaultSpec(spec),
      (err: unknown) => err instanceof ObjectStoreError && err.code === 'Invalid' && err.message.includes(`item ${JSON.stringify(item)}`),
      spec,
    );
  }
  assert.throws(() => withFaults({} as ObjectStore, { seed: 1, errorRate: 1.5 }), /errorRate/);
});

test('s3://: a self-verifying put (a pack) is accepted by MinIO unsigned and reads back whole; a conditional one still holds', async (t) => {
  const store = await s3Store(t);
  const body = randomBytes(3 * MiB + 17);
  const etag = await store.put('packs/ab/abcdef', body, { selfVerifying: true });
  const got = await store.get('packs/ab/abcdef');
  assert.ok(got);
  assert.ok(got.body.equals(body));
  assert.equal(got.etag, etag);
  assert.ok((await store.getRange('packs/ab/abcdef', MiB, 100))?.equals(body.subarray(MiB, MiB + 100)));
  await rejectsWith(store.put('packs/ab/abcdef', body, { selfVerifying: true, ifNoneMatch: '*' }), 'PreconditionFailed', ['packs/ab/abcdef']);
});

/** An HTTP server on loopback that records each request's method, x-amz-content-sha256 and body, answering with `answer`. */
async function recordingServer(t: TestContext, answer: (req: http.IncomingMessage, res: http.ServerResponse) => void) {
  const seen: Array<{ method: string; sha256: string | undefined; checksums: string[]; body: Buffer }> = [];
  const server = http.createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      const checksums = Object.keys(req.headers).filter((h) => h.includes('checksum'));
      seen.push({ method: req.method ?? '', sha256: req.headers['x-amz-content-sha256'] as string | undefined, checksums, body: Buffer.concat(chunks) });
      answer(req, res);
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.after(() => {
    server.closeAllConnections();
    server.close();
  });
  const port = (server.address() as net.AddressInfo).port;
  const store = openObjectStore('s3://bucket/p', { endpoint: `http://127.0.0.1:${port}`, allowHttp: true, accessKeyId: 'a', secretAccessKey: 'b' });
  t.after(() => store.close());
  return { store, seen };
}

test('s3://: only self-verifying puts skip the payload hash: they send UNSIGNED-PAYLOAD, others the SHA-256 of the body; no put computes a CRC32 checksum', async (t) => {
  const { store, seen } = await recordingServer(t, (_req, res) => {
    res.writeHead(200, { ETag: '"e"' });
    res.end();
  });
  const body = randomBytes(200 * KiB);
  await store.put('packs/ab/abcdef', body, { selfVerifying: true });
  await store.put('volumes/a/manifest', body);
  assert.deepEqual(
    seen.map((r) => [r.method, r.sha256]),
    [
      ['PUT', 'UNSIGNED-PAYLOAD'],
      ['PUT', createHash('sha256').update(body).digest('hex')],
    ],
  );
  assert.ok(seen.every((r) => r.body.equals(body)));
  assert.deepEqual(seen.flatMap((r) => r.checksums), [], 'the SDK sent flexible checksums (CRC32 in JavaScript)');
});

test('s3://: a conditional put whose connection is reset reads the key by a HEAD: a condition that can no longer hold fails PreconditionFailed, one that still holds stays Unavailable', async (t) => {
  // The server drops every PUT's connection unanswered (as MinIO sometimes does to a large
  // body it refuses with 412); a HEAD of k/there answers etag "theirs", of anything else 404.
  const methods: string[] = [];
  const server = http.createServer((req, res) => {
    methods.push(`${req.method} ${req.url?.split('?')[0]}`);
    if (req.method === 'PUT') {
      req.socket.destroy();
      return;
    }
    res.writeHead(req.url?.includes('k/there') ? 200 : 404, { ETag: '"theirs"', 'Content-Length': '0' });
    res.end();
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.after(() => {
    server.closeAllConnections();
    server.close();
  });
  const store = openObjectStore('s3://bucket/p', { endpoint: `http://127.0.0.1:${(server.address() as net.AddressInfo).port}`, allowHttp: true, accessKeyId: 'a', secretAccessKey: 'b' });
  t.after(() => store.close());
  const body = randomBytes(64 * KiB);
  await rejectsWith(store.put('k/there', body, { ifNoneMatch: '*' }), 'PreconditionFailed', ['k/there', 'If-None-Match', 'HEAD']);
  await rejectsWith(store.put('k/absent', body, { ifNoneMatch: '*' }), 'Unavailable', ['k/absent']);
  await rejectsWith(store.put('k/there', body, { ifMatch: '"theirs"' }), 'Unavailable', ['k/there']);
  await rejectsWith(store.put('k/there', body, { ifMatch: '"mine"' }), 'PreconditionFailed', ['k/there', '"mine"', 'HEAD']);
  await rejectsWith(store.put('k/absent', body, { ifMatch: '"mine"' }), 'PreconditionFailed', ['k/absent', '"mine"']);
  const heads = methods.filter((m) => m.startsWith('HEAD')).length;
  await rejectsWith(store.put('k/there', body), 'Unavailable', ['k/there']);
  assert.equal(heads, 5, 'one HEAD per failed conditional put');
  assert.equal(methods.filter((m) => m.startsWith('HEAD')).length, 5, 'an unconditional put that failed made a HEAD');
});

test('s3://: a GET body is read whole from many chunks, with or without Content-Length; a short one is Unavailable naming the key', async (t) => {
  const body = randomBytes(MiB + 3);
  const { store } = await recordingServer(t, (req, res) => {
    const parts = [body.subarray(0, 1000), body.subarray(1000, 70_000), body.subarray(70_000)];
    if (req.url?.includes('short')) {
      res.writeHead(200, { 'Content-Length': String(body.length), ETag: '"e"' });
      res.write(parts[0]);
      setTimeout(() => res.socket?.destroy(), 50);
      return;
    }
    res.writeHead(200, req.url?.includes('chunked') ? { ETag: '"e"' } : { 'Content-Length': String(body.length), ETag: '"e"' });
    let i = 0;
    const next = () => (i < parts.length ? res.write(parts[i++], () => setImmediate(next)) : res.end());
    next();
  });
  assert.ok((await store.get('k/sized'))?.body.equals(body));
  assert.ok((await store.get('k/chunked'))?.body.equals(body));
  await rejectsWith(store.get('k/short'), 'Unavailable', ['k/short']);
});

test('s3://: a GET reads its body into the buffer `into` gives (MinIO accepts the request as signed); a missing key is undefined and a wrong secret AccessDenied', async (t) => {
  const store = await s3Store(t);
  const bodies = [randomBytes(3 * MiB + 5), Buffer.alloc(0), randomBytes(100)];
  for (const [i, body] of bodies.entries()) await store.put(`packs/ab/k${i}`, body);
  for (const [i, body] of bodies.entries()) {
    const given: Buffer[] = [];
    const got = await store.get(`packs/ab/k${i}`, { into: (length) => given[given.push(Buffer.alloc(length + 7).subarray(3, 3 + length)) - 1] });
    assert.ok(got, `k${i} is there`);
    assert.ok(got.body.equals(body), `k${i} reads back whole`);
    assert.equal(got.size, body.length);
    assert.match(got.etag, /^"[0-9a-f]+"$/);
    assert.equal(given.length, 1, 'into() is asked once, for the body length');
    assert.equal(got.body.buffer, given[0].buffer, `k${i}'s body is in the buffer into() gave`);
    assert.equal(got.body.byteOffset, given[0].byteOffset);
  }
  assert.equal(await store.get('packs/ab/missing', { into: (length) => Buffer.alloc(length) }), undefined);
  const m = await sharedMinio();
  const wrong = openObjectStore(`s3://${m.bucket}/${freshPrefix()}`, awsOf(m, { secretAccessKey: 'not-the-secret' }));
  t.after(() => wrong.close());
  await rejectsWith(wrong.get('packs/ab/k0', { into: (length) => Buffer.alloc(length) }), 'AccessDenied', ['packs/ab/k0']);
});
