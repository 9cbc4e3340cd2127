// The volume journal's zero-filled space past its last batch (a batch's fdatasync then
// writes no file-system metadata): reopening replays every batch and keeps the space; a
// torn batch in it is cut off, and no older batch behind a torn one is ever replayed.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, test } from 'node:test';
import { Journal, type ChunkRecord } from '../src/volume/journal.js';

const BLOCK = 65536;
const MASK = 2;
const SIZE = BLOCK * 64;
const MiB = 1024 * 1024;
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'updraft-journal-test-'));
after(() => fs.rmSync(dir, { recursive: true, force: true }));

const record = (chunk: number, fill: number): ChunkRecord => ({ chunk, hash: Buffer.alloc(16, fill), mask: Buffer.from([fill, 0]) });

test('batches land in the zero-filled space; a reopen replays them all, cuts nothing and appends in place', async () => {
  const file = path.join(dir, 'plain');
  const journal = await Journal.create(file, BLOCK, MASK, SIZE);
  for (let i = 1; i <= 50; i++) await journal.commit([record(i % 64, i)], i, SIZE);
  const written = journal.bytes;
  journal.close();
  const length = fs.statSync(file).size;
  assert.ok(length > written && length % MiB === 0, `the file is ${length} bytes for ${written} bytes of batches: not zero-filled ahead`);
  assert.ok(fs.readFileSync(file).subarray(written).every((b) => b === 0), 'the space past the last batch is not zeros');

  const { journal: again, state } = Journal.open(file, BLOCK, MASK);
  assert.equal(state.truncatedBytes, 0, 'the zero-filled space was taken for a torn batch');
  assert.equal(state.batches, 51);
  assert.equal(state.sequence, 50);
  assert.equal(state.chunks.get(50 % 64)!.hash[0], 50);
  assert.equal(fs.statSync(file).size, length, 'the reopen cut the zero-filled space off');
  // A batch of the sequence alone (a FLUSH after rewrites of present sectors).
  await again.commit([], 51, SIZE);
  again.close();
  const last = Journal.open(file, BLOCK, MASK).state;
  assert.equal(last.sequence, 51);
  assert.equal(last.batches, 52);
  assert.equal(last.chunks.size, 50);
});

test('a torn batch in the zero-filled space is cut off, and a valid older batch behind it is never replayed', async () => {
  const file = path.join(dir, 'torn');
  const journal = await Journal.create(file, BLOCK, MASK, SIZE);
  await journal.commit([record(1, 1)], 1, SIZE);
  const tail = journal.bytes;
  // Two batches appended after it, as a crash may leave them: the first torn, the second whole.
  await journal.commit([record(2, 2), record(3, 3)], 2, SIZE);
  const second = journal.bytes;
  await journal.commit([record(4, 4)], 3, SIZE);
  journal.close();
  const bytes = fs.readFileSync(file);
  bytes[tail + 30] ^= 0xff;
  fs.writeFileSync(file, bytes);

  const { journal: reopened, state } = Journal.open(file, BLOCK, MASK);
  assert.equal(state.sequence, 1, 'a batch behind the torn one was replayed');
  assert.ok(state.truncatedBytes >= second - tail, `only ${state.truncatedBytes} bytes were cut off`);
  // A batch as long as the torn one, where it was: the older whole batch must not follow it on replay.
  await reopened.commit([record(5, 5), record(6, 6)], 2, SIZE);
  reopened.close();
  const replayed = Journal.open(file, BLOCK, MASK).state;
  assert.equal(replayed.sequence, 2);
  assert.deepEqual([...replayed.chunks.keys()].sort((a, b) => a - b), [1, 5, 6], 'a batch written before the crash came back after the tear');
});
