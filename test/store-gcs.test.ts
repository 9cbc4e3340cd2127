// Volumes in Google Cloud Storage (fake-gcs-server on loopback, started here): the same
// portability suite as file:// and s3://, through Google's client; and a daemon whose
// bucket is missing or whose credentials cannot work refuses to start, saying why.
import assert from 'node:assert/strict';
import { writeFile } from 'node:fs/promises';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { assertRefusesToStart, removeDir, scratchDir } from './harness/daemon.js';
import { fakeGcsStore, startFakeGcs, type FakeGcs } from './harness/fake-gcs.js';
import { definePortabilityTests } from './harness/portability.js';

let gcs: FakeGcs | undefined;
before(async () => {
  gcs = await startFakeGcs();
});
after(async () => {
  await gcs?.stop();
});

definePortabilityTests((dir) => fakeGcsStore(gcs, dir), 'gs:// (fake-gcs-server)');

const refusesToStart = (toml: Record<string, unknown>, mentions: string[]) => assertRefusesToStart(toml, mentions, 'updraft-gcs-start-');

test('gs://: a daemon whose bucket does not exist refuses to start, naming the store and the bucket', async () => {
  await refusesToStart({ storage: { url: 'gs://no-such-bucket/prod' }, gcs: { endpoint: gcs!.endpoint, allow_http: true } }, [
    'object store gs://no-such-bucket/prod: bucket no-such-bucket does not exist',
  ]);
});

test('gs://: a daemon whose service account key cannot work refuses to start, naming the store and the key file', async () => {
  const dir = await scratchDir('updraft-gcs-key-');
  try {
    const key = path.join(dir, 'sa.json');
    await writeFile(key, JSON.stringify({ type: 'service_account', client_email: 'sa@p.iam.gserviceaccount.com' }));
    await refusesToStart({ storage: { url: `gs://${gcs!.bucket}/prod` }, gcs: { endpoint: gcs!.endpoint, allow_http: true, service_account_key: key } }, [
      `object store gs://${gcs!.bucket}/prod: access denied`,
      `service account key ${key}: no private_key`,
    ]);
  } finally {
    await removeDir(dir);
  }
});
