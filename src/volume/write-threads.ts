// Large overlay writes on a worker thread (volume/write-worker.ts). Cut into the small
// pieces the page cache keeps cheap (overlay-file.ts), a 1 MiB write is 64 pwrite calls:
// through the thread pool each was a callback on the event loop, and a volume streaming
// large writes took the event loop from every other volume on the host. Here the payload
// is copied once into shared memory (a reused buffer) and one message goes each way.
import os from 'node:os';
import { Worker } from 'node:worker_threads';
import { disk, nodeDisk } from '../disk/disk.js';
import { totalLength, writeAll } from './overlay-file.js';
import type { WriteAnswer, WriteJob } from './write-worker.js';

/** Threads: the cores left beside the event loop, at least 1, at most 2. */
const WRITE_THREADS = Math.max(1, Math.min(2, os.availableParallelism() - 1));
/** Shared buffers come in steps of this many bytes and are reused. */
const STAGING_STEP = 1024 * 1024;
/** Idle shared buffers kept for reuse: QD8 of 1 MiB writes four times over. */
const MAX_IDLE_STAGING_BYTES = 32 * 1024 * 1024;

interface Pending {
  settle: () => void;
  reject: (err: Error) => void;
}

interface Thread {
  worker: Worker;
  jobs: Map<number, Pending>;
}

class WriteThreads {
  private readonly threads: Thread[] = [];
  private readonly idle = new Map<number, SharedArrayBuffer[]>();
  private idleBytes = 0;
  private nextJob = 0;

  /** Write `parts` back to back into `fd` from `position`; settles once they are in the file. */
  async write(fd: number, parts: readonly Buffer[], position: number): Promise<void> {
    const length = totalLength(parts);
    const staging = this.take(length);
    const data = Buffer.from(staging, 0, length);
    let at = 0;
    for (const part of parts) at += part.copy(data, at);
    try {
      await this.run({ job: this.nextJob++, fd, position, data });
    } finally {
      this.give(staging);
    }
  }

  private take(length: number): SharedArrayBuffer {
    const bytes = Math.ceil(length / STAGING_STEP) * STAGING_STEP;
    const buffer = this.idle.get(bytes)?.pop();
    if (buffer === undefined) return new SharedArrayBuffer(bytes);
    this.idleBytes -= bytes;
    return buffer;
  }

  private give(buffer: SharedArrayBuffer): void {
    if (this.idleBytes + buffer.byteLength > MAX_IDLE_STAGING_BYTES) return;
    let list = this.idle.get(buffer.byteLength);
    if (list === undefined) this.idle.set(buffer.byteLength, (list = []));
    list.push(buffer);
    this.idleBytes += buffer.byteLength;
  }

  private run(message: WriteJob): Promise<void> {
    const thread = this.leastBusy();
    return new Promise<void>((settle, reject) => {
      thread.jobs.set(message.job, { settle, reject });
      if (thread.jobs.size === 1) thread.worker.ref();
      thread.worker.postMessage(message);
    });
  }

  private leastBusy(): Thread {
    let best: Thread | undefined;
    for (const t of this.threads) if (best === undefined || t.jobs.size < best.jobs.size) best = t;
    if (best !== undefined && (best.jobs.size === 0 || this.threads.length >= WRITE_THREADS)) return best;
    return this.start();
  }

  private start(): Thread {
    const worker = new Worker(new URL('./write-worker.js', import.meta.url));
    const thread: Thread = { worker, jobs: new Map() };
    // An idle thread never keeps the process alive; a busy one does (run() refs it).
    worker.unref();
    worker.on('message', (answer: WriteAnswer) => {
      const pending = thread.jobs.get(answer.job);
      if (pending === undefined) return;
      thread.jobs.delete(answer.job);
      if (thread.jobs.size === 0) worker.unref();
      if (!('error' in answer)) pending.settle();
      else pending.reject(Object.assign(new Error(answer.error), answer.code === undefined ? {} : { code: answer.code }));
    });
    const fail = (why: string) => {
      const index = this.threads.indexOf(thread);
      if (index >= 0) this.threads.splice(index, 1);
      for (const pending of thread.jobs.values()) pending.reject(new Error(`the overlay write thread ${why}`));
      thread.jobs.clear();
    };
    worker.on('error', (err) => fail(`failed: ${err.message}`));
    worker.on('exit', (code) => fail(`exited (code ${code})`));
    this.threads.push(thread);
    return thread;
  }
}

let threads: WriteThreads | undefined;

/**
 * Write a large payload into the overlay `fd` from `position` off the event loop. On a
 * disk other than node:fs (the simulation's) it goes through that disk's thread-pool calls.
 */
export function writeLarge(fd: number, parts: readonly Buffer[], position: number): Promise<void> {
  if (disk !== nodeDisk) return writeAll(fd, parts, position);
  threads ??= new WriteThreads();
  return threads.write(fd, parts, position);
}
