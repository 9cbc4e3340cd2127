// The store formats (DESIGN.md: Formats) as pure codecs: block compression, packs,
// manifests, leases and the host pack index file. Every decoder is fed damaged input of
// each kind and must throw a FormatError that names the object, never return wrong data.

import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { appendFileSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, test } from 'node:test';
import { Blake3Hasher } from '@napi-rs/blake-hash';
import { CODEC_LZ4, CODEC_NONE, CODEC_ZSTD, codecName, compressBlock, decompressBlock, parseCompression } from '../src/crypto/compress.js';
import type { CodecId } from '../src/crypto/compress.js';
import { ZERO_ALLOCATED_HASH, ZERO_HASH, blockHash } from '../src/crypto/hash.js';
import { PLAINTEXT } from '../src/crypto/cipher.js';
import { blockKey } from '../src/blocks/cache.js';
import { FormatError } from '../src/store/errors.js';
import { decodeLease, encodeLease, leaseIsLiveAt, type Lease } from '../src/store/lease.js';
import { ZERO_ALLOCATED_BLOCK, checkpointKey, leaseKey, manifestKey, type Manifest, type ManifestMeta } from '../src/store/manifest.js';
import { bodyPacks, manifestBody, relabelManifest } from '../src/store/manifest-body.js';
import { ManifestBuilder } from '../src/store/manifest-builder.js';
import { decodeManifest, decodeManifestBody } from '../src/store/manifest-decode.js';
import { patchManifestBody } from '../src/store/manifest-patch.js';
import { encodeManifest, sealManifest, storedTables, type StoredTables } from '../src/store/manifest-seal.js';
import { PackIndex, type PackLocation } from '../src/store/pack-index.js';
import { decodePackIndex, encodePack, packIdFromKey, packKey, unpackBlock, unpackRange, verifyPackId, type PackBlock } from '../src/store/pack.js';

const BLOCK = 128 * 1024;
const LZ4 = parseCompression('lz4');
const ZSTD = parseCompression('zstd');
const NONE = parseCompression('none');

// ---------------------------------------------------------------------------
// Helpers

/** A block that compresses well: text with some variety. */
function textBlock(seed: number, size = BLOCK): Buffer {
  const words = ['volume', 'chunk', 'block', 'pack', 'manifest', 'seal', 'lease', 'overlay', String(seed)];
  let text = '';
  for (let i = 0; text.length < size; i++) text += `${words[(i * 7 + seed) % words.length]} ${i % 1000} `;
  return Buffer.from(text.slice(0, size));
}

function packBlocks(n: number): PackBlock[] {
  // Every third block is random (stored uncompressed), the rest compress.
  return Array.from({ length: n }, (_, i) => {
    const data = i % 3 === 0 ? randomBytes(BLOCK) : textBlock(i);
    return { hash: blockHash(data), data };
  });
}

/** Runs `fn`, which must throw a FormatError about `key` whose message matches `pattern`. */
function assertFormatError(fn: () => unknown, key: string, pattern: RegExp): FormatError {
  try {
    fn();
  } catch (err) {
    assert.ok(err instanceof FormatError, `expected a FormatError, got ${String(err)}`);
    assert.equal(err.key, key);
    assert.ok(err.message.includes(key), `message does not name the key: ${err.message}`);
    assert.match(err.message, pattern);
    return err;
  }
  assert.fail(`no error; expected one matching ${pattern}`);
}

function flipped(buf: Buffer, at: number): Buffer {
  const copy = Buffer.from(buf);
  copy[at] ^= 0x40;
  return copy;
}

/** Recompute a pack's header+index checksum, as a (future or hostile) writer would. */
function resealPack(body: Buffer): Buffer {
  const count = body.readUInt32LE(12);
  const sum = new Blake3Hasher().update(body.subarray(0, 16)).update(body.subarray(32, 32 + 32 * count)).digestBuffer();
  sum.copy(body, 16, 0, 16);
  return body;
}

/** Recompute a manifest's checksum over header bytes 0..20 and the stored body. */
function resealManifest(body: Buffer): Buffer {
  const sum = new Blake3Hasher().update(body.subarray(0, 20)).update(body.subarray(36)).digestBuffer();
  sum.copy(body, 20, 0, 16);
  return body;
}

/** An uncompressed manifest laid out by hand from the documented format. */
function assembleManifest(metaJson: string, packs: string[], blocks: Buffer[], chunks: [number, number][]): Buffer {
  const meta = Buffer.from(metaJson);
  const u32 = (n: number) => {
    const b = Buffer.alloc(4);
    b.writeUInt32LE(n);
    return b;
  };
  const chunkTable = Buffer.alloc(chunks.length * 8);
  chunks.forEach(([chunk, block], i) => {
    chunkTable.writeUInt32LE(chunk, i * 8);
    chunkTable.writeUInt32LE(block, i * 8 + 4);
  });
  const raw = Buffer.concat([
    u32(meta.length),
    meta,
    u32(packs.length),
    ...packs.map((p) => Buffer.from(p, 'hex')),
    u32(blocks.length),
    ...blocks,
    u32(chunks.length),
    chunkTable,
  ]);
  const header = Buffer.alloc(36);
  Buffer.from('UPDMANI1').copy(header);
  header.writeUInt16LE(1, 8);
  header.writeUInt8(CODEC_NONE, 10);
  header.writeUInt8(0, 11);
  header.writeUInt32LE(raw.length, 12);
  header.writeUInt32LE(raw.length, 16);
  return resealManifest(Buffer.concat([header, raw]));
}

/** One 36-byte block table entry. */
function blockEntry(hash: Buffer, pack: number, offset: number, length: number, rawLength: number, codec: number): Buffer {
  const b = Buffer.alloc(36);
  hash.copy(b, 0);
  b.writeUInt32LE(pack, 16);
  b.writeUInt32LE(offset, 20);
  b.writeUInt32LE(length, 24);
  b.writeUInt32LE(rawLength, 28);
  b.writeUInt8(codec, 32);
  return b;
}

function meta(overrides: Partial<ManifestMeta> = {}): ManifestMeta {
  return {
    format: 1,
    name: 'tenant-a/vm-1',
    size: 10 * 1024 * 1024 * 1024,
    blockSize: BLOCK,
    sequence: 42,
    generation: 3,
    host: 'host-1',
    created: '2025-06-01T12:00:00.000Z',
    ...overrides,
  };
}

function randomPackId(): string {
  return randomBytes(16).toString('hex');
}

function location(pack: string, i: number, codec: CodecId = CODEC_LZ4): PackLocation {
  return { pack, offset: 64 + i * 1000, length: 900, rawLength: BLOCK, codec };
}

const tmpDirs: string[] = [];
function tmpDir(): string {
  const dir = mkdtempSync(join(tmpdir(), 'updraft-formats-'));
  tmpDirs.push(dir);
  return dir;
}
after(() => {
  for (const dir of tmpDirs) rmSync(dir, { recursive: true, force: true });
});

// ---------------------------------------------------------------------------
// Compression

describe('compression', () => {
  test('parseCompression accepts the configured forms and names the value it refuses', () => {
    assert.deepEqual(parseCompression('lz4'), { codec: CODEC_LZ4, level: 0, name: 'lz4' });
    assert.deepEqual(parseCompression('none'), { codec: CODEC_NONE, level: 0, name: 'none' });
    assert.deepEqual(parseCompression('zstd'), { codec: CODEC_ZSTD, level: 3, name: 'zstd-3' });
    assert.deepEqual(parseCompression('zstd-1'), { codec: CODEC_ZSTD, level: 1, name: 'zstd-1' });
    assert.deepEqual(parseCompression('zstd-19'), { codec: CODEC_ZSTD, level: 19, name: 'zstd-19' });
    for (const bad of ['gzip', '', 'zstd-0', 'zstd-20', 'zstd-03', 'LZ4', 'zstd-', 'zstd-1.5']) {
      assert.throws(() => parseCompression(bad), (err: Error) => err.message.includes(JSON.stringify(bad)) && err.message.includes('"zstd-N"'));
    }
  });

  for (const name of ['lz4', 'zstd-1', 'zstd-3', 'zstd-19']) {
    test(`${name}: a compressible block round-trips smaller`, () => {
      const c = parseCompression(name);
      const raw = textBlock(7);
      const { codec, data } = compressBlock(c, raw);
      assert.equal(codec, c.codec);
      assert.ok(data.length < raw.length / 2, `${name} stored ${data.length} bytes`);
      assert.deepEqual(decompressBlock(codec, data, raw.length), raw);
    });

    test(`${name}: a random block is stored as it is`, () => {
      const raw = randomBytes(BLOCK);
      const { codec, data } = compressBlock(parseCompression(name), raw);
      assert.equal(codec, CODEC_NONE);
      assert.equal(data, raw);
      assert.equal(decompressBlock(codec, data, raw.length), raw);
    });
  }

  test('none stores the block itself', () => {
    const raw = textBlock(1);
    assert.deepEqual(compressBlock(NONE, raw), { codec: CODEC_NONE, data: raw });
  });

  test('decompression to a different length than recorded fails, for every codec', () => {
    const raw = textBlock(3);
    for (const c of [LZ4, ZSTD]) {
      const { codec, data } = compressBlock(c, raw);
      assert.throws(() => decompressBlock(codec, data, raw.length - 1), /lz4|zstd/);
      assert.throws(() => decompressBlock(codec, data, raw.length + 1), /lz4|zstd/);
      assert.throws(() => decompressBlock(codec, data.subarray(0, data.length - 3), raw.length), /lz4|zstd/);
    }
    assert.throws(() => decompressBlock(CODEC_NONE, raw, raw.length + 1), /uncompressed/);
  });

  test('garbage, unknown codecs and absurd lengths are refused', () => {
    const garbage = randomBytes(1000);
    assert.throws(() => decompressBlock(CODEC_ZSTD, garbage, BLOCK), /zstd/);
    assert.throws(() => decompressBlock(CODEC_LZ4, Buffer.from([0xff, 0xff, 0xff]), BLOCK), /lz4/);
    assert.throws(() => decompressBlock(7 as CodecId, garbage, BLOCK), /unknown codec 7/);
    assert.throws(() => decompressBlock(CODEC_LZ4, garbage, 64 * 1024 * 1024), /outside/);
    assert.equal(codecName(CODEC_LZ4), 'lz4');
    assert.equal(codecName(9), 'unknown codec 9');
  });

  test('a zstd-compressed body larger than a block round-trips without the block bound', () => {
    const raw = Buffer.concat(Array.from({ length: 80 }, (_, i) => textBlock(i))); // 10 MiB
    const { codec, data } = compressBlock(ZSTD, raw);
    assert.equal(codec, CODEC_ZSTD);
    assert.throws(() => decompressBlock(codec, data, raw.length), /outside/);
    assert.deepEqual(decompressBlock(codec, data, raw.length, raw.length), raw);
  });
});

// ---------------------------------------------------------------------------
// Packs

describe('pack', () => {
  for (const c of [LZ4, ZSTD, NONE]) {
    test(`25 blocks round-trip with ${c.name}`, () => {
      const blocks = packBlocks(25);
      const pack = encodePack(blocks, c, PLAINTEXT);
      assert.match(pack.id, /^[0-9a-f]{32}$/);
      assert.equal(pack.key, `packs/${pack.id.slice(0, 2)}/${pack.id}`);
      assert.equal(packIdFromKey(pack.key), pack.id);
      verifyPackId(pack.key, pack.body);

      const entries = decodePackIndex(pack.key, pack.body, PLAINTEXT);
      assert.deepEqual(entries, pack.entries);
      for (let i = 0; i < blocks.length; i++) {
        assert.deepEqual(entries[i].hash, blocks[i].hash);
        if (c.codec !== CODEC_NONE && i % 3 !== 0) assert.equal(entries[i].codec, c.codec);
        if (i % 3 === 0 || c.codec === CODEC_NONE) assert.equal(entries[i].codec, CODEC_NONE);
        const block = unpackBlock(pack.key, pack.body, entries[i], PLAINTEXT);
        assert.deepEqual(block, blocks[i].data);
        const ranged = Buffer.from(pack.body.subarray(entries[i].offset, entries[i].offset + entries[i].length));
        assert.deepEqual(unpackRange(pack.key, ranged, entries[i], PLAINTEXT), blocks[i].data);
      }
      // Blocks are fresh buffers: scribbling over the pack body leaves them alone.
      const first = unpackBlock(pack.key, pack.body, entries[0], PLAINTEXT);
      pack.body.fill(0);
      assert.deepEqual(first, blocks[0].data);
    });
  }

  test('compressible blocks make a smaller pack', () => {
    const blocks = Array.from({ length: 25 }, (_, i) => {
      const data = textBlock(i);
      return { hash: blockHash(data), data };
    });
    assert.ok(encodePack(blocks, LZ4, PLAINTEXT).body.length < (25 * BLOCK) / 2);
  });

  test('the pack id is the hash of the body, and the same blocks make the same pack', () => {
    const blocks = packBlocks(4);
    assert.equal(encodePack(blocks, LZ4, PLAINTEXT).id, encodePack(blocks, LZ4, PLAINTEXT).id);
    assert.notEqual(encodePack(blocks, LZ4, PLAINTEXT).id, encodePack(blocks, ZSTD, PLAINTEXT).id);
  });

  test('encodePack refuses what must never be stored', () => {
    const blocks = packBlocks(2);
    assert.throws(() => encodePack([], LZ4, PLAINTEXT), /0 blocks/);
    assert.throws(() => encodePack([blocks[0], blocks[1], blocks[0]], LZ4, PLAINTEXT), /given twice/);
    assert.throws(() => encodePack([{ hash: blocks[1].hash, data: blocks[0].data }], LZ4, PLAINTEXT), /does not match its hash/);
    assert.throws(() => encodePack([{ hash: ZERO_HASH, data: Buffer.alloc(BLOCK) }], LZ4, PLAINTEXT), /zero name/);
  });

  test('pack keys', () => {
    const id = randomPackId();
    assert.equal(packKey(id), `packs/${id.slice(0, 2)}/${id}`);
    assert.throws(() => packKey('ABC'), /32 lowercase hex/);
    assert.equal(packIdFromKey(`packs/00/${id}`), id.startsWith('00') ? id : undefined);
    assert.equal(packIdFromKey(`volumes/${id}`), undefined);
    assert.equal(packIdFromKey(`packs/${id.slice(0, 2)}/${id}x`), undefined);
  });

  describe('damage', () => {
    const blocks = packBlocks(25);
    const pack = encodePack(blocks, LZ4, PLAINTEXT);
    const { key, body } = pack;
    const dataStart = 32 + 25 * 32;

    test('a flipped byte in the header fails the checksum', () => {
      for (const at of [10, 11, 12, 16, 31]) {
        assertFormatError(() => decodePackIndex(key, flipped(body, at), PLAINTEXT), key, /checksum mismatch|truncated/);
      }
    });

    test('a flipped byte in the index fails the checksum', () => {
      for (const at of [32, 32 + 5 * 32 + 17, dataStart - 1]) {
        assertFormatError(() => decodePackIndex(key, flipped(body, at), PLAINTEXT), key, /checksum mismatch/);
      }
    });

    test('a flipped byte in block data is caught by the block hash and the pack id', () => {
      const entry = pack.entries[1]; // compressed with lz4
      const damaged = flipped(body, entry.offset + Math.floor(entry.length / 2));
      assert.deepEqual(decodePackIndex(key, damaged, PLAINTEXT), pack.entries); // the index is intact
      assertFormatError(() => unpackBlock(key, damaged, entry, PLAINTEXT), key, new RegExp(`block ${entry.hash.toString('hex')}`));
      const plain = pack.entries[0]; // stored uncompressed
      assert.equal(plain.codec, CODEC_NONE);
      const damagedPlain = flipped(body, plain.offset + 100);
      assertFormatError(() => unpackBlock(key, damagedPlain, plain, PLAINTEXT), key, new RegExp(`block ${plain.hash.toString('hex')} is corrupt: its content hashes to`));
      assertFormatError(() => verifyPackId(key, damaged), key, /hashes to [0-9a-f]{32}, not to its id/);
    });

    test('a truncated body is refused', () => {
      const short = body.subarray(0, body.length - 10);
      assertFormatError(() => decodePackIndex(key, short, PLAINTEXT), key, /index entry 24 .* runs past the end of the body/);
      assertFormatError(() => verifyPackId(key, short), key, /truncated or corrupt/);
      assertFormatError(() => decodePackIndex(key, body.subarray(0, 100), PLAINTEXT), key, /truncated: the index of 25 blocks needs 832 bytes/);
      assertFormatError(() => decodePackIndex(key, body.subarray(0, 20), PLAINTEXT), key, /truncated: 20 bytes/);
      const last = pack.entries[24];
      assertFormatError(() => unpackBlock(key, short, last, PLAINTEXT), key, /runs past the end/);
    });

    test('a wrong magic, an unknown version and an unknown cipher are named', () => {
      const magic = Buffer.from(body);
      magic.write('UPDPACK2', 0);
      assertFormatError(() => decodePackIndex(key, magic, PLAINTEXT), key, /bad magic "UPDPACK2"/);
      const version = Buffer.from(body);
      version.writeUInt16LE(3, 8);
      assertFormatError(() => decodePackIndex(key, resealPack(version), PLAINTEXT), key, /format version 3; this reader knows versions 1 and 2/);
      const sealedVersion = Buffer.from(body);
      sealedVersion.writeUInt16LE(2, 8);
      assertFormatError(() => decodePackIndex(key, resealPack(sealedVersion), PLAINTEXT), key, /format version 2 \(sealed\) but its blocks are not sealed/);
      const cipher = Buffer.from(body);
      cipher.writeUInt8(1, 10);
      assertFormatError(() => decodePackIndex(key, resealPack(cipher), PLAINTEXT), key, /is encrypted \(xchacha20-poly1305\), but this store is not encrypted: refused/);
      const flags = Buffer.from(body);
      flags.writeUInt8(4, 11);
      assertFormatError(() => decodePackIndex(key, resealPack(flags), PLAINTEXT), key, /unknown flags 0x4/);
    });

    test('an index that passes its checksum but points outside the body or overlaps is refused', () => {
      const pastEnd = Buffer.from(body);
      pastEnd.writeUInt32LE(pack.entries[24].offset + 1000, 32 + 24 * 32 + 16);
      const pastEndMessage = /index entry 24 \(block [0-9a-f]{32}\) runs past the end of the body \(offset \d+ \+ length \d+ > \d+ bytes\)/;
      assertFormatError(() => decodePackIndex(key, resealPack(pastEnd), PLAINTEXT), key, pastEndMessage);
      const overlap = Buffer.from(body);
      overlap.writeUInt32LE(pack.entries[3].offset - 1, 32 + 4 * 32 + 16);
      assertFormatError(() => decodePackIndex(key, resealPack(overlap), PLAINTEXT), key, /index entry 4 .* overlaps the previous block/);
      const intoIndex = Buffer.from(body);
      intoIndex.writeUInt32LE(40, 32 + 16);
      assertFormatError(() => decodePackIndex(key, resealPack(intoIndex), PLAINTEXT), key, /index entry 0 .* overlaps the index/);
      const codec = Buffer.from(body);
      codec.writeUInt8(9, 32 + 2 * 32 + 28);
      assertFormatError(() => decodePackIndex(key, resealPack(codec), PLAINTEXT), key, /index entry 2 .* unknown codec 9/);
      const count = Buffer.from(body);
      count.writeUInt32LE(0, 12);
      assertFormatError(() => decodePackIndex(key, resealPack(count), PLAINTEXT), key, /holds 0 blocks/);
    });

    test('unpackBlock refuses a block whose content does not match the entry hash', () => {
      const entry = { ...pack.entries[2], hash: blocks[3].hash };
      assertFormatError(() => unpackBlock(key, body, entry, PLAINTEXT), key, new RegExp(`block ${blocks[3].hash.toString('hex')} is corrupt`));
    });

    test('unpackRange refuses a ranged GET of the wrong length', () => {
      const entry = pack.entries[5];
      const stored = body.subarray(entry.offset, entry.offset + entry.length - 1);
      assertFormatError(() => unpackRange(key, stored, entry, PLAINTEXT), key, new RegExp(`got ${entry.length - 1} stored bytes, the index says ${entry.length}`));
    });

    test('verifyPackId refuses a key that is not a pack key', () => {
      assertFormatError(() => verifyPackId('volumes/x/manifest', body), 'volumes/x/manifest', /not a pack key/);
    });
  });
});

// ---------------------------------------------------------------------------
// Manifests

describe('manifest', () => {
  test('an incremental manifest (base tables with changed chunks patched in) decodes to the same volume as a full layout', () => {
    // A model: chunk -> [hash, location] | 'zero'. Rounds of random changes, each patched
    // onto the previous body; every body decodes to exactly the model.
    const chunkCount = 5000;
    const m = meta({ size: chunkCount * BLOCK });
    const model = new Map<number, [Buffer, PackLocation] | 'zero'>();
    const builder = new ManifestBuilder(m);
    let pack = randomPackId();
    let inPack = 0;
    const newBlock = (): [Buffer, PackLocation] => {
      if (inPack === 25) [pack, inPack] = [randomPackId(), 0];
      return [randomBytes(16), location(pack, inPack++)];
    };
    for (let c = 0; c < chunkCount; c += 3) {
      const b = newBlock();
      model.set(c, b);
      builder.setChunk(c, b[0], b[1]);
    }
    const locations = new Map<string, PackLocation>();
    for (const v of model.values()) if (v !== 'zero') locations.set(blockKey(v[0]), v[1]);
    let raw = manifestBody(builder.build(), 0);
    let appendedTotal = 0;
    let lent: StoredTables | undefined;
    for (let round = 1; round <= 6; round++) {
      const changed = new Map<number, string | undefined>();
      for (let n = 0; n < 300; n++) {
        const c = Math.floor(Math.random() * chunkCount);
        const r = Math.random();
        const existing = [...model.values()].filter((v): v is [Buffer, PackLocation] => v !== 'zero');
        if (r < 0.2) {
          model.delete(c); // a hole (trim), or nothing if it was one
          changed.set(c, undefined);
        } else if (r < 0.3) {
          model.set(c, 'zero');
          changed.set(c, blockKey(ZERO_ALLOCATED_HASH));
        } else if (r < 0.5 && existing.length > 0) {
          const b = existing[Math.floor(Math.random() * existing.length)]; // dedup: a block named elsewhere
          model.set(c, b);
          changed.set(c, blockKey(b[0]));
        } else {
          const b = newBlock();
          model.set(c, b);
          locations.set(blockKey(b[0]), b[1]);
          changed.set(c, blockKey(b[0]));
        }
      }
      const changes = [...changed].sort((a, b) => a[0] - b[0]);
      const patched = patchManifestBody(raw, meta({ size: chunkCount * BLOCK, sequence: 42 + round }), changes, (key) => locations.get(key)!, 0);
      appendedTotal += patched.appended;
      raw = patched.raw;
      const key = manifestKey('tenant-a/vm-1');
      // Lent the last round's frames, the stored bytes are those of compressing everything anew.
      const sealed = sealManifest(key, raw, ZSTD, PLAINTEXT, lent);
      const body = sealed.body;
      assert.ok(body.equals(sealManifest(key, raw, ZSTD, PLAINTEXT).body), `round ${round}: lent frames changed the stored bytes`);
      lent = sealed.tables;
      const decoded = decodeManifest(key, body, PLAINTEXT);
      assert.equal(decoded.meta.sequence, 42 + round);
      const got = new Map<number, string>();
      for (let i = 0; i < decoded.chunks.length; i++) {
        const b = decoded.chunkBlocks[i];
        got.set(decoded.chunks[i], b === ZERO_ALLOCATED_BLOCK ? 'zero' : `${decoded.blocks[b].hash.toString('hex')}@${decoded.blocks[b].pack}:${decoded.blocks[b].offset}`);
      }
      const want = new Map<number, string>();
      for (const [c, v] of model) want.set(c, v === 'zero' ? 'zero' : `${v[0].toString('hex')}@${v[1].pack}:${v[1].offset}`);
      assert.deepEqual(got, want, `round ${round}`);
      // Every pack a block names is in the pack table GC counts.
      const packs = bodyPacks(raw);
      for (const b of decoded.blocks) assert.ok(packs.has(b.pack));
      const opened = decodeManifestBody(key, body, PLAINTEXT);
      assert.deepEqual(opened.raw, raw);
      // The tables' frame is found again and carries them under another meta (a lazy fork).
      const frame = storedTables(opened, ZSTD);
      assert.ok(frame !== undefined, 'the stored tables frame was not found');
      assert.ok(frame.frame.equals(sealed.tables!.frame));
      const forkKey = manifestKey('tenant-b/fork');
      const forkMeta = meta({ name: 'tenant-b/fork', size: chunkCount * BLOCK, parent: { name: 'tenant-a/vm-1', sequence: 42 + round } });
      const forked = decodeManifest(forkKey, sealManifest(forkKey, relabelManifest(raw, forkMeta), ZSTD, PLAINTEXT, frame).body, PLAINTEXT);
      assert.equal(forked.meta.name, 'tenant-b/fork');
      assert.deepEqual([...forked.chunks], [...decoded.chunks]);
      assert.deepEqual([...forked.chunkBlocks], [...decoded.chunkBlocks]);
    }
    assert.ok(appendedTotal > 0);
    // Changes must ascend inside the volume.
    assert.throws(() => patchManifestBody(raw, m, [[9, undefined], [3, undefined]], () => location(pack, 0), 0), /ascending/);
    assert.throws(() => patchManifestBody(raw, m, [[chunkCount, undefined]], () => location(pack, 0), 0), /ascending, each once, below 5000/);
  });

  test('a manifest written again with a few chunks changed compresses only the segments they touch', () => {
    // 65,536 chunks (8 GiB) of distinct blocks, 25 to a pack; then 8 chunks changed.
    const chunkCount = 65536;
    const builder = new ManifestBuilder(meta({ size: chunkCount * BLOCK }));
    let pack = randomPackId();
    for (let c = 0; c < chunkCount; c++) {
      if (c % 25 === 0) pack = randomPackId();
      builder.setChunk(c, randomBytes(16), location(pack, c % 25));
    }
    const key = manifestKey('tenant-a/vm-1');
    const first = sealManifest(key, manifestBody(builder.build(), 0), ZSTD, PLAINTEXT);
    const segments = first.tables!.segments!.size;
    assert.ok(segments > 40, `${segments} segments`);
    assert.equal(first.tables!.compressed, segments);
    const fresh = randomPackId();
    const changes: Array<[number, string]> = [100, 101, 20000, 20001, 40000, 50000, 65000, 65535].map((c) => [c, blockKey(randomBytes(16))]);
    const locations = new Map(changes.map(([, k], i) => [k, location(fresh, i)]));
    const patched = patchManifestBody(manifestBody(builder.build(), 0), meta({ size: chunkCount * BLOCK, sequence: 43 }), changes, (k) => locations.get(k)!, 0);
    const second = sealManifest(key, patched.raw, ZSTD, PLAINTEXT, first.tables);
    // The meta is its own frame; of the tables: the pack count and last pack segment, the
    // block count and last block segment (appended to), the chunk count is unchanged, and
    // the 6 chunk segments the 8 chunks fall in.
    assert.ok(second.tables!.compressed <= 10, `${second.tables!.compressed} of ${second.tables!.segments!.size} segments compressed again for 8 changed chunks`);
    assert.ok(second.body.equals(sealManifest(key, patched.raw, ZSTD, PLAINTEXT).body), 'lent frames changed the stored bytes');
    const decoded = decodeManifest(key, second.body, PLAINTEXT);
    assert.equal(decoded.chunks.length, chunkCount);
    assert.equal(decoded.blocks[decoded.chunkBlocks[20000]].pack, fresh);
  });

  function sampleManifest(): { manifest: Manifest; packs: string[] } {
    const packs = [randomPackId(), randomPackId()];
    const builder = new ManifestBuilder(meta({ parent: { name: 'golden/base', sequence: 7 } }));
    const h = (i: number) => blockHash(textBlock(i));
    builder.setChunk(5, h(1), location(packs[0], 0));
    builder.setChunk(1, h(2), location(packs[1], 0, CODEC_ZSTD));
    builder.setChunk(9, h(1)); // dedup: same block, no location needed
    builder.setChunk(3, 'zero-allocated');
    builder.setChunk(4, ZERO_ALLOCATED_HASH);
    builder.setChunk(7, h(3), location(packs[0], 1));
    builder.setChunk(7, ZERO_HASH); // a hole again: absent, and block 3 is no longer named
    builder.setChunk(81919, h(4), { pack: packs[1], offset: 5000, length: BLOCK, rawLength: BLOCK, codec: CODEC_NONE });
    return { manifest: builder.build(), packs };
  }

  test('the builder sorts chunks, dedups blocks and drops blocks no chunk names', () => {
    const { manifest, packs } = sampleManifest();
    assert.deepEqual([...manifest.chunks], [1, 3, 4, 5, 9, 81919]);
    assert.deepEqual([...manifest.chunkBlocks], [0, ZERO_ALLOCATED_BLOCK, ZERO_ALLOCATED_BLOCK, 1, 1, 2]);
    assert.equal(manifest.blocks.length, 3);
    assert.deepEqual(manifest.blocks[0].hash, blockHash(textBlock(2)));
    assert.equal(manifest.blocks[0].pack, packs[1]);
    assert.equal(manifest.blocks[0].codec, CODEC_ZSTD);
  });

  for (const c of [ZSTD, LZ4, NONE, parseCompression('zstd-19')]) {
    test(`round trip with ${c.name}, including zero-allocated chunks and a parent`, () => {
      const { manifest } = sampleManifest();
      const key = manifestKey(manifest.meta.name);
      const body = encodeManifest('volumes/v/manifest', manifest, c, PLAINTEXT);
      assert.equal(body.toString('latin1', 0, 8), 'UPDMANI1');
      assert.deepEqual(decodeManifest(key, body, PLAINTEXT), manifest);
    });
  }

  test('a manifest with no mapped chunks round-trips', () => {
    const empty = new ManifestBuilder(meta()).build();
    assert.equal(empty.chunks.length, 0);
    const decoded = decodeManifest('volumes/v/manifest', encodeManifest('volumes/v/manifest', empty, ZSTD, PLAINTEXT), PLAINTEXT);
    assert.deepEqual(decoded, empty);
  });

  test('the size grows with mapped chunks, not with the volume size', () => {
    const build = (size: number, chunks: number) => {
      const builder = new ManifestBuilder(meta({ size }));
      const pack = randomPackId();
      for (let i = 0; i < chunks; i++) builder.setChunk(i * 8, blockHash(textBlock(i, 4096)), location(pack, i));
      return encodeManifest('volumes/v/manifest', builder.build(), ZSTD, PLAINTEXT).length;
    };
    const small = build(2 ** 30, 100); // 1 GiB
    const huge = build(2 ** 50, 100); // 1 PiB
    assert.ok(Math.abs(huge - small) < 16, `1 GiB: ${small} bytes, 1 PiB: ${huge} bytes`);
    assert.ok(build(2 ** 30, 1000) > small * 5);
  });

  test('keys', () => {
    assert.equal(manifestKey('a/b'), 'volumes/a/b/manifest');
    assert.equal(leaseKey('a/b'), 'volumes/a/b/lease');
    assert.equal(checkpointKey('a/b', 'before-upgrade.1'), 'volumes/a/b/checkpoints/before-upgrade.1');
    assert.throws(() => manifestKey('../x'), /'\.\.' segment/);
    assert.throws(() => leaseKey(''), /empty/);
    assert.throws(() => checkpointKey('a', 'x/y'), /'\/'/);
    assert.throws(() => checkpointKey('a', '..'), /checkpoint name/);
  });

  test('encodeManifest refuses a manifest that would not decode', () => {
    const { manifest } = sampleManifest();
    const unsorted = { ...manifest, chunks: Uint32Array.from([1, 3, 4, 9, 5, 81919]) };
    assert.throws(() => encodeManifest('volumes/v/manifest', unsorted, ZSTD, PLAINTEXT), /chunk 5 after chunk 9/);
    const pastEnd = { ...manifest, chunks: Uint32Array.from([1, 3, 4, 5, 9, 81920]) };
    assert.throws(() => encodeManifest('volumes/v/manifest', pastEnd, ZSTD, PLAINTEXT), /chunk 81920 is past the end of the volume \(81920 chunks\)/);
    const badIndex = { ...manifest, chunkBlocks: Uint32Array.from([0, 1, 2, 3, 4, 5]) };
    assert.throws(() => encodeManifest('volumes/v/manifest', badIndex, ZSTD, PLAINTEXT), /names block 3 of 3/);
    const badMeta = { ...manifest, meta: { ...manifest.meta, blockSize: 1000 } };
    assert.throws(() => encodeManifest('volumes/v/manifest', badMeta, ZSTD, PLAINTEXT), /field blockSize/);
    const zero = { ...manifest, blocks: [{ ...manifest.blocks[0], hash: ZERO_HASH }, ...manifest.blocks.slice(1)] };
    assert.throws(() => encodeManifest('volumes/v/manifest', zero, ZSTD, PLAINTEXT), /zero name/);
    assert.throws(() => new ManifestBuilder(meta()).setChunk(3, blockHash(textBlock(1))), /has no pack location/);
    assert.throws(() => new ManifestBuilder(meta()).setChunk(81920, 'zero-allocated'), /outside the volume/);
  });

  describe('damage', () => {
    const key = 'volumes/tenant-a/vm-1/manifest';
    const { manifest, packs } = sampleManifest();
    const body = encodeManifest('volumes/v/manifest', manifest, ZSTD, PLAINTEXT);

    test('a flipped byte anywhere in header or body is caught', () => {
      for (const at of [10, 11, 12, 13, 20, 35, 36, 40, body.length - 1]) {
        assertFormatError(() => decodeManifest(key, flipped(body, at), PLAINTEXT), key, /checksum mismatch/);
      }
      for (const at of [16, 17]) {
        assertFormatError(() => decodeManifest(key, flipped(body, at), PLAINTEXT), key, /the header says \d+ stored body bytes, the object has \d+/);
      }
    });

    test('a truncated object is refused', () => {
      assertFormatError(() => decodeManifest(key, body.subarray(0, body.length - 1), PLAINTEXT), key, /truncated or corrupt/);
      assertFormatError(() => decodeManifest(key, body.subarray(0, 30), PLAINTEXT), key, /truncated: 30 bytes/);
      assertFormatError(() => decodeManifest(key, Buffer.alloc(0), PLAINTEXT), key, /truncated: 0 bytes/);
    });

    test('a wrong magic, an unknown version, cipher or codec are named', () => {
      const magic = Buffer.from(body);
      magic.write('UPDPACK1', 0);
      assertFormatError(() => decodeManifest(key, magic, PLAINTEXT), key, /bad magic "UPDPACK1"/);
      const version = Buffer.from(body);
      version.writeUInt16LE(3, 8);
      assertFormatError(() => decodeManifest(key, resealManifest(version), PLAINTEXT), key, /format version 3/);
      const cipher = Buffer.from(body);
      cipher.writeUInt8(2, 11);
      assertFormatError(() => decodeManifest(key, resealManifest(cipher), PLAINTEXT), key, /is encrypted \(unknown cipher 2\), but this store is not encrypted/);
      const codec = Buffer.from(body);
      codec.writeUInt8(5, 10);
      assertFormatError(() => decodeManifest(key, resealManifest(codec), PLAINTEXT), key, /unknown codec 5/);
      const rawLength = Buffer.from(body);
      rawLength.writeUInt32LE(rawLength.readUInt32LE(12) + 1, 12);
      assertFormatError(() => decodeManifest(key, resealManifest(rawLength), PLAINTEXT), key, /does not decompress \(zstd\)/);
    });

    test('the hand-assembled layout decodes as documented', () => {
      const h = blockHash(textBlock(1));
      const chunks: [number, number][] = [
        [2, 0],
        [6, ZERO_ALLOCATED_BLOCK],
      ];
      const decoded = decodeManifest(key, assembleManifest(JSON.stringify(meta()), [packs[0]], [blockEntry(h, 0, 64, 900, BLOCK, CODEC_LZ4)], chunks), PLAINTEXT);
      assert.deepEqual([...decoded.chunks], [2, 6]);
      assert.deepEqual([...decoded.chunkBlocks], [0, ZERO_ALLOCATED_BLOCK]);
      assert.deepEqual(decoded.blocks, [{ hash: h, pack: packs[0], offset: 64, length: 900, rawLength: BLOCK, codec: CODEC_LZ4 }]);
      assert.deepEqual(decoded.meta, meta());
    });

    test('content that passes the checksum but breaks the rules is refused with what is wrong', () => {
      const h = blockHash(textBlock(1));
      const good = blockEntry(h, 0, 64, 900, BLOCK, CODEC_LZ4);
      const json = JSON.stringify(meta());
      const cases: [Buffer, RegExp][] = [
        [assembleManifest(json, [packs[0]], [good], [[6, 0], [2, 0]]), /chunk table entry 1: chunk 2 after chunk 6/],
        [assembleManifest(json, [packs[0]], [good], [[2, 0], [2, 0]]), /chunk 2 after chunk 2/],
        [assembleManifest(json, [packs[0]], [good], [[81920, 0]]), /chunk 81920 is past the end of the volume \(81920 chunks of 131072 bytes\)/],
        [assembleManifest(json, [packs[0]], [good], [[2, 1]]), /chunk 2 names block 1 of 1/],
        [assembleManifest(json, [packs[0]], [blockEntry(h, 1, 64, 900, BLOCK, CODEC_LZ4)], [[2, 0]]), /names pack 1 of 1/],
        [assembleManifest(json, [packs[0]], [blockEntry(h, 0, 64, 900, BLOCK, 4)], [[2, 0]]), /unknown codec 4/],
        [assembleManifest(json, [packs[0]], [blockEntry(h, 0, 64, 900, BLOCK * 2, CODEC_LZ4)], [[2, 0]]), /raw length 262144; the volume's block size/],
        [assembleManifest(json, [packs[0]], [blockEntry(h, 0, 64, 900, BLOCK / 2, CODEC_LZ4)], [[2, 0]]), /raw length 65536; the volume's block size/],
        [assembleManifest(json, [packs[0]], [blockEntry(h, 0, 64, 900, BLOCK, CODEC_NONE)], [[2, 0]]), /stored uncompressed in 900 bytes/],
        [assembleManifest(json, [packs[0]], [blockEntry(ZERO_HASH, 0, 64, 900, BLOCK, CODEC_LZ4)], [[2, 0]]), /zero name/],
        [assembleManifest(JSON.stringify({ ...meta(), sequence: '42' }), [], [], []), /meta field sequence: .*number/],
        [assembleManifest(JSON.stringify({ ...meta(), name: 'a//b' }), [], [], []), /meta field name: .*empty segment/],
        [assembleManifest(JSON.stringify({ ...meta(), created: 'yesterday' }), [], [], []), /meta field created: expected an ISO time/],
        [assembleManifest(JSON.stringify({ ...meta(), format: 2 }), [], [], []), /meta field format/],
        [assembleManifest(JSON.stringify({ ...meta(), parent: { name: 'p', sequence: -1 } }), [], [], []), /meta field parent.sequence/],
        [assembleManifest(JSON.stringify({ ...meta(), host: undefined }), [], [], []), /meta field host/],
        [assembleManifest('{"format":1,', [], [], []), /meta is not JSON/],
      ];
      for (const [damaged, pattern] of cases) assertFormatError(() => decodeManifest(key, damaged, PLAINTEXT), key, pattern);
      // Tables that claim more entries than the body holds, and bytes after the last table.
      const counted = assembleManifest(json, [packs[0]], [good], [[2, 0]]);
      const chunkCountAt = counted.length - 8 - 4;
      counted.writeUInt32LE(2, chunkCountAt);
      assertFormatError(() => decodeManifest(key, resealManifest(counted), PLAINTEXT), key, /chunk table of 2 entries runs past the end of the body/);
      const trailing = assembleManifest(json, [packs[0]], [good], [[2, 0]]);
      const longer = Buffer.concat([trailing, Buffer.from([0])]);
      longer.writeUInt32LE(longer.length - 36, 12);
      longer.writeUInt32LE(longer.length - 36, 16);
      assertFormatError(() => decodeManifest(key, resealManifest(longer), PLAINTEXT), key, /1 bytes after the chunk table/);
    });
  });
});

// ---------------------------------------------------------------------------
// Leases

describe('lease', () => {
  const key = 'volumes/tenant-a/vm-1/lease';
  const lease: Lease = {
    format: 1,
    volume: 'tenant-a/vm-1',
    owner: 'host-1',
    generation: 4,
    expires: '2025-06-01T12:01:00.000Z',
    acquired: '2025-06-01T12:00:00.000Z',
  };

  test('round trip, and liveness by release and by its TTL from the store\'s stamp (whole seconds), whatever its times say', () => {
    assert.deepEqual(decodeLease(key, encodeLease(lease)), lease);
    assert.deepEqual(decodeLease(key, encodeLease({ ...lease, released: true })), { ...lease, released: true });
    // Stamped by the store a day after the holder's clock said: the TTL (60 s) counts from the stamp.
    const stamp = new Date(Date.parse(lease.acquired) + 86_400_000);
    const end = stamp.getTime() + 1000 + 60_000;
    assert.equal(leaseIsLiveAt(lease, stamp, end), true);
    assert.equal(leaseIsLiveAt(lease, stamp, end + 1), false);
    assert.equal(leaseIsLiveAt({ ...lease, released: true }, stamp, stamp.getTime()), false);
  });

  test('a bad lease is a FormatError naming the key and the field', () => {
    const cases: [unknown, RegExp][] = [
      [{ ...lease, generation: '4' }, /field generation: .*number/],
      [{ ...lease, generation: 1.5 }, /field generation/],
      [{ ...lease, owner: undefined }, /field owner/],
      [{ ...lease, owner: '' }, /field owner/],
      [{ ...lease, expires: 'tomorrow' }, /field expires: expected an ISO time/],
      [{ ...lease, acquired: 12 }, /field acquired/],
      [{ ...lease, format: 2 }, /field format/],
      [{ ...lease, released: 'yes' }, /field released/],
      [{ ...lease, volume: 'tenant-b/vm-1' }, /field volume: names volume "tenant-b\/vm-1", not "tenant-a\/vm-1"/],
      [[], /field \(top level\)/],
    ];
    for (const [value, pattern] of cases) {
      assertFormatError(() => decodeLease(key, Buffer.from(JSON.stringify(value))), key, pattern);
    }
    assertFormatError(() => decodeLease(key, Buffer.from('{"format":1')), key, /not JSON/);
    assert.throws(() => encodeLease({ ...lease, generation: -1 }), /field generation/);
  });
});

// ---------------------------------------------------------------------------
// Host pack index

describe('pack index', () => {
  const HEADER = 16;
  const RECORD = 52;
  const key = (i: number) => blockKey(blockHash(Buffer.from(`block ${i}`)));

  test('entries persist across reopen', () => {
    const file = join(tmpDir(), 'pack-index');
    const [a, b] = [randomPackId(), randomPackId()];
    const index = PackIndex.open(file);
    assert.equal(index.size, 0);
    index.add([
      [key(1), location(a, 0)],
      [key(2), location(a, 1, CODEC_NONE)],
      [key(3), location(b, 0, CODEC_ZSTD)],
    ]);
    assert.equal(index.size, 3);
    assert.deepEqual(index.get(key(2)), location(a, 1, CODEC_NONE));
    assert.equal(index.has(key(4)), false);
    assert.equal(index.get(key(4)), undefined);
    index.close();
    assert.equal(statSync(file).size, HEADER + 3 * RECORD);

    const reopened = PackIndex.open(file);
    assert.equal(reopened.size, 3);
    assert.equal(reopened.truncatedBytes, 0);
    for (const [k, loc] of [
      [key(1), location(a, 0)],
      [key(2), location(a, 1, CODEC_NONE)],
      [key(3), location(b, 0, CODEC_ZSTD)],
    ] as const) {
      assert.deepEqual(reopened.get(k), loc);
    }
    reopened.close();
  });

  test('adding an unchanged entry writes nothing; a changed one moves the block', async () => {
    const file = join(tmpDir(), 'pack-index');
    const [a, b] = [randomPackId(), randomPackId()];
    const index = PackIndex.open(file);
    index.add([[key(1), location(a, 0)]]);
    index.add([[key(1), location(a, 0)]]);
    assert.equal(statSync(file).size, HEADER + RECORD);
    index.add([[key(1), location(b, 3)]]);
    assert.deepEqual(index.get(key(1)), location(b, 3));
    assert.equal(index.removePack(a), 0); // the block moved on
    assert.deepEqual(index.get(key(1)), location(b, 3));
    await index.sync();
    index.close();
    const reopened = PackIndex.open(file);
    assert.deepEqual(reopened.get(key(1)), location(b, 3));
    reopened.close();
  });

  test('a torn tail is cut on open; the records before it survive', () => {
    const file = join(tmpDir(), 'pack-index');
    const a = randomPackId();
    const index = PackIndex.open(file);
    index.add(Array.from({ length: 5 }, (_, i) => [key(i), location(a, i)] as [string, PackLocation]));
    index.close();
    const intact = readFileSync(file);

    // A partial record.
    appendFileSync(file, intact.subarray(HEADER, HEADER + 30));
    let reopened = PackIndex.open(file);
    assert.equal(reopened.truncatedBytes, 30);
    assert.equal(reopened.size, 5);
    reopened.close();
    assert.deepEqual(readFileSync(file), intact);

    // Whole records of garbage, and zeros (a file extended but never written).
    appendFileSync(file, Buffer.concat([randomBytes(RECORD), Buffer.alloc(2 * RECORD + 7)]));
    reopened = PackIndex.open(file);
    assert.equal(reopened.truncatedBytes, 3 * RECORD + 7);
    assert.equal(reopened.corruptRecords, 0);
    assert.equal(reopened.size, 5);
    for (let i = 0; i < 5; i++) assert.deepEqual(reopened.get(key(i)), location(a, i));
    // Appends continue where the good records end.
    reopened.add([[key(9), location(a, 9)]]);
    reopened.close();
    reopened = PackIndex.open(file);
    assert.equal(reopened.size, 6);
    assert.equal(reopened.truncatedBytes, 0);
    reopened.close();
  });

  test('a corrupt record in the middle is dropped alone, and the file rewritten without it', () => {
    const file = join(tmpDir(), 'pack-index');
    const a = randomPackId();
    const index = PackIndex.open(file);
    index.add(Array.from({ length: 4 }, (_, i) => [key(i), location(a, i)] as [string, PackLocation]));
    index.close();
    const bytes = readFileSync(file);
    bytes[HEADER + RECORD + 33] ^= 1; // record 1's offset
    writeFileSync(file, bytes);
    let reopened = PackIndex.open(file);
    assert.equal(reopened.corruptRecords, 1);
    assert.equal(reopened.truncatedBytes, 0);
    assert.equal(reopened.size, 3);
    assert.equal(reopened.has(key(1)), false);
    assert.deepEqual(reopened.get(key(3)), location(a, 3));
    reopened.close();
    assert.equal(statSync(file).size, HEADER + 3 * RECORD);
    reopened = PackIndex.open(file);
    assert.equal(reopened.corruptRecords, 0);
    assert.equal(reopened.size, 3);
    reopened.close();
  });

  test('a file that is not a pack index is refused, not overwritten', () => {
    const file = join(tmpDir(), 'pack-index');
    writeFileSync(file, 'not a pack index at all');
    assert.throws(() => PackIndex.open(file), (err: Error) => err instanceof FormatError && /bad magic/.test(err.message) && err.message.includes(file));
    assert.equal(readFileSync(file, 'utf8'), 'not a pack index at all');
  });

  test('removePack drops the pack’s blocks, and stays dropped across reopen', async () => {
    const file = join(tmpDir(), 'pack-index');
    const [a, b] = [randomPackId(), randomPackId()];
    const index = PackIndex.open(file);
    index.add([
      [key(1), location(a, 0)],
      [key(2), location(a, 1)],
      [key(3), location(b, 0)],
    ]);
    assert.equal(index.removePack(a), 2);
    assert.equal(index.removePack(a), 0);
    assert.equal(index.size, 1);
    assert.equal(index.has(key(1)), false);
    // The same pack id coming back later (re-uploaded) is recorded again.
    index.add([[key(2), location(a, 5)]]);
    await index.sync();
    index.close();

    const reopened = PackIndex.open(file);
    assert.equal(reopened.size, 2);
    assert.equal(reopened.get(key(1)), undefined);
    assert.deepEqual(reopened.get(key(2)), location(a, 5));
    assert.deepEqual(reopened.get(key(3)), location(b, 0));
    assert.equal(reopened.removePack(b), 1);
    reopened.close();
    const third = PackIndex.open(file);
    assert.equal(third.size, 1);
    assert.equal(third.has(key(3)), false);
    third.close();
  });

  test('compaction keeps the content, including blocks added while it runs', async () => {
    const file = join(tmpDir(), 'pack-index');
    const packs = Array.from({ length: 250 }, () => randomPackId());
    const index = PackIndex.open(file);
    const expected = new Map<string, PackLocation>();
    for (let p = 0; p < packs.length; p++) {
      const batch: [string, PackLocation][] = [];
      for (let i = 0; i < 25; i++) {
        const k = key(p * 25 + i);
        batch.push([k, location(packs[p], i)]);
        expected.set(k, location(packs[p], i));
      }
      index.add(batch);
    }
    // Remove 200 packs: 5000 dead block records + 200 pack-removed records > 1250 live.
    for (let p = 0; p < 200; p++) {
      assert.equal(index.removePack(packs[p]), 25);
      for (let i = 0; i < 25; i++) expected.delete(key(p * 25 + i));
    }
    const before = statSync(file).size;
    assert.equal(before, HEADER + (6250 + 200) * RECORD);
    const syncing = index.sync();
    await new Promise((resolve) => setImmediate(resolve));
    // Changes while the rewrite may be in flight must land in the new file.
    const late = randomPackId();
    index.add([[key(99999), location(late, 0)]]);
    expected.set(key(99999), location(late, 0));
    assert.equal(index.removePack(packs[249]), 25);
    for (let i = 0; i < 25; i++) expected.delete(key(249 * 25 + i));
    await syncing;
    await index.sync();
    assert.ok(statSync(file).size < before / 4, `file is ${statSync(file).size} bytes after compaction, ${before} before`);
    assert.equal(index.size, expected.size);
    index.close();

    const reopened = PackIndex.open(file);
    assert.equal(reopened.size, expected.size);
    assert.equal(reopened.truncatedBytes, 0);
    for (const [k, loc] of expected) assert.deepEqual(reopened.get(k), loc);
    reopened.close();
  });

  test('add refuses malformed locations and keys', () => {
    const index = PackIndex.open(join(tmpDir(), 'pack-index'));
    assert.throws(() => index.add([[key(1), { ...location(randomPackId(), 0), pack: 'xyz' }]]), /pack id "xyz"/);
    assert.throws(() => index.add([[key(1), { ...location(randomPackId(), 0), codec: 5 as CodecId }]]), /codec 5/);
    assert.throws(() => index.add([['short', location(randomPackId(), 0)]]), /block key of 5 characters/);
    assert.throws(() => index.removePack('nope'), /not 32 lowercase hex/);
    assert.equal(index.size, 0);
    index.close();
    assert.throws(() => index.add([[key(1), location(randomPackId(), 0)]]), /closed/);
  });
});
