// Large overlay writes on a worker thread (volume/write-worker.ts). Cut into the small
// pieces the page cache keeps cheap (overlay-file.ts), a 1 MiB write is 64 pwrite calls:
// through the thread pool each was a callback on the event loop, and a volume streaming
// large writes took the event loop from every other volume on the host. Here the socket
// chunks a payload fills whole move to the thread with one message, the rest is copied
// into a staging arena the threads share, and the answer is the job number. Sending a
// SharedArrayBuffer in every message instead made V8 count its size as new external
// memory each time, and the main thread ran a full garbage collection every few writes
// (docs/benchmarks.md: large writes and the garbage collector).
import os from 'node:os';
import { Worker } from 'node:worker_threads';
import { disk, nodeDisk } from '../disk/disk.js';
import { JobThreads } from '../disk/job-threads.js';
import { STAGING_SLOT_BYTES, totalLength, writeAll } from './overlay-file.js';
import type { WriteAnswer, WriteJob } from './write-worker.js';

/** Threads: the cores left beside the event loop, at least 1, at most 2. */
const WRITE_THREADS = Math.max(1, Math.min(2, os.availableParallelism() - 1));
/** Slots in the arena: QD8 of 1 MiB writes four times over. */
const STAGING_SLOTS = 32;

class WriteThreads {
  /** Shared with every thread once, when it starts; jobs name slots of it. */
  private readonly arena = new SharedArrayBuffer(STAGING_SLOTS * STAGING_SLOT_BYTES);
  /** A view of each slot, made once: a view per write was garbage the collector chased. */
  private readonly views = Array.from({ length: STAGING_SLOTS }, (_, i) => Buffer.from(this.arena, i * STAGING_SLOT_BYTES, STAGING_SLOT_BYTES));
  private readonly free: number[] = Array.from({ length: STAGING_SLOTS }, (_, i) => STAGING_SLOTS - 1 - i);
  // A thread's heap holds little but the buffers moved to it, each dead once written. A
  // small young generation frees them at the next scavenge; the process's heap flag
  // (cli/node-flags.ts) would otherwise let a thread keep a hundred MB of them.
  private readonly threads = new JobThreads<WriteJob, WriteAnswer>('overlay write', WRITE_THREADS, () =>
    new Worker(new URL('./write-worker.js', import.meta.url), {
      workerData: { arena: this.arena },
      resourceLimits: { maxOldGenerationSizeMb: 16, maxYoungGenerationSizeMb: 4 },
    }),
  );

  get freeSlots(): number {
    return this.free.length;
  }

  /**
   * Write `parts` back to back into `fd` from `position`; settles once they are in the file.
   * With `movable`, a part that is the whole of its ArrayBuffer (a socket read's own buffer)
   * moves to the thread instead of being copied, and reads as empty here afterwards.
   */
  async write(fd: number, parts: readonly Buffer[], position: number, movable: boolean): Promise<void> {
    const length = totalLength(parts);
    const segments: Array<ArrayBuffer | number> = [];
    const moved: ArrayBuffer[] = [];
    const staged: Buffer[] = [];
    let stagedLength = 0;
    for (const part of parts) {
      const buffer = movable ? wholeBuffer(part) : undefined;
      if (buffer !== undefined) {
        segments.push(buffer);
        moved.push(buffer);
        continue;
      }
      staged.push(part);
      stagedLength += part.length;
      const last = segments.length - 1;
      if (last >= 0 && typeof segments[last] === 'number') segments[last] = (segments[last] as number) + part.length;
      else segments.push(part.length);
    }
    const slots = stagedLength === 0 ? [] : this.take(stagedLength);
    let answer: WriteAnswer | undefined;
    try {
      // More in flight than the arena holds (rare: writes past 32 MiB at once): the staged
      // bytes go in a buffer of their own, sent with the job.
      const job = slots === undefined
        ? { fd, position, length, segments, data: copyInto(new Uint8Array(new SharedArrayBuffer(stagedLength)), staged) }
        : { fd, position, length, segments, slots: this.stage(slots, staged) };
      answer = await this.threads.run(job, moved);
    } catch (err) {
      // A buffer that cannot move (one Node.js marked so) fails the message before anything moved.
      if (moved.length === 0 || (err as Error).name !== 'DataCloneError') throw err;
    } finally {
      if (slots !== undefined) this.free.push(...slots);
    }
    if (answer === undefined) return this.write(fd, parts, position, false);
    if ('error' in answer) throw Object.assign(new Error(answer.error), answer.code === undefined ? {} : { code: answer.code });
  }

  /** Slots enough for `length` (> 0) bytes, or undefined while the arena has too few free. */
  private take(length: number): number[] | undefined {
    const count = Math.ceil(length / STAGING_SLOT_BYTES);
    if (count > this.free.length) return undefined;
    return this.free.splice(this.free.length - count, count);
  }

  /** Copy `parts` into `slots`, in order; returns the slots. */
  private stage(slots: number[], parts: readonly Buffer[]): number[] {
    let slot = 0;
    let at = 0;
    for (const part of parts) {
      let taken = 0;
      while (taken < part.length) {
        if (at === STAGING_SLOT_BYTES) {
          slot++;
          at = 0;
        }
        const n = part.copy(this.views[slots[slot]], at, taken, Math.min(part.length, taken + STAGING_SLOT_BYTES - at));
        taken += n;
        at += n;
      }
    }
    return slots;
  }
}

/** The ArrayBuffer a part is the whole of, if it is one that can move (not shared, not empty). */
function wholeBuffer(part: Buffer): ArrayBuffer | undefined {
  const buffer = part.buffer;
  return buffer instanceof ArrayBuffer && part.byteOffset === 0 && part.byteLength === buffer.byteLength && part.byteLength > 0 ? buffer : undefined;
}

function copyInto(target: Uint8Array, parts: readonly Buffer[]): Uint8Array {
  let at = 0;
  for (const part of parts) {
    target.set(part, at);
    at += part.length;
  }
  return target;
}

let threads: WriteThreads | undefined;

/** Slots of the staging arena no write holds (all of them once every write has settled). */
export function stagingSlotsFree(): number {
  return threads?.freeSlots ?? STAGING_SLOTS;
}

/**
 * Write a large payload into the overlay `fd` from `position` off the event loop. With
 * `movable`, parts that are whole ArrayBuffers move to the thread (the caller gives them up).
 * On a disk other than node:fs (the simulation's) it goes through that disk's thread-pool calls.
 */
export function writeLarge(fd: number, parts: readonly Buffer[], position: number, movable = false): Promise<void> {
  if (disk !== nodeDisk) return writeAll(fd, parts, position);
  threads ??= new WriteThreads();
  return threads.write(fd, parts, position, movable);
}
