// The worker thread of volume/write-threads.ts: writes a large payload into a volume's
// overlay, in pieces (overlay-file.ts), with synchronous pwrite calls off the event loop.
// The payload comes as buffers moved with the job and bytes staged in slots of the arena
// shared at start (or, rarely, in a buffer sent with the job); only the job number (or
// the error) goes back.
import { parentPort, workerData } from 'node:worker_threads';
import { errorMessage } from '../log.js';
import { STAGING_SLOT_BYTES, writeAllSync } from './overlay-file.js';

/**
 * Write `length` bytes into the file `fd` at `position`: the segments in order, each a
 * buffer moved here with the job or a count of the next staged bytes, which are in arena
 * `slots` (or, rarely, in `data`).
 */
export interface WriteJob {
  job: number;
  fd: number;
  position: number;
  length: number;
  segments: Array<ArrayBuffer | number>;
  slots?: number[];
  data?: Uint8Array;
}

export type WriteAnswer = { job: number } | { job: number; error: string; code?: string };

const port = parentPort;
if (port === null) throw new Error('volume/write-worker.js runs only as a worker thread');
const arena = (workerData as { arena: SharedArrayBuffer }).arena;

/** The payload of a job as buffers, in order. */
function payload(job: WriteJob): Buffer[] {
  const parts: Buffer[] = [];
  /** Where the next staged bytes start: in `data`, or in slot `slot` of the arena. */
  let dataAt = 0;
  let slot = 0;
  let inSlot = 0;
  for (const segment of job.segments) {
    if (typeof segment !== 'number') {
      parts.push(Buffer.from(segment));
      continue;
    }
    if (job.data !== undefined) {
      parts.push(Buffer.from(job.data.buffer, job.data.byteOffset + dataAt, segment));
      dataAt += segment;
      continue;
    }
    let left = segment;
    while (left > 0) {
      if (inSlot === STAGING_SLOT_BYTES) {
        slot++;
        inSlot = 0;
      }
      const n = Math.min(left, STAGING_SLOT_BYTES - inSlot);
      parts.push(Buffer.from(arena, job.slots![slot] * STAGING_SLOT_BYTES + inSlot, n));
      inSlot += n;
      left -= n;
    }
  }
  return parts;
}

port.on('message', (job: WriteJob) => {
  let answer: WriteAnswer;
  try {
    writeAllSync(job.fd, payload(job), job.position);
    answer = { job: job.job };
  } catch (err) {
    answer = { job: job.job, error: errorMessage(err), code: (err as NodeJS.ErrnoException).code };
  }
  port.postMessage(answer);
});
