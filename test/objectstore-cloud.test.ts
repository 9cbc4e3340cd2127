// gs:// and az:// errors and time limits: a missing bucket or container, credentials that
// cannot work or are refused, a silent server and a caller's abort, against fake-gcs-server,
// Azurite and loopback servers that answer as the services do. Their conformance suite is
// in objectstore.test.ts.

import assert from 'node:assert/strict';
import http from 'node:http';
import { writeFile } from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { after, test } from 'node:test';
import { removeDir, scratchDir } from './harness/daemon.js';
import { startFakeGcs, type FakeGcs } from './harness/fake-gcs.js';
import { startAzurite, type Azurite } from './harness/azurite.js';
import { ObjectStoreError, openObjectStore, probeObjectStore, withRetries, type ObjectStoreErrorCode } from '../src/objectstore/index.js';

const KiB = 1024;
const MiB = 1024 * KiB;

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
  if (fakeGcs) await (await fakeGcs.catch(() => undefined))?.stop();
  if (azurite) await (await azurite.catch(() => undefined))?.stop();
});

/** Asserts that `promise` rejects with an ObjectStoreError of `code` whose message holds every string in `mentions`. */
async function rejectsWith(promise: Promise<unknown>, code: ObjectStoreErrorCode, mentions: string[] = []): Promise<void> {
  let caught: unknown;
  await assert.rejects(promise, (err) => {
    caught = err;
    return true;
  });
  assert.ok(caught instanceof ObjectStoreError, `expected an ObjectStoreError, got ${String(caught)}`);
  assert.equal(caught.code, code, `expected ${code}, got ${caught.code}: ${caught.message}`);
  for (const text of mentions) assert.ok(caught.message.includes(text), `message ${JSON.stringify(caught.message)} does not mention ${JSON.stringify(text)}`);
}

test('gs://: a missing bucket is NoSuchBucket naming it for every request, and the probe says which', async (t) => {
  const gcs = await sharedFakeGcs();
  const store = openObjectStore('gs://no-such-bucket/p', {}, undefined, { gcs: { endpoint: gcs.endpoint, allowHttp: true } });
  t.after(() => store.close());
  const missing = 'bucket no-such-bucket does not exist';
  await rejectsWith(probeObjectStore(store), 'NoSuchBucket', [`object store gs://no-such-bucket/p: ${missing}`]);
  await rejectsWith(store.get('k'), 'NoSuchBucket', ['get', 'k', missing]);
  await rejectsWith(store.head('k'), 'NoSuchBucket', ['head', 'k', missing]);
  await rejectsWith(store.put('k', Buffer.from('x')), 'NoSuchBucket', ['put', 'k', missing]);
  await rejectsWith(store.put('k', Buffer.from('x'), { ifNoneMatch: '*' }), 'NoSuchBucket', ['put', 'k', missing]);
  await rejectsWith(store.list(''), 'NoSuchBucket', ['list', missing]);
  await rejectsWith(store.delete('k'), 'NoSuchBucket', ['delete', 'k', missing]);
});

test('gs://: a service account key that cannot work is AccessDenied naming the file, never an unreachable store', async (t) => {
  const dir = await scratchDir('updraft-gcs-key-');
  t.after(() => removeDir(dir));
  const gcs = await sharedFakeGcs();
  const keys: Array<[string, string | undefined, string]> = [
    ['absent.json', undefined, 'cannot read it'],
    ['garbage.json', 'not json', 'not JSON'],
    ['user.json', JSON.stringify({ type: 'authorized_user', client_id: 'x' }), 'not a service account key'],
    ['no-pem.json', JSON.stringify({ type: 'service_account', client_email: 'sa@p.iam.gserviceaccount.com', private_key: 'nope' }), 'no private_key'],
  ];
  for (const [name, content, why] of keys) {
    const file = path.join(dir, name);
    if (content !== undefined) await writeFile(file, content);
    const store = withRetries(openObjectStore(`gs://${gcs.bucket}/p`, {}, undefined, { gcs: { endpoint: gcs.endpoint, allowHttp: true, serviceAccountKey: file } }), { attempts: 3 });
    t.after(() => store.close());
    await rejectsWith(probeObjectStore(store), 'AccessDenied', [`object store gs://${gcs.bucket}/p: access denied`, file, why]);
    await rejectsWith(store.put('k', Buffer.from('x')), 'AccessDenied', [file]);
  }
});

test('gs://: a server refusing the credentials (401) or the permission (403) is AccessDenied naming the operation, the key and the store', async (t) => {
  const answers: Record<string, [number, string]> = {
    '/creds': [401, 'Invalid Credentials'],
    '/perm': [403, 'sa@p.iam.gserviceaccount.com does not have storage.objects.get access to the Google Cloud Storage object.'],
  };
  const server = http.createServer((req, res) => {
    req.resume();
    const [status, message] = Object.entries(answers).find(([where]) => req.url?.includes(encodeURIComponent(where.slice(1))))?.[1] ?? [401, 'Invalid Credentials'];
    res.writeHead(status, { 'Content-Type': 'application/json' });
    res.end(JSON.stringify({ error: { code: status, message, errors: [{ message, reason: status === 401 ? 'required' : 'forbidden' }] } }));
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.after(() => {
    server.closeAllConnections();
    server.close();
  });
  const endpoint = `http://127.0.0.1:${(server.address() as net.AddressInfo).port}`;
  const store = openObjectStore('gs://bucket/p', {}, undefined, { gcs: { endpoint, allowHttp: true } });
  t.after(() => store.close());
  await rejectsWith(store.get('creds'), 'AccessDenied', ['get creds on gs://bucket/p', 'access denied', '401']);
  await rejectsWith(store.head('perm'), 'AccessDenied', ['head perm', '403', 'storage.objects.get']);
  await rejectsWith(store.put('perm', Buffer.from('x'), { ifNoneMatch: '*' }), 'AccessDenied', ['put perm', '403']);
  await rejectsWith(store.list(''), 'AccessDenied', ['list']);
  await rejectsWith(probeObjectStore(store), 'AccessDenied', ['object store gs://bucket/p: access denied']);
});

test('az://: a wrong account key is AccessDenied naming the container and the account, for every request and the probe', async (t) => {
  const az = await sharedAzurite();
  const store = openObjectStore(`az://${az.container}/p`, {}, undefined, {
    azure: { accountName: az.account, accountKey: Buffer.from('not the key').toString('base64'), endpoint: az.endpoint, allowHttp: true },
  });
  t.after(() => store.close());
  const denied = `access denied to container ${az.container} in storage account ${az.account}`;
  await rejectsWith(probeObjectStore(store), 'AccessDenied', [`object store az://${az.container}/p: access denied`, denied]);
  await rejectsWith(store.get('k'), 'AccessDenied', ['get k', denied]);
  await rejectsWith(store.head('k'), 'AccessDenied', ['head k', denied]);
  await rejectsWith(store.put('k', Buffer.from('x'), { ifNoneMatch: '*' }), 'AccessDenied', ['put k', denied]);
  await rejectsWith(store.list(''), 'AccessDenied', ['list', denied]);
  await rejectsWith(store.delete('k'), 'AccessDenied', ['delete k', denied]);
});

test('az://: without a key, the default Azure credential chain is asked; when it has no credentials the store is AccessDenied, not unreachable', async (t) => {
  // Only the environment credential (no service principal in the environment), so nothing
  // beyond loopback is asked; the endpoint's port is closed, so reaching it would read as unreachable.
  const saved = process.env.AZURE_TOKEN_CREDENTIALS;
  process.env.AZURE_TOKEN_CREDENTIALS = 'EnvironmentCredential';
  t.after(() => {
    if (saved === undefined) delete process.env.AZURE_TOKEN_CREDENTIALS;
    else process.env.AZURE_TOKEN_CREDENTIALS = saved;
  });
  for (const name of ['AZURE_TENANT_ID', 'AZURE_CLIENT_ID', 'AZURE_CLIENT_SECRET', 'AZURE_CLIENT_CERTIFICATE_PATH', 'AZURE_USERNAME']) {
    if (process.env[name] !== undefined) return t.skip(`${name} is set: the environment holds a service principal`);
  }
  const closed = net.createServer();
  await new Promise<void>((resolve) => closed.listen(0, '127.0.0.1', resolve));
  const port = (closed.address() as net.AddressInfo).port;
  await new Promise<void>((resolve) => closed.close(() => resolve()));
  const store = withRetries(openObjectStore('az://container/p', {}, undefined, { azure: { accountName: 'acct', endpoint: `https://127.0.0.1:${port}/acct` } }), { attempts: 3 });
  t.after(() => store.close());
  await rejectsWith(probeObjectStore(store), 'AccessDenied', [
    'object store az://container/p: access denied',
    'container container in storage account acct (by the default Azure credential chain)',
    'EnvironmentCredential',
  ]);
  assert.throws(
    () => openObjectStore('az://container/p', {}, undefined, { azure: { accountName: 'acct', endpoint: 'http://127.0.0.1:10000/acct', allowHttp: true } }),
    (err: unknown) => err instanceof ObjectStoreError && err.code === 'Invalid' && err.message.includes('https://'),
  );
});

test('az://: a missing container is NoSuchBucket naming it, and the probe says which', async (t) => {
  const az = await sharedAzurite();
  const store = openObjectStore('az://no-such-container/p', {}, undefined, { azure: { connectionString: az.connectionString, allowHttp: true } });
  t.after(() => store.close());
  const missing = `container no-such-container does not exist in storage account ${az.account}`;
  await rejectsWith(probeObjectStore(store), 'NoSuchBucket', ['object store az://no-such-container/p: container no-such-container does not exist']);
  await rejectsWith(store.get('k'), 'NoSuchBucket', ['get k', missing]);
  await rejectsWith(store.put('k', Buffer.from('x')), 'NoSuchBucket', ['put k', missing]);
  await rejectsWith(store.list(''), 'NoSuchBucket', ['list', missing]);
  await rejectsWith(store.delete('k'), 'NoSuchBucket', ['delete k', missing]);
});

test('gs://, az://: a server that accepts and never answers is Unavailable after requestTimeoutMs; a caller\'s abort stops a request at once', async (t) => {
  const sockets = new Set<net.Socket>();
  const server = net.createServer((socket) => {
    sockets.add(socket);
    socket.on('error', () => {});
    socket.resume();
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.after(() => {
    for (const socket of sockets) socket.destroy();
    server.close();
  });
  const endpoint = `http://127.0.0.1:${(server.address() as net.AddressInfo).port}`;
  const stores = [
    openObjectStore('gs://bucket/p', {}, undefined, { gcs: { endpoint, allowHttp: true, requestTimeoutMs: 700 } }),
    openObjectStore('az://container/p', {}, undefined, { azure: { accountName: 'acct', accountKey: 'a2V5', endpoint: `${endpoint}/acct`, allowHttp: true, requestTimeoutMs: 700 } }),
  ];
  for (const store of stores) {
    t.after(() => store.close());
    for (const request of [() => store.get('k'), () => store.getRange('k', 0, 10), () => store.put('k', Buffer.alloc(100 * KiB)), () => store.head('k'), () => store.list(''), () => store.delete('k')]) {
      const started = Date.now();
      await rejectsWith(request(), 'Unavailable', [`on ${store.description}`, 'request timeout of 700 ms']);
      const took = Date.now() - started;
      assert.ok(took >= 600 && took < 3_000, `${store.description}: failed after ${took} ms, want about 700`);
    }
    const caller = new AbortController();
    setTimeout(() => caller.abort(), 100);
    const started = Date.now();
    await rejectsWith(store.put('k', Buffer.alloc(MiB), { signal: caller.signal, ifNoneMatch: '*' }), 'Unavailable', ['aborted by the caller']);
    assert.ok(Date.now() - started < 600, `${store.description}: the abort took ${Date.now() - started} ms`);
  }
});

test('gs://, az://: a body cut short mid-transfer is Unavailable naming the key, never a short object', async (t) => {
  const server = http.createServer((req, res) => {
    req.resume();
    res.writeHead(200, {
      'Content-Length': String(MiB),
      'Content-Type': 'application/octet-stream',
      ETag: '"0x1"',
      'Last-Modified': new Date().toUTCString(),
      'x-goog-generation': '1',
      'x-ms-blob-type': 'BlockBlob',
    });
    res.write(Buffer.alloc(1000, 7));
    setTimeout(() => res.socket?.destroy(), 50);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.after(() => {
    server.closeAllConnections();
    server.close();
  });
  const endpoint = `http://127.0.0.1:${(server.address() as net.AddressInfo).port}`;
  const stores = [
    openObjectStore('gs://bucket/p', {}, undefined, { gcs: { endpoint, allowHttp: true } }),
    openObjectStore('az://container/p', {}, undefined, { azure: { accountName: 'acct', accountKey: 'a2V5', endpoint: `${endpoint}/acct`, allowHttp: true } }),
  ];
  for (const store of stores) {
    t.after(() => store.close());
    await rejectsWith(store.get('packs/ab/cut'), 'Unavailable', ['get packs/ab/cut', `on ${store.description}`]);
    await rejectsWith(store.getRange('packs/ab/cut', 0, 4096), 'Unavailable', ['get_range packs/ab/cut']);
  }
});

test('gs://, az://: an http endpoint without allowHttp is Invalid naming it; az:// without an account, with a key and a connection string, or with a garbled connection string, is Invalid', async () => {
  const endpoint = 'http://127.0.0.1:4443';
  const refused = (cloud: Parameters<typeof openObjectStore>[3], url: string, text: string) =>
    assert.throws(
      () => openObjectStore(url, {}, undefined, cloud),
      (err: unknown) => err instanceof ObjectStoreError && err.code === 'Invalid' && err.message.includes(text),
      text,
    );
  refused({ gcs: { endpoint } }, 'gs://bucket/p', endpoint);
  refused({ azure: { accountName: 'acct', accountKey: 'a2V5', endpoint } }, 'az://container/p', 'allowHttp');
  refused({ azure: { connectionString: `AccountName=acct;AccountKey=a2V5;BlobEndpoint=${endpoint}/acct` } }, 'az://container/p', 'allowHttp');
  refused({ azure: {} }, 'az://container/p', 'no account');
  refused({ azure: { connectionString: 'AccountName=acct;AccountKey=a2V5', accountKey: 'a2V5' } }, 'az://container/p', 'not both');
  refused({ azure: { accountName: 'acct' } }, 'az://Bad_Container/p', 'bad container name');
  refused({}, 'gs://Bad/p', 'bad bucket name');
  const garbled = openObjectStore('az://container/p', {}, undefined, { azure: { connectionString: 'AccountKey=c2VjcmV0;no account here' } });
  await rejectsWith(probeObjectStore(garbled), 'Invalid', ['object store az://container/p: the connection string cannot be used']);
  await rejectsWith(garbled.get('k'), 'Invalid', ['connection string']);
  const gs = openObjectStore('gs://bucket/some/prefix/', {});
  assert.equal(gs.description, 'gs://bucket/some/prefix');
  const az = openObjectStore('azure://container/some/prefix', {}, undefined, { azure: { accountName: 'acct' } });
  assert.equal(az.description, 'az://container/some/prefix');
});
