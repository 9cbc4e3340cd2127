// Volumes in Azure Blob Storage (Azurite on loopback, started here): the same portability
// suite as file:// and s3://, through Microsoft's client; and a daemon whose container is
// missing or whose credentials are refused does not start, saying why.
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { assertRefusesToStart, removeDir, scratchDir, startDaemon } from './harness/daemon.js';
import { azuriteStore, startAzurite, type Azurite } from './harness/azurite.js';
import { definePortabilityTests } from './harness/portability.js';

let azurite: Azurite | undefined;
before(async () => {
  azurite = await startAzurite();
});
after(async () => {
  await azurite?.stop();
});

definePortabilityTests((dir) => azuriteStore(azurite, dir), 'az:// (Azurite)');

const refusesToStart = (toml: Record<string, unknown>, mentions: string[]) => assertRefusesToStart(toml, mentions, 'updraft-azure-start-');

test('az://: a daemon whose container does not exist refuses to start, naming the store and the container', async () => {
  const az = azurite!;
  await refusesToStart(
    { storage: { url: 'az://no-such-container/prod' }, azure: { account_name: az.account, account_key: az.key, endpoint: az.endpoint, allow_http: true } },
    ['object store az://no-such-container/prod: container no-such-container does not exist'],
  );
});

test('az://: a daemon whose account key is refused does not start, naming the store, the container and the account', async () => {
  const az = azurite!;
  const wrongKey = Buffer.from('not the account key').toString('base64');
  await refusesToStart(
    { storage: { url: `az://${az.container}/prod` }, azure: { account_name: az.account, account_key: wrongKey, endpoint: az.endpoint, allow_http: true } },
    [`object store az://${az.container}/prod: access denied`, `container ${az.container} in storage account ${az.account}`],
  );
});

test('az://: a connection string reaches the same store as an account name and key', async () => {
  const dir = await scratchDir('updraft-azure-start-');
  try {
    const daemon = await startDaemon({ dir, toml: { storage: { url: `azure://${azurite!.container}/by-connection-string` }, azure: { connection_string: azurite!.connectionString, allow_http: true } } });
    try {
      const r = await daemon.api('PUT', '/api/exports/cs-volume', { size_gb: 1 / 64 });
      assert.equal(r.status, 201, r.text);
      const drained = await daemon.api('POST', '/api/exports/cs-volume/drain');
      assert.equal(drained.status, 200, drained.text);
    } finally {
      await daemon.stop();
    }
    const { BlobServiceClient } = await import('@azure/storage-blob');
    const names: string[] = [];
    for await (const blob of BlobServiceClient.fromConnectionString(azurite!.connectionString).getContainerClient(azurite!.container).listBlobsFlat({ prefix: 'by-connection-string/volumes/cs-volume/' })) {
      names.push(blob.name);
    }
    assert.ok(names.includes('by-connection-string/volumes/cs-volume/manifest'), `no manifest in the container: ${names.join(', ')}`);
  } finally {
    await removeDir(dir);
  }
});
