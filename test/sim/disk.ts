// A host's simulated local disk: files in memory over a modelled page cache. A write
// changes the cache; fdatasync/fsync of the file makes its pages durable; fsync of a
// directory makes its creates, renames and unlinks durable. A power cut keeps what was
// durable and, for each unsynced 4 KiB page or directory entry, the new or the old
// version at random. A failed fsync forgets the dirty pages (they stay readable in the
// cache but never reach the medium), like Linux. Files are sparse (a page takes space once
// written, as on ext4), and the disk can be made to run full.
import path from 'node:path';
import type { Disk, DiskEntry } from '../../src/disk/disk.js';
import { currentActor, type Actor } from './clock.js';

const PAGE = 4096;

function errno(code: string, syscall: string, file?: string): Error {
  return Object.assign(new Error(`${code}: simulated ${syscall}${file ? ` '${file}'` : ''}`), { code, syscall, path: file });
}

class Inode {
  data = Buffer.alloc(0);
  size = 0;
  durable = Buffer.alloc(0);
  durableSize = 0;
  readonly dirty = new Set<number>();
  /** Pages holding data, as the cache has them and on the medium: a file is sparse, like ext4's. */
  allocated = new Set<number>();
  durableAllocated = new Set<number>();

  /** Pages of [position, end) that hold no data yet: what writing them takes from the disk. */
  unallocated(position: number, end: number): number {
    let n = 0;
    for (let p = Math.floor(position / PAGE); p * PAGE < end; p++) if (!this.allocated.has(p)) n++;
    return n;
  }

  ensure(capacity: number): void {
    if (capacity <= this.data.length) return;
    const grown = Buffer.alloc(Math.max(capacity, this.data.length * 2, PAGE));
    this.data.copy(grown, 0, 0, this.size);
    this.data = grown;
  }

  write(src: Buffer, position: number): void {
    this.ensure(position + src.length);
    if (position > this.size) this.data.fill(0, this.size, position);
    src.copy(this.data, position);
    for (let p = Math.floor(position / PAGE); p * PAGE < position + src.length; p++) {
      this.dirty.add(p);
      this.allocated.add(p);
    }
    this.size = Math.max(this.size, position + src.length);
  }

  truncate(length: number): void {
    this.ensure(length);
    if (length > this.size) this.data.fill(0, this.size, length);
    for (let p = Math.floor(length / PAGE); p * PAGE < Math.max(this.size, length); p++) this.dirty.add(p);
    for (const p of this.allocated) if (p * PAGE >= length) this.allocated.delete(p);
    this.size = length;
  }

  sync(): void {
    const durable = Buffer.alloc(this.size);
    this.durable.copy(durable, 0, 0, Math.min(this.durableSize, this.size));
    // Only dirty pages reach the medium: a page a failed writeback dropped keeps its old bytes there.
    for (const p of this.dirty) {
      const start = p * PAGE;
      const end = Math.min(start + PAGE, this.size);
      if (end > start) this.data.copy(durable, start, start, end);
    }
    this.durable = durable;
    this.durableSize = this.size;
    this.durableAllocated = new Set(this.allocated);
    this.dirty.clear();
  }

  /** A failed writeback: the dirty pages never reach the medium and are no longer dirty. */
  dropDirty(): void {
    this.dirty.clear();
  }

  /** What the medium holds after a power cut: durable bytes, each dirty page new or old. */
  cut(keep: () => boolean): void {
    let size = this.durableSize;
    const next = Buffer.alloc(Math.max(this.size, this.durableSize));
    this.durable.copy(next, 0, 0, this.durableSize);
    const allocated = new Set(this.durableAllocated);
    for (const p of this.dirty) {
      if (!keep()) continue;
      const start = p * PAGE;
      const end = Math.min(start + PAGE, this.size);
      if (end <= start) continue;
      this.data.copy(next, start, start, end);
      if (this.allocated.has(p)) allocated.add(p);
      size = Math.max(size, end);
    }
    for (const p of allocated) if (p * PAGE >= size) allocated.delete(p);
    this.allocated = allocated;
    this.durableAllocated = new Set(allocated);
    this.data = next;
    this.size = size;
    this.durable = Buffer.from(next.subarray(0, size));
    this.durableSize = size;
    this.dirty.clear();
  }
}

interface Open {
  inode?: Inode;
  dir?: string;
  append: boolean;
  actor: Actor | undefined;
}

export interface DiskFaults {
  /** Probability that an fsync or fdatasync fails with EIO (dropping the dirty pages). */
  fsyncErrorRate: number;
  /** Bytes of file data the disk holds before writes fail with ENOSPC. */
  capacityBytes: number;
}

export class SimDisk {
  private names = new Map<string, Inode>();
  private durableNames = new Map<string, Inode>();
  private dirs = new Set<string>(['/']);
  private fds = new Map<number, Open>();
  private nextFd = 100;
  counters = { fsyncErrors: 0, enospc: 0, powerCuts: 0 };

  constructor(
    private readonly random: () => number,
    public faults: DiskFaults,
  ) {}

  /** The process died: its descriptors are gone, the page cache stays. */
  kill(): void {
    this.fds.clear();
  }

  /** Power cut: only what reached the medium survives (unsynced pages and entries at random). */
  powerCut(): void {
    this.kill();
    this.counters.powerCuts++;
    const keys = new Set([...this.names.keys(), ...this.durableNames.keys()]);
    const next = new Map<string, Inode>();
    for (const key of [...keys].sort()) {
      const now = this.names.get(key);
      const before = this.durableNames.get(key);
      const chosen = now === before ? now : this.random() < 0.5 ? now : before;
      if (chosen !== undefined) next.set(key, chosen);
    }
    this.names = next;
    this.durableNames = new Map(next);
    for (const inode of new Set(next.values())) inode.cut(() => this.random() < 0.5);
  }

  private used(): number {
    let pages = 0;
    for (const inode of new Set(this.names.values())) pages += inode.allocated.size;
    return pages * PAGE;
  }

  private open(fd: number, syscall: string): Open {
    const open = this.fds.get(fd);
    if (open === undefined) throw errno('EBADF', syscall);
    return open;
  }

  private file(fd: number, syscall: string): Inode {
    const open = this.open(fd, syscall);
    if (open.inode === undefined) throw errno('EISDIR', syscall, open.dir);
    return open.inode;
  }

  private parentExists(file: string, syscall: string): void {
    if (!this.dirs.has(path.dirname(file))) throw errno('ENOENT', syscall, file);
  }

  /** Refuse a write of [position, end) that needs more pages than the disk has left. */
  private grow(inode: Inode, position: number, end: number, syscall: string): void {
    const pages = inode.unallocated(position, end);
    if (pages > 0 && this.used() + pages * PAGE > this.faults.capacityBytes) {
      this.counters.enospc++;
      throw errno('ENOSPC', syscall);
    }
  }

  private fsyncNow(fd: number, syscall: string): void {
    const open = this.open(fd, syscall);
    if (this.random() < this.faults.fsyncErrorRate) {
      this.counters.fsyncErrors++;
      open.inode?.dropDirty();
      throw errno('EIO', syscall);
    }
    if (open.inode !== undefined) open.inode.sync();
    else {
      const dir = open.dir!;
      for (const key of new Set([...this.names.keys(), ...this.durableNames.keys()])) {
        if (path.dirname(key) !== dir) continue;
        const now = this.names.get(key);
        if (now === undefined) this.durableNames.delete(key);
        else this.durableNames.set(key, now);
      }
    }
  }

  /** The engine-facing interface; async calls complete after a short virtual delay. */
  readonly api: Disk = {
    openSync: (file, flags) => {
      file = path.resolve(file);
      if (this.dirs.has(file)) {
        const fd = this.nextFd++;
        this.fds.set(fd, { dir: file, append: false, actor: currentActor() });
        return fd;
      }
      let inode = this.names.get(file);
      const create = flags.startsWith('w') || flags.startsWith('a');
      if (inode === undefined) {
        if (!create) throw errno('ENOENT', 'open', file);
        this.parentExists(file, 'open');
        inode = new Inode();
        this.names.set(file, inode);
      } else if (flags.startsWith('w')) {
        inode.truncate(0);
      }
      const fd = this.nextFd++;
      this.fds.set(fd, { inode, append: flags.startsWith('a'), actor: currentActor() });
      return fd;
    },
    // A direct descriptor is one more descriptor of the file: what a power cut keeps of its
    // writes is what it keeps of buffered ones (only what a sync covered is certain).
    openDirectSync: (file) => this.api.openSync(file, 'r+'),
    closeSync: (fd) => {
      this.open(fd, 'close');
      this.fds.delete(fd);
    },
    readSync: (fd, buffer, offset, length, position) => {
      const inode = this.file(fd, 'read');
      const n = Math.max(0, Math.min(length, inode.size - position));
      if (n === 0) return 0;
      inode.data.copy(buffer, offset, position, position + n);
      return n;
    },
    // Every page is in the page cache here; the sim reads the slab through the thread pool on its own (Volume.readLater).
    readNowSync: (fd, buffer, offset, length, position) => this.api.readSync(fd, buffer, offset, length, position),
    writeSync: (fd, buffer, offset, length, position) => {
      const inode = this.file(fd, 'write');
      const src = typeof buffer === 'string' ? Buffer.from(buffer) : buffer.subarray(offset ?? 0, (offset ?? 0) + (length ?? buffer.length - (offset ?? 0)));
      const at = position ?? inode.size;
      this.grow(inode, at, at + src.length, 'write');
      inode.write(src, at);
      return src.length;
    },
    writevSync: (fd, buffers, position) => {
      const inode = this.file(fd, 'writev');
      const total = buffers.reduce((n, b) => n + b.length, 0);
      this.grow(inode, position, position + total, 'writev');
      let at = position;
      for (const b of buffers) {
        inode.write(b, at);
        at += b.length;
      }
      return total;
    },
    fstatSync: (fd) => ({ size: this.file(fd, 'fstat').size }),
    ftruncateSync: (fd, length) => {
      const inode = this.file(fd, 'ftruncate');
      // Extending a file allocates nothing (a hole).
      inode.truncate(length);
    },
    fsyncSync: (fd) => this.fsyncNow(fd, 'fsync'),
    readFileSync: ((file: string, encoding?: 'utf8') => {
      const inode = this.names.get(path.resolve(file));
      if (inode === undefined) throw errno('ENOENT', 'open', file);
      const copy = Buffer.from(inode.data.subarray(0, inode.size));
      return encoding === undefined ? copy : copy.toString(encoding);
    }) as Disk['readFileSync'],
    writeFileSync: (file, data) => {
      const fd = this.api.openSync(file, 'w');
      this.api.writeSync(fd, typeof data === 'string' ? Buffer.from(data) : data, 0, Buffer.byteLength(data), 0);
      this.api.closeSync(fd);
    },
    renameSync: (from, to) => {
      from = path.resolve(from);
      to = path.resolve(to);
      const inode = this.names.get(from);
      if (inode === undefined) throw errno('ENOENT', 'rename', from);
      this.parentExists(to, 'rename');
      this.names.delete(from);
      this.names.set(to, inode);
    },
    rmSync: (file, options) => {
      file = path.resolve(file);
      if (this.names.delete(file)) return;
      if (this.dirs.has(file)) {
        const inside = (k: string) => k.startsWith(file + '/');
        const children = [...this.names.keys()].some(inside) || [...this.dirs].some(inside);
        if (children && !options?.recursive) throw errno('ENOTEMPTY', 'rm', file);
        for (const k of [...this.names.keys()]) if (inside(k)) this.names.delete(k);
        for (const k of [...this.dirs]) if (inside(k)) this.dirs.delete(k);
        this.dirs.delete(file);
        return;
      }
      if (!options?.force) throw errno('ENOENT', 'rm', file);
    },
    mkdirSync: (dir, options) => {
      dir = path.resolve(dir);
      if (this.dirs.has(dir)) {
        if (options?.recursive) return;
        throw errno('EEXIST', 'mkdir', dir);
      }
      if (!this.dirs.has(path.dirname(dir))) {
        if (!options?.recursive) throw errno('ENOENT', 'mkdir', dir);
        this.api.mkdirSync(path.dirname(dir), options);
      }
      this.dirs.add(dir);
    },
    existsSync: (file) => {
      file = path.resolve(file);
      return this.names.has(file) || this.dirs.has(file);
    },
    readdirSync: (dir) => {
      dir = path.resolve(dir);
      if (!this.dirs.has(dir)) throw errno('ENOENT', 'scandir', dir);
      const out: DiskEntry[] = [];
      for (const d of this.dirs) if (d !== dir && path.dirname(d) === dir) out.push({ name: path.basename(d), isDirectory: () => true });
      for (const f of this.names.keys()) if (path.dirname(f) === dir) out.push({ name: path.basename(f), isDirectory: () => false });
      return out.sort((a, b) => (a.name < b.name ? -1 : 1));
    },
    fdatasync: (fd) => this.later(() => this.fsyncNow(fd, 'fdatasync')),
    fsync: (fd) => this.later(() => this.fsyncNow(fd, 'fsync')),
    read: (fd, buffer, offset, length, position) => this.later(() => ({ bytesRead: this.api.readSync(fd, buffer, offset, length, position) })),
    write: (fd, buffer, offset, length, position) => this.later(() => ({ bytesWritten: this.api.writeSync(fd, buffer, offset, length, position) })),
    writev: (fd, buffers, position) => this.later(() => ({ bytesWritten: this.api.writevSync(fd, buffers, position) })),
  };

  /** Run `op` after a short virtual delay (the thread pool), settling the promise with its outcome. */
  private later<T>(op: () => T): Promise<T> {
    const delay = Math.floor(this.random() * 3);
    return new Promise<T>((resolve, reject) => {
      setTimeout(() => {
        try {
          resolve(op());
        } catch (err) {
          reject(err);
        }
      }, delay);
    });
  }
}

/** The one Disk the engine sees: the disk of the host whose code is running. */
export function routedDisk(diskOf: (actor: Actor) => SimDisk): Disk {
  const route = (): Disk => {
    const actor = currentActor();
    if (actor === undefined) throw new Error('simulation: a disk call outside any host');
    if (!actor.alive) throw new Error(`simulation: host ${actor.name} is dead but its code ran`);
    return diskOf(actor).api;
  };
  return new Proxy({} as Disk, {
    get: (_target, prop: keyof Disk) => (...args: unknown[]) => (route()[prop] as (...a: unknown[]) => unknown)(...args),
  });
}
