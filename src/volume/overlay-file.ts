// Positional reads and writes of the overlay file: lists of buffers written back to back
// (pwritev, never joined), short transfers finished. The async ones run on the thread pool.
import { disk } from '../disk/disk.js';

const read = (...args: Parameters<typeof disk.read>) => disk.read(...args);

/** Write buffers back to back at a position through the thread pool (pwritev), finishing short writes. */
export async function writeAll(fd: number, buffers: readonly Buffer[], position: number): Promise<void> {
  let rest = buffers as Buffer[];
  while (rest.length > 0) {
    const { bytesWritten } = await disk.writev(fd, rest, position);
    if (bytesWritten === totalLength(rest)) return;
    if (bytesWritten === 0) throw new Error(`pwritev at ${position} wrote nothing`);
    position += bytesWritten;
    rest = remainder(rest, bytesWritten);
  }
}

/** Fill buf[offset, offset + length) from a file position through the thread pool. */
export async function readAt(fd: number, buf: Buffer, offset: number, length: number, position: number): Promise<void> {
  let done = 0;
  while (done < length) {
    const { bytesRead } = await read(fd, buf, offset + done, length - done, position + done);
    if (bytesRead === 0) throw new Error(`short read at ${position + done}: end of file`);
    done += bytesRead;
  }
}

/** Write buffers back to back at a position (pwritev), finishing short writes. */
export function writeAllSync(fd: number, buffers: readonly Buffer[], position: number): void {
  let rest = buffers;
  while (rest.length > 0) {
    const n = rest.length === 1 ? disk.writeSync(fd, rest[0], 0, rest[0].length, position) : disk.writevSync(fd, rest as Buffer[], position);
    if (n === totalLength(rest)) return;
    position += n;
    rest = remainder(rest, n);
  }
}

/** Buffers left after `n` bytes of them were written. */
function remainder(buffers: readonly Buffer[], n: number): Buffer[] {
  const left: Buffer[] = [];
  for (const b of buffers) {
    if (n >= b.length) n -= b.length;
    else {
      left.push(n > 0 ? b.subarray(n) : b);
      n = 0;
    }
  }
  return left;
}

export function totalLength(buffers: readonly Buffer[]): number {
  let total = 0;
  for (const b of buffers) total += b.length;
  return total;
}
