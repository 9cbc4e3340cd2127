// The worker thread of store/pack-threads.ts: opens whole fetched packs (openPack: the id of a
// sealed pack, decodePackIndex, unpackBlock of every block: decrypt, decompress, hash check) off the
// event loop. workerData: { dataKey: Uint8Array | null }, the store cipher's data key.
// The pack comes in and the blocks go back transferred, not copied; or, when the caller
// lends a buffer on shared memory for them, the blocks are written there and only their
// names and lengths go back.
import { parentPort, workerData } from 'node:worker_threads';
import { PLAINTEXT, storeCipher } from '../crypto/cipher.js';
import { errorMessage } from '../log.js';
import { FormatError } from './errors.js';
import { openPack } from './pack.js';

/** Open the whole pack `body` fetched from `key`. */
export interface OpenJob {
  job: number;
  key: string;
  body: Uint8Array;
  /** Shared memory the blocks are opened into when they fit (a view of a SharedArrayBuffer). */
  out?: Uint8Array;
}

export type PackAnswer =
  | { job: number; hashes: Uint8Array; blocks: Uint8Array; lengths: number[] }
  /** format: the error was a FormatError, to be rethrown as one naming the job's key. */
  | { job: number; error: string; format: boolean };

const port = parentPort;
if (port === null) throw new Error('store/pack-worker.js runs only as a worker thread');
const dataKey = (workerData as { dataKey: Uint8Array | null }).dataKey;
const cipher = dataKey === null ? PLAINTEXT : storeCipher(Buffer.from(dataKey));

function open({ job, key, body, out }: OpenJob): void {
  const into = out === undefined ? undefined : Buffer.from(out.buffer, out.byteOffset, out.byteLength);
  const opened = openPack(key, Buffer.from(body.buffer, body.byteOffset, body.byteLength), cipher, into);
  const answer: PackAnswer = { job, ...opened };
  const shared = opened.blocks.buffer === into?.buffer;
  port!.postMessage(answer, shared ? [opened.hashes.buffer as ArrayBuffer] : [opened.hashes.buffer as ArrayBuffer, opened.blocks.buffer as ArrayBuffer]);
}

port.on('message', (message: OpenJob) => {
  try {
    open(message);
  } catch (err) {
    const answer: PackAnswer = { job: message.job, error: errorMessage(err), format: err instanceof FormatError };
    port.postMessage(answer);
  }
});
