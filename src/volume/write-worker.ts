// The worker thread of volume/write-threads.ts: writes a large payload into a volume's
// overlay, in pieces (overlay-file.ts), with synchronous pwrite calls off the event loop.
// The payload is in slots of the staging arena shared at start (or, rarely, in a buffer
// sent with the job); only the job number (or the error) goes back.
import { parentPort, workerData } from 'node:worker_threads';
import { errorMessage } from '../log.js';
import { STAGING_SLOT_BYTES, writeAllSync } from './overlay-file.js';

/** Write `length` bytes into the file `fd` at `position`, from arena slots or from `data`. */
export interface WriteJob {
  job: number;
  fd: number;
  position: number;
  length: number;
  slots?: number[];
  data?: Uint8Array;
}

export type WriteAnswer = { job: number } | { job: number; error: string; code?: string };

const port = parentPort;
if (port === null) throw new Error('volume/write-worker.js runs only as a worker thread');
const arena = (workerData as { arena: SharedArrayBuffer }).arena;

/** The payload of a job as buffers over shared memory, in order. */
function payload(job: WriteJob): Buffer[] {
  if (job.data !== undefined) return [Buffer.from(job.data.buffer, job.data.byteOffset, job.length)];
  const parts: Buffer[] = [];
  let left = job.length;
  for (const slot of job.slots ?? []) {
    const n = Math.min(left, STAGING_SLOT_BYTES);
    parts.push(Buffer.from(arena, slot * STAGING_SLOT_BYTES, n));
    left -= n;
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
