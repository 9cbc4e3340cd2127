// Opening fetched packs on worker threads (store/pack-worker.ts). Verifying a pack
// against its id and opening its index and every block (decrypt, decompress, hash check)
// costs a few ms of CPU per 3.2 MB pack; on the event loop that work competed with the
// NBD reads it was done for. The threads make the store's cipher from its data key. The
// body is transferred, not copied, when it owns its memory; the blocks come back in one
// transferred buffer. Encoding packs for upload was tried here too and measured slower
// for encrypted drains on 2 cores (the copy to the thread, and one more thread competing
// with sealing and MinIO), so uploads encode on the event loop (store/upload.ts).
import os from 'node:os';
import { Worker } from 'node:worker_threads';
import { cipherDataKey, type StoreCipher } from '../crypto/cipher.js';
import { HASH_BYTES } from '../crypto/hash.js';
import { JobThreads } from '../disk/job-threads.js';
import { errorMessage } from '../log.js';
import { FormatError } from './errors.js';
import type { OpenJob, PackAnswer } from './pack-worker.js';
import { openPack } from './pack.js';

/** Threads per pool: the cores left beside the event loop, at least 1, at most 4. */
export const PACK_THREADS = Math.max(1, Math.min(4, os.availableParallelism() - 1));

/** One opened block: its name and raw content (a view of a buffer it shares with the pack's other blocks). */
export interface OpenedBlock {
  hash: Buffer;
  data: Buffer;
}

/** A thread's answer to a job that succeeded. */
type Opened = Extract<PackAnswer, { blocks: Uint8Array }>;

/** Whether `bytes` is the whole of its ArrayBuffer (not a view of Buffer's shared pool or of a bigger buffer), so it can be transferred. */
function ownsMemory(bytes: Buffer): boolean {
  return bytes.byteOffset === 0 && bytes.byteLength === bytes.buffer.byteLength && bytes.buffer instanceof ArrayBuffer;
}

let packThreadCount = PACK_THREADS;

/** Threads of the pools made from now on; 0 opens packs inline (the simulation). */
export function setPackThreads(count: number): void {
  packThreadCount = count;
}

const pools = new WeakMap<StoreCipher, PackThreads>();

/** The one pool of a store cipher (every fetcher of a host shares it). */
export function packThreads(cipher: StoreCipher): PackThreads {
  let pool = pools.get(cipher);
  if (pool === undefined) {
    pool = new PackThreads(cipher);
    pools.set(cipher, pool);
  }
  return pool;
}

export class PackThreads {
  private readonly threads: JobThreads<OpenJob, PackAnswer>;

  constructor(
    private readonly cipher: StoreCipher,
    /** 0: open packs on the calling thread (the simulation: no threads, a deterministic order). */
    private readonly size = packThreadCount,
  ) {
    const dataKey = cipherDataKey(cipher) ?? null;
    this.threads = new JobThreads('pack', size, () => new Worker(new URL('./pack-worker.js', import.meta.url), { workerData: { dataKey } }));
  }

  /**
   * The blocks of the whole pack `body` fetched from `key`, each verified against its
   * name. Throws FormatError naming `key` if the body is not that pack. `body` must not
   * be used afterwards (its memory may be handed to the thread), unless it is on shared
   * memory. The blocks are opened into `out` (a buffer on shared memory) when they fit,
   * else into a buffer of their own.
   */
  async open(key: string, body: Buffer, out?: Buffer): Promise<OpenedBlock[]> {
    const answer = this.size === 0 ? openPack(key, body, this.cipher, out) : await this.run(key, body, out);
    const hashes = Buffer.from(answer.hashes.buffer, answer.hashes.byteOffset, answer.hashes.byteLength);
    // Opened into `out`: the thread's view is of its own handle on out's shared memory.
    const intoOut = out !== undefined && (answer.blocks.buffer === out.buffer || answer.blocks.buffer instanceof SharedArrayBuffer);
    const blocks = intoOut ? out.subarray(0, answer.blocks.byteLength) : Buffer.from(answer.blocks.buffer, answer.blocks.byteOffset, answer.blocks.byteLength);
    const opened: OpenedBlock[] = new Array(answer.lengths.length);
    let at = 0;
    for (let i = 0; i < opened.length; i++) {
      opened[i] = { hash: hashes.subarray(i * HASH_BYTES, (i + 1) * HASH_BYTES), data: blocks.subarray(at, at + answer.lengths[i]) };
      at += answer.lengths[i];
    }
    return opened;
  }

  /** Stops the threads; the next job starts new ones. */
  close(): Promise<void> {
    return this.threads.close();
  }

  private async run(key: string, body: Buffer, out: Buffer | undefined): Promise<Opened> {
    const what = `opening pack ${key}`;
    let answer: PackAnswer;
    try {
      answer = await this.threads.run({ key, body, out }, ownsMemory(body) ? [body.buffer as ArrayBuffer] : []);
    } catch (err) {
      throw new Error(`${what}: ${errorMessage(err)}`);
    }
    if (!('error' in answer)) return answer;
    throw answer.format ? new FormatError(key, answer.error) : new Error(`${what}: ${answer.error}`);
  }
}
