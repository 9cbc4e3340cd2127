// Processes and HTTP for the bench scripts: free ports, children started with their output
// to a log file (and stopped by pid at the end), readiness, the daemon's API and metrics.
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

/** The repository, the built daemon, and the MinIO binary the test setup installs. */
export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
export const MAIN = path.join(ROOT, 'dist/src/cli/updraft.cjs');
/** Node.js flags for each daemon: the `updraft` command's (src/cli/node-flags.ts), or BENCH_DAEMON_FLAGS when set ("" for none). */
export const DAEMON_FLAGS = process.env.BENCH_DAEMON_FLAGS !== undefined
  ? process.env.BENCH_DAEMON_FLAGS.split(' ').filter(Boolean)
  : [...(await import(path.join(ROOT, 'dist/src/cli/node-flags.js'))).DAEMON_NODE_FLAGS];
export const MINIO = path.join(process.env.UPDRAFT_TEST_CACHE || path.join(os.homedir(), '.cache/updraft-test'), 'bin/minio');

/** Every child started and not yet exited: a script stops them all by pid at its end. */
export const children = new Set();

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

export async function freePort() {
  const server = net.createServer();
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  const { port } = server.address();
  await new Promise((r) => server.close(r));
  return port;
}

export function start(cmd, args, opts = {}) {
  const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], ...opts });
  const log = fs.createWriteStream(opts.logFile ?? '/dev/null');
  child.stdout.pipe(log);
  child.stderr.pipe(log);
  children.add(child);
  child.once('exit', () => children.delete(child));
  return child;
}

export async function stop(child, signal = 'SIGTERM') {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise((r) => child.once('exit', r));
  child.kill(signal);
  const timer = setTimeout(() => child.kill('SIGKILL'), 60_000);
  await exited;
  clearTimeout(timer);
}

export async function waitUrl(url, child, timeoutMs = 30_000) {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (child.exitCode !== null) throw new Error(`${url}: the process exited (${child.exitCode})`);
    try {
      if ((await fetch(url)).ok) return;
    } catch {}
    await sleep(50);
  }
  throw new Error(`${url} not ready after ${timeoutMs} ms`);
}

export async function api(base, method, p, body) {
  const r = await fetch(base + p, {
    method,
    headers: body === undefined ? {} : { 'content-type': 'application/json' },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await r.text();
  if (!r.ok) throw new Error(`${method} ${p}: ${r.status} ${text}`);
  return text ? JSON.parse(text) : null;
}

export async function metric(base, name, labels = {}) {
  const text = await (await fetch(base + '/metrics')).text();
  let total = 0;
  for (const line of text.split('\n')) {
    const m = /^([a-z_]+)(\{([^}]*)\})? (\S+)$/.exec(line);
    if (!m || m[1] !== name) continue;
    const have = Object.fromEntries((m[3] ?? '').split(',').filter(Boolean).map((kv) => [kv.split('=')[0], kv.split('=')[1].slice(1, -1)]));
    if (Object.entries(labels).every(([k, v]) => have[k] === v)) total += Number(m[4]);
  }
  return total;
}
