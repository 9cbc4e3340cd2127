// The file:// backend: a folder on a local filesystem, one file per object at the key's
// path under the root. Puts are atomic (temp file, fsync, rename, fsync folder), and a
// put or delete holds a per-key lock file while it checks its condition and renames, so
// conditional puts hold between processes as well as within one.
//
// The lock is a hard link: a writer fills `.~lockc.<name>.<nonce>` with who it is, then
// link(2)s it to `.~lock.<name>`, which fails with EEXIST while someone else holds it.
// A lock left by a writer that died (SIGKILL between lock and rename) is broken by the
// next writer once it can tell the holder is gone: on this host by pid and process start
// time, from another host (a shared mount) by the lock's age.

import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { link, lstat, mkdir, open, readdir, rename, rmdir, stat, unlink, writeFile, type FileHandle } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import type { BigIntStats } from 'node:fs';
import { pathToFileURL } from 'node:url';
import { errorMessage, type Logger } from '../log.js';
import { checkKey, checkPrefix, checkPutOptions, checkRange, RESERVED_SEGMENT_PREFIX, storeError } from './keys.js';
import { ObjectStoreError, type ObjectInfo, type ObjectStore, type PutOptions, type StoredObject } from './types.js';

export interface FileStoreOptions {
  /** How long a put or delete waits for another writer's lock on the same key before it fails 'Unavailable' (default 10 s). */
  lockTimeoutMs?: number;
  /** A lock whose holder cannot be checked (another host) is stale after this long (default 60 s). */
  staleLockMs?: number;
  /** Where broken stale locks are reported. */
  log?: Logger;
}

const TEMP_PREFIX = `${RESERVED_SEGMENT_PREFIX}tmp.`;
const LOCK_PREFIX = `${RESERVED_SEGMENT_PREFIX}lock.`;
const LOCK_CANDIDATE_PREFIX = `${RESERVED_SEGMENT_PREFIX}lockc.`;
const LOCK_ASIDE_PREFIX = `${RESERVED_SEGMENT_PREFIX}lockx.`;
/** Longest pause between two tries at a held lock. */
const LOCK_POLL_MAX_MS = 20;
/** Attempts at creating a put's temp file while a delete removes the (empty) folder under it. */
const TEMP_CREATE_ATTEMPTS = 5;

/** What a lock file says about its holder. */
interface LockOwner {
  pid: number;
  host: string;
  /** Field 22 of /proc/PID/stat (start time in clock ticks since boot), so a reused pid is not taken for the holder. */
  start: string | null;
  nonce: string;
  at: number;
}

/** A lock file as found: its holder (undefined when unreadable), inode and age. */
interface LockSeen {
  owner: LockOwner | undefined;
  ino: bigint;
  ageMs: number;
}

/** Nonces of the locks this process holds now, across every FileObjectStore in it. */
const heldLocks = new Set<string>();

function processStart(pid: number | 'self'): string | null {
  try {
    const text = readFileSync(`/proc/${pid}/stat`, 'utf8');
    // The command name (field 2) may hold spaces and parentheses; fields resume after the last ')'.
    return text.slice(text.lastIndexOf(')') + 2).split(' ')[19] ?? null;
  } catch {
    return null;
  }
}

const SELF = { pid: process.pid, host: os.hostname(), start: processStart('self') };

function errnoCode(err: unknown): string | undefined {
  return (err as NodeJS.ErrnoException | null)?.code;
}

function randomName(): string {
  return randomBytes(8).toString('hex');
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** The etag of a stored file: its mtime (kept strictly increasing per key by put), inode (new on every rename) and size. */
function etagOf(st: BigIntStats): string {
  return `${st.mtimeNs.toString(36)}-${st.ino.toString(36)}-${st.size.toString(36)}`;
}

function infoOf(key: string, st: BigIntStats): ObjectInfo {
  return { key, size: Number(st.size), etag: etagOf(st), lastModified: new Date(Number(st.mtimeMs)) };
}

/** Reads exactly `length` bytes at `position`, or fewer if the file ends first. */
async function readAt(handle: FileHandle, position: number, length: number): Promise<Buffer> {
  const out = Buffer.allocUnsafe(length);
  let done = 0;
  while (done < length) {
    const { bytesRead } = await handle.read(out, done, length - done, position + done);
    if (bytesRead === 0) break;
    done += bytesRead;
  }
  return done === length ? out : out.subarray(0, done);
}

/** fsync a file or folder by path, off the event loop. */
export async function fsyncPath(file: string): Promise<void> {
  const handle = await open(file, 'r');
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}

/** A store in a local folder (`file:///abs/path`); keys are paths under it. */
export class FileObjectStore implements ObjectStore {
  readonly description: string;
  readonly root: string;
  private readonly lockTimeoutMs: number;
  private readonly staleLockMs: number;
  private readonly log: Logger | undefined;

  constructor(root: string, options: FileStoreOptions = {}) {
    if (!path.isAbsolute(root)) throw new ObjectStoreError('Invalid', `file object store: root ${JSON.stringify(root)} is not an absolute path`);
    this.root = path.resolve(root);
    this.description = pathToFileURL(this.root).href;
    this.lockTimeoutMs = options.lockTimeoutMs ?? 10_000;
    this.staleLockMs = options.staleLockMs ?? 60_000;
    this.log = options.log;
  }

  /** The whole object, or undefined if the key does not exist. */
  async get(key: string): Promise<StoredObject | undefined> {
    checkKey('get', key, this.description);
    const handle = await this.openForRead('get', key);
    if (!handle) return undefined;
    try {
      const st = await handle.stat({ bigint: true });
      if (!st.isFile()) return undefined;
      const size = Number(st.size);
      const body = await readAt(handle, 0, size);
      // A file is never changed in place (puts rename a new one over it), so it cannot shrink under us.
      if (body.length !== size) throw storeError('Unavailable', 'get', key, this.description, `read ${body.length} of ${size} bytes`);
      return { ...infoOf(key, st), body };
    } catch (err) {
      throw this.diskError('get', key, err);
    } finally {
      await handle.close();
    }
  }

  /** Bytes [offset, offset + length) clipped to the object's end, or undefined if the key does not exist. */
  async getRange(key: string, offset: number, length: number): Promise<Buffer | undefined> {
    checkKey('get_range', key, this.description);
    checkRange(key, offset, length, this.description);
    const handle = await this.openForRead('get_range', key);
    if (!handle) return undefined;
    try {
      const st = await handle.stat({ bigint: true });
      if (!st.isFile()) return undefined;
      const size = Number(st.size);
      if (offset >= size || length === 0) return Buffer.alloc(0);
      return await readAt(handle, offset, Math.min(length, size - offset));
    } catch (err) {
      throw this.diskError('get_range', key, err);
    } finally {
      await handle.close();
    }
  }

  /** Size, etag and mtime, or undefined if the key does not exist. */
  async head(key: string): Promise<ObjectInfo | undefined> {
    checkKey('head', key, this.description);
    let st: BigIntStats;
    try {
      st = await stat(this.pathOf(key), { bigint: true });
    } catch (err) {
      return this.missing('head', key, err);
    }
    return st.isFile() ? infoOf(key, st) : undefined;
  }

  /** Writes body to a temp file, then (under the key's lock) checks the condition and renames it into place; returns the new etag. */
  async put(key: string, body: Buffer, options?: PutOptions): Promise<string> {
    checkKey('put', key, this.description);
    checkPutOptions(key, options, this.description);
    if (!((body as unknown) instanceof Uint8Array)) {
      throw storeError('Invalid', 'put', key, this.description, 'body must be a Buffer');
    }
    const file = this.pathOf(key);
    const dir = path.dirname(file);
    const { handle, temp, firstNewDir } = await this.createTemp(key, dir, path.basename(file));
    let renamed = false;
    try {
      await handle.writeFile(body);
      await handle.datasync();
      const release = await this.lock('put', key, dir, path.basename(file));
      let etag: string;
      try {
        const current = await this.statIfExists('put', key, file);
        if (current && !current.isFile()) {
          throw storeError('Invalid', 'put', key, this.description, 'a folder of that name holds other keys (the file store cannot hold both a and a/b)');
        }
        if (options?.ifNoneMatch === '*' && current) {
          throw storeError('PreconditionFailed', 'put', key, this.description, 'precondition failed: the key exists (If-None-Match: *)');
        }
        if (options?.ifMatch !== undefined && (!current || etagOf(current) !== options.ifMatch)) {
          const now = current ? `is ${etagOf(current)}` : 'does not exist';
          throw storeError('PreconditionFailed', 'put', key, this.description, `precondition failed: If-Match ${options.ifMatch}, but the key ${now}`);
        }
        // The etag includes the mtime; keeping it strictly increasing per key means a
        // reused inode number with equal size cannot bring an old etag back (ABA). The
        // time is the file system's (the write just set it), not this process's clock: it
        // is the store's clock (Last-Modified) that leases are judged on (clock.ts).
        const nowNs = (await handle.stat({ bigint: true })).mtimeNs;
        const floorNs = current ? current.mtimeNs + 1_000n : 0n;
        const mtimeNs = nowNs > floorNs ? nowNs : floorNs;
        const seconds = Number(mtimeNs) / 1e9;
        await handle.utimes(seconds, seconds);
        await handle.sync();
        etag = etagOf(await handle.stat({ bigint: true }));
        await rename(temp, file);
        renamed = true;
        await fsyncPath(dir);
      } finally {
        await release();
      }
      if (firstNewDir) await this.syncNewDirs(dir, firstNewDir);
      return etag;
    } catch (err) {
      throw this.diskError('put', key, err);
    } finally {
      await handle.close().catch(() => {});
      if (!renamed) await unlink(temp).catch(() => {});
    }
  }

  /** Every object whose key starts with prefix, in key order (UTF-8 byte order, as S3 lists). */
  async list(prefix: string): Promise<ObjectInfo[]> {
    checkPrefix(prefix, this.description);
    const what = `prefix ${JSON.stringify(prefix)}`;
    await this.checkRoot('list', what);
    const slash = prefix.lastIndexOf('/');
    const folderKey = slash >= 0 ? prefix.slice(0, slash) : '';
    const start = folderKey === '' ? this.root : path.join(this.root, ...folderKey.split('/'));
    const found: ObjectInfo[] = [];
    try {
      await this.walk(start, folderKey === '' ? '' : `${folderKey}/`, prefix.slice(slash + 1), found);
    } catch (err) {
      throw this.diskError('list', what, err);
    }
    const bytes = new Map(found.map((info) => [info, Buffer.from(info.key)]));
    return found.sort((a, b) => Buffer.compare(bytes.get(a)!, bytes.get(b)!));
  }

  /** Removes the key's file under its lock, then any folders that became empty; a missing key is not an error. */
  async delete(key: string): Promise<void> {
    checkKey('delete', key, this.description);
    const file = this.pathOf(key);
    const dir = path.dirname(file);
    try {
      await this.checkRoot('delete', key);
      let release: () => Promise<void>;
      try {
        release = await this.lock('delete', key, dir, path.basename(file));
      } catch (err) {
        // No folder for the lock file means no object either.
        if (errnoCode(err) === 'ENOENT' || errnoCode(err) === 'ENOTDIR') return;
        throw err;
      }
      try {
        await unlink(file);
        await fsyncPath(dir);
      } catch (err) {
        // A folder of that name is not an object (some other keys start with "key/").
        if (!['ENOENT', 'ENOTDIR', 'EISDIR', 'EPERM'].includes(errnoCode(err) ?? '')) throw err;
      } finally {
        await release();
      }
    } catch (err) {
      throw this.diskError('delete', key, err);
    }
    await this.removeEmptyFolders(dir);
  }

  /** Nothing to release: every handle is closed when its request ends. */
  async close(): Promise<void> {}

  /** The lock file a put or delete of `key` holds while it runs (operators remove it by hand only if its holder is surely gone). */
  lockFileOf(key: string): string {
    checkKey('lock', key, this.description);
    const file = this.pathOf(key);
    return path.join(path.dirname(file), LOCK_PREFIX + path.basename(file));
  }

  private pathOf(key: string): string {
    return path.join(this.root, ...key.split('/'));
  }

  /** Opens the key's file for reading, or undefined when there is no such object. */
  private async openForRead(op: string, key: string): Promise<FileHandle | undefined> {
    try {
      return await open(this.pathOf(key), 'r');
    } catch (err) {
      return this.missing(op, key, err);
    }
  }

  private async statIfExists(op: string, key: string, file: string): Promise<BigIntStats | undefined> {
    try {
      return await lstat(file, { bigint: true });
    } catch (err) {
      if (errnoCode(err) === 'ENOENT') return undefined;
      throw this.diskError(op, key, err);
    }
  }

  /** For a failed open/stat: undefined when the key is simply absent, NoSuchBucket when the root is, else a disk error. */
  private async missing(op: string, key: string, err: unknown): Promise<undefined> {
    const code = errnoCode(err);
    if (code !== 'ENOENT' && code !== 'ENOTDIR') throw this.diskError(op, key, err);
    await this.checkRoot(op, key);
    return undefined;
  }

  /** Throws NoSuchBucket unless the root folder exists. */
  private async checkRoot(op: string, key: string): Promise<void> {
    let isDir: boolean;
    try {
      isDir = (await stat(this.root)).isDirectory();
    } catch (err) {
      if (errnoCode(err) !== 'ENOENT' && errnoCode(err) !== 'ENOTDIR') throw this.diskError(op, key, err);
      isDir = false;
    }
    if (!isDir) throw storeError('NoSuchBucket', op, key, this.description, `folder ${this.root} does not exist`);
  }

  /** Creates the put's temp file next to the key's file, making the folders on the way; returns the first folder it had to make. */
  private async createTemp(key: string, dir: string, name: string): Promise<{ handle: FileHandle; temp: string; firstNewDir: string | undefined }> {
    await this.checkRoot('put', key);
    let firstNewDir: string | undefined;
    for (let attempt = 1; ; attempt++) {
      try {
        firstNewDir = (await mkdir(dir, { recursive: true })) ?? firstNewDir;
        const temp = path.join(dir, `${TEMP_PREFIX}${name}.${randomName()}`);
        return { handle: await open(temp, 'wx', 0o644), temp, firstNewDir };
      } catch (err) {
        // A delete of the folder's last key removed the folder between mkdir and open.
        if (errnoCode(err) === 'ENOENT' && attempt < TEMP_CREATE_ATTEMPTS) continue;
        if (errnoCode(err) === 'EEXIST' || errnoCode(err) === 'ENOTDIR') {
          throw storeError('Invalid', 'put', key, this.description, `an object holds a folder name on the key's path (the file store cannot hold both a and a/b): ${errorMessage(err)}`, err);
        }
        throw this.diskError('put', key, err);
      }
    }
  }

  /** Makes new folders' entries durable: each one from the key's folder up to the one above the first made. */
  private async syncNewDirs(dir: string, firstNewDir: string): Promise<void> {
    const stop = path.dirname(firstNewDir);
    for (let d = path.dirname(dir); ; d = path.dirname(d)) {
      await fsyncPath(d);
      if (d === stop || d === this.root || d === path.dirname(d)) break;
    }
  }

  /** Removes `dir` and its parents while they are empty, up to (not including) the root. Best effort. */
  private async removeEmptyFolders(dir: string): Promise<void> {
    for (let d = dir; d !== this.root && d.startsWith(this.root + path.sep); d = path.dirname(d)) {
      try {
        await rmdir(d);
      } catch {
        return; // not empty, already gone, or busy: some other key lives there
      }
    }
  }

  private async walk(dir: string, keyPrefix: string, namePrefix: string, found: ObjectInfo[]): Promise<void> {
    let entries;
    try {
      entries = await readdir(dir, { withFileTypes: true });
    } catch (err) {
      if (errnoCode(err) === 'ENOENT' || errnoCode(err) === 'ENOTDIR') return;
      throw err;
    }
    for (const entry of entries) {
      const name = entry.name;
      if (name.startsWith(RESERVED_SEGMENT_PREFIX) || !name.startsWith(namePrefix)) continue;
      const full = path.join(dir, name);
      if (entry.isDirectory()) {
        await this.walk(full, `${keyPrefix}${name}/`, '', found);
      } else if (entry.isFile()) {
        try {
          found.push(infoOf(keyPrefix + name, await lstat(full, { bigint: true })));
        } catch (err) {
          if (errnoCode(err) !== 'ENOENT') throw err; // deleted while we walked
        }
      }
    }
  }

  /** Takes the lock of `name` in `dir`; resolves to its release. Throws 'Unavailable' after lockTimeoutMs. */
  private async lock(op: string, key: string, dir: string, name: string): Promise<() => Promise<void>> {
    const lockFile = path.join(dir, LOCK_PREFIX + name);
    const nonce = randomName();
    const owner: LockOwner = { ...SELF, nonce, at: Date.now() };
    const candidate = path.join(dir, `${LOCK_CANDIDATE_PREFIX}${name}.${nonce}`);
    await writeFile(candidate, JSON.stringify(owner), { flag: 'wx', mode: 0o644 });
    let ino: bigint;
    try {
      const deadline = Date.now() + this.lockTimeoutMs;
      let pause = 1;
      for (;;) {
        try {
          await link(candidate, lockFile);
          ino = (await stat(candidate, { bigint: true })).ino;
          break;
        } catch (err) {
          if (errnoCode(err) !== 'EEXIST') throw err;
        }
        const seen = await this.readLock(lockFile);
        if (seen === undefined) continue; // released between our link and our look
        if (this.isStale(seen)) {
          await this.breakLock(op, key, lockFile, seen);
          continue;
        }
        if (Date.now() >= deadline) {
          const who = seen.owner ? `pid ${seen.owner.pid} on ${seen.owner.host}` : 'an unknown writer';
          throw storeError('Unavailable', op, key, this.description, `lock ${lockFile} held by ${who} for ${Math.round(seen.ageMs)} ms; gave up after ${this.lockTimeoutMs} ms`);
        }
        await sleep(pause * (0.5 + Math.random()));
        pause = Math.min(pause * 2, LOCK_POLL_MAX_MS);
      }
    } finally {
      await unlink(candidate).catch(() => {});
    }
    heldLocks.add(nonce);
    return async () => {
      heldLocks.delete(nonce);
      try {
        // Only our own lock: were ours broken (we looked dead), the file may be someone else's now.
        if ((await stat(lockFile, { bigint: true })).ino === ino) await unlink(lockFile);
      } catch {
        // Gone already.
      }
    };
  }

  private async readLock(lockFile: string): Promise<LockSeen | undefined> {
    let handle: FileHandle;
    try {
      handle = await open(lockFile, 'r');
    } catch (err) {
      if (errnoCode(err) === 'ENOENT') return undefined;
      throw err;
    }
    try {
      const st = await handle.stat({ bigint: true });
      const text = (await handle.readFile()).toString('utf8');
      let owner: LockOwner | undefined;
      try {
        const parsed = JSON.parse(text) as LockOwner;
        const valid = Number.isSafeInteger(parsed.pid) && parsed.pid > 0 && typeof parsed.host === 'string' && typeof parsed.nonce === 'string';
        if (valid) owner = parsed;
      } catch {
        owner = undefined; // torn by a crash of the host before the candidate reached the disk
      }
      return { owner, ino: st.ino, ageMs: Date.now() - Number(st.mtimeMs) };
    } finally {
      await handle.close();
    }
  }

  /** True when the lock's holder is surely gone, or (when that cannot be checked) the lock is older than staleLockMs. */
  private isStale(seen: LockSeen): boolean {
    const owner = seen.owner;
    if (!owner || owner.host !== SELF.host) return seen.ageMs > this.staleLockMs;
    if (owner.pid === SELF.pid && owner.start === SELF.start) return !heldLocks.has(owner.nonce);
    try {
      process.kill(owner.pid, 0);
    } catch (err) {
      if (errnoCode(err) === 'ESRCH') return true;
    }
    // The pid lives; it is the holder unless it was reused by a process started later.
    return owner.start !== null && processStart(owner.pid) !== owner.start;
  }

  /**
   * Removes a stale lock: moves whatever is at lockFile aside, and deletes it if it is the
   * stale one seen. If another writer broke it first and took the lock in between, the
   * file moved aside is that writer's live lock, and goes back. (Only if a third writer
   * took the vacant lock in that instant could two writers hold it: a window of a few
   * syscalls, open only while recovering from a crash.)
   */
  private async breakLock(op: string, key: string, lockFile: string, seen: LockSeen): Promise<void> {
    const aside = path.join(path.dirname(lockFile), `${LOCK_ASIDE_PREFIX}${path.basename(lockFile)}.${randomName()}`);
    try {
      await rename(lockFile, aside);
    } catch (err) {
      if (errnoCode(err) === 'ENOENT') return;
      throw err;
    }
    if ((await stat(aside, { bigint: true })).ino === seen.ino) {
      await unlink(aside);
      this.log?.warn('broke a stale object store lock', {
        op,
        key,
        lock: lockFile,
        holder_pid: seen.owner?.pid,
        holder_host: seen.owner?.host,
        age_ms: Math.round(seen.ageMs),
      });
      return;
    }
    await link(aside, lockFile).catch(() => {});
    await unlink(aside);
  }

  /** Maps a filesystem error to an ObjectStoreError naming the operation and the key. */
  private diskError(op: string, key: string, err: unknown): ObjectStoreError {
    if (err instanceof ObjectStoreError) return err;
    const code = errnoCode(err);
    const detail = errorMessage(err);
    switch (code) {
      case 'EACCES':
      case 'EPERM':
        return storeError('AccessDenied', op, key, this.description, detail, err);
      case 'ENAMETOOLONG':
        return storeError('Invalid', op, key, this.description, detail, err);
      case 'EISDIR':
      case 'ENOTDIR':
      case 'EEXIST':
        return storeError('Invalid', op, key, this.description, `the key and another key's folder collide (the file store cannot hold both a and a/b): ${detail}`, err);
      default:
        // ENOSPC, EIO, EDQUOT, EROFS, EMFILE...: the disk may recover, or space be freed.
        return storeError('Unavailable', op, key, this.description, detail, err);
    }
  }
}
