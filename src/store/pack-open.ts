// Opening fetched packs on worker threads (DESIGN.md: Paths, Read). Verifying a whole-pack
// GET against its id, opening its index and every block (decrypt, decompress, hash check)
// costs about 3 ms of CPU per 3.2 MB pack; on the event loop that competed with the NBD
// reads the pack was fetched for. The workers (store/pack-worker.ts) make the store's
// cipher from its data key. A pack body is handed over without a copy when it owns its
// ArrayBuffer; the opened blocks come back in one transferred buffer.
import os from 'node:os';
import { Worker } from 'node:worker_threads';
import { cipherDataKey, type StoreCipher } from '../crypto/cipher.js';
import { HASH_BYTES } from '../crypto/hash.js';
import { FormatError } from './errors.js';
import type { OpenAnswer, OpenJob } from './pack-worker.js';

/** Worker threads per pool: the cores left beside the event loop, at least 1, at most 4. */
export const PACK_OPEN_THREADS = Math.max(1, Math.min(4, os.availableParallelism() - 1));

/** One opened block: its name and raw content (a view of a buffer it shares with the pack's other blocks). */
export interface OpenedBlock {
  hash: Buffer;
  data: Buffer;
}

interface Pending {
  key: string;
  resolve: (blocks: OpenedBlock[]) => void;
  reject: (err: Error) => void;
}

interface Thread {
  worker: Worker;
  jobs: Map<number, Pending>;
}

export class PackOpeners {
  private readonly threads: Thread[] = [];
  private readonly dataKey: Buffer | null;
  private nextJob = 0;

  constructor(
    cipher: StoreCipher,
    private readonly size = PACK_OPEN_THREADS,
  ) {
    this.dataKey = cipherDataKey(cipher) ?? null;
  }

  /**
   * The blocks of the whole pack `body` fetched from `key`, each verified against its
   * name. Throws FormatError naming `key` if the body is not that pack. `body` must not
   * be used afterwards (its memory may be handed to the worker).
   */
  open(key: string, body: Buffer): Promise<OpenedBlock[]> {
    const thread = this.leastBusy();
    const job = this.nextJob++;
    const whole = body.byteOffset === 0 && body.byteLength === body.buffer.byteLength && body.buffer instanceof ArrayBuffer;
    const message: OpenJob = { job, key, body };
    return new Promise<OpenedBlock[]>((resolve, reject) => {
      thread.jobs.set(job, { key, resolve, reject });
      if (thread.jobs.size === 1) thread.worker.ref();
      // A view of a bigger buffer (Buffer's shared pool, a subarray) is copied, never detached.
      thread.worker.postMessage(message, whole ? [body.buffer as ArrayBuffer] : []);
    });
  }

  /** Stops the threads; open() starts new ones if called again. */
  async close(): Promise<void> {
    const threads = this.threads.splice(0);
    await Promise.all(threads.map((t) => t.worker.terminate()));
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
    // An idle pool never keeps the process alive.
    worker.unref();
    worker.on('message', (answer: OpenAnswer) => {
      const pending = thread.jobs.get(answer.job);
      if (pending === undefined) return;
      thread.jobs.delete(answer.job);
      if (thread.jobs.size === 0) worker.unref();
      if ('error' in answer) {
        pending.reject(answer.format ? new FormatError(pending.key, answer.error) : new Error(`opening pack ${pending.key}: ${answer.error}`));
        return;
      }
      const hashes = Buffer.from(answer.hashes.buffer, answer.hashes.byteOffset, answer.hashes.byteLength);
      const blocks = Buffer.from(answer.blocks.buffer, answer.blocks.byteOffset, answer.blocks.byteLength);
      const opened: OpenedBlock[] = new Array(answer.lengths.length);
      let at = 0;
      for (let i = 0; i < opened.length; i++) {
        opened[i] = { hash: hashes.subarray(i * HASH_BYTES, (i + 1) * HASH_BYTES), data: blocks.subarray(at, at + answer.lengths[i]) };
        at += answer.lengths[i];
      }
      pending.resolve(opened);
    });
    const fail = (why: string) => {
      const index = this.threads.indexOf(thread);
      if (index >= 0) this.threads.splice(index, 1);
      for (const pending of thread.jobs.values()) pending.reject(new Error(`opening pack ${pending.key}: the pack worker thread ${why}`));
      thread.jobs.clear();
    };
    worker.on('error', (err) => fail(`failed: ${err.message}`));
    worker.on('exit', (code) => fail(`exited (code ${code})`));
    this.threads.push(thread);
    return thread;
  }
}
