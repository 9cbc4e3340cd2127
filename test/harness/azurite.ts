// Azurite, Microsoft's Azure Storage emulator (the npm devDependency), for the az:// tests:
// its blob service on 127.0.0.1 with a free port, a fresh workspace, the emulator's
// well-known development account and one container. Telemetry is off: tests reach
// nothing beyond loopback.

import { createRequire } from 'node:module';
import path from 'node:path';
import type { SharedStore } from './cluster.js';
import { freePort } from './daemon.js';
import { startEmulator } from './emulator.js';

/** Azurite's fixed development account and key (public, documented by Microsoft). */
export const AZURITE_ACCOUNT = 'devstoreaccount1';
export const AZURITE_KEY = 'Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==';

export interface Azurite {
  /** The blob service URL with the account, e.g. http://127.0.0.1:40123/devstoreaccount1 */
  endpoint: string;
  account: string;
  key: string;
  /** A container created at start. */
  container: string;
  /** A connection string for the same account. */
  connectionString: string;
  readonly pid: number;
  log(): string;
  stop(): Promise<void>;
}

function azuriteBlobMain(): string {
  const require = createRequire(import.meta.url);
  return path.join(path.dirname(require.resolve('azurite/package.json')), 'dist', 'src', 'blob', 'main.js');
}

/** Starts Azurite's blob service (its data in a fresh folder) and creates the container. */
export async function startAzurite(container = 'updraft-test'): Promise<Azurite> {
  const port = await freePort();
  const endpoint = `http://127.0.0.1:${port}/${AZURITE_ACCOUNT}`;
  const server = await startEmulator({
    name: 'azurite',
    command: process.execPath,
    args: (dataDir) => [
      azuriteBlobMain(), '--blobHost', '127.0.0.1', '--blobPort', String(port), '--location', dataDir,
      '--silent', '--skipApiVersionCheck', '--disableTelemetry', '--disableProductStyleUrl',
    ],
    // Any HTTP answer means it listens (an unauthenticated request is refused with 4xx).
    ready: async () => (await fetch(`${endpoint}?comp=list`, { signal: AbortSignal.timeout(1000) })).status > 0,
  });
  const connectionString = `DefaultEndpointsProtocol=http;AccountName=${AZURITE_ACCOUNT};AccountKey=${AZURITE_KEY};BlobEndpoint=${endpoint};`;
  try {
    const { BlobServiceClient } = await import('@azure/storage-blob');
    await BlobServiceClient.fromConnectionString(connectionString).getContainerClient(container).create();
  } catch (err) {
    await server.stop();
    throw new Error(`azurite: creating container ${container}: ${(err as Error).message}\n${server.log()}`, { cause: err });
  }
  return {
    endpoint, account: AZURITE_ACCOUNT, key: AZURITE_KEY, container, connectionString,
    get pid() { return server.pid; }, log: server.log, stop: server.stop,
  };
}

/** A cluster's shared store on this Azurite: one prefix per cluster folder. */
export function azuriteStore(azurite: Azurite | undefined, dir: string): SharedStore {
  if (!azurite) throw new Error('Azurite did not start');
  return {
    label: 'az://',
    toml: {
      storage: { url: `az://${azurite.container}/${path.basename(dir)}` },
      azure: { account_name: azurite.account, account_key: azurite.key, endpoint: azurite.endpoint, allow_http: true },
    },
  };
}
