// Coverage-guided fuzzing of the NBD server and of every stored format's decoder (targets
// in test/fuzz/targets/, docs/fuzzing.md). Here: every input of the checked-in corpus
// (seeds and the inputs of past findings) replays through its target in this process, the
// findings' fixes are checked directly, and each target gets a short Jazzer.js pass.

import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, describe, test } from 'node:test';
import { CODEC_LZ4, CODEC_ZSTD, compressBlock, decompressBlock, parseCompression } from '../src/crypto/compress.js';
import { Journal } from '../src/volume/journal.js';
import { ROOT, runTarget, TARGETS } from './fuzz/jazzer.js';
import { nbdSlowReader } from './fuzz/seeds.js';

/** Seconds of fuzzing per target in this test; a long pass is `npm run fuzz`. */
const SECONDS = Number(process.env.UPDRAFT_FUZZ_SECONDS ?? 5);

const workDir = fs.mkdtempSync(path.join(os.tmpdir(), 'updraft-fuzz-test-'));
after(() => fs.rmSync(workDir, { recursive: true, force: true }));

describe('fuzz corpus replay', () => {
  for (const target of TARGETS) {
    test(`${target}: every corpus input passes the target's checks`, async () => {
      const dir = path.join(ROOT, 'test/fuzz/corpus', target);
      const inputs = fs.readdirSync(dir);
      assert.ok(inputs.some((f) => f.startsWith('seed-')), `${dir} has no seeds`);
      const { fuzz } = (await import(`./fuzz/targets/${target}.js`)) as { fuzz: (data: Buffer) => void | Promise<void> };
      for (const input of inputs) {
        try {
          await fuzz(fs.readFileSync(path.join(dir, input)));
        } catch (err) {
          assert.fail(`${target}: corpus input ${input}: ${(err as Error).stack}`);
        }
      }
    });
  }
});

describe('fuzz target checks', () => {
  test('the NBD target holds the server to its bound of replies queued for a client that does not read', async () => {
    const { fuzz } = (await import('./fuzz/targets/nbd.js')) as { fuzz: (data: Buffer) => Promise<void> };
    // 400 reads of 266 KB: 106 MB of replies; the server stops serving past 64 MiB queued.
    await fuzz(nbdSlowReader(400));
  });

  test('the bound holds while its large replies wait for their turns beside another connection', async () => {
    const { fuzz, anotherSender } = (await import('./fuzz/targets/nbd.js')) as { fuzz: (data: Buffer) => Promise<void>; anotherSender: () => void };
    // Replies waiting for their turn (src/nbd/reply-pacer.ts) count as queued.
    anotherSender();
    await fuzz(nbdSlowReader(400));
  });
});

describe('fuzz findings', () => {
  test('decompression refuses a raw length its input cannot produce, before allocating it', () => {
    // A 296-byte manifest body whose header claimed 4278190400 raw bytes of lz4.
    assert.throws(() => decompressBlock(CODEC_LZ4, Buffer.alloc(296, 0x11), 4278190400, 0xffffffff), /lz4: 296 bytes cannot decompress to 4278190400/);
    const frame = compressBlock(parseCompression('zstd-1'), Buffer.alloc(65536, 7));
    assert.equal(frame.codec, CODEC_ZSTD);
    assert.throws(() => decompressBlock(CODEC_ZSTD, frame.data, 0xfffffff0, 0xffffffff), /zstd: the frames hold 65536 bytes, expected 4294967280/);
    assert.throws(() => decompressBlock(CODEC_ZSTD, Buffer.from('not a zstd frame'), 100), /^Error: zstd: /);
    // The largest expansions real data reaches still decompress.
    for (const compression of ['lz4', 'zstd-1']) {
      const raw = Buffer.alloc(4 * 1024 * 1024, 1);
      const stored = compressBlock(parseCompression(compression), raw);
      assert.ok(decompressBlock(stored.codec, stored.data, raw.length).equals(raw), compression);
    }
  });

  test("a journal written with another sector mask size than the volume's is refused", async () => {
    const file = path.join(workDir, 'journal');
    const journal = await Journal.create(file, 65536, 2, 65536 * 4);
    journal.close();
    assert.equal(Journal.open(file, 65536, 2).state.batches, 1);
    const body = fs.readFileSync(file);
    body.writeUInt32BE(0xffffffff, 12);
    fs.writeFileSync(file, body);
    assert.throws(() => Journal.open(file, 65536, 2), new RegExp(`^Error: journal ${file}: written with 4294967295-byte sector masks, the volume's 65536-byte chunks have 2$`));
  });
});

// Two targets at a time: each Jazzer process runs on one core.
describe('fuzz findings: the journal', () => {
  test("a journal batch naming a chunk past the end of its volume is refused", async () => {
    const file = path.join(workDir, 'journal-chunks');
    const journal = await Journal.create(file, 65536, 2, 65536 * 4);
    await journal.commit([{ chunk: 3, hash: Buffer.alloc(16, 1), mask: Buffer.alloc(2) }], 1, 65536 * 4);
    journal.close();
    assert.equal(Journal.open(file, 65536, 2).state.chunks.size, 1);
    // 2^32 + 3: past the volume, and an alias of chunk 3 for a 32-bit page index.
    const far = await Journal.create(file, 65536, 2, 65536 * 4);
    await far.commit([{ chunk: 2 ** 32 + 3, hash: Buffer.alloc(16, 1), mask: Buffer.alloc(2) }], 1, 65536 * 4);
    far.close();
    assert.throws(() => Journal.open(file, 65536, 2), /^Error: journal .*journal-chunks: the batch at byte \d+ names chunk 4294967299, past the end of its 262144-byte volume$/);
  });

  test('a journal whose volume shrinks from one batch to the next is refused', async () => {
    const file = path.join(workDir, 'journal-size');
    const journal = await Journal.create(file, 65536, 2, 65536 * 4);
    await journal.commit([{ chunk: 3, hash: Buffer.alloc(16, 1), mask: Buffer.alloc(2) }], 1, 65536 * 4);
    await journal.commit([], 2, 65536);
    journal.close();
    assert.throws(() => Journal.open(file, 65536, 2), /^Error: journal .*journal-size: the batch at byte \d+ records a 65536-byte volume, smaller than the 262144 bytes before it$/);
  });
});

describe('fuzzing with Jazzer.js', { concurrency: 2 }, () => {
  for (const target of TARGETS) {
    test(`${target}: ${SECONDS} s of coverage-guided fuzzing find nothing`, async (t) => {
      const run = await runTarget({ target, seconds: SECONDS, workDir });
      t.diagnostic(`${target}: ${run.executions} executions, ${run.coverage} edges covered`);
      // The finding and its input come first: a report may keep only the head of the message.
      const finding = run.finding ? `\n${run.finding}` : '';
      const crash = run.crash ? `\ncrashing input (base64): ${run.crash.toString('base64')}` : '';
      assert.equal(run.code, 0, `${target}: Jazzer exited with ${run.code}:${finding}${crash}\nthe last lines it printed:\n${run.output}`);
      // Edges are counted in the instrumented product modules only: none means no coverage guidance.
      assert.ok(run.coverage > 0 && run.executions > 0, `${target}: ${run.executions} executions covered ${run.coverage} edges:\n${run.output}`);
    });
  }
});
