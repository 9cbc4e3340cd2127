// External tools for integration tests: find them, skip or fail without them, run them
// with a hard time limit.
//
// A missing tool skips the test on a developer's machine and fails it under CI
// (process.env.CI set), so a CI run can never pass by skipping what it was meant to prove.

import { spawn } from 'node:child_process';
import { accessSync, constants } from 'node:fs';
import path from 'node:path';
import type { TestContext } from 'node:test';

/** A command the tests run, and the Debian package that ships it. */
export interface ToolSpec {
  cmd: string;
  pkg: string;
}

/** The tools the integration tests use, by command name. */
export const TOOLS = {
  nbdinfo: { cmd: 'nbdinfo', pkg: 'libnbd-bin' },
  nbdcopy: { cmd: 'nbdcopy', pkg: 'libnbd-bin' },
  nbdfuse: { cmd: 'nbdfuse', pkg: 'libnbd-bin' },
  nbdsh: { cmd: 'nbdsh', pkg: 'python3-libnbd' },
  nbdkit: { cmd: 'nbdkit', pkg: 'nbdkit' },
  fio: { cmd: 'fio', pkg: 'fio' },
  qemuImg: { cmd: 'qemu-img', pkg: 'qemu-utils' },
  qemuSystem: { cmd: 'qemu-system-x86_64', pkg: 'qemu-system-x86' },
  debugfs: { cmd: 'debugfs', pkg: 'e2fsprogs' },
  mke2fs: { cmd: 'mke2fs', pkg: 'e2fsprogs' },
  mkfsExt4: { cmd: 'mkfs.ext4', pkg: 'e2fsprogs' },
  e2fsck: { cmd: 'e2fsck', pkg: 'e2fsprogs' },
  fusermount3: { cmd: 'fusermount3', pkg: 'fuse3' },
  losetup: { cmd: 'losetup', pkg: 'util-linux' },
  fincore: { cmd: 'fincore', pkg: 'util-linux' },
  dd: { cmd: 'dd', pkg: 'coreutils' },
  mount: { cmd: 'mount', pkg: 'mount' },
  openssl: { cmd: 'openssl', pkg: 'openssl' },
  ss: { cmd: 'ss', pkg: 'iproute2' },
} as const satisfies Record<string, ToolSpec>;

// losetup, mkfs.ext4 and friends live in sbin, which a non-login shell's PATH may lack.
// Appending (not prepending) keeps whatever the caller chose first.
for (const dir of ['/usr/local/sbin', '/usr/sbin', '/sbin']) {
  const parts = (process.env.PATH ?? '').split(path.delimiter).filter(Boolean);
  if (!parts.includes(dir)) process.env.PATH = [...parts, dir].join(path.delimiter);
}

/** The absolute path of `cmd` found on PATH, or null. */
export function which(cmd: string): string | null {
  if (cmd.includes('/')) return isExecutable(cmd) ? cmd : null;
  for (const dir of (process.env.PATH ?? '').split(path.delimiter)) {
    if (!dir) continue;
    const candidate = path.join(dir, cmd);
    if (isExecutable(candidate)) return candidate;
  }
  return null;
}

function isExecutable(file: string): boolean {
  try {
    accessSync(file, constants.X_OK);
    return true;
  } catch {
    return false;
  }
}

/**
 * True when every tool is on PATH. Otherwise: under CI throws (the test fails, naming
 * the command and its Debian package); elsewhere skips the test and returns false, and
 * the caller returns at once.
 */
export function requireTools(t: TestContext, tools: ToolSpec[]): boolean {
  const missing = tools.filter((tool) => which(tool.cmd) === null);
  if (missing.length === 0) return true;
  const what = missing.map((tool) => `${tool.cmd} (Debian package ${tool.pkg})`).join(', ');
  return refuse(t, `needs ${what}`);
}

/** True when running as root (losetup, mount, /dev/nbd*); same skip/fail rule as requireTools. */
export function requireRoot(t: TestContext, why: string): boolean {
  if (typeof process.getuid === 'function' && process.getuid() === 0) return true;
  return refuse(t, `needs root: ${why}`);
}

function refuse(t: TestContext, reason: string): false {
  if (process.env.CI) throw new Error(`${reason} (CI is set, so this is a failure, not a skip)`);
  t.skip(reason);
  return false;
}

export interface RunOptions {
  /** Hard limit; the child (and its process group) is SIGKILLed when it expires. */
  timeoutMs: number;
  /** Written to the child's stdin, which is then closed. Without it stdin is /dev/null. */
  input?: string | Buffer;
  /** The child's whole environment (default: this process's). */
  env?: NodeJS.ProcessEnv;
  cwd?: string;
}

export interface RunResult {
  /** Exit code, or null when the child died of a signal. */
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  /** stdout as raw bytes, for tools that print binary data. */
  stdoutBytes: Buffer;
  /** True when the child was killed because timeoutMs expired. */
  timedOut: boolean;
}

/**
 * Runs `cmd args` and resolves when it exits, whatever the exit code. Rejects only when
 * it cannot be started (e.g. ENOENT). The child leads its own process group, so a
 * timeout kills it together with anything it forked.
 */
export function run(cmd: string, args: readonly string[], opts: RunOptions): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, {
      cwd: opts.cwd,
      env: opts.env ?? process.env,
      stdio: [opts.input === undefined ? 'ignore' : 'pipe', 'pipe', 'pipe'],
      detached: true,
    });
    const stdout: Buffer[] = [];
    const stderr: Buffer[] = [];
    let timedOut = false;
    child.stdout!.on('data', (chunk: Buffer) => stdout.push(chunk));
    child.stderr!.on('data', (chunk: Buffer) => stderr.push(chunk));
    const timer = setTimeout(() => {
      timedOut = true;
      killTree(child.pid);
    }, opts.timeoutMs);
    child.once('error', (err) => {
      clearTimeout(timer);
      reject(new Error(`${commandLine(cmd, args)}: ${err.message}`, { cause: err }));
    });
    child.once('close', (code, signal) => {
      clearTimeout(timer);
      const stdoutBytes = Buffer.concat(stdout);
      resolve({
        code,
        signal,
        stdout: stdoutBytes.toString('utf8'),
        stderr: Buffer.concat(stderr).toString('utf8'),
        stdoutBytes,
        timedOut,
      });
    });
    if (opts.input !== undefined && child.stdin) {
      // A child that exits without reading its input must not crash the test with EPIPE.
      child.stdin.on('error', () => {});
      child.stdin.end(opts.input);
    }
  });
}

/** Like run(), but throws unless the command exits 0 within its time limit. */
export async function runOk(cmd: string, args: readonly string[], opts: RunOptions): Promise<RunResult> {
  const result = await run(cmd, args, opts);
  if (result.code !== 0 || result.timedOut) {
    const how = result.timedOut
      ? `timed out after ${opts.timeoutMs} ms`
      : result.code === null
        ? `died of ${result.signal}`
        : `exited ${result.code}`;
    throw new Error(`${commandLine(cmd, args)} ${how}\n--- stderr (tail) ---\n${tail(result.stderr, 20)}`);
  }
  return result;
}

/** The command as a shell would show it, for error messages. */
export function commandLine(cmd: string, args: readonly string[]): string {
  return [cmd, ...args].map((word) => (/^[\w@%+=:,./-]+$/.test(word) ? word : `'${word.replace(/'/g, `'\\''`)}'`)).join(' ');
}

/** The last `lines` lines of `text`. */
export function tail(text: string, lines: number): string {
  const all = text.trimEnd().split('\n');
  return all.slice(-lines).join('\n');
}

/** SIGKILL a child we started, and its process group when it leads one. */
export function killTree(pid: number | undefined): void {
  if (pid === undefined) return;
  try {
    process.kill(-pid, 'SIGKILL');
  } catch {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      // Already gone.
    }
  }
}
