// Several daemons ("hosts") sharing one object store, for drain / wake / lease /
// migration tests. Each host has its own directory, cache, ports and host id.
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { readdir, readFile } from 'node:fs/promises';
import path from 'node:path';
import { mergeToml, removeDir, scratchDir, startDaemon, type Daemon, type TomlTable } from './daemon.js';
import { NbdClient } from './nbd-client.js';
import { tail } from './tools.js';

export const KiB = 1024;
export const MiB = 1024 * KiB;
export const CHUNK = 128 * KiB;

/** How the hosts reach the shared store: config tables merged into each host's config. */
export interface SharedStore {
  label: string;
  toml: TomlTable;
}

export interface Cluster {
  dir: string;
  store: SharedStore;
  hosts: Daemon[];
  start(id: string, toml?: TomlTable, env?: NodeJS.ProcessEnv): Promise<Daemon>;
  cleanup(): Promise<void>;
}

export async function startCluster(store: SharedStore | ((dir: string) => SharedStore)): Promise<Cluster> {
  const dir = await scratchDir('updraft-cluster-');
  const shared = typeof store === 'function' ? store(dir) : store;
  const hosts: Daemon[] = [];
  return {
    dir,
    store: shared,
    hosts,
    async start(id, toml = {}, env = {}) {
      const hostDir = path.join(dir, id);
      const { mkdir } = await import('node:fs/promises');
      await mkdir(hostDir, { recursive: true });
      const base: TomlTable = {
        host: { id, lease_ttl_s: 30 },
        volumes: { seal_idle_ms: 200 },
        servers: { nbd: { auto_create_size_gb: 0.0625 } },
      };
      const daemon = await startDaemon({ dir: hostDir, toml: mergeToml(mergeToml(base, shared.toml), toml), env });
      hosts.push(daemon);
      return daemon;
    },
    async cleanup() {
      await Promise.allSettled(hosts.map((h) => h.stop()));
      if (!process.env.UPDRAFT_KEEP_TEST_DIRS) await removeDir(dir);
    },
  };
}

/** A file:// store in the cluster's folder. */
export function fileStore(dir: string): SharedStore {
  return { label: 'file://', toml: { storage: { url: `file://${path.join(dir, 'store')}` } } };
}

/** Runs body; a failure carries each host's log tail. */
export async function withLogs(hosts: Daemon[], body: () => Promise<void>): Promise<void> {
  try {
    await body();
  } catch (err) {
    if (err instanceof Error) {
      for (const h of hosts) err.message += `\n--- log of ${path.basename(h.dir)} (tail) ---\n${tail(h.log(), 25)}`;
    }
    throw err;
  }
}

export function connect(d: Daemon, name: string): Promise<NbdClient> {
  return NbdClient.connect({ path: d.socket, exportName: name });
}

/** PUT /api/exports/NAME with a size in MiB; asserts the status. */
export async function createVolume(d: Daemon, name: string, sizeMiB: number, extra: Record<string, unknown> = {}, status = 201): Promise<any> {
  const r = await d.api('PUT', `/api/exports/${encodeURIComponent(name)}`, { size_gb: sizeMiB / 1024, ...extra });
  assert.equal(r.status, status, r.text);
  return r.json;
}

export async function drain(d: Daemon, name: string): Promise<any> {
  const r = await d.api('POST', `/api/exports/${encodeURIComponent(name)}/drain`);
  assert.equal(r.status, 200, `drain ${name}: ${r.text}`);
  return r.json;
}

export async function exportInfo(d: Daemon, name: string): Promise<any> {
  const r = await d.api('GET', `/api/exports/${encodeURIComponent(name)}`);
  assert.equal(r.status, 200, r.text);
  return r.json;
}

/** Writes random data in `piece`-sized writes over [offset, offset + length); returns it. */
export async function writeRandom(client: NbdClient, offset: number, length: number, piece = MiB): Promise<Buffer> {
  const data = randomBytes(length);
  const writes: Promise<void>[] = [];
  for (let at = 0; at < length; at += piece) {
    writes.push(client.write(offset + at, data.subarray(at, Math.min(length, at + piece))));
    if (writes.length >= 8) await Promise.all(writes.splice(0));
  }
  await Promise.all(writes);
  return data;
}

/** Reads [offset, offset + length) in `piece`-sized reads. */
export async function readAll(client: NbdClient, offset: number, length: number, piece = MiB): Promise<Buffer> {
  const out = Buffer.alloc(length);
  const reads: Promise<void>[] = [];
  for (let at = 0; at < length; at += piece) {
    const n = Math.min(piece, length - at);
    reads.push(client.read(offset + at, n).then((b) => void b.copy(out, at)));
    if (reads.length >= 8) await Promise.all(reads.splice(0));
  }
  await Promise.all(reads);
  return out;
}

/** Sum of a Prometheus series over the samples whose labels include `labels`. */
export async function metric(d: Daemon, name: string, labels: Record<string, string> = {}): Promise<number> {
  const r = await d.api('GET', '/metrics');
  assert.equal(r.status, 200);
  let total = 0;
  for (const line of r.text.split('\n')) {
    if (!line.startsWith(name)) continue;
    const m = /^([a-z_]+)(\{([^}]*)\})? (\S+)$/.exec(line);
    if (!m || m[1] !== name) continue;
    const have = Object.fromEntries((m[3] ?? '').split(',').filter(Boolean).map((kv) => {
      const eq = kv.indexOf('=');
      return [kv.slice(0, eq), kv.slice(eq + 2, -1)];
    }));
    if (Object.entries(labels).every(([k, v]) => have[k] === v)) total += Number(m[4]);
  }
  return total;
}

export async function storeRequests(d: Daemon, kind?: string): Promise<number> {
  return metric(d, 'updraft_store_requests_total', kind ? { kind } : {});
}

export async function waitFor(what: string, check: () => Promise<boolean>, timeoutMs = 20_000, everyMs = 100): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (await check()) return;
    await new Promise((r) => setTimeout(r, everyMs));
  }
  assert.fail(`timed out after ${timeoutMs} ms waiting for ${what}`);
}

/** Pids that hold a key lock of the file store in `storeDir` (a key's lock is the file `.~lock.NAME` beside it). */
async function storeLockHolders(storeDir: string): Promise<Set<number>> {
  const pids = new Set<number>();
  const walk = async (dir: string): Promise<void> => {
    for (const entry of await readdir(dir, { withFileTypes: true }).catch(() => [])) {
      const full = path.join(dir, entry.name);
      if (entry.isDirectory()) await walk(full);
      else if (entry.name.startsWith('.~lock.')) {
        const owner = JSON.parse(await readFile(full, 'utf8').catch(() => '{}')) as { pid?: number };
        if (owner.pid !== undefined) pids.add(owner.pid);
      }
    }
  };
  await walk(storeDir);
  return pids;
}

/**
 * SIGSTOP `pid` at a moment it holds none of the file store's key locks. The file store
 * serves a conditional put under its key's lock, so a client paused inside one is a paused
 * store (S3 does that on the server): nobody could put the lease or manifest until it
 * resumed. A pause that lands inside one is undone and tried again a moment later.
 */
export async function pauseOutsideStoreLocks(pid: number, storeDir: string): Promise<void> {
  for (let attempt = 0; attempt < 500; attempt++) {
    process.kill(pid, 'SIGSTOP');
    if (!(await storeLockHolders(storeDir)).has(pid)) return;
    process.kill(pid, 'SIGCONT');
    await sleep(2);
  }
  throw new Error(`pid ${pid} held a lock of the file store ${storeDir} at each of 500 pauses`);
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));
