// A real MinIO server for the s3:// tests: the binary scripts/setup-minio.sh builds into
// the test cache, on 127.0.0.1 with a free port, a fresh data folder and one bucket.
// There is no skipping: without the binary the test fails and says how to build it.

import { spawn, type ChildProcess } from 'node:child_process';
import { after, before } from 'node:test';
import { accessSync, constants } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { CreateBucketCommand, S3Client } from '@aws-sdk/client-s3';
import { freePort, removeDir, scratchDir } from './daemon.js';
import type { SharedStore } from './cluster.js';
import { killTree, tail } from './tools.js';

const READY_TIMEOUT_MS = 30_000;

export interface Minio {
  /** e.g. http://127.0.0.1:40123 */
  endpoint: string;
  accessKeyId: string;
  secretAccessKey: string;
  /** A bucket created at start. */
  bucket: string;
  region: string;
  /** s3://BUCKET/PREFIX with a fresh prefix. */
  url: string;
  /** Pid of the server process (changes on restart). */
  readonly pid: number;
  /** MinIO's output so far (last 64 KiB). */
  log(): string;
  /** SIGSTOP: the server keeps its port and accepts connections, but answers nothing (a hung store). */
  pause(): void;
  /** SIGCONT after pause(). */
  resume(): void;
  /** SIGKILL the server and wait for it to exit, keeping its data: the port refuses connections. */
  kill(): Promise<void>;
  /** Start the server again after kill(), on the same port and data; resolves once it is live. */
  restart(): Promise<void>;
  /** SIGKILL the server, wait for it to exit, remove its data folder. */
  stop(): Promise<void>;
}

/** Where setup-minio.sh puts the binary. */
export function minioBinary(): string {
  const cache = process.env.UPDRAFT_TEST_CACHE || path.join(os.homedir(), '.cache', 'updraft-test');
  return path.join(cache, 'bin', 'minio');
}

/** The MinIO binary's path; throws (failing the test) when it has not been built. */
export function requireMinio(): string {
  const binary = minioBinary();
  try {
    accessSync(binary, constants.X_OK);
  } catch {
    throw new Error(`MinIO is not built: ${binary} is missing. Run \`bash scripts/setup-minio.sh\` (needs Go; takes 5-15 minutes once).`);
  }
  return binary;
}

/** Starts MinIO, waits for /minio/health/live, creates the bucket. */
/**
 * One MinIO for a test file (or a describe block): started before its tests, stopped
 * (by pid) after them. The getter gives it, undefined when it did not start.
 */
export function minioForTests(): () => Minio | undefined {
  let minio: Minio | undefined;
  before(async () => {
    minio = await startMinio();
  });
  after(async () => {
    await minio?.stop();
  });
  return () => minio;
}

export async function startMinio(): Promise<Minio> {
  const binary = requireMinio();
  const dataDir = await scratchDir('updraft-minio-');
  const port = await freePort();
  const consolePort = await freePort();
  const endpoint = `http://127.0.0.1:${port}`;
  const accessKeyId = 'updraft-test';
  const secretAccessKey = 'updraft-test-secret';
  const bucket = 'updraft-test';
  const region = 'us-east-1';

  let child: ChildProcess | undefined;
  let exited: Promise<void> = Promise.resolve();
  let output = '';
  const remember = (chunk: Buffer) => {
    output = (output + chunk.toString('utf8')).slice(-65536);
  };
  const onExit = () => killTree(child?.pid);
  process.once('exit', onExit);
  const running = () => child !== undefined && child.exitCode === null && child.signalCode === null;
  const kill = async () => {
    if (running()) {
      // A stopped process dies of SIGKILL too.
      killTree(child!.pid);
    }
    await exited;
  };
  const stop = async () => {
    process.removeListener('exit', onExit);
    await kill();
    await removeDir(dataDir);
  };

  const launch = async () => {
    const proc: ChildProcess = spawn(
      binary,
      ['server', '--quiet', '--address', `127.0.0.1:${port}`, '--console-address', `127.0.0.1:${consolePort}`, path.join(dataDir, 'data')],
      {
        env: {
          ...process.env,
          MINIO_ROOT_USER: accessKeyId,
          MINIO_ROOT_PASSWORD: secretAccessKey,
          MINIO_BROWSER: 'off',
          MINIO_UPDATE: 'off',
          MINIO_REGION: region,
        },
        stdio: ['ignore', 'pipe', 'pipe'],
        detached: true,
      },
    );
    child = proc;
    proc.stdout!.on('data', remember);
    proc.stderr!.on('data', remember);
    exited = new Promise<void>((resolve) => proc.once('close', () => resolve()));
    const deadline = Date.now() + READY_TIMEOUT_MS;
    for (;;) {
      if (proc.exitCode !== null || proc.signalCode !== null) throw new Error(`minio exited before it was ready`);
      try {
        const res = await fetch(`${endpoint}/minio/health/live`, { signal: AbortSignal.timeout(1000) });
        if (res.ok) break;
      } catch {
        // Not listening yet.
      }
      if (Date.now() > deadline) throw new Error(`minio not live at ${endpoint} after ${READY_TIMEOUT_MS} ms`);
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
  };

  try {
    await launch();
    const client = new S3Client({ endpoint, region, forcePathStyle: true, credentials: { accessKeyId, secretAccessKey } });
    try {
      await client.send(new CreateBucketCommand({ Bucket: bucket }));
    } finally {
      client.destroy();
    }
  } catch (err) {
    await stop();
    throw new Error(`${(err as Error).message}\n--- minio output (tail) ---\n${tail(output, 30)}`, { cause: err });
  }

  return {
    endpoint,
    accessKeyId,
    secretAccessKey,
    bucket,
    region,
    url: `s3://${bucket}/t-${Date.now().toString(36)}`,
    get pid() {
      return child?.pid ?? -1;
    },
    log: () => output,
    pause: () => void process.kill(child!.pid!, 'SIGSTOP'),
    resume: () => void process.kill(child!.pid!, 'SIGCONT'),
    kill,
    async restart() {
      await kill();
      try {
        await launch();
      } catch (err) {
        throw new Error(`${(err as Error).message}\n--- minio output (tail) ---\n${tail(output, 30)}`, { cause: err });
      }
    },
    stop,
  };
}

/** A cluster's shared store on this MinIO: one prefix per cluster folder, so clusters never see each other's objects. */
export function minioStore(minio: Minio | undefined, dir: string): SharedStore {
  if (!minio) throw new Error('MinIO did not start');
  return {
    label: 's3://',
    toml: {
      storage: { url: `s3://${minio.bucket}/${path.basename(dir)}` },
      aws: {
        access_key_id: minio.accessKeyId, secret_access_key: minio.secretAccessKey, endpoint: minio.endpoint,
        default_region: minio.region, allow_http: true, force_path_style: true,
      },
    },
  };
}
