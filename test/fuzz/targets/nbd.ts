// Fuzz target: the NBD server (nbd/handshake.ts, transmission.ts, byte-queue.ts, server.ts)
// fed a client's byte stream over an in-memory socket, through the same accept path a
// TCP or unix connection takes, to two real volumes (one writable, one read-only).
//
// Input: byte 0's low 7 bits are the size of the pieces the stream arrives in (0: all at
// once), so requests and options straddle receive chunks; its high bit makes the client
// read nothing until it has sent everything. The rest is what the client sends. Then the
// client hangs up. Invariants:
//   - nothing is thrown out of the server, no promise is rejected unhandled, and no
//     negotiation or request fails "unexpectedly" (a non-protocol exception);
//   - the server's output is a greeting, then well-formed option replies (an error type
//     for what it refused), then an export reply, then transmission replies, each to a
//     request the server took, and every request it took gets its reply (no hang) unless
//     the server closed the connection;
//   - a client that does not read finds at most the server's stated bound of replies queued;
//   - once the client is gone, neither volume still counts it as a client, and the
//     volumes still serve a read (nothing was left half-done).
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Duplex } from 'node:stream';
import { setImmediate as tick } from 'node:timers/promises';
import { BlockCache } from '../../../src/blocks/cache.js';
import { PLAINTEXT } from '../../../src/crypto/cipher.js';
import type { Fields, Logger } from '../../../src/log.js';
import type { ExportCatalog } from '../../../src/nbd/handshake.js';
import * as P from '../../../src/nbd/protocol.js';
import type { ReplyPacer } from '../../../src/nbd/reply-pacer.js';
import { NbdServer } from '../../../src/nbd/server.js';
import { Transmission } from '../../../src/nbd/transmission.js';
import { volumeNameProblem } from '../../../src/volume/names.js';
import { Volume, VolumeError } from '../../../src/volume/volume.js';

const BLOCK_SIZE = 65536;
const VOLUME_BYTES = 4 * BLOCK_SIZE + 4096;
/** A request still without its reply this long after the client stopped sending is a hang: under the run's 10 s limit, above the stalls of a loaded 2-core machine. */
const REPLY_WAIT_MS = 8000;
/** Output bytes per connection: bounded, though 16 KiB of reads of the whole volume ask for 150 MB. */
const MAX_OUTPUT_BYTES = 256 * 1024 * 1024;
/**
 * Reply bytes a client that reads nothing may find queued: the transmission phase's bound
 * (MAX_QUEUED_REPLY_BYTES in transmission.ts, 64 MiB), the reply that crossed it, and the
 * option replies of the negotiation.
 */
const MAX_QUEUED_BYTES = 64 * 1024 * 1024 + VOLUME_BYTES + 1024 * 1024;

/** Error log lines that say a negotiation or request failed "unexpectedly": findings. */
const problems: string[] = [];
const log: Logger = {
  debug: () => undefined,
  info: () => undefined,
  warn: () => undefined,
  error: (msg: string, fields?: Fields) => {
    if (msg.includes('unexpectedly')) problems.push(`${msg} ${JSON.stringify(fields)}`);
  },
  child: () => log,
};

const unhandled: unknown[] = [];
process.on('unhandledRejection', (err) => unhandled.push(err));

const DIR = fs.mkdtempSync(path.join(os.tmpdir(), 'updraft-fuzz-nbd-'));
process.on('exit', () => fs.rmSync(DIR, { recursive: true, force: true }));
const cache = BlockCache.open(
  path.join(DIR, 'blocks'),
  { blockSize: BLOCK_SIZE, namesId: PLAINTEXT.namesId, blockHash: PLAINTEXT.blockHash, diskBytes: 64 << 20, memoryBytes: 16 << 20 },
  log,
);
const ctx = { cache, blockHash: PLAINTEXT.blockHash, log, scratch: Buffer.alloc(BLOCK_SIZE) };
const volumes = new Map<string, Volume>([
  ['disk', await Volume.create(path.join(DIR, 'disk'), 'disk', VOLUME_BYTES, BLOCK_SIZE, ctx)],
  ['ro', await Volume.create(path.join(DIR, 'ro'), 'ro', VOLUME_BYTES, BLOCK_SIZE, ctx)],
]);
volumes.get('ro')!.readOnly = true;

/** The host's catalog rules: a bad name is a VolumeError, an unknown one undefined. */
const catalog: ExportCatalog = {
  list: () => [...volumes.values()].map((v) => ({ name: v.name, description: `volume ${v.name}` })),
  open: async (name) => catalog.peek(name),
  peek: (name) => {
    const problem = volumeNameProblem(name);
    if (problem) throw new VolumeError('EINVAL', problem);
    return volumes.get(name);
  },
};
const server = new NbdServer(catalog, { handshakeTimeoutMs: 5000 }, log);

/** As if another client had just sent a request: the next input's large replies are paced (src/nbd/reply-pacer.ts). */
export function anotherSender(): void {
  (server['pacer'] as ReplyPacer).request({}, performance.now());
}

/**
 * The server's end of an in-memory connection: what it writes is kept; the client's bytes
 * are pushed in. A slow client reads nothing until release(): the server's replies queue
 * up in the socket (writableLength), as they do when a client does not read.
 */
class MemorySocket extends Duplex {
  outputBytes = 0;
  /** The most bytes ever queued for the client. */
  peakQueued = 0;
  private held: (() => void) | undefined;
  checker: ReplyChecker | undefined;

  constructor(private slow: boolean) {
    super({ allowHalfOpen: false });
  }

  override _read(): void {}

  override _write(chunk: Buffer, _encoding: BufferEncoding, done: (err?: Error) => void): void {
    this.peakQueued = Math.max(this.peakQueued, this.writableLength);
    this.outputBytes += chunk.length;
    if (this.outputBytes > MAX_OUTPUT_BYTES) return done(new Error(`the server wrote more than ${MAX_OUTPUT_BYTES} bytes`));
    this.checker!.feed(chunk);
    if (this.slow) this.held = () => done();
    else done();
  }

  /** The client starts reading. */
  release(): void {
    this.slow = false;
    const held = this.held;
    this.held = undefined;
    held?.();
  }
}

/** A request the server parsed and served (recorded from Transmission's serve). */
interface Served {
  type: number;
  cookie: string;
  length: number;
  answered: boolean;
}

/** Requests each connection's transmission served, in order. */
const served = new WeakMap<object, Served[]>();
/** Cookies given to requests that reused the cookie of one still waiting: 0xffffffff then a count. */
let freshCookies = 0;
const serve = Transmission.prototype['serve'];
Transmission.prototype['serve'] = function (this: Transmission, header: Buffer, payload: Buffer[] | undefined) {
  let list = served.get(this['socket']);
  if (!list) served.set(this['socket'], (list = []));
  // The spec lets a client reuse the cookie of a request still in flight (a SHOULD NOT),
  // but then nothing in a simple reply says which of the two it answers, nor whether read
  // data follows. The server only echoes cookies (it keys nothing by them), so such a
  // request gets a cookie of its own here and the checker can follow the reply stream.
  const waiting = (this['socket'] as unknown as MemorySocket).checker!.waiting();
  while (waiting.some((r) => r.cookie === header.toString('hex', 8, 16))) {
    header.writeUInt32BE(0xffffffff, 8);
    header.writeUInt32BE(freshCookies++ >>> 0, 12);
  }
  list.push({ type: header.readUInt16BE(6), cookie: header.toString('hex', 8, 16), length: header.readUInt32BE(24), answered: false });
  return serve.call(this, header, payload);
};

/**
 * Reads the server's output as it is written and checks it against the protocol: the
 * greeting, well-formed option replies, the export reply, then transmission replies each
 * answering a request the server served. Throws on the first thing out of place.
 */
class ReplyChecker {
  private phase: 'greeting' | 'options' | 'export' | 'transmission' = 'greeting';
  /** Bytes not parsed yet: at most one header or option reply. */
  private unparsed = Buffer.alloc(0);
  /** Read payload bytes still to pass over. */
  private skip = 0;
  private lastAck = -1;
  private offset = 0;

  constructor(
    private readonly clientFlags: number,
    private readonly requests: () => Served[],
  ) {}

  /** Requests (other than NBD_CMD_DISC) still without their final reply. */
  waiting(): Served[] {
    return this.requests().filter((r) => !r.answered && r.type !== P.CMD_DISC);
  }

  feed(chunk: Buffer): void {
    if (this.skip >= chunk.length) {
      this.skip -= chunk.length;
      this.offset += chunk.length;
      return;
    }
    this.offset += this.skip;
    this.unparsed = Buffer.concat([this.unparsed, chunk.subarray(this.skip)]);
    this.skip = 0;
    while (this.step());
  }

  /** Parse one thing from `unparsed`; false when more bytes are needed. */
  private step(): boolean {
    const out = this.unparsed;
    const at = this.offset;
    const consume = (bytes: number, payload = 0) => {
      this.unparsed = out.subarray(Math.min(bytes + payload, out.length));
      this.skip = Math.max(0, bytes + payload - out.length);
      this.offset += Math.min(bytes + payload, out.length);
      return this.skip === 0;
    };
    switch (this.phase) {
      case 'greeting':
        if (out.length < 18) return false;
        if (out.readBigUInt64BE(0) !== P.NBDMAGIC || out.readBigUInt64BE(8) !== P.IHAVEOPT) {
          throw new Error(`the server did not start with the newstyle greeting: ${out.subarray(0, 18).toString('hex')}`);
        }
        this.phase = 'options';
        return consume(18);
      case 'options': {
        if (out.length < 8) return false;
        if (out.readBigUInt64BE(0) !== P.OPTION_REPLY_MAGIC) {
          this.phase = this.lastAck === P.OPT_GO ? 'transmission' : 'export';
          return true;
        }
        if (out.length < 20) return false;
        const option = out.readUInt32BE(8);
        const type = out.readUInt32BE(12);
        const known = [P.REP_ACK, P.REP_SERVER, P.REP_INFO, P.REP_META_CONTEXT].includes(type) || (type >= P.REP_ERR_UNSUP && type <= P.REP_ERR_TOO_BIG);
        if (!known) throw new Error(`option ${option}: reply at byte ${at} has type 0x${type.toString(16)}, which the spec does not define`);
        if (out.length < 20 + out.readUInt32BE(16)) return false;
        this.lastAck = type === P.REP_ACK ? option : -1;
        return consume(20 + out.readUInt32BE(16));
      }
      case 'export': {
        // NBD_OPT_EXPORT_NAME's reply: size, transmission flags, and 124 zeros unless the client said no.
        const bytes = this.clientFlags & P.FLAG_C_NO_ZEROES ? 10 : 134;
        if (out.length < bytes) return false;
        this.phase = 'transmission';
        return consume(bytes);
      }
      case 'transmission': {
        if (out.length < 4) return false;
        const magic = out.readUInt32BE(0);
        if (magic === P.SIMPLE_REPLY_MAGIC) {
          if (out.length < P.SIMPLE_REPLY_BYTES) return false;
          const request = this.answer(out.toString('hex', 8, 16), true, at);
          return consume(P.SIMPLE_REPLY_BYTES, out.readUInt32BE(4) === 0 && request.type === P.CMD_READ ? request.length : 0);
        }
        if (magic === P.STRUCTURED_REPLY_MAGIC) {
          if (out.length < P.STRUCTURED_REPLY_BYTES) return false;
          this.answer(out.toString('hex', 8, 16), (out.readUInt16BE(4) & P.REPLY_FLAG_DONE) !== 0, at);
          return consume(P.STRUCTURED_REPLY_BYTES, out.readUInt32BE(16));
        }
        throw new Error(`transmission reply at byte ${at} has magic 0x${magic.toString(16)}`);
      }
    }
  }

  /** The served request a reply with `cookie` answers (the oldest waiting one). */
  private answer(cookie: string, final: boolean, at: number): Served {
    const request = this.requests().find((r) => r.cookie === cookie && !r.answered && r.type !== P.CMD_DISC);
    if (!request) throw new Error(`the reply at byte ${at} has cookie ${cookie}, which no request waiting for a reply carries`);
    if (final) request.answered = true;
    return request;
  }
}

async function settle(volume: Volume): Promise<void> {
  for (let round = 0; volume.clients !== 0; round++) {
    if (round > 10000) throw new Error(`volume ${volume.name} still counts ${volume.clients} clients after the client hung up`);
    await tick();
  }
}

export async function fuzz(data: Buffer): Promise<void> {
  if (data.length === 0) return;
  const slow = (data[0] & 0x80) !== 0;
  const piece = data[0] & 0x7f || data.length;
  const stream = data.subarray(1);
  const socket = new MemorySocket(slow);
  const checker = new ReplyChecker(stream.length >= 4 ? stream.readUInt32BE(0) : 0, () => served.get(socket) ?? []);
  socket.checker = checker;
  const closed = new Promise((resolve) => socket.once('close', resolve));
  server['accept'](socket as never, 'off');
  for (let at = 0; at < stream.length; at += piece) {
    socket.push(Buffer.from(stream.subarray(at, at + piece)));
    await tick();
  }
  if (slow) {
    // Invariant 7: what a client that does not read makes the server queue is bounded.
    for (let round = 0, quiet = 0; round < 1000 && quiet < 10 && !socket.destroyed; round++) {
      const before = socket.writableLength;
      await tick();
      quiet = socket.writableLength === before ? quiet + 1 : 0;
    }
    socket.peakQueued = Math.max(socket.peakQueued, socket.writableLength);
    if (socket.peakQueued > MAX_QUEUED_BYTES) throw new Error(`${socket.peakQueued} reply bytes queued for a client that does not read; at most ${MAX_QUEUED_BYTES}`);
    socket.release();
  }
  // Every request the server took gets its reply (FLUSH and FUA once their syncs on the
  // thread pool are done), unless the server closed the connection.
  const waitingSince = Date.now();
  for (let quiet = 0; quiet < 10 && !socket.destroyed; ) {
    const before = socket.outputBytes;
    await tick();
    const waiting = checker.waiting();
    quiet = socket.outputBytes === before && waiting.length === 0 ? quiet + 1 : 0;
    if (waiting.length > 0 && Date.now() - waitingSince > REPLY_WAIT_MS) {
      throw new Error(`no reply after ${REPLY_WAIT_MS} ms to ${waiting.length} requests: ${JSON.stringify(waiting.slice(0, 5))}`);
    }
  }
  socket.push(null);
  await closed;
  for (const volume of volumes.values()) await settle(volume);
  // Still serving: a read of the whole volume goes through.
  for (const volume of volumes.values()) volume.read(0, VOLUME_BYTES, Buffer.alloc(VOLUME_BYTES), 0);
  if (problems.length > 0 || unhandled.length > 0) {
    const found = [...problems.splice(0), ...unhandled.splice(0).map((e) => `unhandled rejection: ${e instanceof Error ? e.stack : String(e)}`)];
    throw new Error(found.join('\n'));
  }
}
