// The steps shared by the disks the tests build from nbdkit (failing-disk.ts,
// power-cut-disk.ts): an NBD disk as a file through nbdfuse, that file as a loop device,
// ext4 mounted on it. Every process is started with its output kept and stopped by pid;
// every step done is undone, last first.

import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import type { TestContext } from 'node:test';
import { TOOLS, requireRoot, requireTools, run, runOk, tail } from './tools.js';

const STEP_TIMEOUT_MS = 60_000;

/** Whether this machine can build an nbdkit disk; skips (or fails under CI) the test when not. */
export function canMountNbdDisks(t: TestContext): boolean {
  return (
    requireRoot(t, 'losetup and mount of an nbdkit disk') &&
    requireTools(t, [TOOLS.nbdkit, TOOLS.nbdfuse, TOOLS.fusermount3, TOOLS.losetup, TOOLS.mkfsExt4, TOOLS.mount])
  );
}

function isMounted(dir: string): boolean {
  const target = path.resolve(dir);
  return readFileSync('/proc/self/mounts', 'utf8')
    .split('\n')
    .some((line) => line.split(' ')[1] === target);
}

async function waitFor(what: string, check: () => boolean): Promise<void> {
  const deadline = Date.now() + STEP_TIMEOUT_MS;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 25));
  }
}

function stopChild(child: ChildProcess, signal: NodeJS.Signals = 'SIGTERM'): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve();
  const closed = new Promise<void>((resolve) => child.once('close', () => resolve()));
  child.kill(signal);
  const timer = setTimeout(() => child.kill('SIGKILL'), 10_000);
  return closed.finally(() => clearTimeout(timer));
}

/** The steps of one disk: each one done pushes its undo. */
export class DiskSteps {
  private readonly undo: Array<() => Promise<void>> = [];
  private readonly output: string[] = [];
  private nbdkit: ChildProcess | undefined;

  /** `cwd` is the disk's scratch folder: anything a process leaves behind goes with it. */
  constructor(private readonly cwd: string) {}

  private start(cmd: string, args: string[], env?: NodeJS.ProcessEnv): ChildProcess {
    const child = spawn(cmd, args, { cwd: this.cwd, env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
    child.stdout!.on('data', (chunk: Buffer) => this.output.push(chunk.toString()));
    child.stderr!.on('data', (chunk: Buffer) => this.output.push(chunk.toString()));
    child.once('error', (err) => this.output.push(`${cmd}: ${err.message}\n`));
    return child;
  }

  private async started(what: string, child: ChildProcess, ready: string): Promise<void> {
    await waitFor(`${what} to start`, () => {
      if (child.exitCode !== null || child.signalCode !== null) throw new Error(`${what} exited early: ${tail(this.output.join(''), 10)}`);
      return existsSync(ready);
    });
  }

  /** nbdkit in the foreground serving `args` (filters, plugin, parameters) on `socket`. */
  async serve(socket: string, args: string[], env?: NodeJS.ProcessEnv): Promise<void> {
    const nbdkit = this.start('nbdkit', ['-f', '-U', socket, ...args], env);
    this.nbdkit = nbdkit;
    this.undo.push(() => stopChild(nbdkit));
    await this.started('nbdkit', nbdkit, socket);
  }

  /** SIGKILL nbdkit: whatever it holds and has not written to its plugin is gone. */
  killServer(): Promise<void> {
    if (this.nbdkit === undefined) return Promise.resolve();
    return stopChild(this.nbdkit, 'SIGKILL');
  }

  /** The disk on `socket` as a file in `fuseDir` (nbdfuse), attached as a loop device; returns its path. */
  async attach(socket: string, fuseDir: string): Promise<string> {
    await fsp.mkdir(fuseDir);
    const file = path.join(fuseDir, 'disk');
    const nbdfuse = this.start('nbdfuse', [file, '--unix', socket]);
    this.undo.push(async () => {
      if (isMounted(fuseDir)) await run('fusermount3', ['-u', fuseDir], { timeoutMs: STEP_TIMEOUT_MS });
      await stopChild(nbdfuse);
    });
    await this.started('nbdfuse', nbdfuse, file);
    const loop = (await runOk('losetup', ['--find', '--show', '--direct-io=off', file], { timeoutMs: STEP_TIMEOUT_MS })).stdout.trim();
    this.undo.push(async () => {
      await runOk('losetup', ['-d', loop], { timeoutMs: STEP_TIMEOUT_MS });
      // A busy loop device is only marked to detach; it stays bound while a mount holds it.
      await waitFor(`${loop} to detach`, () => !existsSync(path.join('/sys/block', path.basename(loop), 'loop')));
    });
    return loop;
  }

  /** mkfs.ext4 with `mkfsArgs` on `loop`. */
  async format(loop: string, mkfsArgs: string[]): Promise<void> {
    await runOk('mkfs.ext4', ['-q', '-F', ...mkfsArgs, loop], { timeoutMs: STEP_TIMEOUT_MS });
  }

  /** Mounts the ext4 on `loop` at `mountDir` with `options`. */
  async mount(loop: string, mountDir: string, options: string): Promise<void> {
    await runOk('mount', ['-t', 'ext4', '-o', options, loop, mountDir], { timeoutMs: STEP_TIMEOUT_MS });
    this.undo.push(async () => {
      if (!isMounted(mountDir)) return;
      const result = await run('umount', [mountDir], { timeoutMs: STEP_TIMEOUT_MS });
      if (result.code !== 0 && isMounted(mountDir)) await runOk('umount', ['-l', mountDir], { timeoutMs: STEP_TIMEOUT_MS });
    });
  }

  /** Detaches `mountDir` at once; the filesystem goes when nothing holds it any more. */
  async unmountLazily(mountDir: string): Promise<void> {
    if (isMounted(mountDir)) await runOk('umount', ['-l', mountDir], { timeoutMs: STEP_TIMEOUT_MS });
  }

  /** Undoes every step done, last first; throws naming every step that failed. */
  async undoAll(what: string): Promise<void> {
    const problems: string[] = [];
    while (this.undo.length > 0) {
      try {
        await this.undo.pop()!();
      } catch (err) {
        problems.push((err as Error).message);
      }
    }
    if (problems.length > 0) throw new Error(`${what}: ${problems.join('; ')}`);
  }
}
