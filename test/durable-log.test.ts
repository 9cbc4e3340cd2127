// The durable log's parts without a daemon: the log object format (round trips, plain and
// sealed; a torn or changed object is refused naming its key), the changed-sector set of a
// volume, which log objects the sweep deletes, and a replica's view of a log laid over reads.
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { test } from 'node:test';
import { newDataKey, PLAINTEXT, storeCipher } from '../src/crypto/cipher.js';
import { parseCompression } from '../src/crypto/compress.js';
import { openObjectStore } from '../src/objectstore/index.js';
import { FormatError } from '../src/store/errors.js';
import { decodeLog, encodeLog, logKey, sweepLogObjects, type LogRecord } from '../src/store/log.js';
import { ChangedSectors } from '../src/volume/changes.js';
import { LogView, type ViewEntry } from '../src/volume/log-view.js';
import { removeDir, scratchDir } from './harness/daemon.js';

function record(volume = 'acme/vm-1', generation = 3, sequence = 42): LogRecord {
  const data = randomBytes(12_288);
  return {
    host: 'host-a', created: 1_790_000_000_000,
    entries: [
      { volume, generation, manifestSequence: 30, sequence, size: 1 << 30, extents: [
        { offset: 4096, length: data.length, zero: false, data },
        { offset: 1 << 20, length: 131_072, zero: true },
      ] },
      { volume: 'other', generation: 1, manifestSequence: -1, sequence: 7, size: 1 << 20, extents: [{ offset: 0, length: 512, zero: false, data: Buffer.alloc(512, 9) }] },
    ],
  };
}

for (const [label, cipher] of [['plaintext', PLAINTEXT], ['sealed', storeCipher(newDataKey())]] as const) {
  test(`log objects round-trip (${label}, lz4 and zstd) and are refused naming the key when torn, changed or opened with another key`, () => {
    const key = logKey('host-a', Date.now(), 1);
    for (const compression of ['lz4', 'zstd-3', 'none']) {
      const r = record();
      const body = encodeLog(key, r, parseCompression(compression), cipher);
      assert.deepEqual(decodeLog(key, body, cipher), r);
      if (cipher !== PLAINTEXT) assert.equal(body.indexOf(r.entries[0].extents[0].data!.subarray(0, 32)), -1, 'sealed log holds plaintext');
      for (const bad of [body.subarray(0, body.length - 1), body.subarray(0, 20), Buffer.concat([body, Buffer.alloc(1)])]) {
        assert.throws(() => decodeLog(key, bad, cipher), (err: unknown) => err instanceof FormatError && err.message.includes(key) && /truncated|shorter|extended/.test(err.message));
      }
      const flipped = Buffer.from(body);
      flipped[flipped.length - 3] ^= 1;
      assert.throws(() => decodeLog(key, flipped, cipher), (err: unknown) => err instanceof FormatError && err.message.includes(key) && /checksum/.test(err.message));
    }
    const other = cipher === PLAINTEXT ? storeCipher(newDataKey()) : PLAINTEXT;
    assert.throws(() => decodeLog(key, encodeLog(key, record(), parseCompression('lz4'), cipher), other), (err: unknown) => err instanceof FormatError && err.message.includes(key));
    // Sealed for its key: the same bytes under another key do not open.
    if (cipher !== PLAINTEXT) {
      const moved = logKey('host-a', Date.now(), 2);
      assert.throws(() => decodeLog(moved, encodeLog(key, record(), parseCompression('lz4'), cipher), cipher), /does not decrypt/);
    }
  });
}

test('log keys sort by time per host', () => {
  const keys = [logKey('h', 1_000, 5), logKey('h', 999_999, 0), logKey('h', 1_000, 6), logKey('h', 12_345_678, 1)];
  assert.deepEqual([...keys].sort(), [keys[0], keys[2], keys[1], keys[3]]);
  assert.ok(logKey('h', 1, 1).startsWith('log/h/'));
});

test('changed sectors: marks widen to whole sectors, join across chunks, cut at the size, and a failed commit merges back', () => {
  const changes = new ChangedSectors(131_072);
  changes.add(100, 10);
  changes.add(131_072 - 4096, 8192);
  changes.add(4096 * 40, 4096);
  assert.deepEqual(changes.extents(1 << 30), [
    { offset: 0, length: 4096 },
    { offset: 131_072 - 4096, length: 8192 },
    { offset: 4096 * 40, length: 4096 },
  ]);
  assert.equal(changes.bytes, 4 * 4096);
  assert.deepEqual(changes.extents(4096 * 40 + 100), [
    { offset: 0, length: 4096 },
    { offset: 131_072 - 4096, length: 8192 },
    { offset: 4096 * 40, length: 100 },
  ]);
  const taken = changes.take();
  assert.equal(changes.size, 0);
  changes.add(0, 4096);
  changes.merge(taken);
  assert.equal(changes.bytes, 4 * 4096);
});

test('the sweep deletes log objects every entry of which a manifest covers (or a later generation replaced), and keeps the others', async (t) => {
  const dir = await scratchDir('updraft-log-sweep-');
  t.after(() => removeDir(dir));
  const store = openObjectStore(`file://${dir}`, {});
  t.after(() => store.close());
  const put = async (n: number, entries: LogRecord['entries']) => {
    const key = logKey('host-a', 1000 + n, n);
    await store.put(key, encodeLog(key, { host: 'host-a', created: 0, entries }, parseCompression('lz4'), PLAINTEXT));
    return key;
  };
  const entry = (volume: string, generation: number, sequence: number) => ({ volume, generation, manifestSequence: 0, sequence, size: 4096, extents: [{ offset: 0, length: 4096, zero: true }] });
  const manifests: Record<string, { generation: number; sequence: number }> = { a: { generation: 2, sequence: 10 }, b: { generation: 5, sequence: 3 } };
  const covered = await put(1, [entry('a', 2, 9), entry('a', 2, 10)]);
  const needed = await put(2, [entry('a', 2, 9), entry('b', 5, 4)]);
  const stale = await put(3, [entry('b', 4, 100)]);
  const gone = await put(4, [entry('deleted-volume', 1, 1)]);
  const ahead = await put(5, [entry('a', 2, 11)]);
  const swept = await sweepLogObjects(store, PLAINTEXT, async (v) => manifests[v]);
  assert.deepEqual(swept.deleted.sort(), [covered, stale, gone].sort());
  assert.deepEqual((await store.list('log/')).map((o) => o.key).sort(), [needed, ahead].sort());
});

test('a log view lays its entries over any read as applying them in sequence order would: later entries win, zeroed ranges, a short last sector, reads across chunks', () => {
  const blockSize = 128 * 1024;
  // A volume whose size ends mid-sector, so the last extent is cut short as a log commit cuts it.
  const size = 3 * blockSize + 4096 * 5 + 1000;
  const base = randomBytes(size);
  const entries: ViewEntry[] = [];
  const expected = Buffer.from(base);
  const rng = (n: number) => Math.floor(Math.random() * n);
  for (let sequence = 10; sequence < 40; sequence += 3) {
    const extents = [];
    for (let i = 0; i < 3; i++) {
      const offset = rng(Math.ceil(size / 4096)) * 4096;
      const length = Math.min(size - offset, (1 + rng(40)) * 4096);
      if (rng(4) === 0) {
        extents.push({ offset, length, zero: true });
        expected.fill(0, offset, offset + length);
      } else {
        const data = randomBytes(length);
        extents.push({ offset, length, zero: false, data });
        data.copy(expected, offset);
      }
    }
    entries.push({ sequence, extents });
  }
  const view = new LogView(entries, blockSize);
  assert.equal(view.sequence, 37);
  assert.equal(view.entries, entries.length);
  for (let i = 0; i < 300; i++) {
    const offset = rng(size);
    const length = 1 + rng(Math.min(size - offset, 3 * blockSize));
    const dst = Buffer.alloc(length + 16, 0xee);
    base.copy(dst, 8, offset, offset + length);
    view.patch(offset, length, dst, 8);
    assert.ok(dst.subarray(8, 8 + length).equals(expected.subarray(offset, offset + length)), `read at ${offset}+${length} differs from the entries applied in order`);
    assert.ok(dst.subarray(0, 8).every((b) => b === 0xee) && dst.subarray(8 + length).every((b) => b === 0xee), `read at ${offset}+${length} wrote outside its range`);
  }
  // Every chunk an entry touched, and only those, holds data in the view.
  for (let chunk = 0; chunk * blockSize < size; chunk++) {
    const touched = entries.some((e) => e.extents.some((x) => x.offset < (chunk + 1) * blockSize && x.offset + x.length > chunk * blockSize));
    assert.equal(view.has(chunk), touched, `chunk ${chunk}`);
  }
  assert.throws(() => new LogView([{ sequence: 5, extents: [] }, { sequence: 4, extents: [] }], blockSize), /must ascend/);
  assert.throws(() => new LogView([{ sequence: 5, extents: [{ offset: 512, length: 4096, zero: true }] }], blockSize), /does not start on a 4096-byte sector/);
});
