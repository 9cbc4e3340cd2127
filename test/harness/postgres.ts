// A real PostgreSQL server from Debian's packages (/usr/lib/postgresql/N/bin): initdb into
// a fresh folder (or a given data folder, e.g. on a filesystem on a volume), postgres on
// 127.0.0.1 with a free port and a private socket folder, one database per call of
// `database()`. PostgreSQL
// refuses to run as root, so when we are root the server runs as the `postgres` user (the
// folder is handed to it). Stopped by its pid.
import { spawn, type ChildProcess } from 'node:child_process';
import { chownSync, existsSync, readdirSync, readFileSync } from 'node:fs';
import path from 'node:path';
import pg from 'pg';
import { freePort, removeDir, scratchDir } from './daemon.js';
import { runOk, tail } from './tools.js';

const READY_TIMEOUT_MS = 30_000;

/** The folder of PostgreSQL's server binaries (the newest installed), or undefined. */
export function postgresBin(): string | undefined {
  const root = '/usr/lib/postgresql';
  if (!existsSync(root)) return undefined;
  const versions = readdirSync(root).filter((v) => existsSync(path.join(root, v, 'bin', 'postgres'))).sort((a, b) => Number(b) - Number(a));
  return versions.length > 0 ? path.join(root, versions[0], 'bin') : undefined;
}

export interface Postgres {
  /** postgres://updraft@127.0.0.1:PORT/ — add a database name. */
  baseUrl: string;
  port: number;
  /** SIGKILL the postmaster and every process it started, as a dead host's would all go. */
  kill9(): void;
  /** Create a fresh database; returns its URL. */
  database(name: string): Promise<string>;
  log(): string;
  stop(): Promise<void>;
}

/** uid and gid of the `postgres` user when we are root (PostgreSQL will not run as root). */
async function serverUser(): Promise<{ uid: number; gid: number } | undefined> {
  if (process.getuid?.() !== 0) return undefined;
  const uid = Number((await runOk('id', ['-u', 'postgres'], { timeoutMs: 5000 })).stdout.trim());
  const gid = Number((await runOk('id', ['-g', 'postgres'], { timeoutMs: 5000 })).stdout.trim());
  return { uid, gid };
}

export interface PostgresOptions {
  /** The data folder: initdb'd when it holds no cluster yet, kept at stop. Default: a fresh one, removed at stop. */
  data?: string;
  /** fsync and synchronous commits (default off: the GC tests need speed, not durability). */
  durable?: boolean;
}

/** Every process below `pid` (from /proc/PID/task/TID/children). */
function descendants(pid: number): number[] {
  const found: number[] = [];
  const walk = (parent: number) => {
    let tasks: string[];
    try {
      tasks = readdirSync(`/proc/${parent}/task`);
    } catch {
      return;
    }
    for (const task of tasks) {
      let children = '';
      try {
        children = readFileSync(`/proc/${parent}/task/${task}/children`, 'utf8');
      } catch {
        continue;
      }
      for (const child of children.split(' ').filter(Boolean).map(Number)) {
        found.push(child);
        walk(child);
      }
    }
  };
  walk(pid);
  return found;
}

export async function startPostgres(opts: PostgresOptions = {}): Promise<Postgres> {
  const bin = postgresBin();
  if (bin === undefined) {
    throw new Error('PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/postgres); install the Debian package postgresql (scripts/setup-test-deps.sh does when root)');
  }
  const dir = await scratchDir('updraft-pg-');
  const user = await serverUser();
  if (user) chownSync(dir, user.uid, user.gid);
  const data = opts.data ?? path.join(dir, 'data');
  if (user && opts.data !== undefined) chownSync(data, user.uid, user.gid);
  const durability = opts.durable === true ? ['-c', 'fsync=on', '-c', 'synchronous_commit=on', '-c', 'full_page_writes=on'] : ['-c', 'fsync=off'];
  const asServer = user ? { uid: user.uid, gid: user.gid } : {};
  const env = { ...process.env, LC_ALL: 'C', LANG: 'C' };
  if (!existsSync(path.join(data, 'PG_VERSION'))) await new Promise<void>((resolve, reject) => {
    const init = spawn(path.join(bin, 'initdb'), ['-D', data, '-U', 'updraft', '--auth=trust', '-E', 'UTF8', ...(opts.durable === true ? [] : ['--no-sync'])], { ...asServer, env, cwd: dir, stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    init.stdout!.on('data', (c: Buffer) => (out += c.toString()));
    init.stderr!.on('data', (c: Buffer) => (out += c.toString()));
    init.once('error', reject);
    init.once('close', (code) => (code === 0 ? resolve() : reject(new Error(`initdb exited ${code}:\n${tail(out, 20)}`))));
  });
  const port = await freePort();
  let output = '';
  const child: ChildProcess = spawn(
    path.join(bin, 'postgres'),
    ['-D', data, '-k', dir, '-p', String(port), '-c', 'listen_addresses=127.0.0.1', ...durability, '-c', 'max_connections=200'],
    { ...asServer, env, cwd: dir, stdio: ['ignore', 'pipe', 'pipe'] },
  );
  child.stdout!.on('data', (c: Buffer) => (output = (output + c.toString()).slice(-65536)));
  child.stderr!.on('data', (c: Buffer) => (output = (output + c.toString()).slice(-65536)));
  const exited = new Promise<void>((resolve) => child.once('close', () => resolve()));
  const onExit = () => {
    if (child.pid !== undefined && child.exitCode === null) process.kill(child.pid, 'SIGKILL');
  };
  process.once('exit', onExit);
  const stop = async () => {
    process.removeListener('exit', onExit);
    if (child.exitCode === null && child.signalCode === null && child.pid !== undefined) {
      process.kill(child.pid, 'SIGINT'); // fast shutdown
      const late = setTimeout(() => child.pid !== undefined && child.exitCode === null && process.kill(child.pid, 'SIGKILL'), 10_000);
      await exited;
      clearTimeout(late);
    }
    await removeDir(dir);
  };
  const baseUrl = `postgres://updraft@127.0.0.1:${port}/`;
  try {
    const deadline = Date.now() + READY_TIMEOUT_MS;
    for (;;) {
      if (child.exitCode !== null) throw new Error(`postgres exited with ${child.exitCode} before it was ready`);
      const client = new pg.Client({ connectionString: `${baseUrl}postgres` });
      try {
        await client.connect();
        await client.end();
        break;
      } catch {
        await client.end().catch(() => undefined);
      }
      if (Date.now() > deadline) throw new Error(`postgres not ready on port ${port} after ${READY_TIMEOUT_MS} ms`);
      await new Promise((r) => setTimeout(r, 100));
    }
  } catch (err) {
    await stop();
    throw new Error(`${(err as Error).message}\n--- postgres output (tail) ---\n${tail(output, 30)}`, { cause: err });
  }
  return {
    baseUrl,
    port,
    kill9() {
      const pids = child.pid === undefined ? [] : [child.pid, ...descendants(child.pid)];
      for (const pid of pids) {
        try {
          process.kill(pid, 'SIGKILL');
        } catch {
          // Gone already.
        }
      }
    },
    async database(name) {
      const client = new pg.Client({ connectionString: `${baseUrl}postgres` });
      await client.connect();
      try {
        await client.query(`CREATE DATABASE "${name.replace(/"/g, '')}"`);
      } finally {
        await client.end();
      }
      return `${baseUrl}${name}`;
    },
    log: () => output,
    stop,
  };
}
