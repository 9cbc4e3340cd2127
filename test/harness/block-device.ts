// A volume as a Linux block device with a filesystem on it: nbdfuse exposes the export as
// a file, a loop device turns that into a block device, and ext4 is made and mounted on
// it. Every step registers its undo, so a failure anywhere leaves nothing mounted.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync, readFileSync, statSync } from 'node:fs';
import path from 'node:path';
import { run, runOk, tail } from './tools.js';

/** Cleanup steps, undone in reverse order; a step done on the normal path is dropped. */
export class Undo {
  private steps: Array<{ what: string; fn: () => Promise<void> }> = [];

  /** Registers fn; the returned function runs it now (once) and forgets it. */
  push(what: string, fn: () => Promise<void>): () => Promise<void> {
    const step = { what, fn };
    this.steps.push(step);
    return async () => {
      const at = this.steps.indexOf(step);
      if (at < 0) return;
      this.steps.splice(at, 1);
      await fn();
    };
  }

  /** Runs every step left, last first; failures are collected, not thrown. */
  async runAll(): Promise<string[]> {
    const problems: string[] = [];
    while (this.steps.length > 0) {
      const step = this.steps.pop()!;
      try {
        await step.fn();
      } catch (err) {
        problems.push(`${step.what}: ${(err as Error).message}`);
      }
    }
    return problems;
  }
}

export function isMounted(dir: string): boolean {
  const target = path.resolve(dir);
  return readFileSync('/proc/self/mounts', 'utf8')
    .split('\n')
    .some((line) => line.split(' ')[1]?.replace(/\\040/g, ' ') === target);
}

export function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

async function waitUntil(what: string, timeoutMs: number, check: () => boolean | Promise<boolean>): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (await check()) return;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 25));
  }
}

export interface Attached {
  /** The block device, e.g. /dev/loop3. */
  loop: string;
  /** Detach the loop device, then unmount the FUSE file and stop nbdfuse (by pid). */
  detach(): Promise<void>;
}

/**
 * nbdfuse FUSEDIR/ URI (exposes FUSEDIR/nbd), then a loop device on that file. Every
 * step registers its undo in `undo`, so a failure anywhere leaves nothing behind.
 */
export async function attach(uri: string, size: number, fuseDir: string, undo: Undo): Promise<Attached> {
  const pidfile = path.join(path.dirname(fuseDir), `nbdfuse-${Date.now()}.pid`);
  const child = spawn('nbdfuse', ['-P', pidfile, fuseDir + '/', uri], { stdio: ['ignore', 'pipe', 'pipe'] });
  let output = '';
  child.stdout!.on('data', (chunk: Buffer) => (output += chunk.toString('utf8')));
  child.stderr!.on('data', (chunk: Buffer) => (output += chunk.toString('utf8')));
  const exited = new Promise<void>((resolve) => child.once('close', () => resolve()));
  const spawnError = new Promise<never>((_, reject) => child.once('error', reject));
  // nbdfuse stays in the foreground; the pidfile names the process that serves the mount.
  let pid = child.pid ?? -1;

  const stopFuse = undo.push(`stop nbdfuse on ${fuseDir}`, async () => {
    if (isMounted(fuseDir)) {
      const result = await run('fusermount3', ['-u', fuseDir], { timeoutMs: 60_000 });
      if (result.code !== 0 && isMounted(fuseDir)) {
        // Busy or dead: detach lazily so nothing stays mounted under the test dir.
        await run('fusermount3', ['-u', '-z', fuseDir], { timeoutMs: 30_000 });
      }
    }
    const pids = new Set([pid, child.pid ?? -1].filter((p) => p > 0));
    const gone = () => [...pids].every((p) => !processAlive(p));
    try {
      await waitUntil('nbdfuse to exit after fusermount3 -u', 30_000, gone);
    } catch {
      for (const p of pids) if (processAlive(p)) process.kill(p, 'SIGTERM');
      try {
        await waitUntil('nbdfuse to exit after SIGTERM', 5000, gone);
      } catch {
        for (const p of pids) if (processAlive(p)) process.kill(p, 'SIGKILL');
      }
    }
    if (child.exitCode === null && child.signalCode === null) await exited;
    if (isMounted(fuseDir)) throw new Error(`${fuseDir} is still mounted`);
  });

  const file = path.join(fuseDir, 'nbd');
  await Promise.race([
    spawnError,
    waitUntil(`nbdfuse to expose ${file}`, 30_000, () => {
      if (child.exitCode !== null || child.signalCode !== null) {
        throw new Error(`nbdfuse exited early (${child.exitCode ?? child.signalCode}): ${tail(output, 20)}`);
      }
      return existsSync(pidfile) && readFileSync(pidfile, 'utf8').trim() !== '' && existsSync(file);
    }),
  ]);
  pid = Number(readFileSync(pidfile, 'utf8').trim()) || pid;
  assert.equal(statSync(file).size, size, 'nbdfuse file size is the volume size');

  const loop = (await runOk('losetup', ['--find', '--show', '--direct-io=off', file], { timeoutMs: 30_000 })).stdout.trim();
  assert.match(loop, /^\/dev\/loop\d+$/, 'losetup printed the loop device');
  const detachLoop = undo.push(`losetup -d ${loop}`, async () => {
    await runOk('losetup', ['-d', loop], { timeoutMs: 60_000 });
  });

  return {
    loop,
    async detach() {
      await detachLoop();
      await stopFuse();
    },
  };
}

export async function mount(device: string, dir: string, undo: Undo, readOnly: boolean): Promise<() => Promise<void>> {
  await runOk('mount', ['-t', 'ext4', ...(readOnly ? ['-o', 'ro'] : []), device, dir], { timeoutMs: 60_000 });
  return undo.push(`umount ${dir}`, async () => {
    if (!isMounted(dir)) return;
    const result = await run('umount', [dir], { timeoutMs: 120_000 });
    if (result.code !== 0 && isMounted(dir)) {
      await run('umount', ['-l', dir], { timeoutMs: 30_000 });
      throw new Error(`umount ${dir} failed (${result.code}); lazily unmounted: ${tail(result.stderr, 5)}`);
    }
  });
}

/** e2fsck -fn: forced full check, no changes. Exit 0 means clean. */
export async function fsckClean(device: string, when: string): Promise<void> {
  const result = await run('e2fsck', ['-fn', device], { timeoutMs: 180_000 });
  assert.ok(
    result.code === 0 && !result.timedOut,
    `e2fsck -fn ${device} ${when}: exit ${result.code}${result.timedOut ? ' (timed out)' : ''}\n` +
      `${tail(result.stdout, 30)}\n${tail(result.stderr, 10)}`,
  );
}

