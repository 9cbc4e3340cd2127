// The object store hangs (MinIO stopped with SIGSTOP: connections are accepted, nothing
// answers) or refuses connections (MinIO killed) while volumes are served. Open volumes
// keep taking writes and serving what is cached; what needs the store fails within
// [storage] request_deadline_s saying the store is unreachable (a cold read with EIO, a
// drain with an API error, a connection to a volume this host does not have with an NBD
// error reply); once the store is back everything catches up and no byte is lost.
import assert from 'node:assert/strict';
import net from 'node:net';
import path from 'node:path';
import { after, before, test } from 'node:test';
import {
  FileObjectStore, ObjectStoreError, openObjectStore, withFaults, withMetering, withRetries, type ListOptions, type ObjectStore,
} from '../src/objectstore/index.js';
import {
  connect, createVolume, drain, exportInfo, KiB, MiB, readAll, startCluster, waitFor, withLogs, writeRandom, type Cluster,
} from './harness/cluster.js';
import type { Daemon } from './harness/daemon.js';
import { removeDir, scratchDir } from './harness/daemon.js';
import { minioStore, startMinio, type Minio } from './harness/minio.js';
import { startStoreProxy } from './harness/store-proxy.js';
import { NbdClient, NbdCommandError, NbdOptionError, rawSocket, waitClosed } from './harness/nbd-client.js';
import { createLogger } from '../src/log.js';
import { NbdServer } from '../src/nbd/server.js';
import { run, TOOLS, requireTools } from './harness/tools.js';

/** Small bounds, so that the minutes of a real outage become seconds here; the settings are what bound the waits. */
const STORE_BOUNDS = { storage: { request_timeout_s: 1, request_deadline_s: 4 } };
/** Longer than every check below waits for: a leased volume stays writable through the outages of the first two tests. */
const LONG_LEASE = { host: { lease_ttl_s: 300 } };

let minio: Minio | undefined;
let cluster: Cluster | undefined;
let writer: Daemon;
let reader: Daemon;

before(async () => {
  minio = await startMinio();
  cluster = await startCluster((dir) => minioStore(minio, dir));
  writer = await cluster.start('writer', { ...STORE_BOUNDS, ...LONG_LEASE });
  reader = await cluster.start('reader', { ...STORE_BOUNDS, ...LONG_LEASE });
});

after(async () => {
  // A stopped MinIO would hold the daemons' shutdown drains to their deadline.
  if (minio && minio.pid > 0) {
    try {
      minio.resume();
    } catch {
      // Not running.
    }
  }
  await cluster?.cleanup();
  await minio?.stop();
});

/** The error a promise rejects with (fails the test if it resolves). */
async function rejection(promise: Promise<unknown>): Promise<unknown> {
  try {
    await promise;
  } catch (err) {
    return err;
  }
  assert.fail('expected a failure, but it succeeded');
}

/** Writes `data` at `offset` on a new connection, flushes, disconnects. */
async function writeAt(d: Daemon, name: string, offset: number, length: number): Promise<Buffer> {
  const client = await connect(d, name);
  try {
    const data = await writeRandom(client, offset, length);
    await client.flush();
    return data;
  } finally {
    await client.disconnect();
  }
}

/** A connection whose error replies carry the server's message (structured replies). */
function connectStructured(d: Daemon, name: string): Promise<NbdClient> {
  return NbdClient.connect({ path: d.socket, exportName: name, structuredReplies: true, timeoutMs: 120_000, commandTimeoutMs: 120_000 });
}

/**
 * What must hold while the store is out: on the reader, a cold read fails with EIO and a
 * connection to `unknown` (not on that host) gets NBD_REP_ERR_UNKNOWN, both saying the
 * store is unreachable; on the writer, cached reads and writes go on (while they wait, when
 * the store `hangs`), and a drain fails naming the store and the operation, the volume
 * staying dirty and writable.
 */
async function duringOutage(hangs: boolean, cold: NbdClient, unknown: string, volume: string, content: Buffer): Promise<void> {
  const store = cluster!.store.toml.storage as { url: string };
  // New blocks, so that the drain below has packs to upload.
  const client = await connect(writer, volume);
  (await writeRandom(client, 4 * MiB, MiB)).copy(content, 4 * MiB);
  await client.flush();

  let storeWaitsSettled = false;
  const coldRead = rejection(cold.read(0, 128 * KiB));
  const opening = rejection(NbdClient.connect({ path: reader.socket, exportName: unknown, timeoutMs: 120_000 }));
  const drained = writer.api('POST', `/api/exports/${volume}/drain`);
  void Promise.allSettled([coldRead, opening, drained]).then(() => (storeWaitsSettled = true));

  // The writer's open volume is served from this host meanwhile: reads of cached data, writes, flushes.
  (await writeRandom(client, 5 * MiB, MiB)).copy(content, 5 * MiB);
  await client.flush();
  assert.ok((await readAll(client, 0, 6 * MiB)).equals(content.subarray(0, 6 * MiB)), 'cached read on the writer');
  if (hangs) assert.equal(storeWaitsSettled, false, 'the writer served reads and writes only after the requests that wait on the store had settled');

  const readErr = await coldRead;
  assert.ok(readErr instanceof NbdCommandError, `cold read: expected an NBD error reply, got ${String(readErr)}`);
  assert.equal(readErr.code, 'EIO');
  assert.match(readErr.serverMessage, /the object store s3:\/\/\S+ is unreachable/);
  assert.ok(!cold.broken, 'the reader connection stays usable after the failed read');

  const openErr = await opening;
  assert.ok(openErr instanceof NbdOptionError, `open of ${unknown}: expected an NBD option error, got ${String(openErr)}`);
  assert.equal(openErr.code, 'NBD_REP_ERR_UNKNOWN');
  assert.ok(openErr.serverMessage.includes(`volume ${unknown}: cannot open it on this host: the object store ${store.url} is unreachable`), openErr.serverMessage);
  assert.ok(openErr.serverMessage.includes(`volumes/${unknown}/manifest`), openErr.serverMessage);

  // A real client gets the same refusal (libnbd 1.14 shows the server's message only in debug output it turns off).
  const copy = await run('nbdcopy', [reader.uri(unknown), 'null:'], { timeoutMs: 120_000 });
  assert.notEqual(copy.code, 0, copy.stdout);
  assert.match(copy.stderr, new RegExp(`server has no export named '${unknown}'`), copy.stderr);

  const drainReply = await drained;
  assert.equal(drainReply.status, 503, drainReply.text);
  const why: string = drainReply.json.error;
  assert.ok(why.includes(`volume ${volume}: drain failed`), why);
  assert.ok(why.includes(`the object store ${store.url} is unreachable`), why);
  assert.match(why, /put packs\/[0-9a-f]{2}\/[0-9a-f]+ on /, 'the message names the store request that failed');
  const summary = await exportInfo(writer, volume);
  assert.equal(summary.read_only, false, 'the volume stays writable');
  assert.notEqual(summary.manifest_sequence, summary.sequence, 'the volume stays dirty');
  const again = await writeRandom(client, 6 * MiB, 128 * KiB);
  again.copy(content, 6 * MiB);
  await client.flush();
  await client.disconnect();
}

/** Once the store is back: the drain succeeds, cold reads and opens work, nothing is lost. */
async function afterOutage(cold: NbdClient, coldData: Buffer, unknown: string, unknownData: Buffer, volume: string, content: Buffer): Promise<void> {
  const drained = await drain(writer, volume);
  assert.equal(drained.sequence, (await exportInfo(writer, volume)).sequence);
  assert.ok((await readAll(cold, 0, coldData.length)).equals(coldData), 'cold read after the outage');
  const opened = await connect(reader, unknown);
  assert.ok((await readAll(opened, 0, unknownData.length)).equals(unknownData), `${unknown} opened after the outage`);
  await opened.disconnect();
  const check = await connect(writer, volume);
  assert.ok((await readAll(check, 0, content.length)).equals(content), 'every write on the writer survived');
  await check.disconnect();
}

test('a hung store (SIGSTOP): writes and cached reads go on; cold reads, opens and drains fail within the deadline; all catches up', async (t) => {
  if (!requireTools(t, [TOOLS.nbdcopy])) return;
  await withLogs([writer, reader], async () => {
    const content = Buffer.alloc(8 * MiB);
    await createVolume(writer, 'hung-warm', 8);
    (await writeAt(writer, 'hung-warm', 0, 4 * MiB)).copy(content, 0);
    await drain(writer, 'hung-warm');
    await createVolume(writer, 'hung-cold', 4);
    const coldData = await writeAt(writer, 'hung-cold', 0, 4 * MiB);
    await drain(writer, 'hung-cold');
    await createVolume(writer, 'hung-unknown', 2);
    const unknownData = await writeAt(writer, 'hung-unknown', 0, 2 * MiB);
    await drain(writer, 'hung-unknown');
    // Woken on the reader (read-only there: the writer holds the lease); nothing of it is cached yet.
    const cold = await connectStructured(reader, 'hung-cold');

    minio!.pause();
    try {
      await duringOutage(true, cold, 'hung-unknown', 'hung-warm', content);
    } finally {
      minio!.resume();
    }
    await afterOutage(cold, coldData, 'hung-unknown', unknownData, 'hung-warm', content);
    await cold.disconnect();
  });
});

test('a store that refuses connections (MinIO killed): the same failures, quickly; all catches up once it is back', async (t) => {
  if (!requireTools(t, [TOOLS.nbdcopy])) return;
  await withLogs([writer, reader], async () => {
    const content = Buffer.alloc(8 * MiB);
    await createVolume(writer, 'down-warm', 8);
    (await writeAt(writer, 'down-warm', 0, 4 * MiB)).copy(content, 0);
    await drain(writer, 'down-warm');
    await createVolume(writer, 'down-cold', 4);
    const coldData = await writeAt(writer, 'down-cold', 0, 4 * MiB);
    await drain(writer, 'down-cold');
    await createVolume(writer, 'down-unknown', 2);
    const unknownData = await writeAt(writer, 'down-unknown', 0, 2 * MiB);
    await drain(writer, 'down-unknown');
    const cold = await connectStructured(reader, 'down-cold');

    await minio!.kill();
    try {
      await duringOutage(false, cold, 'down-unknown', 'down-warm', content);
    } finally {
      await minio!.restart();
    }
    await afterOutage(cold, coldData, 'down-unknown', unknownData, 'down-warm', content);
    await cold.disconnect();
  });
});

test('a lease cannot be renewed while the store hangs: past its expiry writes are refused; once the store answers the same lease is renewed and writes go on', async () => {
  const holder = await cluster!.start('holder', { ...STORE_BOUNDS, host: { lease_ttl_s: 6, clock_skew_margin_s: 1 } });
  await withLogs([holder], async () => {
    await createVolume(holder, 'leased', 4);
    const client = await connect(holder, 'leased');
    const content = Buffer.alloc(4 * MiB);
    (await writeRandom(client, 0, MiB)).copy(content, 0);
    await client.flush();
    await drain(holder, 'leased');
    const generation = (await exportInfo(holder, 'leased')).lease_generation;
    assert.ok(generation > 0);

    minio!.pause();
    let refused: unknown;
    try {
      // Writes go on until the lease expires unrenewed; then they are refused (another host may take the volume).
      let at = MiB;
      await waitFor('a write refused once the lease expired', async () => {
        const data = Buffer.alloc(4 * KiB, at / (4 * KiB));
        try {
          await client.write(at, data);
          data.copy(content, at);
          at += 4 * KiB;
          return false;
        } catch (err) {
          refused = err;
          return true;
        }
      }, 40_000, 200);
    } finally {
      minio!.resume();
    }
    assert.ok(refused instanceof NbdCommandError, String(refused));
    assert.equal(refused.code, 'EPERM');
    assert.equal((await exportInfo(holder, 'leased')).read_only, true);

    // Nobody took the lease meanwhile: the next renewal succeeds with the same generation.
    await waitFor('the volume writable again', async () => (await exportInfo(holder, 'leased')).read_only === false, 30_000);
    const more = await writeRandom(client, 3 * MiB, 128 * KiB);
    more.copy(content, 3 * MiB);
    await client.flush();
    await drain(holder, 'leased');
    assert.equal((await exportInfo(holder, 'leased')).lease_generation, generation);
    assert.ok((await readAll(client, 0, content.length)).equals(content));
    await client.disconnect();
  });
});

test('faults hang mode: a request nobody answers fails at the request deadline with its attempt aborted; healed, the store answers', async (t) => {
  const dir = await scratchDir('updraft-outage-');
  t.after(() => removeDir(dir));
  const faulty = withFaults(new FileObjectStore(dir), { seed: 4, hangRate: 1 });
  const metered = withMetering(faulty);
  const store = withRetries(metered, { deadlineMs: 300, baseDelayMs: 1 });
  for (const request of [() => store.get('k'), () => store.put('k', Buffer.from('x')), () => store.list('')]) {
    const err = await rejection(request());
    assert.ok(err instanceof ObjectStoreError && err.code === 'Unavailable', String(err));
    assert.match(err.message, /injected hang.*no answer within the request deadline of 0\.3 s; 1 attempt\)/);
  }
  // One attempt each, held until the deadline aborted it: retries did not compound past it.
  assert.equal(faulty.injected.hang, 3);
  assert.equal(metered.counters().requests.put, 1);
  assert.equal(await new FileObjectStore(dir).head('k'), undefined, 'the hung put never reached the store');
  faulty.options.hangRate = 0;
  await store.put('k', Buffer.from('x'));
  assert.equal((await store.get('k'))?.body.toString(), 'x');
});

test('s3://: the request deadline aborts an attempt the server never answers, shorter than the request timeout, and closes its connection', async (t) => {
  const closed: Promise<void>[] = [];
  const server = net.createServer((socket) => {
    closed.push(new Promise((resolve) => socket.once('close', () => resolve())));
    socket.on('data', () => undefined); // read the request, answer nothing
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.after(() => server.close());
  const port = (server.address() as net.AddressInfo).port;
  const backend = openObjectStore('s3://bucket/p', {
    endpoint: `http://127.0.0.1:${port}`, allowHttp: true, accessKeyId: 'a', secretAccessKey: 'b', requestTimeoutMs: 600_000,
  });
  const store = withRetries(backend, { deadlineMs: 500 });
  t.after(() => store.close());
  for (const request of [() => store.get('k'), () => store.put('k', Buffer.alloc(64 * KiB), { selfVerifying: true })]) {
    const err = await rejection(request());
    assert.ok(err instanceof ObjectStoreError && err.code === 'Unavailable', String(err));
    assert.match(err.message, /on s3:\/\/bucket\/p: .*no answer within the request deadline of 0\.5 s/);
  }
  assert.ok(closed.length >= 2, `${closed.length} connections`);
  await Promise.all(closed);
});

test('a listing makes progress page by page: each page starts the request deadline again', async () => {
  /** A store whose listing delivers `pages` pages `gapMs` apart, and stops when its signal aborts. */
  const pagedStore = (pages: number, gapMs: number): ObjectStore =>
    ({
      description: 'paged://',
      async list(_prefix: string, options?: ListOptions) {
        for (let page = 0; page < pages; page++) {
          await new Promise((resolve) => setTimeout(resolve, gapMs));
          if (options?.signal?.aborted) throw new ObjectStoreError('Unavailable', `list on paged://: aborted at page ${page}`);
          options?.onPage?.();
        }
        return [];
      },
      close: async () => undefined,
    }) as unknown as ObjectStore;
  // Longer in all than the deadline, but never that long without a page.
  assert.deepEqual(await withRetries(pagedStore(6, 100), { deadlineMs: 400 }).list(''), []);
  const err = await rejection(withRetries(pagedStore(6, 600), { deadlineMs: 400 }).list(''));
  assert.ok(err instanceof ObjectStoreError && err.code === 'Unavailable', String(err));
  assert.match(err.message, /aborted at page 0 \(no answer within the request deadline of 0\.4 s; 1 attempt\)/);
});

test('nbd: the negotiation timeout does not run while the server opens a volume from the store; an idle client is still closed', async (t) => {
  const dir = await scratchDir('updraft-outage-');
  t.after(() => removeDir(dir));
  const socket = path.join(dir, 'nbd.sock');
  // Opening takes longer than the negotiation timeout, then finds the store unreachable.
  const server = new NbdServer(
    {
      list: () => [],
      peek: () => undefined,
      open: async (name) => {
        await new Promise((resolve) => setTimeout(resolve, 1500));
        throw new ObjectStoreError('Unavailable', `volume ${name}: cannot open it on this host: the object store s3://b is unreachable: get volumes/${name}/manifest`);
      },
    },
    { unixSocket: socket, handshakeTimeoutMs: 500 },
    createLogger('test', 'error'),
  );
  await server.listen();
  t.after(() => server.close());
  const err = await rejection(NbdClient.connect({ path: socket, exportName: 'far' }));
  assert.ok(err instanceof NbdOptionError, `expected an NBD option error, got ${String(err)}`);
  assert.equal(err.code, 'NBD_REP_ERR_UNKNOWN');
  assert.match(err.serverMessage, /volume far: cannot open it on this host: the object store s3:\/\/b is unreachable/);
  const idle = await rawSocket({ path: socket, stage: 'greeted' });
  assert.equal(await waitClosed(idle.socket, 30_000), true, 'a client that never chooses an export is closed');
});

test('a manifest PUT that landed but whose every answer was lost: the next drain counts it, writes over it and uploads no block again; another host reads every byte', async (t) => {
  const upstream = new URL(minio!.endpoint);
  const proxy = await startStoreProxy({ host: upstream.hostname, port: Number(upstream.port) });
  t.after(() => proxy.close());
  const lossy = await cluster!.start('lossy', { ...STORE_BOUNDS, ...LONG_LEASE, aws: { endpoint: proxy.endpoint } });
  await withLogs([lossy, reader], async () => {
    const name = 'answer-lost';
    const content = Buffer.alloc(4 * MiB);
    await createVolume(lossy, name, 4);
    (await writeAt(lossy, name, 0, 2 * MiB)).copy(content, 0);
    await drain(lossy, name);
    (await writeAt(lossy, name, 2 * MiB, 2 * MiB)).copy(content, 2 * MiB);
    // The first attempt of the manifest PUT is carried out unheard; the retries, and the HEADs
    // that would show the first one landed, get no answer either.
    const manifestPut = /^PUT \S*\/manifest[?\s]/;
    proxy.add({ match: manifestPut, answerLost: true });
    proxy.add({ match: manifestPut, reset: true, times: 4 });
    proxy.add({ match: /^HEAD \S*\/manifest[?\s]/, reset: true, times: 5 });
    const cut = await lossy.api('POST', `/api/exports/${name}/drain`);
    assert.equal(cut.status, 503, cut.text);
    const again = await drain(lossy, name);
    assert.equal(again.packs_uploaded, 0, 'the drain uploaded blocks its failed predecessor had already put in packs');
    assert.equal(again.sequence, (await exportInfo(lossy, name)).sequence);
    assert.match(lossy.log(), /the manifest in the store is our own unrecorded write/);
    const copy = await connect(reader, name);
    assert.ok((await readAll(copy, 0, content.length)).equals(content), 'the other host reads the drained volume');
    await copy.disconnect();
  });
});
