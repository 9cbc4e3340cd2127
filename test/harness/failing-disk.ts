// A real ext4 filesystem on a disk that fails writes on command, for tests of what the
// daemon does when fdatasync fails (DESIGN.md invariant 1).
//
//   nbdkit memory + error filter  -> an NBD disk whose writes fail with EIO while a
//                                    trigger file exists (error-file=)
//   nbdfuse                        -> that disk as a file
//   losetup + mkfs.ext4 + mount    -> ext4 on it, no fs journal, errors=continue, so a
//                                    failed write leaves the filesystem writable and the
//                                    kernel behaves as it does for a data write error on
//                                    any disk: fdatasync reports EIO once, the dirty pages
//                                    are dropped, and the next fdatasync succeeds.
//
// Every process is started here and stopped by pid; stop() undoes every step that was done.

import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import type { TestContext } from 'node:test';
import { removeDir, scratchDir } from './daemon.js';
import { TOOLS, requireRoot, requireTools, run, runOk, tail } from './tools.js';

const STEP_TIMEOUT_MS = 60_000;

export interface FailingDisk {
  /** The mounted filesystem's folder. */
  mountDir: string;
  /** Writes to the disk fail with EIO from now on. */
  fail(): Promise<void>;
  /** Writes succeed again. */
  heal(): Promise<void>;
  /** Unmount, detach, stop nbdfuse and nbdkit (by pid), remove the scratch folder. */
  stop(): Promise<void>;
}

/** Whether this machine can build a failing disk; skips (or fails under CI) the test when not. */
export function canFailDisks(t: TestContext): boolean {
  return (
    requireRoot(t, 'losetup and mount of a failing disk') &&
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

function stopChild(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve();
  const closed = new Promise<void>((resolve) => child.once('close', () => resolve()));
  child.kill('SIGTERM');
  const timer = setTimeout(() => child.kill('SIGKILL'), 10_000);
  return closed.finally(() => clearTimeout(timer));
}

/** Builds a `sizeMiB` failing disk with ext4 mounted on it. */
export async function startFailingDisk(sizeMiB = 256): Promise<FailingDisk> {
  const dir = await scratchDir('updraft-failing-disk-');
  const socket = path.join(dir, 'nbdkit.sock');
  const trigger = path.join(dir, 'fail-writes');
  const fuseDir = path.join(dir, 'fuse');
  const mountDir = path.join(dir, 'mnt');
  await fsp.mkdir(fuseDir);
  await fsp.mkdir(mountDir);
  const undo: Array<() => Promise<void>> = [];
  const output: string[] = [];
  const start = (cmd: string, args: string[]): ChildProcess => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    child.stdout!.on('data', (chunk: Buffer) => output.push(chunk.toString()));
    child.stderr!.on('data', (chunk: Buffer) => output.push(chunk.toString()));
    child.once('error', (err) => output.push(`${cmd}: ${err.message}\n`));
    return child;
  };
  const stop = async () => {
    const problems: string[] = [];
    while (undo.length > 0) {
      try {
        await undo.pop()!();
      } catch (err) {
        problems.push((err as Error).message);
      }
    }
    await removeDir(dir);
    if (problems.length > 0) throw new Error(`failing disk teardown: ${problems.join('; ')}`);
  };
  try {
    const nbdkit = start('nbdkit', ['-f', '-U', socket, '--filter=error', 'memory', `${sizeMiB}M`, 'error=EIO', 'error-pwrite-rate=1', `error-file=${trigger}`]);
    undo.push(() => stopChild(nbdkit));
    await waitFor('nbdkit to listen', () => {
      if (nbdkit.exitCode !== null) throw new Error(`nbdkit exited early: ${tail(output.join(''), 10)}`);
      return existsSync(socket);
    });
    const file = path.join(fuseDir, 'disk');
    const nbdfuse = start('nbdfuse', [file, '--unix', socket]);
    undo.push(async () => {
      if (isMounted(fuseDir)) await run('fusermount3', ['-u', fuseDir], { timeoutMs: STEP_TIMEOUT_MS });
      await stopChild(nbdfuse);
    });
    await waitFor('nbdfuse to expose the disk', () => {
      if (nbdfuse.exitCode !== null) throw new Error(`nbdfuse exited early: ${tail(output.join(''), 10)}`);
      return existsSync(file);
    });
    const loop = (await runOk('losetup', ['--find', '--show', '--direct-io=off', file], { timeoutMs: STEP_TIMEOUT_MS })).stdout.trim();
    undo.push(async () => {
      await runOk('losetup', ['-d', loop], { timeoutMs: STEP_TIMEOUT_MS });
    });
    await runOk('mkfs.ext4', ['-q', '-F', '-O', '^has_journal', loop], { timeoutMs: STEP_TIMEOUT_MS });
    await runOk('mount', ['-t', 'ext4', '-o', 'errors=continue', loop, mountDir], { timeoutMs: STEP_TIMEOUT_MS });
    undo.push(async () => {
      const result = await run('umount', [mountDir], { timeoutMs: STEP_TIMEOUT_MS });
      if (result.code !== 0 && isMounted(mountDir)) await runOk('umount', ['-l', mountDir], { timeoutMs: STEP_TIMEOUT_MS });
    });
  } catch (err) {
    await stop().catch(() => undefined);
    throw err;
  }
  return {
    mountDir,
    fail: () => fsp.writeFile(trigger, ''),
    heal: () => fsp.rm(trigger, { force: true }),
    stop,
  };
}
