// The transmission phase (proto.md: "Transmission phase", "Request types"). Requests
// are parsed and served synchronously as bytes arrive; only FLUSH and FUA wait, so
// their replies may overtake or trail others (the cookie says which is which). Replies
// produced while one batch of input is parsed go out in one corked write.
import type { Socket } from 'node:net';
import { errorMessage, type Logger } from '../log.js';
import { VolumeError, type Volume, type VolumeErrorCode } from '../volume/volume.js';
import type { OpKind } from '../volume/stats.js';
import type { ByteQueue } from './byte-queue.js';
import type { DeferredRequests } from './deferred.js';
import type { ReplyPacer } from './reply-pacer.js';
import type { Negotiated } from './handshake.js';
import * as P from './protocol.js';

const ERRNO: Record<VolumeErrorCode, number> = {
  EIO: P.EIO, EPERM: P.EPERM, EINVAL: P.EINVAL, ENOSPC: P.ENOSPC, ENOTSUP: P.ENOTSUP, ESHUTDOWN: P.ESHUTDOWN,
};

/** Flags each command may carry; anything else is EINVAL (proto.md: Error values). */
const ALLOWED_FLAGS: Record<number, number> = {
  [P.CMD_READ]: P.CMD_FLAG_FUA | P.CMD_FLAG_DF,
  [P.CMD_WRITE]: P.CMD_FLAG_FUA,
  [P.CMD_DISC]: P.CMD_FLAG_FUA,
  [P.CMD_FLUSH]: P.CMD_FLAG_FUA,
  [P.CMD_TRIM]: P.CMD_FLAG_FUA,
  [P.CMD_CACHE]: P.CMD_FLAG_FUA,
  [P.CMD_WRITE_ZEROES]: P.CMD_FLAG_FUA | P.CMD_FLAG_NO_HOLE | P.CMD_FLAG_FAST_ZERO,
  [P.CMD_BLOCK_STATUS]: P.CMD_FLAG_FUA | P.CMD_FLAG_REQ_ONE,
};

const TWO_32 = 2 ** 32;
/** Read reply classes (see replyBuffer): data lengths rounded up to this below LARGE_REPLY_STEP... */
const SMALL_REPLY_STEP = 4 * 1024;
/** ...and to this from here on. */
const LARGE_REPLY_STEP = 64 * 1024;
/** Bytes of idle reply buffers one connection keeps: QD8 of 1 MiB reads twice over. */
const MAX_POOLED_BYTES = 16 * 1024 * 1024;
/**
 * Reply bytes queued for one client before we stop serving its requests (pump). Not the
 * stream's 16 KiB mark: one 1 MiB read reply would stall the pipeline.
 */
const MAX_QUEUED_REPLY_BYTES = 64 * 1024 * 1024;
/**
 * Sector-aligned writes at least this large go through the thread pool (Volume.writeLarge):
 * the copy into the page cache overlaps with reading the next request.
 */
const LARGE_WRITE_BYTES = 256 * 1024;
/** Reads at least this large read the overlay and the slab through the thread pool (Volume.readLater). */
const LARGE_READ_BYTES = 256 * 1024;
/** Offsets at or past 2^53 cannot be represented exactly; no volume is that large. */
const MAX_OFFSET_HIGH = 2 ** 21;

export class Transmission {
  private readonly volume: Volume;
  private readonly structured: boolean;
  private readonly baseAllocationId: number;
  /** Requests deferred (waiting for the store or a flush); at most deferred.perConnection. */
  private inflight = 0;
  /** Bytes the deferred requests hold: write payloads and large reads' reply buffers. */
  private inflightBytes = 0;
  /** Reply bytes of large reads the thread pool is filling (they count as queued replies). */
  private fillingReplyBytes = 0;
  /** Reply bytes of large reads filled and waiting for their turn (ReplyPacer; they count as queued replies). */
  private pacedReplyBytes = 0;
  /** Parsing stopped and the socket paused until a deferred request finishes. */
  private heldBack = false;
  private readonly wake = () => this.resumeIfRoom();
  private disconnecting = false;
  private closed = false;
  private corked = false;
  /** Idle read reply buffers by class size (see replyBuffer), MAX_POOLED_BYTES in all. */
  private readonly replyPool = new Map<number, Buffer[]>();
  private pooledBytes = 0;

  constructor(
    private readonly socket: Socket,
    private readonly queue: ByteQueue,
    negotiated: Negotiated,
    private readonly log: Logger,
    private readonly onClose: () => void,
    private readonly deferred: DeferredRequests,
    private readonly pacer: ReplyPacer,
  ) {
    this.volume = negotiated.volume;
    this.structured = negotiated.structured;
    this.baseAllocationId = negotiated.baseAllocationId;
    socket.on('drain', () => {
      if (this.closed) return;
      socket.resume();
      this.pump();
    });
  }

  /** Parse and serve every complete request in the queue. */
  pump(): void {
    if (this.closed || this.disconnecting) return;
    const queue = this.queue;
    while (queue.length >= P.REQUEST_BYTES) {
      // A client that does not read its replies is not served further until it does
      // ('drain' resumes): queued replies stay bounded whatever it has already sent.
      if (this.socket.writableLength > MAX_QUEUED_REPLY_BYTES) {
        this.socket.pause();
        break;
      }
      // Large reads being filled, or waiting for their turn, count as queued: their replies go out when they are done.
      if (this.socket.writableLength + this.fillingReplyBytes + this.pacedReplyBytes > MAX_QUEUED_REPLY_BYTES) {
        this.holdBack();
        break;
      }
      // Deferred requests at their bound: no more parsing, no more reading, until one ends.
      if (!this.deferred.hasRoom(this.inflight, this.inflightBytes)) {
        this.holdBack();
        break;
      }
      if (queue.peekUInt32(0) !== P.REQUEST_MAGIC) {
        return this.abort(`bad request magic 0x${queue.peekUInt32(0).toString(16)}`);
      }
      const type = queue.peekUInt32(4) & 0xffff;
      const length = queue.peekUInt32(24);
      if (type === P.CMD_WRITE) {
        if (length > P.MAX_PAYLOAD) return this.abort(`write of ${length} bytes exceeds the ${P.MAX_PAYLOAD}-byte maximum`);
        if (queue.length < P.REQUEST_BYTES + length) break; // wait for the payload
      }
      const header = queue.take(P.REQUEST_BYTES);
      const payload = type === P.CMD_WRITE ? queue.takeViews(length) : undefined;
      this.serve(header, payload);
      if (this.closed || this.disconnecting) break;
    }
    this.uncork();
  }

  private serve(header: Buffer, payload: Buffer[] | undefined): void {
    const flags = header.readUInt16BE(4);
    const type = header.readUInt16BE(6);
    const cookieHigh = header.readUInt32BE(8);
    const cookieLow = header.readUInt32BE(12);
    const offsetHigh = header.readUInt32BE(16);
    const offset = offsetHigh * TWO_32 + header.readUInt32BE(20);
    const length = header.readUInt32BE(24);
    const volume = this.volume;

    if (type === P.CMD_DISC) {
      this.disconnecting = true;
      this.endIfDisconnected();
      return;
    }
    const allowed = ALLOWED_FLAGS[type];
    if (allowed === undefined) return this.error(cookieHigh, cookieLow, P.EINVAL, `unknown command ${type}`);
    if (flags & ~allowed) return this.error(cookieHigh, cookieLow, P.EINVAL, `flags 0x${flags.toString(16)} are not valid for command ${type}`);
    if (type === P.CMD_READ && length > P.MAX_PAYLOAD) {
      return this.abort(`read of ${length} bytes exceeds the ${P.MAX_PAYLOAD}-byte maximum`);
    }
    if (type !== P.CMD_FLUSH && (offsetHigh >= MAX_OFFSET_HIGH || offset + length > volume.size)) {
      const errno = type === P.CMD_WRITE || type === P.CMD_WRITE_ZEROES ? P.ENOSPC : P.EINVAL;
      return this.error(cookieHigh, cookieLow, errno, `range ${offset}+${length} is past the end of the ${volume.size}-byte export`);
    }
    const started = performance.now();
    this.pacer.request(this, started);
    try {
      switch (type) {
        case P.CMD_READ: {
          // Slots a restart loaded are checked through the thread pool (the read waits, no one else does).
          const fetching = volume.readReady(offset, length, 0, true);
          if (fetching === undefined) return void this.read(cookieHigh, cookieLow, offset, length, started);
          return this.readAfter(fetching, 1, cookieHigh, cookieLow, offset, length, started);
        }
        case P.CMD_WRITE: {
          const fetching = volume.writeReady(offset, length);
          if (fetching !== undefined) {
            // The payload views point into the receive queue's chunks, which stay ours.
            return this.after(fetching, type, cookieHigh, cookieLow, () => {
              volume.write(offset, payload!);
              return this.complete('write', cookieHigh, cookieLow, flags, length, started, true);
            }, length);
          }
          if (length >= LARGE_WRITE_BYTES && (offset % 4096) === 0 && (length % 4096) === 0) {
            // The received chunks the payload fills whole move to the write thread: nothing here reads them again.
            const writing = volume.writeLarge(offset, payload!, true);
            return this.after(writing, type, cookieHigh, cookieLow, () => this.complete('write', cookieHigh, cookieLow, flags, length, started, true), length);
          }
          volume.write(offset, payload!);
          return void this.complete('write', cookieHigh, cookieLow, flags, length, started);
        }
        case P.CMD_FLUSH:
          return this.wait('flush', cookieHigh, cookieLow, volume.flushForClient(), 0, started);
        case P.CMD_TRIM:
          volume.trim(offset, length);
          return void this.complete('trim', cookieHigh, cookieLow, flags, length, started);
        case P.CMD_WRITE_ZEROES: {
          const zero = (deferred: boolean) => {
            volume.zero(offset, length, {
              noHole: (flags & P.CMD_FLAG_NO_HOLE) !== 0,
              fast: (flags & P.CMD_FLAG_FAST_ZERO) !== 0,
            });
            return this.complete('zero', cookieHigh, cookieLow, flags, length, started, deferred);
          };
          const fetching = volume.writeReady(offset, length);
          if (fetching === undefined) return void zero(false);
          return this.after(fetching, type, cookieHigh, cookieLow, () => zero(true));
        }
        case P.CMD_CACHE: {
          // A hint to bring the range onto this host: fetch its blocks from the store.
          const fetching = volume.readReady(offset, length, 0, true);
          if (fetching === undefined) return void this.complete('cache', cookieHigh, cookieLow, 0, length, started);
          return this.after(fetching, type, cookieHigh, cookieLow, () => this.complete('cache', cookieHigh, cookieLow, 0, length, started));
        }
        case P.CMD_BLOCK_STATUS:
          return this.blockStatus(cookieHigh, cookieLow, flags, offset, length, started);
      }
    } catch (err) {
      this.failed(cookieHigh, cookieLow, type, err);
    }
  }

  /** A large read, or one the page cache cannot serve now, goes through the thread pool unless `mayDefer` is false (it was deferred already). */
  private read(cookieHigh: number, cookieLow: number, offset: number, length: number, started: number, mayDefer = true): Promise<void> | void {
    const headerBytes = this.structured ? P.STRUCTURED_REPLY_BYTES + 8 : P.SIMPLE_REPLY_BYTES;
    const size = headerBytes + length;
    const pooled = this.replyBuffer(headerBytes, length);
    const reply = pooled.length === size ? pooled : pooled.subarray(0, size);
    if (!mayDefer) this.volume.read(offset, length, reply, headerBytes);
    else if (length >= LARGE_READ_BYTES || !this.volume.readNow(offset, length, reply, headerBytes)) return this.readLater(cookieHigh, cookieLow, offset, length, started, headerBytes, reply, pooled);
    return this.sendRead(cookieHigh, cookieLow, offset, length, reply, pooled, started);
  }

  /**
   * A read whose preads go through the thread pool (Volume.readLater), so the event loop
   * serves other requests while they copy out of the page cache or wait for the device.
   * Its reply buffer counts against the deferred bytes, as a write's payload does. A block
   * that left the cache meanwhile is read again as a deferred read is (readAfter).
   */
  private readLater(cookieHigh: number, cookieLow: number, offset: number, length: number, started: number, headerBytes: number, reply: Buffer, pooled: Buffer): void {
    this.fillingReplyBytes += reply.length;
    let read = false;
    const filling = this.volume
      .readLater(offset, length, reply, headerBytes)
      .then((done) => {
        read = done;
      })
      .finally(() => {
        this.fillingReplyBytes -= reply.length;
      });
    this.after(filling, P.CMD_READ, cookieHigh, cookieLow, () => {
      if (read) return this.sendRead(cookieHigh, cookieLow, offset, length, reply, pooled, started);
      this.readAfter(Promise.resolve(), 1, cookieHigh, cookieLow, offset, length, started);
    }, length);
  }

  /** A large reply waits for its turn (ReplyPacer); the promise keeps a deferred read's slot until it is written. */
  private sendRead(cookieHigh: number, cookieLow: number, offset: number, length: number, reply: Buffer, pooled: Buffer, started: number): Promise<void> | void {
    const turn = length >= LARGE_READ_BYTES ? this.pacer.take(reply.length, performance.now()) : undefined;
    if (turn !== undefined) {
      // Queued until written: it counts against the replies' bound as a reply in the socket does.
      this.pacedReplyBytes += reply.length;
      return turn.then(() => {
        this.pacedReplyBytes -= reply.length;
        if (!this.closed) this.writeRead(cookieHigh, cookieLow, offset, length, reply, pooled, started);
      });
    }
    this.writeRead(cookieHigh, cookieLow, offset, length, reply, pooled, started);
  }

  private writeRead(cookieHigh: number, cookieLow: number, offset: number, length: number, reply: Buffer, pooled: Buffer, started: number): void {
    if (this.structured) {
      reply.writeUInt32BE(P.STRUCTURED_REPLY_MAGIC, 0);
      reply.writeUInt16BE(P.REPLY_FLAG_DONE, 4);
      reply.writeUInt16BE(P.REPLY_TYPE_OFFSET_DATA, 6);
      reply.writeUInt32BE(cookieHigh, 8);
      reply.writeUInt32BE(cookieLow, 12);
      reply.writeUInt32BE(length + 8, 16);
      reply.writeUInt32BE(Math.floor(offset / TWO_32), 20);
      reply.writeUInt32BE(offset % TWO_32, 24);
    } else {
      reply.writeUInt32BE(P.SIMPLE_REPLY_MAGIC, 0);
      reply.writeUInt32BE(0, 4);
      reply.writeUInt32BE(cookieHigh, 8);
      reply.writeUInt32BE(cookieLow, 12);
    }
    this.volume.stats.ops.read.observe((performance.now() - started) / 1000, length);
    this.sendPooled(reply, pooled);
  }

  /**
   * Read replies come from a small per-connection pool and go back to it once the socket
   * has written them: a Buffer per request would otherwise cost more in garbage collection
   * than the read itself. A 1 MiB one is a GiB of garbage per GiB read; a 4 KiB one is an
   * ArrayBuffer of its own whose bytes V8 counts as external memory, and a steady stream of
   * them kept full mark-compact collections of the whole heap running back to back
   * (docs/benchmarks.md, "Read replies"). A class is the header plus the data length
   * rounded up to SMALL_REPLY_STEP, or LARGE_REPLY_STEP from there on, so a client reading
   * many different lengths reuses a few classes instead of growing one list per length, and
   * the pool never holds more than MAX_POOLED_BYTES. Buffers of their own (allocUnsafeSlow):
   * a slice of Node's shared pool would keep the rest of that pool alive while it is idle here.
   */
  private replyBuffer(headerBytes: number, length: number): Buffer {
    const step = length < LARGE_REPLY_STEP ? SMALL_REPLY_STEP : LARGE_REPLY_STEP;
    const bytes = headerBytes + Math.ceil(length / step) * step;
    const buffer = this.replyPool.get(bytes)?.pop();
    if (buffer === undefined) return Buffer.allocUnsafeSlow(bytes);
    this.pooledBytes -= bytes;
    return buffer;
  }

  private sendPooled(reply: Buffer, pooled: Buffer): void {
    if (this.closed) return;
    this.cork();
    this.socket.write(reply, () => {
      if (this.closed) return;
      // Full: the client's read sizes changed; forget the old classes, keep the new one.
      if (this.pooledBytes + pooled.length > MAX_POOLED_BYTES) {
        this.replyPool.clear();
        this.pooledBytes = 0;
        if (pooled.length > MAX_POOLED_BYTES) return;
      }
      let pool = this.replyPool.get(pooled.length);
      if (!pool) this.replyPool.set(pooled.length, (pool = []));
      pool.push(pooled);
      this.pooledBytes += pooled.length;
    });
  }

  private blockStatus(cookieHigh: number, cookieLow: number, flags: number, offset: number, length: number, started: number): void {
    if (!this.structured || this.baseAllocationId === 0) {
      return this.error(cookieHigh, cookieLow, P.EINVAL, 'NBD_CMD_BLOCK_STATUS needs base:allocation negotiated');
    }
    const extents = this.volume.extents(offset, length, (flags & P.CMD_FLAG_REQ_ONE) !== 0 ? 1 : 1024);
    const payloadBytes = 4 + extents.length * 8;
    const reply = Buffer.allocUnsafe(P.STRUCTURED_REPLY_BYTES + payloadBytes);
    this.structuredHeader(reply, P.REPLY_FLAG_DONE, P.REPLY_TYPE_BLOCK_STATUS, cookieHigh, cookieLow, payloadBytes);
    reply.writeUInt32BE(this.baseAllocationId, 20);
    let at = 24;
    for (const extent of extents) {
      reply.writeUInt32BE(extent.length, at);
      reply.writeUInt32BE(extent.flags, at + 4);
      at += 8;
    }
    this.volume.stats.ops.block_status.observe((performance.now() - started) / 1000, 0);
    this.send(reply);
  }

  /**
   * Reply to a command that changed data; with FUA, after it is durable. A request already
   * deferred (`deferred`) waits for the flush in its own slot: the returned promise, which
   * after() holds the slot for. Otherwise the wait takes a slot of its own.
   */
  private complete(kind: OpKind, cookieHigh: number, cookieLow: number, flags: number, bytes: number, started: number, deferred = false): Promise<void> | void {
    if (flags & P.CMD_FLAG_FUA) {
      if (deferred) return this.replyAfter(kind, cookieHigh, cookieLow, this.volume.flushForClient(), bytes, started);
      return this.wait(kind, cookieHigh, cookieLow, this.volume.flushForClient(), bytes, started);
    }
    this.volume.stats.ops[kind].observe((performance.now() - started) / 1000, bytes);
    this.ok(cookieHigh, cookieLow);
  }

  private holdBack(): void {
    this.socket.pause();
    this.heldBack = true;
    // Room on the connection comes back with its own requests; room on the host from any.
    if (this.ownRoom()) this.deferred.waitForRoom(this.wake);
  }

  /** Whether this connection is below its own bounds (so only the host's can hold it back). */
  private ownRoom(): boolean {
    return this.inflight < this.deferred.perConnection && this.inflightBytes < this.deferred.bytesPerConnection;
  }

  private resumeIfRoom(): void {
    if (!this.heldBack || this.closed) return;
    if (!this.deferred.hasRoom(this.inflight, this.inflightBytes)) {
      if (this.ownRoom()) this.deferred.waitForRoom(this.wake);
      return;
    }
    this.heldBack = false;
    this.socket.resume();
    this.pump();
  }

  private defer(bytes: number): void {
    this.inflight++;
    this.inflightBytes += bytes;
    this.deferred.take(this.inflight, this.inflightBytes, bytes);
  }

  private undefer(bytes: number): void {
    this.inflight--;
    this.inflightBytes -= bytes;
    this.deferred.release(bytes);
    this.resumeIfRoom();
  }

  /**
   * Read once `fetching` is done. A block the cache evicted while the read waited is
   * fetched again (Volume.readReady bounds the rounds); the read runs in the same tick
   * as the check that found every block here.
   */
  private readAfter(fetching: Promise<void>, round: number, cookieHigh: number, cookieLow: number, offset: number, length: number, started: number): void {
    this.after(fetching, P.CMD_READ, cookieHigh, cookieLow, () => {
      const again = this.volume.readReady(offset, length, round, true);
      // Already deferred: read now, without a second deferral the bounds were not checked for.
      if (again === undefined) return this.read(cookieHigh, cookieLow, offset, length, started, false);
      this.readAfter(again, round + 1, cookieHigh, cookieLow, offset, length, started);
    });
  }

  /** Serve once `fetching` is done; a serve that returns a promise keeps the slot until it settles. */
  private after(fetching: Promise<void>, type: number, cookieHigh: number, cookieLow: number, serve: () => Promise<void> | void, payloadBytes = 0): void {
    this.defer(payloadBytes);
    fetching
      .then(
        () => {
          if (this.closed) return;
          try {
            return serve()?.catch((err: unknown) => this.failed(cookieHigh, cookieLow, type, err));
          } catch (err) {
            this.failed(cookieHigh, cookieLow, type, err);
          }
        },
        (err) => this.failed(cookieHigh, cookieLow, type, err),
      )
      .finally(() => {
        this.undefer(payloadBytes);
        this.uncork();
        this.endIfDisconnected();
      });
  }

  private wait(kind: OpKind, cookieHigh: number, cookieLow: number, work: Promise<void>, bytes: number, started: number): void {
    this.defer(0);
    this.replyAfter(kind, cookieHigh, cookieLow, work, bytes, started).finally(() => {
      this.undefer(0);
      this.uncork();
      this.endIfDisconnected();
    });
  }

  /** Reply once `work` settles: success, or its error. Never rejects. */
  private replyAfter(kind: OpKind, cookieHigh: number, cookieLow: number, work: Promise<void>, bytes: number, started: number): Promise<void> {
    return work.then(
      () => {
        this.volume.stats.ops[kind].observe((performance.now() - started) / 1000, bytes);
        this.ok(cookieHigh, cookieLow);
      },
      (err) => this.failed(cookieHigh, cookieLow, -1, err),
    );
  }

  private failed(cookieHigh: number, cookieLow: number, type: number, err: unknown): void {
    if (err instanceof VolumeError) {
      if (err.code === 'EIO') this.log.error('request failed', { volume: this.volume.name, command: type, error: err.message });
      return this.error(cookieHigh, cookieLow, ERRNO[err.code], err.message);
    }
    this.log.error('request failed unexpectedly', { volume: this.volume.name, command: type, error: errorMessage(err) });
    this.error(cookieHigh, cookieLow, P.EIO, errorMessage(err));
  }

  private ok(cookieHigh: number, cookieLow: number): void {
    const reply = Buffer.allocUnsafe(P.SIMPLE_REPLY_BYTES);
    reply.writeUInt32BE(P.SIMPLE_REPLY_MAGIC, 0);
    reply.writeUInt32BE(0, 4);
    reply.writeUInt32BE(cookieHigh, 8);
    reply.writeUInt32BE(cookieLow, 12);
    this.send(reply);
  }

  /** An error reply: structured (with the message) when negotiated, else simple. */
  private error(cookieHigh: number, cookieLow: number, errno: number, message: string): void {
    if (this.structured) {
      const text = Buffer.from(message.slice(0, 512));
      const reply = Buffer.allocUnsafe(P.STRUCTURED_REPLY_BYTES + 6 + text.length);
      this.structuredHeader(reply, P.REPLY_FLAG_DONE, P.REPLY_TYPE_ERROR, cookieHigh, cookieLow, 6 + text.length);
      reply.writeUInt32BE(errno, 20);
      reply.writeUInt16BE(text.length, 24);
      text.copy(reply, 26);
      this.send(reply);
      return;
    }
    const reply = Buffer.allocUnsafe(P.SIMPLE_REPLY_BYTES);
    reply.writeUInt32BE(P.SIMPLE_REPLY_MAGIC, 0);
    reply.writeUInt32BE(errno, 4);
    reply.writeUInt32BE(cookieHigh, 8);
    reply.writeUInt32BE(cookieLow, 12);
    this.send(reply);
  }

  private structuredHeader(reply: Buffer, flags: number, type: number, cookieHigh: number, cookieLow: number, length: number): void {
    reply.writeUInt32BE(P.STRUCTURED_REPLY_MAGIC, 0);
    reply.writeUInt16BE(flags, 4);
    reply.writeUInt16BE(type, 6);
    reply.writeUInt32BE(cookieHigh, 8);
    reply.writeUInt32BE(cookieLow, 12);
    reply.writeUInt32BE(length, 16);
  }

  private send(reply: Buffer): void {
    if (this.closed) return;
    this.cork();
    this.socket.write(reply);
  }

  /** Replies queued until uncork() go out in one writev. */
  private cork(): void {
    if (!this.corked) {
      this.socket.cork();
      this.corked = true;
    }
  }

  private uncork(): void {
    if (this.corked) {
      this.corked = false;
      this.socket.uncork();
    }
  }

  /** A protocol violation: log it and close this connection only. */
  private abort(reason: string): void {
    this.log.warn('closing connection: malformed request', { volume: this.volume.name, reason });
    this.close();
    this.socket.destroy();
  }

  /**
   * After NBD_CMD_DISC, once the last reply is out: the client is detached before the
   * connection ends, so a client that sees the close finds the export free.
   */
  private endIfDisconnected(): void {
    if (!this.disconnecting || this.inflight > 0 || this.closed) return;
    this.close();
    this.uncork();
    this.socket.end();
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.deferred.forget(this.wake);
    this.replyPool.clear();
    this.pooledBytes = 0;
    this.onClose();
  }
}
