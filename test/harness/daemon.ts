// Runs the real `updraft run` daemon as a child process for integration tests: a fresh
// directory, a config with free ports, readiness by /healthz, and a log kept on disk.

import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { createWriteStream, readFileSync, type WriteStream } from 'node:fs';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { stringify } from 'smol-toml';
import { DAEMON_NODE_FLAGS } from '../../src/cli/node-flags.js';

/** dist/test/harness/daemon.js -> dist/src/cli/updraft.cjs (the `updraft` command) */
export const DAEMON_MAIN = fileURLToPath(new URL('../../src/cli/updraft.cjs', import.meta.url));

/** Preloaded into a daemon whose wall clock a test skews. */
const SKEWED_CLOCK = new URL('./skewed-clock.js', import.meta.url).href;

const READY_TIMEOUT_MS = 20_000;
const STOP_GRACE_MS = 15_000;
/** How much of the daemon's output is kept in memory for log() and error messages. */
const LOG_MEMORY_BYTES = 1 << 20;

export type TomlTable = Record<string, unknown>;

export interface StartDaemonOptions {
  /** Directory for config, cache, store, socket and log; default a fresh temp dir. */
  dir?: string;
  /**
   * Deep-merged over the default config: tables merge key by key, anything else
   * (arrays included) replaces. A null value removes the key.
   */
  toml?: TomlTable;
  /** Added to this process's environment for the daemon. */
  env?: NodeJS.ProcessEnv;
  /** The daemon's JS entry point; default DAEMON_MAIN (the built `updraft` CLI). */
  main?: string;
  /** Node.js flags before the entry point; default DAEMON_NODE_FLAGS (what the `updraft` command passes). */
  nodeFlags?: readonly string[];
  /** Sent as "Authorization: Bearer TOKEN" by api() and the readiness probe ([servers.http] token). */
  apiToken?: string;
  /** A cgroup directory the daemon starts in (harness/cgroup.ts): it joins before Node.js starts. */
  cgroup?: string;
}

export interface ApiResponse {
  status: number;
  /** Parsed JSON body; null when the body is empty or not JSON. */
  json: any;
  text: string;
}

export interface Daemon {
  dir: string;
  /** Path of the written updraft.toml. */
  configPath: string;
  /** The config as written (defaults merged with overrides). */
  config: TomlTable;
  /** Pid of the current process (changes on restart). */
  readonly pid: number;
  /** NBD unix socket path. */
  socket: string;
  tcp: { host: string; port: number };
  /** e.g. http://127.0.0.1:40123 */
  httpUrl: string;
  /** nbd+unix:///NAME?socket=PATH */
  uri(name: string): string;
  /** nbd://HOST:PORT/NAME */
  tcpUri(name: string): string;
  /** JSON request against the HTTP API; body, when given, is sent as JSON. */
  api(method: string, urlPath: string, body?: unknown): Promise<ApiResponse>;
  /** SIGTERM, wait for exit (SIGKILL after 15 s); resolves to the exit code (null after a signal). */
  stop(): Promise<number | null>;
  /** SIGKILL and wait for exit: a crash. */
  kill9(): Promise<void>;
  /**
   * Stops the daemon if it runs, then starts it again on the same dir, config and ports;
   * with `env`, that replaces the options' extra environment from now on.
   */
  restart(env?: NodeJS.ProcessEnv): Promise<void>;
  /** Resolves when the process has exited (it may kill itself: UPDRAFT_CRASH_AT). */
  exited(): Promise<void>;
  /** True while the process runs. */
  readonly running: boolean;
  /** The daemon's output (stdout and stderr, across restarts; last 1 MiB). */
  log(): string;
  /** stop(), then remove dir unless UPDRAFT_KEEP_TEST_DIRS is set. */
  cleanup(): Promise<void>;
}

/** Every daemon process started and not yet seen to exit, for the exit-time safety net. */
const live = new Set<ChildProcess>();
process.on('exit', () => {
  for (const child of live) {
    if (child.pid !== undefined && child.exitCode === null && child.signalCode === null) {
      try {
        process.kill(child.pid, 'SIGKILL');
      } catch {
        // Already gone.
      }
    }
  }
});

/** A TCP port on 127.0.0.1 that was free a moment ago. */
export async function freePort(host = '127.0.0.1'): Promise<number> {
  const server = net.createServer();
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, host, resolve);
  });
  const address = server.address();
  await new Promise<void>((resolve) => server.close(() => resolve()));
  if (address === null || typeof address === 'string') throw new Error('freePort: no TCP address');
  return address.port;
}

/** A fresh directory under the OS temp dir, named PREFIX + random. */
export function scratchDir(prefix = 'updraft-test-'): Promise<string> {
  return mkdtemp(path.join(os.tmpdir(), prefix));
}

/** Removes a directory tree under the OS temp dir; refuses any other path. */
export async function removeDir(dir: string): Promise<void> {
  const resolved = path.resolve(dir);
  const tmp = path.resolve(os.tmpdir());
  if (!resolved.startsWith(tmp + path.sep)) throw new Error(`removeDir: refusing ${resolved}: not under ${tmp}`);
  await rm(resolved, { recursive: true, force: true, maxRetries: 3 });
}

function isTable(value: unknown): value is TomlTable {
  return typeof value === 'object' && value !== null && !Array.isArray(value) && !(value instanceof Date);
}

/** base with overrides merged in; neither argument is changed. */
/** A live process's resident set (VmRSS), in bytes; throws when `pid` has none (it has exited). */
export function rssBytes(pid: number): number {
  const match = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  if (match === null) throw new Error(`process ${pid} has no resident set (VmRSS)`);
  return Number(match[1]) * 1024;
}

export function mergeToml(base: TomlTable, overrides: TomlTable): TomlTable {
  const out: TomlTable = { ...base };
  for (const [key, value] of Object.entries(overrides)) {
    if (value === undefined) continue;
    if (value === null) delete out[key];
    else if (isTable(value) && isTable(out[key])) out[key] = mergeToml(out[key] as TomlTable, value);
    else out[key] = value;
  }
  return out;
}

/** Starts `updraft run` and resolves once GET /healthz answers 200. */
export async function startDaemon(opts: StartDaemonOptions = {}): Promise<Daemon> {
  const ownDir = opts.dir === undefined;
  const dir = opts.dir ?? (await scratchDir('updraft-test-'));
  const socket = path.join(dir, 'nbd.sock');
  const tcp = { host: '127.0.0.1', port: 0 };
  const configPath = path.join(dir, 'updraft.toml');
  let config: TomlTable = {};
  let httpUrl = '';
  /** Whether the config's listen addresses are the free ports picked here (not the test's own). */
  let ownPorts = false;
  const writeConfig = async () => {
    tcp.port = await freePort();
    const httpPort = await freePort();
    const nbdAddresses = [`${tcp.host}:${tcp.port}`];
    const defaults: TomlTable = {
      // Off: hundreds of test daemons would each fault in their tier (memory-bounds.test turns it on).
      cache: { dir: path.join(dir, 'cache'), disk_size_gb: 4, memory_size_gb: 0.25, memory_pretouch: false },
      storage: { url: `file://${path.join(dir, 'store')}` },
      servers: {
        nbd: { unix_socket: socket, auto_create_size_gb: 1, addresses: nbdAddresses },
        http: { address: `127.0.0.1:${httpPort}` },
      },
    };
    config = mergeToml(defaults, opts.toml ?? {});
    await writeFile(configPath, stringify(config) + '\n');
    const servers = config.servers as TomlTable | undefined;
    const httpAddress = (servers?.http as TomlTable | undefined)?.address;
    httpUrl = `http://${typeof httpAddress === 'string' ? httpAddress : `127.0.0.1:${httpPort}`}`;
    ownPorts = httpAddress === `127.0.0.1:${httpPort}` && (servers?.nbd as TomlTable | undefined)?.addresses === nbdAddresses;
  };
  await writeConfig();
  const logPath = path.join(dir, 'daemon.log');
  let env = { ...process.env, ...opts.env };
  const main = opts.main ?? DAEMON_MAIN;

  let memoryLog = '';
  let child: ChildProcess | null = null;
  let exited: Promise<void> = Promise.resolve();
  let exitCode: number | null = null;
  let logFile: WriteStream | null = null;

  const remember = (chunk: Buffer) => {
    logFile?.write(chunk);
    memoryLog += chunk.toString('utf8');
    if (memoryLog.length > LOG_MEMORY_BYTES) memoryLog = memoryLog.slice(-LOG_MEMORY_BYTES);
  };
  const logTail = (lines = 40) => memoryLog.trimEnd().split('\n').slice(-lines).join('\n');
  const isRunning = () => child !== null && child.exitCode === null && child.signalCode === null;

  const launch = async () => {
    logFile = createWriteStream(logPath, { flags: 'a' });
    // UPDRAFT_TEST_NODE_ARGS: extra node flags for every daemon (e.g. --cpu-prof to profile one test).
    const nodeArgs = [...(opts.nodeFlags ?? DAEMON_NODE_FLAGS), ...(process.env.UPDRAFT_TEST_NODE_ARGS ?? '').split(' ').filter(Boolean)];
    // UPDRAFT_TEST_CLOCK_SKEW_MS: this daemon's wall clock reads that many ms off (skewed-clock.ts).
    if (env.UPDRAFT_TEST_CLOCK_SKEW_MS !== undefined) nodeArgs.push('--import', SKEWED_CLOCK);
    const command = [process.execPath, ...nodeArgs, main, 'run', '-c', configPath];
    // In a cgroup: a shell joins it and execs Node.js, so the pid and everything it allocates are the cgroup's.
    const [file, ...args] = opts.cgroup === undefined ? command : ['/bin/sh', '-c', 'echo $$ > "$0" && exec "$@"', path.join(opts.cgroup, 'cgroup.procs'), ...command];
    const proc = spawn(file, args, {
      cwd: dir,
      env,
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    child = proc;
    live.add(proc);
    proc.stdout!.on('data', remember);
    proc.stderr!.on('data', remember);
    exited = new Promise<void>((resolve) => {
      proc.once('close', (code, signal) => {
        live.delete(proc);
        exitCode = code;
        remember(Buffer.from(`[harness] daemon pid ${proc.pid} exited: ${code === null ? signal : `code ${code}`}\n`));
        const file = logFile;
        logFile = null;
        if (file) file.end(() => resolve());
        else resolve();
      });
    });
    const spawnError = new Promise<never>((_, reject) => proc.once('error', reject));
    try {
      await Promise.race([waitHealthy(httpUrl, proc, opts.apiToken), spawnError]);
    } catch (err) {
      if (isRunning()) proc.kill('SIGKILL');
      await exited; // so the output below is complete
      throw new Error(
        `updraft daemon did not become ready (${(err as Error).message}); dir ${dir}\n--- daemon output (tail) ---\n${logTail()}`,
      );
    }
  };

  const signalAndWait = async (signal: NodeJS.Signals, graceMs: number): Promise<void> => {
    const proc = child;
    if (proc === null || !isRunning()) return;
    proc.kill(signal);
    let timer: NodeJS.Timeout | undefined;
    const late = new Promise<'late'>((resolve) => (timer = setTimeout(() => resolve('late'), graceMs)));
    const outcome = await Promise.race([exited.then(() => 'exited' as const), late]);
    clearTimeout(timer);
    if (outcome === 'late') {
      remember(Buffer.from(`[harness] daemon pid ${proc.pid} ignored ${signal} for ${graceMs} ms; SIGKILL\n`));
      proc.kill('SIGKILL');
      await exited;
    }
  };

  const daemon: Daemon = {
    dir,
    configPath,
    get config() {
      return config;
    },
    get pid() {
      return child?.pid ?? -1;
    },
    socket,
    tcp,
    get httpUrl() {
      return httpUrl;
    },
    uri: (name) => `nbd+unix:///${encodeName(name)}?socket=${encodeURIComponent(socket)}`,
    tcpUri: (name) => `nbd://${tcp.host}:${tcp.port}/${encodeName(name)}`,
    api: (method, urlPath, body) => apiCall(httpUrl, method, urlPath, body, opts.apiToken),
    async stop() {
      if (isRunning()) await signalAndWait('SIGTERM', STOP_GRACE_MS);
      else await exited;
      return exitCode;
    },
    async kill9() {
      await signalAndWait('SIGKILL', STOP_GRACE_MS);
      await exited;
    },
    async restart(extraEnv) {
      if (isRunning()) await signalAndWait('SIGTERM', STOP_GRACE_MS);
      await exited;
      if (extraEnv !== undefined) env = { ...process.env, ...extraEnv };
      await launch();
    },
    exited: () => exited,
    get running() {
      return isRunning();
    },
    log: () => memoryLog,
    async cleanup() {
      await daemon.stop();
      if (ownDir && !process.env.UPDRAFT_KEEP_TEST_DIRS) await removeDir(dir);
    },
  };

  for (let attempt = 1; ; attempt++) {
    try {
      await launch();
      return daemon;
    } catch (err) {
      // Another process took a port between freePort() and the daemon's bind (the ports
      // come from the ephemeral range outgoing connections use too): new ports, once more.
      if (attempt >= 3 || !ownPorts || !/EADDRINUSE/.test(memoryLog)) throw err;
      memoryLog += `[harness] a listen port was taken meanwhile; starting again on other ports\n`;
      await writeConfig();
    }
  }
}

/** Export names go into the URI path; keep '/' between segments. */
function encodeName(name: string): string {
  return name.split('/').map(encodeURIComponent).join('/');
}

/** The Authorization header for a token, or none. */
function authorization(token: string | undefined): Record<string, string> {
  return token === undefined ? {} : { authorization: `Bearer ${token}` };
}

async function apiCall(httpUrl: string, method: string, urlPath: string, body?: unknown, token?: string): Promise<ApiResponse> {
  const init: RequestInit = { method, signal: AbortSignal.timeout(60_000), headers: authorization(token) };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers = { ...authorization(token), 'content-type': 'application/json' };
  }
  const response = await fetch(httpUrl + urlPath, init);
  const text = await response.text();
  let json: unknown = null;
  if (text.length > 0) {
    try {
      json = JSON.parse(text);
    } catch {
      json = null;
    }
  }
  return { status: response.status, json, text };
}

/** Polls GET /healthz until 200; rejects on timeout or when the process exits first. */
async function waitHealthy(httpUrl: string, proc: ChildProcess, token: string | undefined): Promise<void> {
  const deadline = Date.now() + READY_TIMEOUT_MS;
  let lastProblem = 'no answer yet';
  while (Date.now() < deadline) {
    if (proc.exitCode !== null || proc.signalCode !== null) {
      throw new Error(`daemon exited early with ${proc.exitCode ?? proc.signalCode}`);
    }
    try {
      const response = await fetch(`${httpUrl}/healthz`, { signal: AbortSignal.timeout(1000), headers: authorization(token) });
      await response.arrayBuffer();
      if (response.status === 200) return;
      lastProblem = `GET /healthz answered ${response.status}`;
    } catch (err) {
      lastProblem = `GET /healthz: ${(err as Error).message}`;
    }
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  throw new Error(`not healthy after ${READY_TIMEOUT_MS} ms: ${lastProblem}`);
}

/**
 * Asserts that a daemon with `toml` (started in `cgroup`, if given) exits at start-up, its
 * output holding every string of `mentions`. One that starts is stopped before the test fails.
 */
export async function assertRefusesToStart(toml: TomlTable, mentions: string[], prefix = 'updraft-start-', cgroup?: string): Promise<void> {
  const dir = await scratchDir(prefix);
  try {
    let started: Daemon;
    try {
      started = await startDaemon({ dir, toml, cgroup });
    } catch (err) {
      const message = (err as Error).message;
      assert.match(message, /daemon exited early/, message);
      for (const text of mentions) assert.ok(message.includes(text), `start-up failure does not mention ${JSON.stringify(text)}:\n${message}`);
      return;
    }
    await started.stop();
    assert.fail(`the daemon started; its output:\n${started.log()}`);
  } finally {
    await removeDir(dir);
  }
}
