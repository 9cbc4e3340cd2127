// Store encryption: the formats under a cipher (a ranged read of one block,
// tampering, splicing, a manifest moved to another key, mixing), store.json and its
// passwords, and daemons on an encrypted file:// and MinIO store: no plaintext and no
// plain BLAKE3 in the store, dedup across volumes, tampered objects read as EIO, wrong /
// missing / unexpected passwords refused with the store untouched, change-password.
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { Blake3Hasher } from '@napi-rs/blake-hash';
import { stringify } from 'smol-toml';
import { PLAINTEXT, SEAL_OVERHEAD, sealLabel, storeCipher, newDataKey, type StoreCipher } from '../src/crypto/cipher.js';
import { parseCompression } from '../src/crypto/compress.js';
import { blockHash } from '../src/crypto/hash.js';
import { FileObjectStore, openObjectStore, type ObjectStore } from '../src/objectstore/index.js';
import { decodeBootSet, encodeBootSet } from '../src/store/boot-set.js';
import { FormatError } from '../src/store/errors.js';
import { changePassword, openStoreIdentity, readIdentity, StoreKeyError } from '../src/store/identity.js';
import { ManifestBuilder } from '../src/store/manifest-builder.js';
import { decodeManifest } from '../src/store/manifest-decode.js';
import { encodeManifest } from '../src/store/manifest-seal.js';
import { PackThreads } from '../src/store/pack-threads.js';
import { decodePackIndex, encodePack, packKey, unpackBlock, unpackRange, verifyPackId, type PackBlock } from '../src/store/pack.js';
import { connect, createVolume, drain, metric, MiB, CHUNK, readAll, startCluster, waitFor, withLogs, writeRandom, type Cluster, type SharedStore } from './harness/cluster.js';
import { DAEMON_MAIN, mergeToml, removeDir, scratchDir, type TomlTable } from './harness/daemon.js';
import { minioForTests, minioStore } from './harness/minio.js';
import { NbdCommandError } from './harness/nbd-client.js';
import { requireTools, run, runOk, TOOLS } from './harness/tools.js';

const TIMEOUT = 300_000;
const BLOCK = 128 * 1024;
const LZ4 = parseCompression('lz4');
const ZSTD = parseCompression('zstd-3');

function textBlock(i: number, size = BLOCK): Buffer {
  const line = `block ${i}: the quick brown fox jumps over the lazy dog, again and again\n`;
  return Buffer.from(line.repeat(Math.ceil(size / line.length)).slice(0, size));
}

function packBlocks(cipher: StoreCipher, n: number, make: (i: number) => Buffer): PackBlock[] {
  return Array.from({ length: n }, (_, i) => {
    const data = make(i);
    return { hash: cipher.blockHash(data), data };
  });
}

function assertFormatError(fn: () => unknown, key: string, pattern: RegExp): void {
  assert.throws(fn, (err: unknown) => {
    assert.ok(err instanceof FormatError, `expected a FormatError, got ${String(err)}`);
    assert.equal(err.key, key);
    assert.match(err.message, pattern);
    assert.ok(err.message.includes(key), `the message names the object: ${err.message}`);
    return true;
  });
}

function flipped(body: Buffer, at: number): Buffer {
  const copy = Buffer.from(body);
  copy[at] ^= 0x40;
  return copy;
}

/** A pack body changed by an adversary who keeps it well-formed: its unkeyed checksum recomputed, stored under the id of the new header and index. */
function forgedPack(body: Buffer, indexEnd: number): { key: string; body: Buffer } {
  const copy = Buffer.from(body);
  new Blake3Hasher().update(copy.subarray(0, 16)).update(copy.subarray(32, indexEnd)).digestBuffer().copy(copy, 16, 0, 16);
  return { key: packKey(new Blake3Hasher().update(copy.subarray(0, indexEnd)).digestBuffer().toString('hex', 0, 16)), body: copy };
}

/** The same for a manifest: checksum over bytes 0..20 and the stored body. */
function resealedManifest(body: Buffer): Buffer {
  const copy = Buffer.from(body);
  new Blake3Hasher().update(copy.subarray(0, 20)).update(copy.subarray(36)).digestBuffer().copy(copy, 20, 0, 16);
  return copy;
}

describe('packs opened on worker threads (the cold-read path)', () => {
  const cipher = storeCipher(newDataKey());
  const openers = new PackThreads(cipher, 2);
  after(() => openers.close());

  /** Asserts that `promise` rejects with a FormatError naming `key` whose message matches `pattern`. */
  async function rejectsFormat(promise: Promise<unknown>, key: string, pattern: RegExp): Promise<void> {
    await assert.rejects(promise, (err: unknown) => {
      assert.ok(err instanceof FormatError, `expected a FormatError, got ${String(err)}`);
      assert.equal(err.key, key);
      assert.match(err.message, pattern);
      assert.ok(err.message.includes(key), `the message names the object: ${err.message}`);
      return true;
    });
  }

  test('every block comes back with its name and content, whole packs handed over without a copy, small pooled ones copied', async () => {
    for (const [c, name] of [[cipher, 'encrypted'], [PLAINTEXT, 'plaintext']] as const) {
      const own = c === cipher ? openers : new PackThreads(PLAINTEXT, 1);
      const blocks = packBlocks(c, 25, (i) => (i % 2 ? randomBytes(BLOCK) : textBlock(i)));
      const pack = encodePack(blocks, LZ4, c);
      const body = Buffer.from(pack.body);
      const opened = await own.open(pack.key, body);
      assert.deepEqual(opened.map((b) => b.hash.toString('hex')), blocks.map((b) => b.hash.toString('hex')), name);
      assert.ok(opened.every((b, i) => b.data.equals(blocks[i].data)), `${name}: a block came back changed`);
      assert.equal(body.length, 0, `${name}: the body was copied to the worker, not transferred`);
      // A pack smaller than Buffer's pool slab shares its ArrayBuffer: it must be copied, the neighbours left intact.
      const tiny = packBlocks(c, 2, (i) => textBlock(i, 300));
      const small = encodePack(tiny, ZSTD, c);
      const pooled = Buffer.from(small.body);
      const neighbour = Buffer.from('still here');
      assert.ok(pooled.buffer === neighbour.buffer || pooled.byteLength < pooled.buffer.byteLength, 'the small body is a view of a bigger buffer');
      const got = await own.open(small.key, pooled);
      assert.deepEqual(got.map((b) => b.data.toString()), tiny.map((b) => b.data.toString()));
      assert.equal(neighbour.toString(), 'still here');
      assert.ok(pooled.equals(small.body), 'a pooled body was detached');
      if (own !== openers) await own.close();
    }
  });

  test('a tampered, truncated or foreign pack is a FormatError naming the key, from the worker as in-thread', async () => {
    const blocks = packBlocks(cipher, 25, () => randomBytes(BLOCK));
    const pack = encodePack(blocks, LZ4, cipher);
    const indexEnd = 32 + 25 * 32 + SEAL_OVERHEAD;
    // A sealed pack's id names its header and index; its blocks prove themselves by their tags.
    assert.equal(pack.body.readUInt16LE(8), 2, 'a sealed pack is version 2');
    await rejectsFormat(openers.open(pack.key, flipped(pack.body, 40)), pack.key, /header and sealed index .* not to its id/);
    await rejectsFormat(openers.open(pack.key, flipped(pack.body, pack.entries[3].offset + 5)), pack.key, /block [0-9a-f]{32} does not decrypt with this store's key/);
    await rejectsFormat(openers.open(pack.key, pack.body.subarray(0, pack.body.length - 9)), pack.key, /index entry 24 .* runs past the end of the body/);
    const forged = forgedPack(flipped(pack.body, pack.entries[7].offset + 30), indexEnd);
    await rejectsFormat(openers.open(forged.key, forged.body), forged.key, /block [0-9a-f]{32} does not decrypt with this store's key/);
    const forgedIndex = forgedPack(flipped(pack.body, 40), indexEnd);
    await rejectsFormat(openers.open(forgedIndex.key, forgedIndex.body), forgedIndex.key, /the index does not decrypt/);
    const foreign = encodePack(packBlocks(PLAINTEXT, 3, (i) => textBlock(i)), LZ4, PLAINTEXT);
    await rejectsFormat(openers.open(foreign.key, foreign.body), foreign.key, /is not encrypted, but this store is/);
    const stranger = storeCipher(newDataKey());
    const otherKey = encodePack(packBlocks(stranger, 3, (i) => textBlock(i)), LZ4, stranger);
    await rejectsFormat(openers.open(otherKey.key, otherKey.body), otherKey.key, /does not decrypt/);
    // The pool still works after failures.
    assert.equal((await openers.open(pack.key, Buffer.from(pack.body))).length, 25);
  });
});

describe('formats under a cipher', () => {
  const cipher = storeCipher(newDataKey());
  const other = storeCipher(newDataKey());

  test('block names are keyed: not plain BLAKE3, equal for equal blocks, different under another key', () => {
    const data = textBlock(1);
    assert.notDeepEqual(cipher.blockHash(data), blockHash(data));
    assert.deepEqual(cipher.blockHash(Buffer.from(data)), cipher.blockHash(data));
    assert.notDeepEqual(other.blockHash(data), cipher.blockHash(data));
    assert.equal(cipher.blockHash(data).length, 16);
    assert.notDeepEqual(cipher.namesId, PLAINTEXT.namesId);
    assert.notDeepEqual(cipher.namesId, other.namesId);
  });

  test('a sealed pack round-trips, whole and by a ranged read of one block, and holds no plaintext', () => {
    for (const c of [LZ4, ZSTD, parseCompression('none')]) {
      const blocks = packBlocks(cipher, 25, (i) => (i % 2 ? textBlock(i) : randomBytes(BLOCK)));
      const pack = encodePack(blocks, c, cipher);
      verifyPackId(pack.key, pack.body);
      assert.equal(pack.body.readUInt8(10), 1, 'cipher id 1 in the header');
      const entries = decodePackIndex(pack.key, pack.body, cipher);
      assert.deepEqual(entries, pack.entries);
      for (let i = 0; i < 25; i++) {
        assert.deepEqual(unpackBlock(pack.key, pack.body, entries[i], cipher), blocks[i].data);
        const ranged = pack.body.subarray(entries[i].offset, entries[i].offset + entries[i].length);
        assert.deepEqual(unpackRange(pack.key, Buffer.from(ranged), entries[i], cipher), blocks[i].data);
      }
      // Neither content, nor names, nor plain hashes are in the body.
      assert.equal(pack.body.includes(Buffer.from('the quick brown fox')), false);
      for (const b of blocks) {
        assert.equal(pack.body.includes(b.hash), false, 'a keyed name is in the clear');
        assert.equal(pack.body.includes(blockHash(b.data)), false, 'a plain BLAKE3 is in the pack');
      }
    }
  });

  test('a sealed pack of version 1 (named by its whole body, as written before version 2) still reads', () => {
    const blocks = packBlocks(cipher, 5, (i) => textBlock(i));
    const pack = encodePack(blocks, LZ4, cipher);
    const indexEnd = 32 + 5 * 32 + SEAL_OVERHEAD;
    // What an earlier writer made: version 1 in the header (bound to the index as its AAD), the id of every byte.
    const old = Buffer.from(pack.body);
    const index = cipher.open(old.subarray(32, indexEnd), sealLabel('pack index', pack.body.subarray(0, 16)));
    old.writeUInt16LE(1, 8);
    cipher.sealInto(old.subarray(32, indexEnd), index, sealLabel('pack index', old.subarray(0, 16)));
    new Blake3Hasher().update(old.subarray(0, 16)).update(old.subarray(32, indexEnd)).digestBuffer().copy(old, 16, 0, 16);
    const key = packKey(new Blake3Hasher().update(old).digestBuffer().toString('hex', 0, 16));
    verifyPackId(key, old);
    assertFormatError(() => verifyPackId(key, flipped(old, pack.entries[2].offset + 1)), key, /the \d+-byte body hashes to [0-9a-f]{32}, not to its id/);
    const entries = decodePackIndex(key, old, cipher);
    assert.deepEqual(entries.map((e) => unpackBlock(key, old, e, cipher)), blocks.map((b) => b.data));
  });

  test('compression comes before encryption: a compressible block still shrinks', () => {
    const pack = encodePack(packBlocks(cipher, 25, (i) => textBlock(i)), LZ4, cipher);
    assert.ok(pack.body.length < (25 * BLOCK) / 4, `${pack.body.length} bytes for 25 text blocks`);
    assert.ok(pack.entries.every((e) => e.codec === 1 && e.length < e.rawLength));
  });

  describe('tampering', () => {
    const blocks = packBlocks(cipher, 25, () => randomBytes(BLOCK));
    const pack = encodePack(blocks, LZ4, cipher);
    const indexEnd = 32 + 25 * 32 + SEAL_OVERHEAD;

    test('a flipped byte in a sealed block: that block does not open, whole or ranged, even in a well-formed pack', () => {
      const entry = pack.entries[7];
      for (const at of [entry.offset, entry.offset + 30, entry.offset + entry.length - 1]) {
        const forged = forgedPack(flipped(pack.body, at), indexEnd);
        verifyPackId(forged.key, forged.body); // the adversary made it consistent
        assert.deepEqual(decodePackIndex(forged.key, forged.body, cipher), pack.entries);
        assertFormatError(() => unpackBlock(forged.key, forged.body, entry, cipher), forged.key, /block [0-9a-f]{32} does not decrypt with this store's key/);
        const ranged = forged.body.subarray(entry.offset, entry.offset + entry.length);
        assertFormatError(() => unpackRange(forged.key, ranged, entry, cipher), forged.key, /does not decrypt/);
        // Its neighbours still read.
        assert.deepEqual(unpackBlock(forged.key, forged.body, pack.entries[8], cipher), blocks[8].data);
      }
      // The pack id names the header and sealed index, not the sealed blocks (each has its tag):
      // an unforged flip in the index is caught by the id already, one in a block by its tag.
      assertFormatError(() => verifyPackId(pack.key, flipped(pack.body, indexEnd - 1)), pack.key, /not to its id/);
      verifyPackId(pack.key, flipped(pack.body, entry.offset + 3));
      assertFormatError(() => verifyPackId(pack.key, pack.body.subarray(0, indexEnd - 1)), pack.key, /truncated/);
    });

    test('a flipped byte in the sealed pack index: the index does not open', () => {
      for (const at of [32, 32 + 24 + 5 * 32 + 17, indexEnd - 1]) {
        const forged = forgedPack(flipped(pack.body, at), indexEnd);
        assertFormatError(() => decodePackIndex(forged.key, forged.body, cipher), forged.key, /the index does not decrypt with this store's key/);
      }
      const count = Buffer.from(pack.body);
      count.writeUInt32LE(24, 12); // a header field bound as associated data
      const forged = forgedPack(count, indexEnd - 32);
      assertFormatError(() => decodePackIndex(forged.key, forged.body, cipher), forged.key, /does not decrypt|checksum/);
    });

    test('two blocks swapped between packs (or within one) do not open where they now sit', () => {
      const blocks2 = packBlocks(cipher, 25, () => randomBytes(BLOCK));
      const pack2 = encodePack(blocks2, LZ4, cipher);
      const a = pack.entries[3];
      const b = pack2.entries[11];
      assert.equal(a.length, b.length, 'random blocks are stored raw, so equal lengths');
      const spliced = Buffer.from(pack.body);
      pack2.body.copy(spliced, a.offset, b.offset, b.offset + b.length);
      const forged = forgedPack(spliced, indexEnd);
      assertFormatError(() => unpackBlock(forged.key, forged.body, a, cipher), forged.key, /block [0-9a-f]{32} does not decrypt/);
      // Within one pack: block 3's bytes at block 4's place.
      const within = Buffer.from(pack.body);
      pack.body.copy(within, pack.entries[4].offset, a.offset, a.offset + a.length);
      const forged2 = forgedPack(within, indexEnd);
      assertFormatError(() => unpackBlock(forged2.key, forged2.body, pack.entries[4], cipher), forged2.key, /does not decrypt/);
      // A ranged read of a block under another block's entry (a manifest naming the wrong place).
      const stolen = pack2.body.subarray(b.offset, b.offset + b.length);
      assertFormatError(() => unpackRange(pack.key, stolen, a, cipher), pack.key, /does not decrypt/);
    });

    test('a pack sealed under another data key does not open', () => {
      assertFormatError(() => decodePackIndex(pack.key, pack.body, other), pack.key, /the index does not decrypt/);
    });

    test('a store is never mixed: a plaintext pack in an encrypted store, and the reverse, are refused by name', () => {
      const plainBlocks = packBlocks(PLAINTEXT, 3, (i) => textBlock(i));
      const plain = encodePack(plainBlocks, LZ4, PLAINTEXT);
      assertFormatError(() => decodePackIndex(plain.key, plain.body, cipher), plain.key, /is not encrypted, but this store is: refused/);
      assertFormatError(() => decodePackIndex(pack.key, pack.body, PLAINTEXT), pack.key, /is encrypted \(xchacha20-poly1305\), but this store is not encrypted/);
      assert.throws(() => encodePack(plainBlocks, LZ4, cipher), /does not match its hash/, 'plain names are not this store\'s names');
    });
  });

  describe('manifests', () => {
    const key = 'volumes/tenant-a/vm-1/manifest';
    const blocks = packBlocks(cipher, 5, (i) => textBlock(i));
    const pack = encodePack(blocks, LZ4, cipher);
    const builder = new ManifestBuilder({
      format: 1, name: 'tenant-a/vm-1', size: 64 * MiB, blockSize: BLOCK, sequence: 9, generation: 2, host: 'host-a', created: new Date().toISOString(),
    });
    blocks.forEach((b, i) => builder.setChunk(i * 3, b.hash, { pack: pack.id, ...pack.entries[i] }));
    builder.setChunk(40, 'zero-allocated');
    const manifest = builder.build();
    const body = encodeManifest(key, manifest, ZSTD, cipher);

    test('round-trips, and holds neither names nor pack ids nor the volume name in the clear', () => {
      assert.equal(body.readUInt8(11), 1);
      assert.deepEqual(decodeManifest(key, body, cipher), manifest);
      assert.equal(body.includes(Buffer.from('tenant-a')), false);
      assert.equal(body.includes(Buffer.from('host-a')), false);
      assert.equal(body.includes(Buffer.from(pack.id, 'hex')), false);
      for (const b of blocks) assert.equal(body.includes(b.hash), false);
    });

    test('a flipped byte (checksum made to match) does not open', () => {
      for (const at of [36, 36 + 24 + 3, body.length - 1, 12]) {
        assertFormatError(() => decodeManifest(key, resealedManifest(flipped(body, at)), cipher), key, /does not decrypt with this store's key|does not decompress/);
      }
      assertFormatError(() => decodeManifest(key, flipped(body, 40), cipher), key, /checksum mismatch/);
    });

    test('a manifest opens only under its own key: not as another volume, not as a checkpoint standing in for the manifest', () => {
      assertFormatError(() => decodeManifest('volumes/tenant-b/vm-1/manifest', body, cipher), 'volumes/tenant-b/vm-1/manifest', /does not decrypt/);
      const checkpoint = encodeManifest('volumes/tenant-a/vm-1/checkpoints/old', manifest, ZSTD, cipher);
      assertFormatError(() => decodeManifest(key, checkpoint, cipher), key, /does not decrypt/);
    });

    test('mixing is refused both ways', () => {
      const plain = encodeManifest(key, manifest, ZSTD, PLAINTEXT);
      assertFormatError(() => decodeManifest(key, plain, cipher), key, /is not encrypted, but this store is/);
      assertFormatError(() => decodeManifest(key, body, PLAINTEXT), key, /is encrypted \(xchacha20-poly1305\)/);
    });

    test('boot sets are sealed too, bound to their key', () => {
      const set = { format: 1, volume: 'tenant-a/vm-1', blockSize: BLOCK, seconds: 5, chunks: [1, 2, 3] };
      const sealed = encodeBootSet('volumes/tenant-a/vm-1/bootset', set, cipher);
      assert.equal(sealed.includes(Buffer.from('tenant-a')), false);
      assert.deepEqual(decodeBootSet('volumes/tenant-a/vm-1/bootset', sealed, cipher), set);
      assertFormatError(() => decodeBootSet('volumes/x/bootset', sealed, cipher), 'volumes/x/bootset', /does not decrypt/);
      assertFormatError(() => decodeBootSet('volumes/x/bootset', encodeBootSet('volumes/x/bootset', set, PLAINTEXT), cipher), 'volumes/x/bootset', /is not encrypted/);
      assertFormatError(() => decodeBootSet('volumes/x/bootset', sealed, PLAINTEXT), 'volumes/x/bootset', /is encrypted/);
      assert.deepEqual(decodeBootSet('volumes/x/bootset', encodeBootSet('volumes/x/bootset', set, PLAINTEXT), PLAINTEXT), set);
    });
  });
});

/** key → SHA-256 of the body, of every object in the store. */
async function storeSnapshot(store: ObjectStore): Promise<Map<string, string>> {
  const out = new Map<string, string>();
  for (const o of await store.list('')) {
    const object = await store.get(o.key);
    if (object) out.set(o.key, createHash('sha256').update(object.body).digest('hex'));
  }
  return out;
}

describe('store.json and passwords', () => {
  let dir: string;
  before(async () => {
    dir = await scratchDir('updraft-crypt-identity-');
  });
  after(async () => {
    await removeDir(dir);
  });
  const folderStore = (name: string) => {
    fs.mkdirSync(path.join(dir, name), { recursive: true });
    return new FileObjectStore(path.join(dir, name));
  };

  test('an encrypted store is created with a wrapped key; wrong, missing and unexpected passwords are refused and touch nothing', async () => {
    const store = folderStore('enc');
    const created = await openStoreIdentity(store, 'correct horse');
    assert.equal(created.created, true);
    assert.equal(created.cipher.id, 1);
    const json = (await store.get('store.json'))!.body.toString();
    assert.match(json, /"alg": "argon2id13"/);
    assert.doesNotMatch(json, /correct horse/);
    const again = await openStoreIdentity(store, 'correct horse');
    assert.equal(again.created, false);
    assert.deepEqual(again.cipher.namesId, created.cipher.namesId, 'the same data key');
    const data = textBlock(3);
    assert.deepEqual(again.cipher.blockHash(data), created.cipher.blockHash(data));

    const before = await storeSnapshot(store);
    await assert.rejects(openStoreIdentity(store, 'wrong horse'), (err: unknown) => err instanceof StoreKeyError && /wrong encryption password/.test(err.message) && err.message.includes(store.description));
    await assert.rejects(openStoreIdentity(store, ''), /is encrypted \(store\.json\): set \[storage\] encryption_password/);
    assert.deepEqual(await storeSnapshot(store), before);

    const plain = folderStore('plain');
    assert.equal((await openStoreIdentity(plain, '')).cipher.id, 0);
    const plainBefore = await storeSnapshot(plain);
    await assert.rejects(openStoreIdentity(plain, 'a password'), /is not encrypted .* but \[storage\] encryption_password is set/);
    assert.deepEqual(await storeSnapshot(plain), plainBefore);
    assert.equal((await readIdentity(plain))!.encryption, null);
  });

  test('a store from before store.json with objects in it cannot be encrypted in place', async () => {
    const legacy = folderStore('legacy');
    await legacy.put('volumes/v/manifest', Buffer.from('old'));
    await assert.rejects(openStoreIdentity(legacy, 'pw'), /has no store\.json but already holds unencrypted objects \(such as volumes\/v\/manifest\)/);
    assert.equal(await legacy.get('store.json'), undefined, 'nothing written');
    assert.equal((await openStoreIdentity(legacy, '')).cipher.id, 0, 'without a password it is the plaintext store it always was');
  });

  test('change-password rewraps the same data key: the new password opens it, the old one does not', async () => {
    const store = folderStore('rewrap');
    const first = await openStoreIdentity(store, 'old password');
    await assert.rejects(changePassword(store, 'not the old one', 'new password'), /wrong encryption password/);
    await changePassword(store, 'old password', 'new password');
    const reopened = await openStoreIdentity(store, 'new password');
    assert.deepEqual(reopened.cipher.namesId, first.cipher.namesId);
    await assert.rejects(openStoreIdentity(store, 'old password'), /wrong encryption password/);
    const plain = folderStore('plain2');
    await openStoreIdentity(plain, '');
    await assert.rejects(changePassword(plain, '', 'x'), /is not encrypted: it has no password to change/);
  });
});

// ---- daemons on an encrypted store -------------------------------------------------------

const PASSWORD = 'tr0ub4dor&3 for the test store';
const ENCRYPTED: TomlTable = { storage: { encryption_password: '${UPDRAFT_PASSWORD}' } };
const ENV = { UPDRAFT_PASSWORD: PASSWORD };

/** The store the cluster's hosts share, opened from this process. */
function openShared(shared: SharedStore): ObjectStore {
  const storage = shared.toml.storage as TomlTable;
  const aws = (shared.toml.aws ?? {}) as TomlTable;
  return openObjectStore(String(storage.url), {
    accessKeyId: aws.access_key_id as string | undefined,
    secretAccessKey: aws.secret_access_key as string | undefined,
    endpoint: aws.endpoint as string | undefined,
    region: (aws.default_region as string | undefined) ?? 'us-east-1',
    allowHttp: aws.allow_http === true,
    forcePathStyle: aws.force_path_style === true,
  });
}

async function cli(args: string[], cwd: string, env: NodeJS.ProcessEnv = {}, input?: string) {
  const r = await run(process.execPath, [DAEMON_MAIN, ...args], { cwd, timeoutMs: 120_000, env: { ...process.env, ...env }, input });
  let json: any = null;
  try {
    json = JSON.parse(r.stdout);
  } catch {
    // Not JSON: the caller looks at code and stderr.
  }
  return { code: r.code, json, stderr: r.stderr };
}

function writeConfig(cluster: Cluster, name: string, extra: TomlTable): string {
  const file = path.join(cluster.dir, name);
  fs.writeFileSync(file, stringify(mergeToml(mergeToml({ cache: { dir: path.join(cluster.dir, `${name}-cache`) } }, cluster.store.toml), extra)) + '\n');
  return file;
}

/** Every distinct 16-byte window of the non-zero 4 KiB sectors of `image`, and the all-zero window. */
function plaintextWindows(image: Buffer): Set<string> {
  const windows = new Set<string>([Buffer.alloc(16).toString('latin1')]);
  const zero = Buffer.alloc(4096);
  for (let sector = 0; sector < image.length; sector += 4096) {
    if (image.subarray(sector, sector + 4096).equals(zero)) continue;
    const end = Math.min(image.length - 16, sector + 4096);
    for (let at = sector; at <= end; at++) windows.add(image.toString('latin1', at, at + 16));
  }
  return windows;
}

/** Objects (and keys) that hold a window of the plaintext or a plain BLAKE3 of one of its chunks. */
async function plaintextHits(store: ObjectStore, windows: Set<string>, hashes: Buffer[]): Promise<string[]> {
  const hits: string[] = [];
  const hexes = hashes.map((h) => h.toString('hex'));
  for (const o of await store.list('')) {
    if (hexes.some((hex) => o.key.includes(hex))) hits.push(`key ${o.key} holds a plain BLAKE3`);
    const body = (await store.get(o.key))!.body;
    const text = body.toString('latin1');
    for (let at = 0; at + 16 <= body.length; at++) {
      if (windows.has(text.slice(at, at + 16))) {
        hits.push(`${o.key} holds plaintext at byte ${at}: ${JSON.stringify(text.slice(at, at + 16))}`);
        break;
      }
    }
    for (const [i, hash] of hashes.entries()) {
      if (body.includes(hash) || text.includes(hexes[i])) {
        hits.push(`${o.key} holds the plain BLAKE3 of a written block`);
        break;
      }
    }
  }
  return hits;
}

/** Read every chunk of [0, size) separately: each read either fails with EIO or returns exactly `data`. */
async function readsFailOrMatch(client: Awaited<ReturnType<typeof connect>>, data: Buffer): Promise<{ failed: number[]; ok: number }> {
  const failed: number[] = [];
  let ok = 0;
  for (let at = 0; at < data.length; at += CHUNK) {
    try {
      const got = await client.read(at, CHUNK);
      assert.ok(got.equals(data.subarray(at, at + CHUNK)), `chunk at ${at} read back wrong data`);
      ok++;
    } catch (err) {
      if (!(err instanceof NbdCommandError)) throw err;
      assert.equal(err.code, 'EIO', err.message);
      failed.push(at / CHUNK);
    }
  }
  return { failed, ok };
}

function defineEncryptedStoreTests(makeStore: (dir: string) => SharedStore, label: string, dedupMiB: number): void {
  test(`${label}: an ext4 image with known files, written through NBD and drained, leaves neither plaintext nor plain BLAKE3 in the store`, { timeout: TIMEOUT }, async (t) => {
    if (!requireTools(t, [TOOLS.mkfsExt4])) return;
    const cluster = await startCluster(makeStore);
    try {
      // A small ext4 image holding recognisable text files with known names.
      const files = path.join(cluster.dir, 'files');
      fs.mkdirSync(files);
      for (let i = 0; i < 12; i++) {
        const line = `UPDRAFT-PLAINTEXT-MARKER file ${i}: the secret launch code is ${i * 7919} and the password is hunter${i}\n`;
        fs.writeFileSync(path.join(files, `secret-plan-${i}.txt`), line.repeat(40 + i * 30));
      }
      const imageFile = path.join(cluster.dir, 'fs.img');
      await runOk('mkfs.ext4', ['-q', '-F', '-b', '4096', '-d', files, '-L', 'updraft-crypt', imageFile, '16M'], { timeoutMs: 60_000 });
      const image = fs.readFileSync(imageFile);
      assert.ok(image.includes(Buffer.from('secret-plan-3.txt')) && image.includes(Buffer.from('UPDRAFT-PLAINTEXT-MARKER')), 'the image holds the names and the text');

      const a = await cluster.start('host-a', ENCRYPTED, ENV);
      await withLogs([a], async () => {
        assert.match(a.log(), /store is encrypted: xchacha20-poly1305/);
        await createVolume(a, 'crypt/ext4', 16);
        const c = await connect(a, 'crypt/ext4');
        for (let at = 0; at < image.length; at += MiB) await c.write(at, image.subarray(at, at + MiB));
        await c.flush();
        await c.disconnect();
        const drained = await drain(a, 'crypt/ext4');
        assert.ok(drained.packs_uploaded >= 1);
      });

      // bless names blocks the same way: the image it imports is all in the store already,
      // and blessing it again changes nothing (manifests compared decoded, not by bytes).
      const encConfig = writeConfig(cluster, 'enc.toml', ENCRYPTED);
      const blessed = await cli(['bless', imageFile, '--name', 'crypt/blessed', '-c', encConfig], cluster.dir, ENV);
      assert.equal(blessed.code, 0, blessed.stderr);
      assert.equal(blessed.json.newBlocks, 0, 'bless uploaded blocks the daemon had drained');
      assert.ok(blessed.json.dedupChunks > 0);
      const again = await cli(['bless', imageFile, '--name', 'crypt/blessed', '-c', encConfig], cluster.dir, ENV);
      assert.equal(again.code, 0, again.stderr);
      assert.equal(again.json.unchanged, true);
      assert.equal(again.json.etag, blessed.json.etag);

      const store = openShared(cluster.store);
      try {
        const hashes: Buffer[] = [];
        for (let at = 0; at < image.length; at += BLOCK) {
          const chunk = image.subarray(at, at + BLOCK);
          if (!chunk.equals(Buffer.alloc(BLOCK))) hashes.push(blockHash(chunk));
        }
        const windows = plaintextWindows(image);
        assert.deepEqual(await plaintextHits(store, windows, hashes), []);

        // The detector is real: the same image blessed into a plaintext store is found at once.
        const plainConfig = writeConfig(cluster, 'plain.toml', { storage: { url: `file://${path.join(cluster.dir, 'plain-store')}` } });
        const plainBless = await cli(['bless', imageFile, '--name', 'control', '-c', plainConfig], cluster.dir);
        assert.equal(plainBless.code, 0, plainBless.stderr);
        const plainStore = new FileObjectStore(path.join(cluster.dir, 'plain-store'));
        const plainHits = await plaintextHits(plainStore, windows, hashes);
        assert.ok(plainHits.some((h) => h.includes('holds plaintext')), 'the control store holds plaintext');
        assert.ok(plainHits.some((h) => h.includes('plain BLAKE3')), 'the control store holds plain BLAKE3 names');

        // Another host with the password reads it all back.
        const b = await cluster.start('host-b', ENCRYPTED, ENV);
        await withLogs([a, b], async () => {
          const cb = await connect(b, 'crypt/ext4');
          assert.ok((await readAll(cb, 0, image.length)).equals(image));
          await cb.disconnect();
        });
      } finally {
        await store.close();
      }
    } finally {
      await cluster.cleanup();
    }
  });

  test(`${label}: dedup survives encryption: two volumes with the same ${dedupMiB} MiB are stored about once`, { timeout: TIMEOUT }, async () => {
    const cluster = await startCluster(makeStore);
    try {
      const a = await cluster.start('host-a', { ...ENCRYPTED, cache: { disk_size_gb: 2 } }, ENV);
      await withLogs([a], async () => {
        const size = dedupMiB * MiB;
        await createVolume(a, 'dedup/one', dedupMiB);
        await createVolume(a, 'dedup/two', dedupMiB);
        const c1 = await connect(a, 'dedup/one');
        const data = await writeRandom(c1, 0, size);
        await c1.flush();
        await c1.disconnect();
        const first = await drain(a, 'dedup/one');
        const c2 = await connect(a, 'dedup/two');
        for (let at = 0; at < size; at += MiB) await c2.write(at, data.subarray(at, at + MiB));
        await c2.flush();
        await c2.disconnect();
        const second = await drain(a, 'dedup/two');
        assert.ok(first.bytes_uploaded >= size, `first drain uploaded ${first.bytes_uploaded}`);
        assert.equal(second.packs_uploaded, 0, 'the second volume uploaded packs for blocks the store has');
        const store = openShared(cluster.store);
        try {
          const packs = (await store.list('packs/')).reduce((sum, o) => sum + o.size, 0);
          assert.ok(packs < size * 1.01 && packs >= size, `${packs} bytes of packs for two volumes of ${size} bytes`);
        } finally {
          await store.close();
        }
      });
    } finally {
      await cluster.cleanup();
    }
  });

  test(`${label}: a flipped byte in a sealed block, in a pack index, in a manifest, and blocks swapped between packs: reads fail with EIO or an error naming the object, never wrong data`, { timeout: TIMEOUT }, async () => {
    const cluster = await startCluster(makeStore);
    try {
      const a = await cluster.start('host-a', ENCRYPTED, ENV);
      const volumes = ['t/block', 't/index', 't/swap', 't/manif', 't/clean'];
      const data = new Map<string, Buffer>();
      await withLogs([a], async () => {
        for (const name of volumes) {
          await createVolume(a, name, 8);
          const c = await connect(a, name);
          // 32 chunks: two packs, 25 + 7 blocks.
          data.set(name, await writeRandom(c, 0, 4 * MiB));
          await c.flush();
          await c.disconnect();
          await drain(a, name);
        }
        // The cache scrub checks blocks by the store's keyed names: untouched blocks pass.
        await waitFor('the cache scrub to check blocks', async () => (await metric(a, 'updraft_cache_scrubbed_blocks_total')) >= 32);
        assert.equal(await metric(a, 'updraft_cache_scrub_evictions_total'), 0, 'the scrub called sound blocks corrupt');
        assert.equal(await metric(a, 'updraft_cache_scrub_corrupt_pinned_total'), 0, 'the scrub called sound blocks corrupt');
      });
      const store = openShared(cluster.store);
      try {
        // Which packs belong to which volume: the order of the listing after each drain is not known, so use the manifests.
        const { openStoreIdentity: open } = await import('../src/store/identity.js');
        const { cipher } = await open(store, PASSWORD);
        const packsOf = async (name: string) => {
          const m = decodeManifest(`volumes/${name}/manifest`, (await store.get(`volumes/${name}/manifest`))!.body, cipher);
          return [...new Set(m.blocks.map((b) => b.pack))].map((id) => packKey(id));
        };
        const blockPack = (await packsOf('t/block'))[0];
        const body = (await store.get(blockPack))!.body;
        await store.put(blockPack, flipped(body, body.length - 1000));
        const indexPack = (await packsOf('t/index'))[0];
        const indexBody = (await store.get(indexPack))!.body;
        await store.put(indexPack, flipped(indexBody, 32 + 24 + 3 * 32 + 2));
        // Swap the first sealed block of the two packs of t/swap (both raw random blocks: same length).
        const [p1, p2] = await packsOf('t/swap');
        const b1 = (await store.get(p1))!.body;
        const b2 = (await store.get(p2))!.body;
        const e1 = decodePackIndex(p1, b1, cipher)[0];
        const e2 = decodePackIndex(p2, b2, cipher)[0];
        assert.equal(e1.length, e2.length);
        const s1 = Buffer.from(b1);
        const s2 = Buffer.from(b2);
        b2.copy(s1, e1.offset, e2.offset, e2.offset + e2.length);
        b1.copy(s2, e2.offset, e1.offset, e1.offset + e1.length);
        await store.put(p1, s1);
        await store.put(p2, s2);
        // The manifest: a flipped byte with its checksum made to match, and another volume's manifest copied over one.
        const manifestKey = 'volumes/t/manif/manifest';
        await store.put(manifestKey, resealedManifest(flipped((await store.get(manifestKey))!.body, 36 + 24 + 10)));
        await store.put('volumes/t/copied/manifest', (await store.get('volumes/t/clean/manifest'))!.body);
      } finally {
        await store.close();
      }

      const b = await cluster.start('host-b', ENCRYPTED, ENV);
      await withLogs([a, b], async () => {
        for (const [name, pack] of [['t/block', 0], ['t/index', 0], ['t/swap', -1]] as const) {
          const c = await connect(b, name);
          const { failed, ok } = await readsFailOrMatch(c, data.get(name)!);
          await c.disconnect();
          assert.ok(failed.length >= 7, `${name}: only chunks ${failed} failed`);
          if (pack === 0) assert.ok(ok > 0, `${name}: the untouched pack still reads`);
        }
        assert.match(b.log(), /request failed .*volume=t\/block.*pack packs\/[0-9a-f]{2}\/[0-9a-f]{32}/);
        for (const name of ['t/manif', 't/copied']) {
          const r = await b.api('PUT', `/api/exports/${encodeURIComponent(name)}`, { size_gb: 8 / 1024 });
          assert.equal(r.status, 502, r.text);
          assert.match(r.json.error, new RegExp(`manifest volumes/${name}/manifest: does not decrypt with this store's key`));
        }
        const c = await connect(b, 't/clean');
        assert.ok((await readAll(c, 0, 4 * MiB)).equals(data.get('t/clean')!));
        await c.disconnect();
      });
    } finally {
      await cluster.cleanup();
    }
  });

  test(`${label}: wrong, missing and unexpected passwords stop the daemon at start with the store untouched; change-password, then the new password works and the old one fails`, { timeout: TIMEOUT }, async () => {
    const cluster = await startCluster(makeStore);
    try {
      const a = await cluster.start('host-a', ENCRYPTED, ENV);
      let data: Buffer;
      await withLogs([a], async () => {
        await createVolume(a, 'pw/vol', 8);
        const c = await connect(a, 'pw/vol');
        data = await writeRandom(c, 0, 2 * MiB);
        await c.flush();
        await c.disconnect();
        await drain(a, 'pw/vol');
      });
      assert.equal(await a.stop(), 0);
      const store = openShared(cluster.store);
      try {
        const before = await storeSnapshot(store);
        await assert.rejects(cluster.start('host-w', ENCRYPTED, { UPDRAFT_PASSWORD: 'not the password' }), /wrong encryption password: the data key in store\.json does not unwrap/);
        await assert.rejects(cluster.start('host-m'), /is encrypted \(store\.json\): set \[storage\] encryption_password/);
        assert.deepEqual(await storeSnapshot(store), before, 'a refused start wrote to the store');

        // status says so, and whether the configured password opens it.
        const good = writeConfig(cluster, 'good.toml', ENCRYPTED);
        const status = await cli(['status', '--json', '-c', good], cluster.dir, ENV);
        assert.equal(status.code, 0, status.stderr);
        assert.equal(status.json.encrypted, true);
        assert.equal(status.json.password, 'accepted');
        const noPassword = await cli(['status', '--json', '-c', writeConfig(cluster, 'none.toml', {})], cluster.dir);
        assert.match(noPassword.json.password, /not set/);

        // change-password: the old one from the config, the new one on stdin.
        const changed = await cli(['change-password', '-c', good], cluster.dir, ENV, 'a brand new password\n');
        assert.equal(changed.code, 0, changed.stderr);
        assert.deepEqual(changed.json.rewritten, ['store.json']);
        const after = await storeSnapshot(store);
        for (const [key, sum] of before) if (key !== 'store.json') assert.equal(after.get(key), sum, `${key} was rewritten`);
        assert.notEqual(after.get('store.json'), before.get('store.json'));
        await assert.rejects(cluster.start('host-old', ENCRYPTED, ENV), /wrong encryption password/);
        const b = await cluster.start('host-new', ENCRYPTED, { UPDRAFT_PASSWORD: 'a brand new password' });
        await withLogs([b], async () => {
          const c = await connect(b, 'pw/vol');
          assert.ok((await readAll(c, 0, 2 * MiB)).equals(data!));
          await c.disconnect();
        });
      } finally {
        await store.close();
      }

      // A password for a store created without one.
      const plain = await startCluster(makeStore);
      try {
        const p = await plain.start('host-p');
        assert.match(p.log(), /store is not encrypted/);
        await p.stop();
        await assert.rejects(plain.start('host-q', ENCRYPTED, ENV), /is not encrypted \(its store\.json says so.*but \[storage\] encryption_password is set/);
      } finally {
        await plain.cleanup();
      }
    } finally {
      await cluster.cleanup();
    }
  });
}

defineEncryptedStoreTests((dir) => ({ label: 'file://', toml: { storage: { url: `file://${path.join(dir, 'store')}` } } }), 'file://', 256);

describe('MinIO', () => {
  const minio = minioForTests();
  defineEncryptedStoreTests((dir) => minioStore(minio(), dir), 's3:// (MinIO)', 64);
});
