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
// Every process is stopped by pid (nbd-disk.ts); stop() undoes every step that was done.

import fsp from 'node:fs/promises';
import path from 'node:path';
import { removeDir, scratchDir } from './daemon.js';
import { DiskSteps } from './nbd-disk.js';

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

/** Builds a `sizeMiB` failing disk with ext4 mounted on it. */
export async function startFailingDisk(sizeMiB = 256): Promise<FailingDisk> {
  const dir = await scratchDir('updraft-failing-disk-');
  const socket = path.join(dir, 'nbdkit.sock');
  const trigger = path.join(dir, 'fail-writes');
  const mountDir = path.join(dir, 'mnt');
  await fsp.mkdir(mountDir);
  const steps = new DiskSteps(dir);
  const stop = async () => {
    try {
      await steps.undoAll('failing disk teardown');
    } finally {
      await removeDir(dir);
    }
  };
  try {
    await steps.serve(socket, ['--filter=error', 'memory', `${sizeMiB}M`, 'error=EIO', 'error-pwrite-rate=1', `error-file=${trigger}`]);
    const loop = await steps.attach(socket, path.join(dir, 'fuse'));
    await steps.format(loop, ['-O', '^has_journal']);
    await steps.mount(loop, mountDir, 'errors=continue');
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
