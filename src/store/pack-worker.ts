// The worker thread of store/pack-threads.ts: opens whole fetched packs (verifyPackId,
// decodePackIndex, unpackBlock of every block: decrypt, decompress, hash check) off the
// event loop. workerData: { dataKey: Uint8Array | null }, the store cipher's data key.
// The pack comes in and the blocks go back transferred, not copied.
import { parentPort, workerData } from 'node:worker_threads';
import { PLAINTEXT, storeCipher } from '../crypto/cipher.js';
import { HASH_BYTES } from '../crypto/hash.js';
import { errorMessage } from '../log.js';
import { FormatError } from './errors.js';
import { decodePackIndex, unpackInto, verifyPackId } from './pack.js';

/** Open the whole pack `body` fetched from `key`. */
export interface OpenJob {
  job: number;
  key: string;
  body: Uint8Array;
}

export type PackAnswer =
  | { job: number; hashes: Uint8Array; blocks: Uint8Array; lengths: number[] }
  /** format: the error was a FormatError, to be rethrown as one naming the job's key. */
  | { job: number; error: string; format: boolean };

const port = parentPort;
if (port === null) throw new Error('store/pack-worker.js runs only as a worker thread');
const dataKey = (workerData as { dataKey: Uint8Array | null }).dataKey;
const cipher = dataKey === null ? PLAINTEXT : storeCipher(Buffer.from(dataKey));

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
    const length = entries[i].rawLength;
    unpackInto(key, pack, entries[i], cipher, blocks.subarray(at, at + length));
    entries[i].hash.copy(hashes, i * HASH_BYTES);
    lengths[i] = length;
    at += length;
  }
  const answer: PackAnswer = { job, hashes, blocks, lengths };
  port!.postMessage(answer, [hashes.buffer, blocks.buffer]);
}

port.on('message', (message: OpenJob) => {
  try {
    open(message);
  } catch (err) {
    const answer: PackAnswer = { job: message.job, error: errorMessage(err), format: err instanceof FormatError };
    port.postMessage(answer);
  }
});
