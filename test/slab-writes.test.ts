// The disk tier's writes (src/blocks/slab.ts: FileWriteQueue): one pwritev at a time per
// file, in the order they were queued, with queued writes to consecutive ranges merged;
// a failed write fails every write it carried, and the ones queued after it still run.
// The slab's writes bypass the page cache (O_DIRECT, through a page-aligned staging
// buffer) where the filesystem allows it, and fall back to buffered writes where not.
import assert from 'node:assert/strict';
import { closeSync, mkdtempSync, openSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { DirectWrites, FileWriteQueue } from '../src/blocks/slab.js';
import { nodeDisk, useDisk, type Disk } from '../src/disk/disk.js';

const SLOT = 4096;

/** node:fs, with every pwritev recorded (fd, position, buffers) and the most in flight at once. */
function countingDisk(): { disk: Disk; calls: Array<{ fd: number; position: number; buffers: number }>; peak: () => number } {
  const calls: Array<{ fd: number; position: number; buffers: number }> = [];
  let inFlight = 0;
  let peak = 0;
  const disk: Disk = {
    ...nodeDisk,
    writev: async (fd, buffers, position) => {
      calls.push({ fd, position, buffers: buffers.length });
      inFlight++;
      peak = Math.max(peak, inFlight);
      try {
        await new Promise((resolve) => setTimeout(resolve, 5));
        return await nodeDisk.writev(fd, buffers, position);
      } finally {
        inFlight--;
      }
    },
  };
  return { disk, calls, peak: () => peak };
}

test('slab writes: one at a time, in order, queued writes to consecutive slots as one', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'updraft-slab-writes-'));
  const counting = countingDisk();
  const previous = useDisk(counting.disk);
  const fd = openSync(join(dir, 'blocks.slab'), 'w+');
  try {
    const queue = new FileWriteQueue(fd);
    const slot = (fill: number) => Buffer.alloc(SLOT, fill);
    await Promise.all([
      queue.write([slot(1)], 0), // runs at once, alone
      queue.write([slot(2)], SLOT), // these two are queued meanwhile and consecutive: one write
      queue.write([slot(3), slot(4)], 2 * SLOT),
      queue.write([slot(5)], 0), // slot 0 again: after the first, and it wins
      queue.write([slot(6)], 10 * SLOT),
    ]);
    assert.equal(counting.peak(), 1, 'never more than one write in flight');
    assert.deepEqual(
      counting.calls.map(({ position, buffers }) => [position / SLOT, buffers]),
      [
        [0, 1],
        [1, 3],
        [0, 1],
        [10, 1],
      ],
    );
    const file = readFileSync(join(dir, 'blocks.slab'));
    assert.equal(file.length, 11 * SLOT);
    for (const [index, fill] of [[0, 5], [1, 2], [2, 3], [3, 4], [10, 6]]) {
      assert.ok(file.subarray(index * SLOT, (index + 1) * SLOT).equals(slot(fill)), `slot ${index} holds what was written last`);
    }
  } finally {
    useDisk(previous);
    closeSync(fd);
    rmSync(dir, { recursive: true, force: true });
  }
});

test('slab writes: a failed write fails every write merged into it, and later writes still run', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'updraft-slab-writes-'));
  const counting = countingDisk();
  let failing = true;
  const previous = useDisk({
    ...counting.disk,
    writev: (fd, buffers, position) => (failing && position === SLOT ? Promise.reject(new Error('EIO: injected')) : counting.disk.writev(fd, buffers, position)),
  });
  const fd = openSync(join(dir, 'blocks.slab'), 'w+');
  try {
    const queue = new FileWriteQueue(fd);
    const results = await Promise.allSettled([
      queue.write([Buffer.alloc(SLOT, 1)], 0),
      queue.write([Buffer.alloc(SLOT, 2)], SLOT), // merged with the next: both fail
      queue.write([Buffer.alloc(SLOT, 3)], 2 * SLOT),
      queue.write([Buffer.alloc(SLOT, 4)], 8 * SLOT),
    ]);
    assert.deepEqual(
      results.map((r) => r.status),
      ['fulfilled', 'rejected', 'rejected', 'fulfilled'],
    );
    for (const r of results) if (r.status === 'rejected') assert.match((r.reason as Error).message, /EIO: injected/);
    failing = false;
    await queue.write([Buffer.alloc(SLOT, 7)], SLOT);
    const file = readFileSync(join(dir, 'blocks.slab'));
    assert.ok(file.subarray(SLOT, 2 * SLOT).equals(Buffer.alloc(SLOT, 7)), 'the queue still writes after a failure');
    assert.ok(file.subarray(8 * SLOT, 9 * SLOT).equals(Buffer.alloc(SLOT, 4)));
  } finally {
    useDisk(previous);
    closeSync(fd);
    rmSync(dir, { recursive: true, force: true });
  }
});

const BLOCK = 128 * 1024;

/** `count` blocks of distinct bytes, each a view at an odd offset of a bigger buffer (memory O_DIRECT could not take as it is). */
function unalignedBlocks(count: number, seed: number, length = BLOCK): Buffer[] {
  const backing = Buffer.allocUnsafe(count * length + 1);
  for (let i = 0; i < backing.length; i++) backing[i] = (i * 31 + seed * 7 + (i >> 12)) & 0xff;
  return Array.from({ length: count }, (_, i) => backing.subarray(1 + i * length, 1 + (i + 1) * length));
}

/** node:fs with every write (pwrite) and writev (pwritev) recorded by descriptor. */
function recordingDisk(overrides: Partial<Disk> = {}): { disk: Disk; writes: Array<{ fd: number; position: number; length: number }>; writevs: number[] } {
  const writes: Array<{ fd: number; position: number; length: number }> = [];
  const writevs: number[] = [];
  const base: Disk = { ...nodeDisk, ...overrides };
  return {
    writes,
    writevs,
    disk: {
      ...base,
      write: (fd, buffer, offset, length, position) => {
        writes.push({ fd, position, length });
        return base.write(fd, buffer, offset, length, position);
      },
      writev: (fd, buffers, position) => {
        writevs.push(fd);
        return base.writev(fd, buffers, position);
      },
    },
  };
}

test('slab writes: direct writes from unaligned blocks, past the staging size, with a short last block, read back through the page cache', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'updraft-slab-writes-'));
  const file = join(dir, 'blocks.slab');
  const fd = openSync(file, 'w+');
  const directFd = nodeDisk.openDirectSync(file);
  const recording = recordingDisk();
  const previous = useDisk(recording.disk);
  try {
    if (directFd === undefined) return t.skip(`the filesystem of ${tmpdir()} refuses O_DIRECT`);
    const queue = new FileWriteQueue(fd, new DirectWrites(directFd));
    const first = unalignedBlocks(1, 1);
    const run = unalignedBlocks(40, 2); // 5 MiB in one write: more than the 4 MiB staging buffer
    const short = unalignedBlocks(1, 3, 5000);
    const again = unalignedBlocks(1, 4);
    await Promise.all([queue.write(first, 0), queue.write(run, BLOCK), queue.write(short, 41 * BLOCK), queue.write(again, 3 * BLOCK)]);
    assert.equal(queue.writesDirect, true);
    assert.deepEqual(recording.writevs, [], 'no buffered write');
    assert.ok(recording.writes.length >= 4);
    for (const w of recording.writes) {
      assert.equal(w.fd, directFd, 'every write went through the direct descriptor');
      assert.equal(w.position % 4096, 0, `write at ${w.position} is aligned`);
      assert.equal(w.length % 4096, 0, `write of ${w.length} bytes is a multiple of 4 KiB`);
      assert.ok(w.length <= 4 * 1024 * 1024, `write of ${w.length} bytes fits the staging buffer`);
    }
    const slab = readFileSync(file);
    const expect = (slot: number, block: Buffer) => assert.ok(slab.subarray(slot * BLOCK, slot * BLOCK + block.length).equals(block), `slot ${slot} holds its block`);
    expect(0, first[0]);
    for (let i = 0; i < run.length; i++) expect(1 + i, i === 2 ? again[0] : run[i]);
    expect(41, short[0]);
    // The short block's write is padded with zeros to 4 KiB, inside its own slot.
    assert.equal(slab.length, 41 * BLOCK + 8192);
    assert.ok(slab.subarray(41 * BLOCK + 5000).equals(Buffer.alloc(8192 - 5000)));
  } finally {
    useDisk(previous);
    closeSync(fd);
    if (directFd !== undefined) closeSync(directFd);
    rmSync(dir, { recursive: true, force: true });
  }
});

test('slab writes: a filesystem that refuses a direct write (EINVAL) gets buffered writes from then on; another error fails the write', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'updraft-slab-writes-'));
  const file = join(dir, 'blocks.slab');
  const fd = openSync(file, 'w+');
  // Any second descriptor does: the disk below refuses its writes.
  const otherFd = openSync(file, 'r+');
  const refusing = (code: string): Partial<Disk> => ({
    write: (wfd, buffer, offset, length, position) =>
      wfd === otherFd ? Promise.reject(Object.assign(new Error(`${code}: injected`), { code })) : nodeDisk.write(wfd, buffer, offset, length, position),
  });
  try {
    const failing = recordingDisk(refusing('EIO'));
    let previous = useDisk(failing.disk);
    try {
      const queue = new FileWriteQueue(fd, new DirectWrites(otherFd));
      await assert.rejects(queue.write(unalignedBlocks(1, 5), 0), /EIO: injected/);
      assert.equal(queue.writesDirect, true, 'an I/O error is not a reason to stop writing direct');
      assert.deepEqual(failing.writevs, []);
    } finally {
      useDisk(previous);
    }
    const refused = recordingDisk(refusing('EINVAL'));
    previous = useDisk(refused.disk);
    try {
      const queue = new FileWriteQueue(fd, new DirectWrites(otherFd));
      const blocks = unalignedBlocks(3, 6);
      await queue.write(blocks.slice(0, 2), 0);
      assert.equal(queue.writesDirect, false);
      await queue.write(blocks.slice(2), 2 * BLOCK);
      assert.equal(refused.writes.filter((w) => w.fd === otherFd).length, 1, 'one direct write was tried');
      assert.deepEqual(refused.writevs, [fd, fd], 'the refused batch and the next went buffered');
      const slab = readFileSync(file);
      for (let i = 0; i < 3; i++) assert.ok(slab.subarray(i * BLOCK, (i + 1) * BLOCK).equals(blocks[i]), `slot ${i} holds its block`);
    } finally {
      useDisk(previous);
    }
  } finally {
    closeSync(fd);
    closeSync(otherFd);
    rmSync(dir, { recursive: true, force: true });
  }
});
