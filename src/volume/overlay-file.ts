// Positional reads and writes of the overlay file: lists of buffers written back to back
// (pwritev, never joined), short transfers finished. The async ones run on the thread pool.
import { disk } from '../disk/disk.js';

const read = (...args: Parameters<typeof disk.read>) => disk.read(...args);

/**
 * Writes reach the kernel in pieces of at most this many bytes, cut at multiples of it in
 * the file, so the page cache holds the overlay in small folios. The kernel sizes a
 * folio by the write: after a 1 MiB write, every 4 KiB rewrite in that range walks all
 * the folio's blocks, and large folios cost far more to allocate on a VM that hands freed
 * memory back to its host (docs/benchmarks.md: overlay writes).
 */
export const WRITE_PIECE_BYTES = 16 * 1024;
/** The staging arena of large writes (write-threads.ts) is cut into slots of this many bytes. */
export const STAGING_SLOT_BYTES = 1024 * 1024;
/** Pieces of one asynchronous write in flight at once on the thread pool. */
const WRITE_LANES = 4;

/** One pwritev: `buffers` back to back from `position`. */
interface Piece {
  buffers: Buffer[];
  position: number;
}

/** `buffers` from `position`, cut where the file crosses a multiple of WRITE_PIECE_BYTES. */
export function cutPieces(buffers: readonly Buffer[], position: number): Piece[] {
  const pieces: Piece[] = [];
  let piece: Piece = { buffers: [], position };
  let room = WRITE_PIECE_BYTES - (position % WRITE_PIECE_BYTES);
  let at = position;
  for (const buffer of buffers) {
    let taken = 0;
    while (taken < buffer.length) {
      const n = Math.min(room, buffer.length - taken);
      piece.buffers.push(taken === 0 && n === buffer.length ? buffer : buffer.subarray(taken, taken + n));
      taken += n;
      at += n;
      room -= n;
      if (room === 0) {
        pieces.push(piece);
        piece = { buffers: [], position: at };
        room = WRITE_PIECE_BYTES;
      }
    }
  }
  if (piece.buffers.length > 0) pieces.push(piece);
  return pieces;
}

/** Write buffers back to back at a position through the thread pool, in pieces, finishing short writes. */
export async function writeAll(fd: number, buffers: readonly Buffer[], position: number): Promise<void> {
  const pieces = cutPieces(buffers, position);
  let next = 0;
  const lane = async () => {
    while (next < pieces.length) {
      const piece = pieces[next++];
      await writePiece(fd, piece.buffers, piece.position);
    }
  };
  // Every piece settles before a failure is reported: nothing of this write lands after it.
  const lanes = await Promise.allSettled(Array.from({ length: Math.min(WRITE_LANES, pieces.length) }, lane));
  for (const settled of lanes) if (settled.status === 'rejected') throw settled.reason;
}

async function writePiece(fd: number, buffers: Buffer[], position: number): Promise<void> {
  let rest = buffers;
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

/** Write buffers back to back at a position, in pieces, finishing short writes. */
export function writeAllSync(fd: number, buffers: readonly Buffer[], position: number): void {
  if (totalLength(buffers) <= WRITE_PIECE_BYTES - (position % WRITE_PIECE_BYTES)) return writePieceSync(fd, buffers, position);
  for (const piece of cutPieces(buffers, position)) writePieceSync(fd, piece.buffers, piece.position);
}

function writePieceSync(fd: number, buffers: readonly Buffer[], position: number): void {
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
