// A real ext4 filesystem on a disk with a volatile write cache, for tests of what survives
// a power cut (DESIGN.md invariant 1).
//
//   nbdkit file + cache filter  -> an NBD disk over a backing file; cache=writeback keeps
//                                  writes in nbdkit's memory-backed temp file until the
//                                  client flushes, so a SIGKILL of nbdkit loses exactly
//                                  what was never flushed, as a power cut loses a disk's
//                                  write cache
//   nbdfuse                      -> that disk as a file; its fsync is an NBD flush
//   losetup + mkfs.ext4 + mount  -> ext4 with its journal (metadata survives the cut by
//                                  journal recovery); the loop device turns the
//                                  filesystem's flushes into fsyncs of the nbdfuse file
//
// cut() loses the disk's cache and the kernel's page cache of the filesystem; restart()
// serves the same backing file again through a new nbdfuse file and loop device and mounts
// it, so nothing but what reached the backing file is seen. Every process is stopped by
// pid (nbd-disk.ts); stop() undoes every step that was done.

import fsp from 'node:fs/promises';
import path from 'node:path';
import { removeDir, scratchDir } from './daemon.js';
import { DiskSteps } from './nbd-disk.js';

/**
 * A journal commit every 5 s (the default) would flush the disk's cache on its own; 300 s
 * leaves a test's flushes to the fsyncs it makes.
 */
const MOUNT_OPTIONS = 'commit=300';

export interface PowerCutDisk {
  /** The mounted filesystem's folder (the same across cuts). */
  mountDir: string;
  /**
   * Cut the power: SIGKILL nbdkit (its unflushed writes are lost), unmount the filesystem
   * lazily, detach the loop device, stop nbdfuse. Every process using mountDir must be
   * stopped first, or the old filesystem is never let go.
   */
  cut(): Promise<void>;
  /** Power on after cut(): serve the backing file again and mount it (the ext4 journal recovers). */
  restart(): Promise<void>;
  /** Unmount, detach, stop nbdfuse and nbdkit (by pid), remove the scratch folder. */
  stop(): Promise<void>;
}

/** Builds a `sizeMiB` disk with a write cache and ext4 mounted on it. */
export async function startPowerCutDisk(sizeMiB = 256): Promise<PowerCutDisk> {
  const dir = await scratchDir('updraft-power-cut-disk-');
  const backing = path.join(dir, 'disk.img');
  const mountDir = path.join(dir, 'mnt');
  await fsp.mkdir(mountDir);
  await fsp.writeFile(backing, '');
  await fsp.truncate(backing, sizeMiB * 1024 * 1024);
  // One set of steps per power-on, each with its own socket and nbdfuse file.
  let steps: DiskSteps | undefined;
  let powerOns = 0;
  const powerOn = async (format: boolean) => {
    powerOns++;
    steps = new DiskSteps(dir);
    const socket = path.join(dir, `nbdkit-${powerOns}.sock`);
    // The cache filter keeps its blocks in a temp file under TMPDIR.
    await steps.serve(socket, ['--filter=cache', 'file', backing, 'cache=writeback'], { TMPDIR: dir });
    const loop = await steps.attach(socket, path.join(dir, `fuse-${powerOns}`));
    // 4 KiB blocks like a real disk; inode tables and journal zeroed now, not by a background thread.
    if (format) await steps.format(loop, ['-b', '4096', '-E', 'lazy_itable_init=0,lazy_journal_init=0']);
    await steps.mount(loop, mountDir, MOUNT_OPTIONS);
  };
  const powerOff = async (what: string) => {
    const current = steps;
    steps = undefined;
    await current?.undoAll(what);
  };
  const stop = async () => {
    try {
      await powerOff('power cut disk teardown');
    } finally {
      await removeDir(dir);
    }
  };
  try {
    await powerOn(true);
  } catch (err) {
    await stop().catch(() => undefined);
    throw err;
  }
  return {
    mountDir,
    async cut() {
      if (steps === undefined) throw new Error('power cut disk: cut() while the power is off');
      await steps.killServer();
      await steps.unmountLazily(mountDir);
      // Detaching waits until the loop device is unbound: the old filesystem and its page cache are gone.
      await powerOff('power cut');
    },
    async restart() {
      if (steps !== undefined) throw new Error('power cut disk: restart() while the power is on');
      try {
        await powerOn(false);
      } catch (err) {
        await powerOff('power cut disk restart').catch(() => undefined);
        throw err;
      }
    },
    stop,
  };
}
