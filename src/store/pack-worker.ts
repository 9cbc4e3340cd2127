// The worker thread of store/pack-open.ts: opens whole packs (verifyPackId,
// decodePackIndex, unpackBlock of every block: decrypt, decompress, hash check) off the
// event loop. workerData: { dataKey: Uint8Array | null }, the store cipher's data key.
// A job is { job, key, body }; the answer { job, hashes, blocks, lengths } (hashes 16 bytes
// each, the raw blocks back to back; both transferred, not copied) or { job, error, format }
// (format: the error was a FormatError, to be rethrown as one naming `key`).
import { parentPort, workerData } from 'node:worker_threads';
import { PLAINTEXT, storeCipher } from '../crypto/cipher.js';
import { HASH_BYTES } from '../crypto/hash.js';
import { errorMessage } from '../log.js';
import { FormatError } from './errors.js';
import { decodePackIndex, unpackBlock, verifyPackId } from './pack.js';

export interface OpenJob {
  job: number;
  key: string;
  body: Uint8Array;
}

export type OpenAnswer =
  | { job: number; hashes: Uint8Array; blocks: Uint8Array; lengths: number[] }
  | { job: number; error: string; format: boolean };

const port = parentPort;
if (port === null) throw new Error('store/pack-worker.js runs only as a worker thread');
const dataKey = (workerData as { dataKey: Uint8Array | null }).dataKey;
const cipher = dataKey === null ? PLAINTEXT : storeCipher(Buffer.from(dataKey));

port.on('message', ({ job, key, body }: OpenJob) => {
  try {
    const pack = Buffer.from(body.buffer, body.byteOffset, body.byteLength);
    verifyPackId(key, pack);
    const entries = decodePackIndex(key, pack, cipher);
    let total = 0;
    for (const entry of entries) total += entry.rawLength;
    // Own ArrayBuffers (never Buffer's shared pool), so they can be transferred.
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
    const answer: OpenAnswer = { job, hashes, blocks, lengths };
    port.postMessage(answer, [hashes.buffer, blocks.buffer]);
  } catch (err) {
    const answer: OpenAnswer = { job, error: errorMessage(err), format: err instanceof FormatError };
    port.postMessage(answer);
  }
});
