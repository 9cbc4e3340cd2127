// The worker thread of store/pack-threads.ts: opens whole fetched packs (verifyPackId,
// decodePackIndex, unpackBlock of every block: decrypt, decompress, hash check) and
// encodes packs for upload (encodePack: hash check, compress, seal, pack id) off the
// event loop. workerData: { dataKey: Uint8Array | null }, the store cipher's data key.
// Buffers go both ways transferred, not copied.
import { parentPort, workerData } from 'node:worker_threads';
import { PLAINTEXT, storeCipher } from '../crypto/cipher.js';
import type { CodecId, Compression } from '../crypto/compress.js';
import { HASH_BYTES } from '../crypto/hash.js';
import { errorMessage } from '../log.js';
import { FormatError } from './errors.js';
import { decodePackIndex, encodePack, unpackBlock, verifyPackId, type PackBlock } from './pack.js';

/** Open the whole pack `body` fetched from `key`. */
export interface OpenJob {
  op: 'open';
  job: number;
  key: string;
  body: Uint8Array;
}

/** Encode a pack of blocks: their 16-byte names back to back, the raw blocks back to back and each one's length. */
export interface EncodeJob {
  op: 'encode';
  job: number;
  hashes: Uint8Array;
  blocks: Uint8Array;
  lengths: number[];
  compression: Compression;
}

/** Where each block of an encoded pack sits, in the order given (PackEntry without the hash). */
export interface EncodedEntry {
  offset: number;
  length: number;
  rawLength: number;
  codec: CodecId;
}

export type PackAnswer =
  | { job: number; hashes: Uint8Array; blocks: Uint8Array; lengths: number[] }
  | { job: number; id: string; body: Uint8Array; entries: EncodedEntry[] }
  /** format: the error was a FormatError, to be rethrown as one naming the job's key. */
  | { job: number; error: string; format: boolean };

const port = parentPort;
if (port === null) throw new Error('store/pack-worker.js runs only as a worker thread');
const dataKey = (workerData as { dataKey: Uint8Array | null }).dataKey;
const cipher = dataKey === null ? PLAINTEXT : storeCipher(Buffer.from(dataKey));

/** `bytes` in a buffer of its own (never Buffer's shared pool), so that it can be transferred. */
function owned(bytes: Buffer): Buffer {
  if (bytes.byteOffset === 0 && bytes.byteLength === bytes.buffer.byteLength) return bytes;
  const copy = Buffer.from(new ArrayBuffer(bytes.length));
  bytes.copy(copy);
  return copy;
}

function open({ job, key, body }: OpenJob): void {
  const pack = Buffer.from(body.buffer, body.byteOffset, body.byteLength);
  verifyPackId(key, pack);
  const entries = decodePackIndex(key, pack, cipher);
  let total = 0;
  for (const entry of entries) total += entry.rawLength;
  const hashes = Buffer.from(new ArrayBuffer(entries.length * HASH_BYTES));
  const blocks = Buffer.from(new ArrayBuffer(total));
  const lengths: number[] = new Array(entries.length);
  let at = 0;
  for (let i = 0; i < entries.length; i++) {
    const raw = unpackBlock(key, pack, entries[i], cipher);
    raw.copy(blocks, at);
    entries[i].hash.copy(hashes, i * HASH_BYTES);
    lengths[i] = raw.length;
    at += raw.length;
  }
  const answer: PackAnswer = { job, hashes, blocks, lengths };
  port!.postMessage(answer, [hashes.buffer, blocks.buffer]);
}

function encode({ job, hashes, blocks, lengths, compression }: EncodeJob): void {
  const given: PackBlock[] = new Array(lengths.length);
  let at = 0;
  for (let i = 0; i < lengths.length; i++) {
    given[i] = {
      hash: Buffer.from(hashes.buffer, hashes.byteOffset + i * HASH_BYTES, HASH_BYTES),
      data: Buffer.from(blocks.buffer, blocks.byteOffset + at, lengths[i]),
    };
    at += lengths[i];
  }
  const pack = encodePack(given, compression, cipher);
  const body = owned(pack.body);
  const entries = pack.entries.map(({ offset, length, rawLength, codec }) => ({ offset, length, rawLength, codec }));
  const answer: PackAnswer = { job, id: pack.id, body, entries };
  port!.postMessage(answer, [body.buffer as ArrayBuffer]);
}

port.on('message', (message: OpenJob | EncodeJob) => {
  try {
    if (message.op === 'open') open(message);
    else encode(message);
  } catch (err) {
    const answer: PackAnswer = { job: message.job, error: errorMessage(err), format: err instanceof FormatError };
    port.postMessage(answer);
  }
});
