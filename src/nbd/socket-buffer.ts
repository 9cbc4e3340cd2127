// The kernel's send buffer of a unix-socket connection, raised past the kernel's default
// (208 KiB on stock kernels): a 1 MiB read reply then goes into the socket in one write,
// not in five rounds of waiting for the client to make room, each an event-loop wake-up.
// Node.js sets no socket option of a stream socket, so setsockopt(2) is called through
// koffi (an FFI library with prebuilt binaries); where it cannot load, the default stays.
// TCP sockets are left alone: setting the size there turns off the kernel's autotuning.
import { createRequire } from 'node:module';
import type net from 'node:net';

/** What the daemon asks for; Linux doubles it for its bookkeeping (socket(7)). */
export const UNIX_SEND_BUFFER_BYTES = 1024 * 1024;

const SOL_SOCKET = 1;
const SO_SNDBUF = 7;
/** SO_SNDBUF past net.core.wmem_max, for a process with CAP_NET_ADMIN. */
const SO_SNDBUFFORCE = 32;

interface SockOpts {
  set(fd: number, level: number, name: number, value: Buffer, length: number): number;
  get(fd: number, level: number, name: number, value: Buffer, length: number[]): number;
}

let sockOpts: SockOpts | Error | undefined;

function load(): SockOpts | Error {
  if (sockOpts !== undefined) return sockOpts;
  try {
    const koffi = createRequire(import.meta.url)('koffi') as typeof import('koffi');
    const libc = koffi.load('libc.so.6');
    sockOpts = {
      set: libc.func('int setsockopt(int, int, int, const void *, uint32_t)'),
      get: libc.func('int getsockopt(int, int, int, _Out_ void *, _Inout_ uint32_t *)'),
    };
  } catch (err) {
    sockOpts = new Error(`setsockopt(2) is not reachable here: ${(err as Error).message}`);
  }
  return sockOpts;
}

/**
 * Raise the send buffer of `socket` (a unix-socket connection) to `bytes`, past
 * net.core.wmem_max where the process may. Returns the size the kernel now keeps
 * (doubled), or an Error saying why it stays as it was.
 */
export function raiseSendBuffer(socket: net.Socket, bytes = UNIX_SEND_BUFFER_BYTES): number | Error {
  const opts = load();
  if (opts instanceof Error) return opts;
  // The descriptor of the stream's libuv handle (Node.js keeps it as `fd` on the handle).
  const fd = (socket as unknown as { _handle?: { fd?: number } })._handle?.fd;
  if (typeof fd !== 'number' || fd < 0) return new Error('the socket has no file descriptor');
  const value = Buffer.alloc(4);
  value.writeInt32LE(bytes);
  if (opts.set(fd, SOL_SOCKET, SO_SNDBUFFORCE, value, 4) !== 0 && opts.set(fd, SOL_SOCKET, SO_SNDBUF, value, 4) !== 0) {
    return new Error(`setsockopt(SO_SNDBUF, ${bytes}) failed on descriptor ${fd}`);
  }
  const now = Buffer.alloc(4);
  if (opts.get(fd, SOL_SOCKET, SO_SNDBUF, now, [4]) !== 0) return new Error(`getsockopt(SO_SNDBUF) failed on descriptor ${fd}`);
  return now.readInt32LE(0);
}
