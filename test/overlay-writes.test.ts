// Overlay writes (src/volume/overlay-file.ts, write-threads.ts): every write reaches the
// kernel in pieces cut at multiples of 16 KiB in the file, so the page cache holds the
// overlay in small folios; large writes go from a worker thread through a shared staging
// arena (or a buffer of their own when the arena is full), and its errors come back with
// their code.
import assert from 'node:assert/strict';
import { closeSync, mkdtempSync, openSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { markAsUntransferable } from 'node:worker_threads';
import { nodeDisk, useDisk, type Disk } from '../src/disk/disk.js';
import { cutPieces, WRITE_PIECE_BYTES, writeAll, writeAllSync } from '../src/volume/overlay-file.js';
import { stagingSlotsFree, writeLarge } from '../src/volume/write-threads.js';

const PIECE = WRITE_PIECE_BYTES;

/** Bytes that differ at every offset, as `count` views of one buffer cut at uneven lengths. */
function payload(length: number, seed: number): { whole: Buffer; parts: Buffer[] } {
  const whole = Buffer.allocUnsafe(length);
  for (let i = 0; i < length; i++) whole[i] = (i * 13 + seed + (i >> 9)) & 0xff;
  const parts: Buffer[] = [];
  for (let at = 0, step = 1000; at < length; at += step, step = (step * 7) % 70_000 + 512) parts.push(whole.subarray(at, Math.min(length, at + step)));
  return { whole, parts };
}

/** Run `body` on a fresh overlay file in a temporary folder, removed afterwards. */
async function withOverlayFile(body: (fd: number, file: string) => Promise<void>): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), 'updraft-overlay-writes-'));
  const file = join(dir, 'overlay');
  const fd = openSync(file, 'w+');
  try {
    await body(fd, file);
  } finally {
    closeSync(fd);
    rmSync(dir, { recursive: true, force: true });
  }
}

test('overlay writes: pieces end at multiples of 16 KiB in the file and carry the bytes in order', () => {
  const position = 3 * 4096;
  const { whole, parts } = payload(1024 * 1024 + 4096, 1);
  const pieces = cutPieces(parts, position);
  let at = position;
  for (const [i, piece] of pieces.entries()) {
    assert.equal(piece.position, at, `piece ${i} starts where the last ended`);
    const bytes = piece.buffers.reduce((n, b) => n + b.length, 0);
    const end = piece.position + bytes;
    assert.ok(bytes <= PIECE, `piece ${i} is at most ${PIECE} bytes`);
    assert.ok(end % PIECE === 0 || i === pieces.length - 1, `piece ${i} ends on a multiple of ${PIECE} (or is the last)`);
    assert.ok(Buffer.concat(piece.buffers).equals(whole.subarray(piece.position - position, end - position)), `piece ${i} holds its bytes`);
    at = end;
  }
  assert.equal(at, position + whole.length);
  assert.equal(pieces[0].position + pieces[0].buffers.reduce((n, b) => n + b.length, 0), PIECE, 'the first piece runs up to the first boundary');
});

test('overlay writes: the synchronous and thread-pool paths write in pieces; a large write from the worker thread lands whole', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'updraft-overlay-writes-'));
  const file = join(dir, 'overlay');
  const fd = openSync(file, 'w+');
  const lengths: number[] = [];
  const recording: Disk = {
    ...nodeDisk,
    writeSync: ((...args: Parameters<Disk['writeSync']>) => {
      lengths.push(args[3] as number);
      return nodeDisk.writeSync(...args);
    }) as Disk['writeSync'],
    writevSync: (f, buffers, position) => {
      lengths.push(buffers.reduce((n, b) => n + b.length, 0));
      return nodeDisk.writevSync(f, buffers, position);
    },
    writev: (f, buffers, position) => {
      lengths.push(buffers.reduce((n, b) => n + b.length, 0));
      return nodeDisk.writev(f, buffers, position);
    },
  };
  const previous = useDisk(recording);
  try {
    const first = payload(200 * 1024, 2);
    writeAllSync(fd, first.parts, 4096);
    const second = payload(300 * 1024, 3);
    await writeAll(fd, second.parts, 512 * 1024);
    assert.ok(lengths.length >= Math.ceil((200 + 300) / 16), `${lengths.length} calls for 500 KiB`);
    for (const n of lengths) assert.ok(n <= PIECE, `a call of ${n} bytes is at most one piece`);
    useDisk(previous);
    const third = payload(2 * 1024 * 1024 + 8192, 4);
    await Promise.all([writeLarge(fd, third.parts, 1024 * 1024), writeLarge(fd, [first.whole], 4 * 1024 * 1024)]);
    const written = readFileSync(file);
    assert.ok(written.subarray(4096, 4096 + first.whole.length).equals(first.whole));
    assert.ok(written.subarray(512 * 1024, 512 * 1024 + second.whole.length).equals(second.whole));
    assert.ok(written.subarray(1024 * 1024, 1024 * 1024 + third.whole.length).equals(third.whole), 'the worker thread wrote the large payload');
    assert.ok(written.subarray(4 * 1024 * 1024).equals(first.whole), 'and the one beside it');
    assert.equal(stagingSlotsFree(), 32, 'every staging slot is free again');
  } finally {
    useDisk(previous);
    closeSync(fd);
    rmSync(dir, { recursive: true, force: true });
  }
});

test('overlay writes: a failed write on the worker thread rejects with its error and code', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'updraft-overlay-writes-'));
  const file = join(dir, 'overlay');
  closeSync(openSync(file, 'w'));
  const readOnly = openSync(file, 'r');
  try {
    await assert.rejects(writeLarge(readOnly, [Buffer.alloc(1024 * 1024, 1)], 0), (err: NodeJS.ErrnoException) => {
      assert.equal(err.code, 'EBADF');
      assert.match(err.message, /EBADF/);
      return true;
    });
    // The thread goes on serving after an error.
    const fd = openSync(file, 'r+');
    try {
      await writeLarge(fd, [Buffer.alloc(256 * 1024, 9)], 0);
      assert.ok(readFileSync(file).equals(Buffer.alloc(256 * 1024, 9)));
      assert.equal(stagingSlotsFree(), 32, 'the failed write gave its slot back');
    } finally {
      closeSync(fd);
    }
  } finally {
    closeSync(readOnly);
    rmSync(dir, { recursive: true, force: true });
  }
});

test('overlay writes: more large writes at once than the staging arena holds all land, and free every slot', async () => {
  await withOverlayFile(async (fd, file) => {
    // 40 writes of 1 MiB + 4 KiB take two slots each: 16 fit in the arena, the rest bring their own buffers.
    const length = 1024 * 1024 + 4096;
    const writes = Array.from({ length: 40 }, (_, i) => payload(length, 100 + i));
    const free = stagingSlotsFree();
    const landing = Promise.all(writes.map((w, i) => writeLarge(fd, w.parts, i * length)));
    assert.equal(stagingSlotsFree(), 0, 'the first writes hold the whole arena while in flight');
    await landing;
    const written = readFileSync(file);
    for (const [i, w] of writes.entries()) {
      assert.ok(written.subarray(i * length, (i + 1) * length).equals(w.whole), `write ${i} landed whole`);
    }
    assert.equal(stagingSlotsFree(), free, 'every slot is free again');
  });
});

test('overlay writes: movable parts that are whole buffers move to the thread, the rest are staged, and the bytes land in order', async () => {
  await withOverlayFile(async (fd, file) => {
    // As a socket delivers them: a chunk shared with the request before, whole chunks, a chunk shared with the next.
    const { whole } = payload(3 * 1024 * 1024 + 8192, 7);
    const cuts = [40_000, 40_000 + 65_536, 40_000 + 2 * 65_536, 1_500_000, whole.length - 30_000, whole.length];
    const parts: Buffer[] = [];
    let at = 0;
    for (const [i, cut] of cuts.entries()) {
      const own = Buffer.from(whole.subarray(at, cut)); // a buffer of its own, as each socket read is
      parts.push(i === 0 ? Buffer.concat([Buffer.alloc(100), own]).subarray(100) : i === cuts.length - 1 ? Buffer.concat([own, Buffer.alloc(100)]).subarray(0, own.length) : own);
      at = cut;
    }
    const kept = [parts[0], parts[cuts.length - 1]];
    await writeLarge(fd, parts, 8192, true);
    assert.ok(readFileSync(file).subarray(8192).equals(whole), 'every byte landed in order');
    for (const [i, part] of parts.entries()) {
      const shared = i === 0 || i === cuts.length - 1;
      assert.equal(part.length === 0, !shared, `part ${i} ${shared ? 'shares its buffer and stays' : 'is a whole buffer and moved'}`);
    }
    assert.ok(kept.every((p) => p.length > 0), 'views of shared buffers were copied, not moved');
    // Without `movable`, nothing moves.
    const mine = Buffer.from(whole.subarray(0, 512 * 1024));
    await writeLarge(fd, [mine], 0);
    assert.equal(mine.length, 512 * 1024, 'a caller that did not give its buffers up keeps them');
    // A buffer Node.js will not let move (its pool, say) is copied instead (Node.js 20 clones it, later ones refuse the move).
    const pinned = Buffer.from(whole.subarray(0, 256 * 1024).map((b) => b ^ 0x5a));
    markAsUntransferable(pinned.buffer);
    await writeLarge(fd, [pinned], 1024 * 1024, true);
    assert.equal(pinned.length, 256 * 1024, 'a buffer that cannot move stays');
    assert.ok(readFileSync(file).subarray(1024 * 1024, 1024 * 1024 + pinned.length).equals(pinned), 'and its bytes landed');
    assert.equal(stagingSlotsFree(), 32, 'every slot is free again');
  });
});
