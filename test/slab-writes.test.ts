// The disk tier's writes (src/blocks/slab.ts: FileWriteQueue): one pwritev at a time per
// file, in the order they were queued, with queued writes to consecutive ranges merged;
// a failed write fails every write it carried, and the ones queued after it still run.
import assert from 'node:assert/strict';
import { closeSync, mkdtempSync, openSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { FileWriteQueue } from '../src/blocks/slab.js';
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
