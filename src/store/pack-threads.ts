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

interface Pending {
  /** Named in errors: what the job was doing. */
  what: string;
  /** The object key a FormatError names. */
  key: string;
  settle: (answer: Opened) => void;
  reject: (err: Error) => void;
}

interface Thread {
  worker: Worker;
  jobs: Map<number, Pending>;
}

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
  private readonly threads: Thread[] = [];
  private readonly dataKey: Buffer | null;
  private nextJob = 0;

  constructor(
    private readonly cipher: StoreCipher,
    /** 0: open packs on the calling thread (the simulation: no threads, a deterministic order). */
    private readonly size = packThreadCount,
  ) {
    this.dataKey = cipherDataKey(cipher) ?? null;
  }

  /**
   * The blocks of the whole pack `body` fetched from `key`, each verified against its
   * name. Throws FormatError naming `key` if the body is not that pack. `body` must not
   * be used afterwards (its memory may be handed to the thread), unless it is on shared
   * memory. The blocks are opened into `out` (a buffer on shared memory) when they fit,
   * else into a buffer of their own.
   */
  async open(key: string, body: Buffer, out?: Buffer): Promise<OpenedBlock[]> {
    const message: OpenJob = { job: this.nextJob++, key, body, out };
    const answer =
      this.size === 0 ? openPack(key, body, this.cipher, out) : await this.run(message, key, `opening pack ${key}`, ownsMemory(body) ? [body.buffer as ArrayBuffer] : []);
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
  async close(): Promise<void> {
    const threads = this.threads.splice(0);
    await Promise.all(threads.map((t) => t.worker.terminate()));
  }

  private run(message: OpenJob, key: string, what: string, transfer: ArrayBuffer[]): Promise<Opened> {
    const thread = this.leastBusy();
    return new Promise<Opened>((settle, reject) => {
      thread.jobs.set(message.job, { what, key, settle, reject });
      if (thread.jobs.size === 1) thread.worker.ref();
      thread.worker.postMessage(message, transfer);
    });
  }

  private leastBusy(): Thread {
    let best: Thread | undefined;
    for (const t of this.threads) if (best === undefined || t.jobs.size < best.jobs.size) best = t;
    if (best !== undefined && (best.jobs.size === 0 || this.threads.length >= this.size)) return best;
    return this.start();
  }

  private start(): Thread {
    const worker = new Worker(new URL('./pack-worker.js', import.meta.url), { workerData: { dataKey: this.dataKey } });
    const thread: Thread = { worker, jobs: new Map() };
    // An idle pool never keeps the process alive; a busy one does (run() refs it).
    worker.unref();
    worker.on('message', (answer: PackAnswer) => {
      const pending = thread.jobs.get(answer.job);
      if (pending === undefined) return;
      thread.jobs.delete(answer.job);
      if (thread.jobs.size === 0) worker.unref();
      if (!('error' in answer)) pending.settle(answer);
      else if (answer.format) pending.reject(new FormatError(pending.key, answer.error));
      else pending.reject(new Error(`${pending.what}: ${answer.error}`));
    });
    const fail = (why: string) => {
      const index = this.threads.indexOf(thread);
      if (index >= 0) this.threads.splice(index, 1);
      for (const pending of thread.jobs.values()) pending.reject(new Error(`${pending.what}: the pack thread ${why}`));
      thread.jobs.clear();
    };
    worker.on('error', (err) => fail(`failed: ${err.message}`));
    worker.on('exit', (code) => fail(`exited (code ${code})`));
    this.threads.push(thread);
    return thread;
  }
}
