// The thread BlockArena.pretouch() starts: each buffer it is sent comes back with one
// byte of every page written, so the kernel has backed each page with memory of its own.
// No slot of a buffer sent here is in use, so the bytes it holds do not matter.
import { parentPort } from 'node:worker_threads';

const PAGE = 4096;

parentPort!.on('message', (buffer: ArrayBuffer) => {
  const bytes = new Uint8Array(buffer);
  for (let i = 0; i < bytes.length; i += PAGE) bytes[i] = 0;
  parentPort!.postMessage(buffer, [buffer]);
});
