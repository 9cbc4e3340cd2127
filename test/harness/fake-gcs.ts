// fake-gcs-server, the Google Cloud Storage emulator the gs:// tests run against: the
// binary scripts/setup-fake-gcs.sh builds into the test cache, on 127.0.0.1 with a free
// port and one bucket. There is no skipping: without the binary the test fails and says
// how to build it.

import { accessSync, constants } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { SharedStore } from './cluster.js';
import { freePort } from './daemon.js';
import { startEmulator } from './emulator.js';

export interface FakeGcs {
  /** e.g. http://127.0.0.1:40123 */
  endpoint: string;
  /** A bucket created at start. */
  bucket: string;
  readonly pid: number;
  log(): string;
  /** SIGKILL the server, wait for it to exit, remove its data. */
  stop(): Promise<void>;
}

/** Where setup-fake-gcs.sh puts the binary. */
export function fakeGcsBinary(): string {
  const cache = process.env.UPDRAFT_TEST_CACHE || path.join(os.homedir(), '.cache', 'updraft-test');
  return path.join(cache, 'bin', 'fake-gcs-server');
}

/** Starts fake-gcs-server (objects in memory) and creates the bucket. */
export async function startFakeGcs(bucket = 'updraft-test'): Promise<FakeGcs> {
  const binary = fakeGcsBinary();
  try {
    accessSync(binary, constants.X_OK);
  } catch {
    throw new Error(`fake-gcs-server is not built: ${binary} is missing. Run \`bash scripts/setup-fake-gcs.sh\` (needs Go; takes a few minutes once).`);
  }
  const port = await freePort();
  const endpoint = `http://127.0.0.1:${port}`;
  const server = await startEmulator({
    name: 'fake-gcs-server',
    command: binary,
    args: () => ['-scheme', 'http', '-host', '127.0.0.1', '-port', String(port), '-backend', 'memory', '-external-url', endpoint, '-log-level', 'warn'],
    ready: async () => (await fetch(`${endpoint}/storage/v1/b`, { signal: AbortSignal.timeout(1000) })).ok,
  });
  try {
    const res = await fetch(`${endpoint}/storage/v1/b?project=updraft-test`, {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ name: bucket }),
    });
    if (!res.ok) throw new Error(`fake-gcs-server: creating bucket ${bucket}: HTTP ${res.status} ${await res.text()}`);
  } catch (err) {
    await server.stop();
    throw err;
  }
  return { endpoint, bucket, get pid() { return server.pid; }, log: server.log, stop: server.stop };
}

/** A cluster's shared store on this server: one prefix per cluster folder. */
export function fakeGcsStore(gcs: FakeGcs | undefined, dir: string): SharedStore {
  if (!gcs) throw new Error('fake-gcs-server did not start');
  return {
    label: 'gs://',
    toml: { storage: { url: `gs://${gcs.bucket}/${path.basename(dir)}` }, gcs: { endpoint: gcs.endpoint, allow_http: true } },
  };
}
