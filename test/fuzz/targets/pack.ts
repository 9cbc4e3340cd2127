// Fuzz target: packs and their index (store/pack.ts). The first byte says how the rest is used:
//   bit 0  round trip: the rest is cut into blocks (the next byte says how many), which are
//          packed (bits 2-3 pick none, lz4 or zstd) and must all come back out unchanged
//   bit 1  (decoding) the header and index checksum are fixed up, so mutations of the
//          index reach the entry checks
//   bit 4  (decoding) the store is encrypted (a fixed test key; the seeds hold a pack sealed with it)
// Decoding: any bytes give the pack's entries, every one of which unpacks to its block or
// to a FormatError, or a FormatError naming the key; nothing else is thrown.
import { Blake3Hasher } from '@napi-rs/blake-hash';
import { PLAINTEXT, storeCipher } from '../../../src/crypto/cipher.js';
import { parseCompression } from '../../../src/crypto/compress.js';
import { blockHash } from '../../../src/crypto/hash.js';
import { FormatError } from '../../../src/store/errors.js';
import { decodePackIndex, encodePack, PACK_ENTRY_BYTES, PACK_HEADER_BYTES, unpackBlock, verifyPackId, type PackBlock } from '../../../src/store/pack.js';
import { refusedOr } from '../expect.js';
import { FUZZ_DATA_KEY } from '../seeds.js';

const KEY = 'packs/00/00000000000000000000000000000000';
const SEALED = storeCipher(FUZZ_DATA_KEY);
const COMPRESSIONS = [parseCompression('none'), parseCompression('lz4'), parseCompression('zstd-1'), parseCompression('lz4')];

/** Write the header and index checksum of a pack whose index (sealed with `overhead` more bytes) fits in `pack`. */
export function fixPackChecksum(pack: Buffer, overhead: number): void {
  if (pack.length < PACK_HEADER_BYTES) return;
  const indexEnd = PACK_HEADER_BYTES + pack.readUInt32LE(12) * PACK_ENTRY_BYTES + overhead;
  if (indexEnd > pack.length) return;
  new Blake3Hasher().update(pack.subarray(0, 16)).update(pack.subarray(PACK_HEADER_BYTES, indexEnd)).digestBuffer().copy(pack, 16, 0, 16);
}

function roundTrip(mode: number, rest: Buffer): void {
  if (rest.length < 2) return;
  const count = 1 + (rest[0] % 8);
  const content = rest.subarray(1);
  const blocks: PackBlock[] = [];
  const seen = new Set<string>();
  const step = Math.max(1, Math.ceil(content.length / count));
  for (let at = 0; at < content.length; at += step) {
    const data = Buffer.from(content.subarray(at, at + step));
    const hash = blockHash(data);
    // Zero names are never stored, and a pack holds each block once.
    if (seen.has(hash.toString('hex')) || data.every((b) => b === 0)) continue;
    seen.add(hash.toString('hex'));
    blocks.push({ hash, data });
  }
  if (blocks.length === 0) return;
  const pack = encodePack(blocks, COMPRESSIONS[(mode >> 2) & 3], PLAINTEXT);
  verifyPackId(pack.key, pack.body);
  const entries = decodePackIndex(pack.key, pack.body, PLAINTEXT);
  if (entries.length !== blocks.length) throw new Error(`pack ${pack.key}: ${blocks.length} blocks packed, ${entries.length} in the index`);
  for (let i = 0; i < blocks.length; i++) {
    const block = unpackBlock(pack.key, pack.body, entries[i], PLAINTEXT);
    if (!block.equals(blocks[i].data)) throw new Error(`pack ${pack.key}: block ${i} unpacked to other bytes`);
  }
}

export function fuzz(data: Buffer): void {
  if (data.length === 0) return;
  const mode = data[0];
  const rest = Buffer.from(data.subarray(1));
  if (mode & 1) return roundTrip(mode, rest);
  const cipher = mode & 0x10 ? SEALED : PLAINTEXT;
  if (mode & 2) fixPackChecksum(rest, cipher.overhead);
  refusedOr(() => verifyPackId(KEY, rest), FormatError, KEY);
  const entries = refusedOr(() => decodePackIndex(KEY, rest, cipher), FormatError, KEY);
  for (const entry of entries ?? []) {
    const block = refusedOr(() => unpackBlock(KEY, rest, entry, cipher), FormatError, KEY);
    if (block !== undefined && !cipher.blockHash(block).equals(entry.hash)) throw new Error(`pack ${KEY}: a block unpacked that does not match its name`);
  }
}
