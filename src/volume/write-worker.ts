// The worker thread of volume/write-threads.ts: writes a large payload into a volume's
// overlay, in pieces (overlay-file.ts), with synchronous pwrite calls off the event loop.
// The payload comes on shared memory; only the job number (or the error) goes back.
import { parentPort } from 'node:worker_threads';
import { errorMessage } from '../log.js';
import { writeAllSync } from './overlay-file.js';

/** Write `data` (a view of a SharedArrayBuffer) into the file `fd` at `position`. */
export interface WriteJob {
  job: number;
  fd: number;
  position: number;
  data: Uint8Array;
}

export type WriteAnswer = { job: number } | { job: number; error: string; code?: string };

const port = parentPort;
if (port === null) throw new Error('volume/write-worker.js runs only as a worker thread');

port.on('message', ({ job, fd, position, data }: WriteJob) => {
  let answer: WriteAnswer;
  try {
    writeAllSync(fd, [Buffer.from(data.buffer, data.byteOffset, data.byteLength)], position);
    answer = { job };
  } catch (err) {
    answer = { job, error: errorMessage(err), code: (err as NodeJS.ErrnoException).code };
  }
  port.postMessage(answer);
});
