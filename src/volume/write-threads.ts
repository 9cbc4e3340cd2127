// Large overlay writes on a worker thread (volume/write-worker.ts). Cut into the small
// pieces the page cache keeps cheap (overlay-file.ts), a 1 MiB write is 64 pwrite calls:
// through the thread pool each was a callback on the event loop, and a volume streaming
// large writes took the event loop from every other volume on the host. Here the payload
// is copied once into shared memory (a reused buffer) and one message goes each way.
import os from 'node:os';
import { Worker } from 'node:worker_threads';
import { disk, nodeDisk } from '../disk/disk.js';
import { JobThreads } from '../disk/job-threads.js';
import { totalLength, writeAll } from './overlay-file.js';
import type { WriteAnswer, WriteJob } from './write-worker.js';

/** Threads: the cores left beside the event loop, at least 1, at most 2. */
const WRITE_THREADS = Math.max(1, Math.min(2, os.availableParallelism() - 1));
/** Shared buffers come in steps of this many bytes and are reused. */
const STAGING_STEP = 1024 * 1024;
/** Idle shared buffers kept for reuse: QD8 of 1 MiB writes four times over. */
const MAX_IDLE_STAGING_BYTES = 32 * 1024 * 1024;

class WriteThreads {
  private readonly threads = new JobThreads<WriteJob, WriteAnswer>('overlay write', WRITE_THREADS, () =>
    new Worker(new URL('./write-worker.js', import.meta.url)),
  );
  private readonly idle = new Map<number, SharedArrayBuffer[]>();
  private idleBytes = 0;

  /** Write `parts` back to back into `fd` from `position`; settles once they are in the file. */
  async write(fd: number, parts: readonly Buffer[], position: number): Promise<void> {
    const length = totalLength(parts);
    const staging = this.take(length);
    const data = Buffer.from(staging, 0, length);
    let at = 0;
    for (const part of parts) at += part.copy(data, at);
    try {
      const answer = await this.threads.run({ fd, position, data });
      if ('error' in answer) throw Object.assign(new Error(answer.error), answer.code === undefined ? {} : { code: answer.code });
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
