// Seed inputs of every fuzz target, built from real encoded objects (the encoders of
// src/store and src/volume, the config template, a real NBD session), each prefixed with
// the mode byte its target reads. `node dist/test/fuzz/run.js --make-seeds` writes them
// to test/fuzz/corpus/<target>/seed-*.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { CONFIG_TEMPLATE } from '../../src/config/config.js';
import { PLAINTEXT, storeCipher } from '../../src/crypto/cipher.js';
import { parseCompression } from '../../src/crypto/compress.js';
import { blockHash } from '../../src/crypto/hash.js';
import * as P from '../../src/nbd/protocol.js';
import { encodeBootSet } from '../../src/store/boot-set.js';
import { encodeLease } from '../../src/store/lease.js';
import type { ManifestMeta } from '../../src/store/manifest.js';
import { manifestBody } from '../../src/store/manifest-body.js';
import { ManifestBuilder } from '../../src/store/manifest-builder.js';
import { encodeManifest } from '../../src/store/manifest-seal.js';
import { PackIndex } from '../../src/store/pack-index.js';
import { encodePack } from '../../src/store/pack.js';
import { Journal } from '../../src/volume/journal.js';
import type { Target } from './jazzer.js';

/** The data key of the encrypted store the boot-set target also decodes for (a test key, public). */
export const FUZZ_DATA_KEY = Buffer.alloc(32, 0x5a);

const BLOCK_SIZE = 65536;

function block(seed: number, size = BLOCK_SIZE): Buffer {
  const text = Buffer.alloc(size);
  for (let i = 0; i < size; i++) text[i] = 97 + ((i * 7 + seed * 5 + (i >> 9)) % 26);
  return text;
}

function packOf(blocks: Buffer[], compression: string) {
  return encodePack(blocks.map((data) => ({ hash: blockHash(data), data })), parseCompression(compression), PLAINTEXT);
}

function manifestSeeds(): Record<string, Buffer> {
  const key = 'volumes/disk/manifest';
  const meta: ManifestMeta = {
    format: 1, name: 'disk', size: 16 * BLOCK_SIZE, blockSize: BLOCK_SIZE, sequence: 7, generation: 2, host: 'host-a', created: '2026-12-01T10:00:00.000Z',
  };
  const pack = packOf([block(1), block(2), block(3)], 'lz4');
  const builder = new ManifestBuilder(meta);
  pack.entries.forEach((entry, i) => builder.setChunk(i * 3, entry.hash, { pack: pack.id, ...entry }));
  builder.setChunk(10, pack.entries[0].hash);
  builder.setChunk(12, 'zero-allocated');
  const manifest = builder.build();
  const empty = new ManifestBuilder({ ...meta, parent: { name: 'base', sequence: 3 } }).build();
  return {
    // Mode 1: the raw body, framed by the target.
    'body': Buffer.concat([Buffer.from([1]), manifestBody(manifest, 0)]),
    'body-empty': Buffer.concat([Buffer.from([5]), manifestBody(empty, 0)]),
    // Modes 0 and 2: whole stored objects.
    'none': Buffer.concat([Buffer.from([2]), encodeManifest(key, manifest, parseCompression('none'), PLAINTEXT)]),
    'lz4': Buffer.concat([Buffer.from([2]), encodeManifest(key, manifest, parseCompression('lz4'), PLAINTEXT)]),
    'zstd': Buffer.concat([Buffer.from([6]), encodeManifest(key, manifest, parseCompression('zstd-3'), PLAINTEXT)]),
    'encrypted': Buffer.concat([Buffer.from([0x0a]), encodeManifest(key, manifest, parseCompression('lz4'), storeCipher(FUZZ_DATA_KEY))]),
  };
}

function packSeeds(): Record<string, Buffer> {
  const small = [block(1, 4096), Buffer.from('one small block'), block(2, 300)];
  const random = Buffer.alloc(2048);
  for (let i = 0; i < random.length; i++) random[i] = (i * 2654435761) >>> 24;
  return {
    'none': Buffer.concat([Buffer.from([2]), packOf(small, 'none').body]),
    'lz4': Buffer.concat([Buffer.from([2]), packOf(small, 'lz4').body]),
    'zstd': Buffer.concat([Buffer.from([2]), packOf([...small, random], 'zstd-3').body]),
    'encrypted': Buffer.concat([Buffer.from([0x12]), encodePack(small.map((data) => ({ hash: storeCipher(FUZZ_DATA_KEY).blockHash(data), data })), parseCompression('lz4'), storeCipher(FUZZ_DATA_KEY)).body]),
    'round-trip': Buffer.concat([Buffer.from([1 | (1 << 2), 3]), block(4, 3000)]),
  };
}

async function withTempDir<T>(use: (dir: string) => Promise<T>): Promise<T> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'updraft-fuzz-seeds-'));
  try {
    return await use(dir);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

async function packIndexSeeds(): Promise<Record<string, Buffer>> {
  return withTempDir(async (dir) => {
    const file = path.join(dir, 'packs.index');
    const index = PackIndex.open(file);
    const a = packOf([block(1, 4096), block(2, 4096)], 'lz4');
    const b = packOf([block(3, 4096)], 'none');
    index.add(a.entries.map((e) => [e.hash.toString('latin1'), { pack: a.id, ...e }]));
    index.add(b.entries.map((e) => [e.hash.toString('latin1'), { pack: b.id, ...e }]));
    index.removePack(a.id);
    await index.sync();
    index.close();
    const records = fs.readFileSync(file);
    return {
      'records': Buffer.concat([Buffer.from([0]), records]),
      'torn-tail': Buffer.concat([Buffer.from([0]), records.subarray(0, records.length - 20)]),
      'header': Buffer.concat([Buffer.from([1]), records.subarray(0, 16)]),
    };
  });
}

async function journalSeeds(): Promise<Record<string, Buffer>> {
  return withTempDir(async (dir) => {
    const file = path.join(dir, 'journal');
    const journal = await Journal.create(file, BLOCK_SIZE, 2, 8 * BLOCK_SIZE);
    const mask = Buffer.from([0xff, 0x01]);
    await journal.commit([{ chunk: 1, hash: blockHash(block(1)), mask }, { chunk: 5, hash: Buffer.alloc(16), mask }], 3, 8 * BLOCK_SIZE);
    await journal.commit([{ chunk: 1, hash: blockHash(block(2)), mask: Buffer.alloc(2) }], 4, 8 * BLOCK_SIZE);
    // A logged FLUSH: a record and the overlay writes it covers.
    await journal.commitLogged([{ chunk: 2, hash: Buffer.alloc(16), mask: Buffer.from([0x03, 0x00]) }], [
      { position: 2 * BLOCK_SIZE, data: Buffer.alloc(8192, 0x5a) },
      { position: 2 * BLOCK_SIZE + 4096, data: Buffer.alloc(4096, 0xa5) },
    ], 6, 8 * BLOCK_SIZE);
    const end = journal.bytes;
    journal.close();
    // The batches without the zero-filled space past them.
    const batches = fs.readFileSync(file).subarray(0, end);
    return {
      'batches': Buffer.concat([Buffer.from([0]), batches]),
      'torn': Buffer.concat([Buffer.from([2]), batches.subarray(0, batches.length - 9)]),
    };
  });
}

/**
 * A client of the NBD target that sends `reads` reads of its whole volume (266 KB each)
 * and reads none of the replies: past 252 the server must stop at its 64 MiB bound. Too
 * slow to run for every mutation, so not a seed; test/fuzz.test.ts runs it once.
 */
export function nbdSlowReader(reads: number): Buffer {
  return nbdInput(true, reads);
}

function nbdInput(slow: boolean, reads: number): Buffer {
  const u16 = (n: number) => Buffer.from([n >> 8, n & 0xff]);
  const u32 = (n: number) => Buffer.from([n >>> 24, (n >> 16) & 0xff, (n >> 8) & 0xff, n & 0xff]);
  const name = Buffer.from('disk');
  const go = Buffer.concat([Buffer.from('IHAVEOPT'), u32(P.OPT_GO), u32(4 + name.length + 2), u32(name.length), name, u16(0)]);
  const read = (cookie: number) => Buffer.concat([u32(P.REQUEST_MAGIC), u16(0), u16(P.CMD_READ), u32(0), u32(cookie), u32(0), u32(0), u32(4 * 65536 + 4096)]);
  return Buffer.concat([Buffer.from([slow ? 0x80 : 0]), u32(P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES), go, ...Array.from({ length: reads }, (_, i) => read(i))]);
}

function nbdSeeds(): Record<string, Buffer> {
  const u16 = (n: number) => Buffer.from([n >> 8, n & 0xff]);
  const u32 = (n: number) => Buffer.from([n >>> 24, (n >> 16) & 0xff, (n >> 8) & 0xff, n & 0xff]);
  const u64 = (n: number) => Buffer.concat([u32(Math.floor(n / 2 ** 32)), u32(n >>> 0)]);
  const option = (type: number, data = Buffer.alloc(0)) => Buffer.concat([Buffer.from('IHAVEOPT'), u32(type), u32(data.length), data]);
  const name = (text: string) => Buffer.concat([u32(Buffer.byteLength(text)), Buffer.from(text)]);
  const request = (type: number, flags: number, cookie: number, offset: number, length: number, payload = Buffer.alloc(0)) =>
    Buffer.concat([u32(P.REQUEST_MAGIC), u16(flags), u16(type), u64(cookie), u64(offset), u32(length), payload]);
  const go = (exportName: string) => option(P.OPT_GO, Buffer.concat([name(exportName), u16(2), u16(P.INFO_NAME), u16(P.INFO_DESCRIPTION)]));
  const flags = u32(P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES);
  const requests = Buffer.concat([
    request(P.CMD_WRITE, P.CMD_FLAG_FUA, 1, 4096, 512, Buffer.alloc(512, 0x61)),
    request(P.CMD_READ, 0, 2, 0, 8192),
    request(P.CMD_WRITE_ZEROES, P.CMD_FLAG_NO_HOLE, 3, 65536, 65536),
    request(P.CMD_TRIM, 0, 4, 131072, 4096),
    request(P.CMD_BLOCK_STATUS, 0, 5, 0, 262144),
    request(P.CMD_CACHE, 0, 6, 0, 4096),
    request(P.CMD_FLUSH, 0, 7, 0, 0),
    request(P.CMD_DISC, 0, 8, 0, 0),
  ]);
  const structured = Buffer.concat([
    flags,
    option(P.OPT_LIST),
    option(P.OPT_STRUCTURED_REPLY),
    option(P.OPT_LIST_META_CONTEXT, Buffer.concat([name('disk'), u32(1), name('base:')])),
    option(P.OPT_SET_META_CONTEXT, Buffer.concat([name('disk'), u32(1), name(P.BASE_ALLOCATION)])),
    option(P.OPT_INFO, Buffer.concat([name('disk'), u16(1), u16(P.INFO_BLOCK_SIZE)])),
    go('disk'),
    requests,
  ]);
  return {
    'structured-session': Buffer.concat([Buffer.from([0]), structured]),
    'structured-session-pieces': Buffer.concat([Buffer.from([7]), structured]),
    'simple-session': Buffer.concat([Buffer.from([0]), u32(0), option(P.OPT_EXPORT_NAME, Buffer.from('disk')), requests]),
    'read-only-session': Buffer.concat([Buffer.from([0]), flags, go('ro'), requests]),
    'slow-reader': Buffer.concat([Buffer.from([0x80]), flags, go('disk'), ...Array.from({ length: 8 }, (_, i) => request(P.CMD_READ, 0, i, 0, 4096))]),
    'refused-options': Buffer.concat([
      Buffer.from([0]), flags, option(P.OPT_STARTTLS), option(P.OPT_GO, name('no/such/..')), go('missing'), option(99, Buffer.from('x')), option(P.OPT_ABORT),
    ]),
  };
}

function configSeeds(): Record<string, Buffer> {
  return {
    'template': Buffer.from(CONFIG_TEMPLATE),
    'tls-and-env': Buffer.from(
      '[storage]\nurl = "s3://bucket-name/prefix"\nencryption_password = "${UPDRAFT_PASSWORD}"\n' +
        '[servers.nbd]\naddresses = ["0.0.0.0:10809", "[::1]:10809"]\ntls = "require"\ntls_cert = "c.pem"\ntls_key = "k.pem"\n' +
        '[servers.http]\naddress = "10.0.0.1:8080"\ntoken = "${UPDRAFT_API_TOKEN}"\n[gc]\ngrace_period = "1h30m"\ndatabase_url = "postgres://u:p@db:5432/x"\n',
    ),
    'bad-values': Buffer.from('[cache]\ndisk_size_gb = -1\nunknown = 1\n[gc]\ninterval = "5"\n[servers.nbd]\nblock_size = 1000\nsocket_mode = "999"\n'),
  };
}

/** The seeds of `target`, by name. */
export async function seedsOf(target: Target): Promise<Record<string, Buffer>> {
  switch (target) {
    case 'nbd':
      return nbdSeeds();
    case 'manifest':
      return manifestSeeds();
    case 'pack':
      return packSeeds();
    case 'pack-index':
      return packIndexSeeds();
    case 'journal':
      return journalSeeds();
    case 'lease':
      return {
        'held': encodeLease({ format: 1, volume: 'disk', owner: 'host-a', generation: 3, expires: '2026-12-01T10:00:30.000Z', acquired: '2026-12-01T10:00:00.000Z' }),
        'released': encodeLease({ format: 1, volume: 'disk', owner: 'host-b', generation: 4, expires: '2026-12-01T10:00:30.000Z', acquired: '2026-12-01T10:00:00.000Z', released: true }),
        'other-volume': Buffer.from(JSON.stringify({ format: 1, volume: 'other', owner: 'h', generation: 1, expires: '2026-12-01T10:00:30.000Z', acquired: '2026-12-01T10:00:00.000Z' })),
      };
    case 'identity':
      return {
        'plaintext': Buffer.from(JSON.stringify({ format: 1, id: '0123456789abcdef0123456789abcdef', created: '2026-12-01T10:00:00.000Z', encryption: null }, null, 2) + '\n'),
        'encrypted': Buffer.from(
          JSON.stringify({
            format: 1, id: '0123456789abcdef0123456789abcdef', created: '2026-12-01T10:00:00.000Z',
            encryption: {
              cipher: 'xchacha20-poly1305', names: 'keyed-blake3',
              kdf: { alg: 'argon2id13', opslimit: 3, memlimit: 67108864, salt: Buffer.alloc(16, 1).toString('base64') },
              wrapped_key: Buffer.alloc(72, 2).toString('base64'), password_changed: '2026-12-02T10:00:00.000Z',
            },
          }),
        ),
      };
    case 'boot-set': {
      const key = 'volumes/disk/bootset';
      const set = { format: 1, chunks: [0, 1, 2, 17, 40], recorded: '2026-12-01T10:00:00.000Z' };
      return {
        'plaintext': Buffer.concat([Buffer.from([0]), encodeBootSet(key, set, PLAINTEXT)]),
        'sealed': Buffer.concat([Buffer.from([1]), encodeBootSet(key, set, storeCipher(FUZZ_DATA_KEY))]),
      };
    }
    case 'config':
      return configSeeds();
  }
}
