// Reading a stored manifest (the layout: store/manifest.ts): every field checked before it
// is trusted, so a corrupt, truncated or foreign object is a FormatError naming its key.
import { CODEC_NONE, CODEC_LZ4, CODEC_ZSTD, codecName, type CodecId } from '../crypto/compress.js';
import type { StoreCipher } from '../crypto/cipher.js';
import { HASH_BYTES } from '../crypto/hash.js';
import { errorMessage } from '../log.js';
import { FormatError, openSealedBody } from './errors.js';
import { fieldProblem } from './fields.js';
import {
  BLOCK_ENTRY_BYTES, blockProblem, CHECKSUM_AT, CHECKSUM_BYTES, CHUNK_ENTRY_BYTES, chunkCountOf, MANIFEST_HEADER_BYTES, MANIFEST_MAGIC, MANIFEST_VERSION,
  manifestChecksum, manifestLabel, MAX_BODY_BYTES, META_SCHEMA, PACK_ID_BYTES, ZERO_ALLOCATED_BLOCK,
  type Manifest, type ManifestBlock, type ManifestMeta,
} from './manifest.js';
import { cipherMismatch } from './pack.js';

/**
 * Validate, open (with an encrypting `cipher`) and decode the manifest (or checkpoint)
 * stored under `key`. Throws FormatError naming `key`, also for a manifest sealed otherwise
 * than `cipher` says or for another key.
 */
export function decodeManifest(key: string, body: Buffer, cipher: StoreCipher): Manifest {
  return decodeManifestBody(key, body, cipher).manifest;
}

/** A decoded manifest with its body as opened: what relabelManifest copies. */
export interface DecodedManifest {
  manifest: Manifest;
  /** The body as stored, opened (still compressed), and its codec. */
  stored: Buffer;
  codec: CodecId;
  /** The body after opening and decompression. */
  raw: Buffer;
  /** Where the tables start in `raw`, after the meta. */
  tablesAt: number;
}

/** decodeManifest, keeping the opened body. */
export function decodeManifestBody(key: string, body: Buffer, cipher: StoreCipher): DecodedManifest {
  const fail = (what: string, cause?: unknown) => new FormatError(key, `manifest ${key}: ${what}`, cause === undefined ? undefined : { cause });
  if (body.length < MANIFEST_HEADER_BYTES) throw fail(`truncated: ${body.length} bytes, the header alone is ${MANIFEST_HEADER_BYTES}`);
  if (!body.subarray(0, 8).equals(MANIFEST_MAGIC)) {
    throw fail(`bad magic ${JSON.stringify(body.toString('latin1', 0, 8))}, expected "UPDMANI1" (not a manifest)`);
  }
  const version = body.readUInt16LE(8);
  if (version !== MANIFEST_VERSION) throw fail(`format version ${version}; this reader knows version ${MANIFEST_VERSION}`);
  const storedLength = body.readUInt32LE(16);
  if (storedLength !== body.length - MANIFEST_HEADER_BYTES) {
    throw fail(`the header says ${storedLength} stored body bytes, the object has ${body.length - MANIFEST_HEADER_BYTES} (truncated or corrupt)`);
  }
  if (!manifestChecksum(body).equals(body.subarray(CHECKSUM_AT, CHECKSUM_AT + CHECKSUM_BYTES))) throw fail('checksum mismatch (corrupt)');
  const storedCipher = body.readUInt8(11);
  if (storedCipher !== cipher.id) throw fail(cipherMismatch(storedCipher, cipher));
  const codec = body.readUInt8(10);
  if (codec !== CODEC_NONE && codec !== CODEC_LZ4 && codec !== CODEC_ZSTD) throw fail(`body compressed with ${codecName(codec)}`);
  const rawLength = body.readUInt32LE(12);
  const { compressed, raw } = openSealedBody(key, `manifest ${key}:`, cipher, body.subarray(MANIFEST_HEADER_BYTES), manifestLabel(body, key), codec, rawLength, MAX_BODY_BYTES);

  let at = 0;
  const table = (name: string, entryBytes: number): number => {
    if (at + 4 > raw.length) throw fail(`body ends before the ${name} count (at byte ${at} of ${raw.length})`);
    const n = raw.readUInt32LE(at);
    at += 4;
    if (at + n * entryBytes > raw.length) throw fail(`${name} of ${n} entries runs past the end of the body (${at} + ${n * entryBytes} > ${raw.length} bytes)`);
    return n;
  };

  const metaLength = table('meta', 1);
  let metaValue: unknown;
  try {
    metaValue = JSON.parse(raw.toString('utf8', at, at + metaLength));
  } catch (err) {
    throw fail(`meta is not JSON: ${errorMessage(err)}`, err);
  }
  at += metaLength;
  const parsed = META_SCHEMA.safeParse(metaValue);
  if (!parsed.success) throw fail(`meta ${fieldProblem(parsed.error)}`);
  const meta: ManifestMeta = parsed.data;
  const tablesAt = at;

  const packCount = table('pack table', PACK_ID_BYTES);
  const packs: string[] = new Array(packCount);
  for (let i = 0; i < packCount; i++) {
    packs[i] = raw.toString('hex', at, at + PACK_ID_BYTES);
    at += PACK_ID_BYTES;
  }

  const blockCount = table('block table', BLOCK_ENTRY_BYTES);
  // All hashes in one allocation: the blocks must not keep the whole raw body alive.
  const hashes = Buffer.allocUnsafe(blockCount * HASH_BYTES);
  const blocks: ManifestBlock[] = new Array(blockCount);
  for (let i = 0; i < blockCount; i++) {
    for (let b = 0; b < HASH_BYTES; b++) hashes[i * HASH_BYTES + b] = raw[at + b];
    const hash = hashes.subarray(i * HASH_BYTES, (i + 1) * HASH_BYTES);
    const pack = raw.readUInt32LE(at + 16);
    if (pack >= packCount) throw fail(`block ${i} (${hash.toString('hex')}) names pack ${pack} of ${packCount}`);
    if (raw[at + 33] !== 0 || raw[at + 34] !== 0 || raw[at + 35] !== 0) throw fail(`block ${i} (${hash.toString('hex')}) has nonzero reserved bytes`);
    const block: ManifestBlock = {
      hash,
      pack: packs[pack],
      offset: raw.readUInt32LE(at + 20),
      length: raw.readUInt32LE(at + 24),
      rawLength: raw.readUInt32LE(at + 28),
      codec: raw[at + 32] as CodecId,
    };
    const problem = blockProblem(block, meta.blockSize, cipher.overhead);
    if (problem) throw fail(`block ${i} (${hash.toString('hex')}) ${problem}`);
    blocks[i] = block;
    at += BLOCK_ENTRY_BYTES;
  }

  const chunkCount = chunkCountOf(meta);
  const mapped = table('chunk table', CHUNK_ENTRY_BYTES);
  const chunks = new Uint32Array(mapped);
  const chunkBlocks = new Uint32Array(mapped);
  for (let i = 0; i < mapped; i++) {
    const chunk = raw.readUInt32LE(at);
    const block = raw.readUInt32LE(at + 4);
    if (i > 0 && chunk <= chunks[i - 1]) throw fail(`chunk table entry ${i}: chunk ${chunk} after chunk ${chunks[i - 1]} (must ascend, each once)`);
    if (chunk >= chunkCount) {
      throw fail(`chunk table entry ${i}: chunk ${chunk} is past the end of the volume (${chunkCount} chunks of ${meta.blockSize} bytes)`);
    }
    if (block !== ZERO_ALLOCATED_BLOCK && block >= blockCount) throw fail(`chunk table entry ${i}: chunk ${chunk} names block ${block} of ${blockCount}`);
    chunks[i] = chunk;
    chunkBlocks[i] = block;
    at += CHUNK_ENTRY_BYTES;
  }
  if (at !== raw.length) throw fail(`${raw.length - at} bytes after the chunk table`);
  return { manifest: { meta, chunks, chunkBlocks, blocks }, stored: compressed, codec, raw, tablesAt };
}
