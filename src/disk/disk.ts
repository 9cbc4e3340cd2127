// Every file operation of the engine (volume/, blocks/, store/pack-index, host/) goes
// through this one small interface, so that a simulation can replace the disk with one
// that loses what was not synced at a power cut (the way SQLite's crash tests swap the
// VFS). The real one is node:fs itself: the synchronous calls stay synchronous (the
// request path's pread/pwrite), the syncs stay on the thread pool.
import fs from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
import { readNowSync } from './nowait.js';

/** A directory entry as readdir with file types returns it. */
export interface DiskEntry {
  name: string;
  isDirectory(): boolean;
}

/** The file operations the engine uses; each behaves like the node:fs call of its name. */
export interface Disk {
  openSync(path: string, flags: string): number;
  /** An existing file opened for writes that bypass the page cache (O_DIRECT), or undefined where that is refused. */
  openDirectSync(path: string): number | undefined;
  closeSync(fd: number): void;
  /** pread: bytes read, 0 at the end of the file. */
  readSync(fd: number, buffer: Buffer, offset: number, length: number, position: number): number;
  /** readSync, or undefined where the range is not all in the page cache (disk/nowait.ts). */
  readNowSync(fd: number, buffer: Buffer, offset: number, length: number, position: number): number | undefined;
  /** pwrite of a buffer range, or of a whole string at the file position. */
  writeSync(fd: number, buffer: Buffer | string, offset?: number, length?: number, position?: number): number;
  /** pwritev: bytes written. */
  writevSync(fd: number, buffers: readonly Buffer[], position: number): number;
  fstatSync(fd: number): { size: number };
  ftruncateSync(fd: number, length: number): void;
  /** fsync of a file or of a directory (which makes its creates, renames and unlinks durable). */
  fsyncSync(fd: number): void;
  readFileSync(path: string): Buffer;
  readFileSync(path: string, encoding: 'utf8'): string;
  writeFileSync(path: string, data: string | Buffer): void;
  renameSync(from: string, to: string): void;
  rmSync(path: string, options?: { recursive?: boolean; force?: boolean }): void;
  mkdirSync(path: string, options?: { recursive?: boolean }): void;
  existsSync(path: string): boolean;
  readdirSync(path: string, options: { withFileTypes: true }): DiskEntry[];
  fdatasync(fd: number): Promise<void>;
  fsync(fd: number): Promise<void>;
  read(fd: number, buffer: Buffer, offset: number, length: number, position: number): Promise<{ bytesRead: number }>;
  write(fd: number, buffer: Buffer, offset: number, length: number, position: number): Promise<{ bytesWritten: number }>;
  writev(fd: number, buffers: Buffer[], position: number): Promise<{ bytesWritten: number }>;
}

const fsyncAsync = promisify(fs.fsync);

/** node:fs, unchanged. */
export const nodeDisk: Disk = {
  openSync: (p, flags) => fs.openSync(p, flags),
  openDirectSync: (p) => {
    const direct = fs.constants.O_DIRECT;
    if (direct === undefined) return undefined;
    try {
      return fs.openSync(p, fs.constants.O_WRONLY | direct);
    } catch {
      return undefined; // tmpfs and some others: the buffered descriptor does
    }
  },
  closeSync: fs.closeSync,
  readSync: (fd, buffer, offset, length, position) => fs.readSync(fd, buffer, offset, length, position),
  readNowSync,
  writeSync: fs.writeSync as Disk['writeSync'],
  writevSync: fs.writevSync as Disk['writevSync'],
  fstatSync: (fd) => fs.fstatSync(fd),
  ftruncateSync: fs.ftruncateSync,
  fsyncSync: fs.fsyncSync,
  readFileSync: fs.readFileSync as Disk['readFileSync'],
  writeFileSync: (p, data) => fs.writeFileSync(p, data),
  renameSync: fs.renameSync,
  rmSync: fs.rmSync,
  mkdirSync: (p, options) => void fs.mkdirSync(p, options),
  existsSync: fs.existsSync,
  readdirSync: (p, options) => fs.readdirSync(p, options),
  fdatasync: promisify(fs.fdatasync),
  fsync: fsyncAsync,
  read: promisify(fs.read) as Disk['read'],
  write: promisify(fs.write) as Disk['write'],
  writev: promisify(fs.writev) as Disk['writev'],
};

/** The disk every engine module uses; node:fs unless a simulation installed its own. */
export let disk: Disk = nodeDisk;

/** Replace the disk (the simulation); returns the one it replaced. */
export function useDisk(next: Disk): Disk {
  const previous = disk;
  disk = next;
  return previous;
}

/** fsync a file or directory by path (a directory: its creates, renames and unlinks become durable). */
export async function fsyncPath(file: string): Promise<void> {
  const fd = disk.openSync(file, 'r');
  try {
    await disk.fsync(fd);
  } finally {
    disk.closeSync(fd);
  }
}

/** fsync a directory, so that its creates, renames and unlinks are durable. */
export function syncDirSync(dir: string): void {
  const fd = disk.openSync(dir, 'r');
  try {
    disk.fsyncSync(fd);
  } finally {
    disk.closeSync(fd);
  }
}

/**
 * Replace `file` with `body`, atomically and durably: a temporary file written and
 * fsynced, renamed over it, and its folder fsynced. A crash leaves the old or the new
 * file, never a part of one.
 */
export function replaceFileSync(file: string, body: Buffer | string): void {
  const tmp = `${file}.tmp`;
  const fd = disk.openSync(tmp, 'w');
  try {
    const bytes = typeof body === 'string' ? Buffer.from(body) : body;
    let done = 0;
    while (done < bytes.length) done += disk.writeSync(fd, bytes, done, bytes.length - done, done);
    disk.fsyncSync(fd);
  } finally {
    disk.closeSync(fd);
  }
  disk.renameSync(tmp, file);
  syncDirSync(path.dirname(file));
}
