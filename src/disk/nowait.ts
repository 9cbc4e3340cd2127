// A pread that never waits for the device: preadv2(2) with RWF_NOWAIT fails with EAGAIN
// when a page of the range is not in the page cache. The request path reads the block
// cache's slab with it and sends a read that would wait to the thread pool, so a slab the
// host's page cache dropped (memory pressure) does not hold every volume's requests.
// Node.js has no such call, so it goes through koffi (as nbd/socket-buffer.ts does); where
// that cannot load or the kernel refuses the flag, reads wait as a plain pread does.
import fs from 'node:fs';
import { createRequire } from 'node:module';

const RWF_NOWAIT = 0x08;
const EAGAIN = 11;
/** The native buffer reads land in first, grown to the largest read asked for. */
const FIRST_SCRATCH_BYTES = 256 * 1024;

type Koffi = typeof import('koffi');

/**
 * preadv2 with one iovec that lives in native memory and points at a native scratch buffer:
 * passing a JavaScript object for the iovec costs more per call than the read itself, so
 * only the length is written per read, and the bytes are copied out of the scratch.
 */
class NoWaitReader {
  private readonly preadv2: (fd: number, iov: unknown, count: number, position: number, flags: number) => number;
  private readonly iov: unknown;
  /** The iovec's 16 bytes: base pointer, then length (little-endian, as x86-64 and arm64 keep them). */
  private readonly iovWords: Uint32Array;
  private scratch: unknown;
  private scratchView: Buffer;

  constructor(private readonly koffi: Koffi) {
    const libc = koffi.load('libc.so.6');
    this.preadv2 = libc.func('long preadv2(int, void *, int, long, int)');
    this.iov = koffi.alloc('uint64_t', 2);
    this.iovWords = new Uint32Array(koffi.view(this.iov, 16));
    this.scratch = koffi.alloc('uint8_t', FIRST_SCRATCH_BYTES);
    this.scratchView = Buffer.from(koffi.view(this.scratch, FIRST_SCRATCH_BYTES));
    this.point();
  }

  private point(): void {
    const base = BigInt(this.koffi.address(this.scratch));
    this.iovWords[0] = Number(base & 0xffffffffn);
    this.iovWords[1] = Number(base >> 32n);
    this.iovWords[3] = 0;
  }

  /** Bytes read, or -errno. */
  read(fd: number, buffer: Buffer, offset: number, length: number, position: number): number {
    if (length > this.scratchView.length) {
      this.koffi.free(this.scratch);
      this.scratch = this.koffi.alloc('uint8_t', length);
      this.scratchView = Buffer.from(this.koffi.view(this.scratch, length));
      this.point();
    }
    this.iovWords[2] = length;
    const n = this.preadv2(fd, this.iov, 1, position, RWF_NOWAIT);
    if (n < 0) return -this.koffi.errno();
    this.scratchView.copy(buffer, offset, 0, n);
    return n;
  }
}

/** null where preadv2 cannot be called; undefined until the first read. */
let reader: NoWaitReader | null | undefined;

function load(): NoWaitReader | null {
  try {
    return new NoWaitReader(createRequire(import.meta.url)('koffi') as Koffi);
  } catch {
    return null;
  }
}

/**
 * pread of `length` bytes at `position` into `buffer` at `offset`, or undefined when part
 * of the range is not in the page cache (reading it would wait for the device). Bytes
 * read otherwise, 0 at the end of the file.
 */
export function readNowSync(fd: number, buffer: Buffer, offset: number, length: number, position: number): number | undefined {
  const now = reader === undefined ? (reader = load()) : reader;
  if (now === null) return fs.readSync(fd, buffer, offset, length, position);
  const n = now.read(fd, buffer, offset, length, position);
  if (n === length || n === 0) return n;
  // Part of the range is cached: the rest would wait.
  if (n > 0 || n === -EAGAIN) return undefined;
  // Refused (an old kernel or a filesystem without the flag) or failed: a plain pread
  // from now on, which also reports a real error as node:fs does.
  reader = null;
  return fs.readSync(fd, buffer, offset, length, position);
}
