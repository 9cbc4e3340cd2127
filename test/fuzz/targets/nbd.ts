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
//     for what it refused), then an export reply or transmission replies with the right magic;
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
import { NbdServer } from '../../../src/nbd/server.js';
import { volumeNameProblem } from '../../../src/volume/names.js';
import { Volume, VolumeError } from '../../../src/volume/volume.js';

const BLOCK_SIZE = 65536;
const VOLUME_BYTES = 4 * BLOCK_SIZE + 4096;
/** Output bytes kept per connection: bounded, as 16 KiB of reads of the whole volume would be 150 MB. */
const MAX_OUTPUT_BYTES = 256 * 1024 * 1024;
/**
 * Reply bytes a client that reads nothing may find queued: the transmission phase's bound
 * (MAX_QUEUED_REPLY_BYTES in transmission.ts, 64 MiB), the reply that crossed it, and the
 * option replies of the negotiation.
 */
const MAX_QUEUED_BYTES = 64 * 1024 * 1024 + VOLUME_BYTES + 1024 * 1024;

/** Log lines at warn and above; "unexpectedly" in one is a finding. */
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

/**
 * The server's end of an in-memory connection: what it writes is kept; the client's bytes
 * are pushed in. A slow client reads nothing until release(): the server's replies queue
 * up in the socket (writableLength), as they do when a client does not read.
 */
class MemorySocket extends Duplex {
  readonly output: Buffer[] = [];
  outputBytes = 0;
  /** The most bytes ever queued for the client. */
  peakQueued = 0;
  private held: (() => void) | undefined;

  constructor(private slow: boolean) {
    super({ allowHalfOpen: false });
  }

  override _read(): void {}

  override _write(chunk: Buffer, _encoding: BufferEncoding, done: (err?: Error) => void): void {
    this.peakQueued = Math.max(this.peakQueued, this.writableLength);
    this.outputBytes += chunk.length;
    if (this.outputBytes > MAX_OUTPUT_BYTES) return done(new Error(`the server wrote more than ${MAX_OUTPUT_BYTES} bytes`));
    this.output.push(chunk);
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

/** Check the server's output against the protocol; throws on the first thing out of place. */
function checkOutput(out: Buffer, clientFlags: number): void {
  if (out.length < 18 || out.readBigUInt64BE(0) !== P.NBDMAGIC || out.readBigUInt64BE(8) !== P.IHAVEOPT) {
    throw new Error(`the server did not start with the newstyle greeting: ${out.subarray(0, 18).toString('hex')}`);
  }
  let at = 18;
  let lastAck = -1;
  while (at + 8 <= out.length && out.readBigUInt64BE(at) === P.OPTION_REPLY_MAGIC) {
    if (at + 20 > out.length) throw new Error(`option reply header cut short at byte ${at}`);
    const option = out.readUInt32BE(at + 8);
    const type = out.readUInt32BE(at + 12);
    const length = out.readUInt32BE(at + 16);
    const known = [P.REP_ACK, P.REP_SERVER, P.REP_INFO, P.REP_META_CONTEXT].includes(type) || (type >= P.REP_ERR_UNSUP && type <= P.REP_ERR_TOO_BIG);
    if (!known) throw new Error(`option ${option}: reply type 0x${type.toString(16)} is not one the spec defines`);
    if (at + 20 + length > out.length) throw new Error(`option ${option}: reply of ${length} bytes cut short`);
    lastAck = type === P.REP_ACK ? option : -1;
    at += 20 + length;
  }
  if (at === out.length) return;
  if (lastAck !== P.OPT_GO) {
    // NBD_OPT_EXPORT_NAME's reply: size, transmission flags, and 124 zeros unless the client said no.
    const bytes = clientFlags & P.FLAG_C_NO_ZEROES ? 10 : 134;
    if (at + bytes > out.length) throw new Error(`${out.length - at} bytes after the option replies are neither an option reply nor an export reply`);
    at += bytes;
  }
  if (at + 4 <= out.length) {
    const magic = out.readUInt32BE(at);
    if (magic !== P.SIMPLE_REPLY_MAGIC && magic !== P.STRUCTURED_REPLY_MAGIC) throw new Error(`first transmission reply has magic 0x${magic.toString(16)}`);
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
  const closed = new Promise((resolve) => socket.once('close', resolve));
  server['accept'](socket as never, 'off');
  for (let at = 0; at < stream.length; at += piece) {
    socket.push(Buffer.from(stream.subarray(at, at + piece)));
    await tick();
  }
  // Let FLUSH and FUA finish (their syncs run on the thread pool), then hang up.
  const settleOutput = async () => {
    for (let round = 0, quiet = 0; round < 1000 && quiet < 10 && !socket.destroyed; round++) {
      const before = socket.outputBytes;
      await tick();
      quiet = socket.outputBytes === before ? quiet + 1 : 0;
    }
  };
  await settleOutput();
  if (slow) {
    // Invariant 7: what a client that does not read makes the server queue is bounded.
    socket.peakQueued = Math.max(socket.peakQueued, socket.writableLength);
    if (socket.peakQueued > MAX_QUEUED_BYTES) throw new Error(`${socket.peakQueued} reply bytes queued for a client that does not read; at most ${MAX_QUEUED_BYTES}`);
    socket.release();
    await settleOutput();
  }
  socket.push(null);
  await closed;
  for (const volume of volumes.values()) await settle(volume);
  checkOutput(Buffer.concat(socket.output), stream.length >= 4 ? stream.readUInt32BE(0) : 0);
  // Still serving: a read of the whole volume goes through.
  for (const volume of volumes.values()) volume.read(0, VOLUME_BYTES, Buffer.alloc(VOLUME_BYTES), 0);
  if (problems.length > 0 || unhandled.length > 0) {
    const found = [...problems.splice(0), ...unhandled.splice(0).map((e) => `unhandled rejection: ${e instanceof Error ? e.stack : String(e)}`)];
    throw new Error(found.join('\n'));
  }
}
