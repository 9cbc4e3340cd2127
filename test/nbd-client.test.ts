// Proves the test NBD client (test/harness/nbd-client.ts) against nbdkit, the reference
// server, before any other test trusts it against Updraft. Chunk types nbdkit never
// sends (OFFSET_HOLE, ERROR_OFFSET, out-of-order chunks) are checked against a scripted
// server at the end of this file.

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { test, type TestContext } from 'node:test';
import { removeDir, scratchDir } from './harness/daemon.js';
import {
  BASE_ALLOCATION,
  NBD_CMD,
  NBD_ERRNO,
  NBD_FLAG,
  NBD_FLAG_FIXED_NEWSTYLE,
  NBD_FLAG_NO_ZEROES,
  NBD_INFO,
  NBD_MAGIC,
  NBD_OPT,
  NBD_OPTION_REPLY_MAGIC,
  NBD_OPTS_MAGIC,
  NBD_REP,
  NBD_REP_ERR,
  NBD_REPLY_FLAG_DONE,
  NBD_REPLY_TYPE,
  NBD_REQUEST_MAGIC,
  NBD_STATE_HOLE,
  NBD_STATE_ZERO,
  NBD_STRUCTURED_REPLY_MAGIC,
  NbdClient,
  NbdCommandError,
  NbdOptionError,
  rawSocket,
  readExact,
  type BlockStatusExtent,
} from './harness/nbd-client.js';
import { TOOLS, requireTools, tail } from './harness/tools.js';

const MiB = 1024 * 1024;
const EXPORT_SIZE = 64 * MiB;

interface Nbdkit {
  socket: string;
}

/**
 * Starts `nbdkit -f` on a unix socket in a fresh directory, ready once it writes its
 * pidfile (after it listens). Stopped by pid when the test ends. nbdkit waits for its
 * clients on SIGTERM and after-hooks run in the order they were added, so tests
 * disconnect their clients themselves; a leftover client costs a 5 s SIGKILL delay.
 */
async function startNbdkit(t: TestContext, args: string[]): Promise<Nbdkit> {
  const dir = await scratchDir('updraft-nbdkit-');
  const socket = path.join(dir, 'nbdkit.sock');
  const pidfile = path.join(dir, 'nbdkit.pid');
  const child = spawn('nbdkit', ['-f', '--exit-with-parent', '-U', socket, '-P', pidfile, ...args], {
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  let stderr = '';
  child.stderr!.on('data', (chunk: Buffer) => (stderr += chunk.toString('utf8')));
  const exited = new Promise<void>((resolve) => child.once('close', () => resolve()));
  t.after(async () => {
    if (child.exitCode === null && child.signalCode === null && child.pid !== undefined) {
      process.kill(child.pid, 'SIGTERM');
      const timer = setTimeout(() => child.pid !== undefined && process.kill(child.pid, 'SIGKILL'), 5000);
      await exited;
      clearTimeout(timer);
    }
    await removeDir(dir);
  });
  const deadline = Date.now() + 10_000;
  while (!existsSync(pidfile)) {
    if (child.exitCode !== null || child.signalCode !== null || Date.now() > deadline) {
      throw new Error(`nbdkit ${args.join(' ')} did not start\n${tail(stderr, 20)}`);
    }
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
  return { socket };
}

function pattern(length: number, seed: number): Buffer {
  const buf = Buffer.allocUnsafe(length);
  let x = (seed * 2654435761) >>> 0 || 1;
  for (let i = 0; i < length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    buf[i] = x & 0xff;
  }
  return buf;
}

/** The status flags of the extent holding `offset`, with extents starting at `base`. */
function flagsAt(extents: BlockStatusExtent[], base: number, offset: number): number | undefined {
  let at = base;
  for (const extent of extents) {
    if (offset < at + extent.length) return extent.flags;
    at += extent.length;
  }
  return undefined;
}

test('handshake records export size, transmission flags and block size constraints', async (t) => {
  if (!requireTools(t, [TOOLS.nbdkit])) return;
  const server = await startNbdkit(t, [
    '--filter=blocksize-policy',
    'memory',
    `size=${EXPORT_SIZE}`,
    'blocksize-minimum=512',
    'blocksize-preferred=4096',
    'blocksize-maximum=33554432',
  ]);
  const client = await NbdClient.connect({ path: server.socket, exportName: '' });
  t.after(() => client.close());
  assert.equal(client.size, EXPORT_SIZE);
  assert.ok(client.flags & NBD_FLAG.HAS_FLAGS);
  assert.ok(client.flags & NBD_FLAG.SEND_FLUSH);
  assert.ok(client.flags & NBD_FLAG.SEND_TRIM);
  assert.ok(client.flags & NBD_FLAG.SEND_WRITE_ZEROES);
  assert.equal(client.flags & NBD_FLAG.READ_ONLY, 0);
  assert.deepEqual(client.blockSize, { minimum: 512, preferred: 4096, maximum: 32 * MiB });
  assert.equal(client.structuredReplies, false);
  assert.ok(client.handshakeFlags & NBD_FLAG_FIXED_NEWSTYLE);
  await client.disconnect();
});

test('NBD_OPT_LIST names the exports, NBD_OPT_INFO describes one, an unknown export is NBD_REP_ERR_UNKNOWN', async (t) => {
  if (!requireTools(t, [TOOLS.nbdkit])) return;
  const server = await startNbdkit(t, [
    '--filter=exportname',
    'memory',
    `size=${EXPORT_SIZE}`,
    'exportname=alpha',
    'exportname=beta/two',
    'exportname-list=explicit',
    'exportname-strict=true',
  ]);
  const target = { path: server.socket };
  assert.deepEqual((await NbdClient.list(target)).sort(), ['alpha', 'beta/two']);

  const info = await NbdClient.info(target, 'beta/two');
  assert.equal(info.name, 'beta/two');
  assert.equal(info.size, EXPORT_SIZE);
  assert.ok(info.flags & NBD_FLAG.HAS_FLAGS);

  await assert.rejects(NbdClient.info(target, 'missing'), (err: unknown) => {
    assert.ok(err instanceof NbdOptionError);
    assert.equal(err.code, 'NBD_REP_ERR_UNKNOWN');
    assert.equal(err.reply, NBD_REP_ERR.UNKNOWN);
    return true;
  });
  await assert.rejects(NbdClient.connect({ ...target, exportName: 'missing' }), /NBD_OPT_GO: NBD_REP_ERR_UNKNOWN/);

  const client = await NbdClient.connect({ ...target, exportName: 'alpha' });
  assert.equal(client.exportName, 'alpha');
  await client.disconnect();
});

for (const structuredReplies of [false, true]) {
  const mode = structuredReplies ? 'structured' : 'simple';

  test(`read, write, flush, trim and write zeroes round trip (${mode} replies)`, async (t) => {
    if (!requireTools(t, [TOOLS.nbdkit])) return;
    const server = await startNbdkit(t, ['memory', `size=${EXPORT_SIZE}`]);
    const client = await NbdClient.connect({ path: server.socket, exportName: '', structuredReplies });
    t.after(() => client.close());
    assert.equal(client.structuredReplies, structuredReplies);

    assert.deepEqual(await client.read(0, 4096), Buffer.alloc(4096), 'a fresh export reads as zeros');

    const data = pattern(3 * MiB + 123, 1);
    await client.write(5000, data);
    assert.deepEqual(await client.read(5000, data.length), data);
    assert.deepEqual(await client.read(5000 + 777, 1000), data.subarray(777, 1777), 'an unaligned sub-range');

    await client.write(EXPORT_SIZE - 512, pattern(512, 2), { fua: true });
    assert.deepEqual(await client.read(EXPORT_SIZE - 512, 512), pattern(512, 2), 'the last sector, written with FUA');
    await client.flush();

    await client.writeZeroes(5000 + 4096, 8192);
    const afterZero = await client.read(5000, 4096 + 8192 + 4096);
    assert.deepEqual(afterZero.subarray(0, 4096), data.subarray(0, 4096));
    assert.deepEqual(afterZero.subarray(4096, 4096 + 8192), Buffer.alloc(8192));
    assert.deepEqual(afterZero.subarray(4096 + 8192), data.subarray(4096 + 8192, 4096 + 8192 + 4096));

    await client.writeZeroes(5000, 4096, { noHole: true });
    assert.deepEqual(await client.read(5000, 4096), Buffer.alloc(4096));

    // nbdkit memory discards trimmed pages, so they read back as zeros.
    await client.trim(2 * MiB, MiB);
    assert.deepEqual(await client.read(2 * MiB, MiB), Buffer.alloc(MiB));

    await client.cache(0, MiB);
    await client.disconnect();
    assert.equal(client.socket.destroyed, true, 'NBD_CMD_DISC ends the connection');
    await assert.rejects(client.read(0, 512), 'a command after disconnect rejects');
  });

  test(`a read past the end is EINVAL and a write past the end ENOSPC (${mode} replies)`, async (t) => {
    if (!requireTools(t, [TOOLS.nbdkit])) return;
    const server = await startNbdkit(t, ['memory', `size=${EXPORT_SIZE}`]);
    const client = await NbdClient.connect({ path: server.socket, exportName: '', structuredReplies });
    t.after(() => client.close());

    await assert.rejects(client.read(EXPORT_SIZE - 512, 1024), (err: unknown) => {
      assert.ok(err instanceof NbdCommandError);
      assert.equal(err.errno, NBD_ERRNO.EINVAL);
      assert.equal(err.code, 'EINVAL');
      assert.match(err.message, /NBD_CMD_READ\(offset=67108352, length=1024\) failed: EINVAL/);
      return true;
    });
    await assert.rejects(client.write(EXPORT_SIZE, Buffer.alloc(512)), { errno: NBD_ERRNO.ENOSPC, code: 'ENOSPC' });
    await assert.rejects(client.command({ type: 99 }), { errno: NBD_ERRNO.EINVAL }, 'an unknown command is EINVAL');

    assert.deepEqual(await client.read(0, 512), Buffer.alloc(512), 'the connection survives error replies');
    await client.disconnect();
  });
}

test('pipelines 64 requests at once and matches replies by cookie', async (t) => {
  if (!requireTools(t, [TOOLS.nbdkit])) return;
  // Several server threads, so replies can come back out of order.
  const server = await startNbdkit(t, ['--threads=8', 'memory', `size=${EXPORT_SIZE}`]);
  const client = await NbdClient.connect({ path: server.socket, exportName: '', structuredReplies: true });
  t.after(() => client.close());

  const slot = 256 * 1024;
  const writes = Array.from({ length: 64 }, (_, i) => client.write(i * slot, pattern(slot - i * 7, i + 10)));
  assert.equal(client.inFlight, 64, 'all 64 writes are on the wire before any reply');
  await Promise.all(writes);

  // Reads of different sizes interleaved with more writes: each reply must land on its own request.
  const ops: Array<Promise<void>> = [];
  for (let i = 0; i < 64; i++) {
    if (i % 4 === 3) {
      ops.push(client.write(64 * slot + i * 4096, pattern(4096, 1000 + i)));
    } else {
      const expected = pattern(slot - i * 7, i + 10);
      ops.push(client.read(i * slot, expected.length).then((got) => assert.deepEqual(got, expected, `read #${i}`)));
    }
  }
  assert.equal(client.inFlight, 64);
  await Promise.all(ops);
  for (let i = 3; i < 64; i += 4) {
    assert.deepEqual(await client.read(64 * slot + i * 4096, 4096), pattern(4096, 1000 + i));
  }
  assert.equal(client.inFlight, 0);
  await client.disconnect();
});

test('block status reports data, and a hole after trim (base:allocation)', async (t) => {
  if (!requireTools(t, [TOOLS.nbdkit])) return;
  const server = await startNbdkit(t, ['memory', `size=${EXPORT_SIZE}`]);
  const client = await NbdClient.connect({ path: server.socket, exportName: '', metaContexts: [BASE_ALLOCATION] });
  t.after(() => client.close());
  assert.equal(client.structuredReplies, true, 'meta contexts imply structured replies');
  assert.ok(client.metaContexts.has(BASE_ALLOCATION));

  const untouched = await client.blockStatus(0, 4 * MiB);
  assert.equal(untouched[0].flags, NBD_STATE_HOLE | NBD_STATE_ZERO, 'a never-written export is a hole');

  await client.write(0, pattern(4 * MiB, 3));
  const written = await client.blockStatus(0, 4 * MiB);
  assert.equal(flagsAt(written, 0, 0), 0);
  assert.equal(flagsAt(written, 0, 4 * MiB - 1), 0);

  await client.trim(MiB, MiB);
  const extents = await client.blockStatus(0, 4 * MiB);
  const covered = extents.reduce((sum, e) => sum + e.length, 0);
  assert.ok(covered > 0 && covered <= 4 * MiB, `extents cover ${covered} bytes`);
  assert.equal(flagsAt(extents, 0, 0), 0, 'data before the trim');
  assert.equal(flagsAt(extents, 0, MiB) ?? 0, NBD_STATE_HOLE | NBD_STATE_ZERO, 'the trimmed range is a hole');

  const one = await client.blockStatus(0, 4 * MiB, { reqOne: true });
  assert.equal(one.length, 1, 'NBD_CMD_FLAG_REQ_ONE gives one extent');

  await assert.rejects(client.blockStatus(EXPORT_SIZE, 512), { code: 'EINVAL' }, 'block status past the end');
  await client.disconnect();
});

test('an I/O error from the server arrives as a structured error chunk with its errno', async (t) => {
  if (!requireTools(t, [TOOLS.nbdkit])) return;
  const server = await startNbdkit(t, [
    '--filter=error',
    'memory',
    `size=${EXPORT_SIZE}`,
    'error-pread=EIO',
    'error-pread-rate=100%',
  ]);
  const client = await NbdClient.connect({ path: server.socket, exportName: '', structuredReplies: true });
  t.after(() => client.close());
  await assert.rejects(client.read(0, 4096), { errno: NBD_ERRNO.EIO, code: 'EIO' });
  await client.write(0, Buffer.alloc(4096, 1));
  await client.disconnect();
});

test('a write to a read-only export is EPERM', async (t) => {
  if (!requireTools(t, [TOOLS.nbdkit])) return;
  const server = await startNbdkit(t, ['-r', 'memory', `size=${EXPORT_SIZE}`]);
  const client = await NbdClient.connect({ path: server.socket, exportName: '' });
  t.after(() => client.close());
  assert.ok(client.flags & NBD_FLAG.READ_ONLY);
  await assert.rejects(client.write(0, Buffer.alloc(512)), { errno: NBD_ERRNO.EPERM, code: 'EPERM' });
  await client.disconnect();
});

test('NBD_OPT_EXPORT_NAME enters transmission like NBD_OPT_GO', async (t) => {
  if (!requireTools(t, [TOOLS.nbdkit])) return;
  const server = await startNbdkit(t, ['memory', `size=${EXPORT_SIZE}`]);
  const client = await NbdClient.connect({ path: server.socket, exportName: '', useExportName: true });
  t.after(() => client.close());
  assert.equal(client.size, EXPORT_SIZE);
  await client.write(512, Buffer.alloc(512, 9));
  assert.deepEqual(await client.read(512, 512), Buffer.alloc(512, 9));
  await client.disconnect();
});

test('raw helpers: a request with a bad magic makes the server hang up; an unknown option is NBD_REP_ERR_UNSUP', async (t) => {
  if (!requireTools(t, [TOOLS.nbdkit])) return;
  const server = await startNbdkit(t, ['memory', `size=${EXPORT_SIZE}`]);

  const conn = await rawSocket({ path: server.socket, exportName: '' });
  t.after(() => conn.destroy());
  assert.equal(conn.negotiated?.export.size, EXPORT_SIZE);
  await conn.sendRequest({ type: NBD_CMD.READ, cookie: 7, offset: 0, length: 512 });
  const reply = await conn.readReply(5000);
  assert.deepEqual(reply, { kind: 'simple', error: 0, cookie: 7n });
  assert.deepEqual(await conn.read(512, 5000), Buffer.alloc(512));
  await conn.sendRequest({ type: NBD_CMD.READ, magic: 0x12345678, length: 512 });
  assert.equal(await conn.waitClosed(5000), true);
  assert.equal(conn.isClosed, true);

  const haggling = await rawSocket({ path: server.socket, stage: 'greeted' });
  t.after(() => haggling.destroy());
  await haggling.sendOption(99);
  const optionReply = await haggling.readOptionReply(5000);
  assert.equal(optionReply.option, 99);
  assert.equal(optionReply.type, NBD_REP_ERR.UNSUP);
  await haggling.sendOption(NBD_OPT.ABORT);
  assert.equal((await haggling.readOptionReply(5000)).type, NBD_REP.ACK);
  assert.equal(await haggling.waitClosed(5000), true);

  const fresh = await rawSocket({ path: server.socket });
  t.after(() => fresh.destroy());
  assert.equal((await fresh.read(8, 5000)).readBigUInt64BE(0), NBD_MAGIC, 'the greeting starts with NBDMAGIC');
  await assert.rejects(fresh.read(1 << 20, 200), /timed out/, 'readExact gives up after its timeout');
  // nbdkit does not exit on SIGTERM while a client sits in the handshake.
  fresh.destroy();
});

// ---------------------------------------------------------------------------
// A scripted server for the chunk types nbdkit does not send.

type ChunkScript = (cookie: bigint, offset: number, length: number) => Buffer[];

function chunk(flags: number, type: number, cookie: bigint, payload: Buffer): Buffer {
  const head = Buffer.alloc(20);
  head.writeUInt32BE(NBD_STRUCTURED_REPLY_MAGIC, 0);
  head.writeUInt16BE(flags, 4);
  head.writeUInt16BE(type, 6);
  head.writeBigUInt64BE(cookie, 8);
  head.writeUInt32BE(payload.length, 16);
  return Buffer.concat([head, payload]);
}

function offsetData(cookie: bigint, offset: number, data: Buffer, flags = 0): Buffer {
  const at = Buffer.alloc(8);
  at.writeBigUInt64BE(BigInt(offset));
  return chunk(flags, NBD_REPLY_TYPE.OFFSET_DATA, cookie, Buffer.concat([at, data]));
}

function offsetHole(cookie: bigint, offset: number, size: number, flags = 0): Buffer {
  const payload = Buffer.alloc(12);
  payload.writeBigUInt64BE(BigInt(offset));
  payload.writeUInt32BE(size, 8);
  return chunk(flags, NBD_REPLY_TYPE.OFFSET_HOLE, cookie, payload);
}

function optionReply(option: number, type: number, data = Buffer.alloc(0)): Buffer {
  const head = Buffer.alloc(20);
  head.writeBigUInt64BE(NBD_OPTION_REPLY_MAGIC, 0);
  head.writeUInt32BE(option, 8);
  head.writeUInt32BE(type, 12);
  head.writeUInt32BE(data.length, 16);
  return Buffer.concat([head, data]);
}

/** Answers the handshake with structured replies, then each NBD_CMD_READ with script(). */
async function scriptedServer(t: TestContext, size: number, script: ChunkScript): Promise<{ path: string }> {
  const dir = await scratchDir('updraft-nbd-script-');
  const socketPath = path.join(dir, 'script.sock');
  const connections = new Set<net.Socket>();
  const server = net.createServer((socket) => {
    connections.add(socket);
    socket.on('error', () => {});
    void serve(socket).catch(() => socket.destroy());
  });
  async function serve(socket: net.Socket): Promise<void> {
    const greeting = Buffer.alloc(18);
    greeting.writeBigUInt64BE(NBD_MAGIC, 0);
    greeting.writeBigUInt64BE(NBD_OPTS_MAGIC, 8);
    greeting.writeUInt16BE(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES, 16);
    socket.write(greeting);
    await readExact(socket, 4, 5000);
    for (;;) {
      const head = await readExact(socket, 16, 5000);
      const option = head.readUInt32BE(8);
      await readExact(socket, head.readUInt32BE(12), 5000);
      if (option === NBD_OPT.STRUCTURED_REPLY) {
        socket.write(optionReply(option, NBD_REP.ACK));
      } else if (option === NBD_OPT.GO) {
        const exportInfo = Buffer.alloc(12);
        exportInfo.writeUInt16BE(NBD_INFO.EXPORT, 0);
        exportInfo.writeBigUInt64BE(BigInt(size), 2);
        exportInfo.writeUInt16BE(NBD_FLAG.HAS_FLAGS | NBD_FLAG.SEND_DF, 10);
        socket.write(optionReply(option, NBD_REP.INFO, exportInfo));
        socket.write(optionReply(option, NBD_REP.ACK));
        break;
      } else {
        socket.write(optionReply(option, NBD_REP_ERR.UNSUP));
      }
    }
    for (;;) {
      const request = await readExact(socket, 28, 60_000);
      assert.equal(request.readUInt32BE(0), NBD_REQUEST_MAGIC);
      const type = request.readUInt16BE(6);
      const cookie = request.readBigUInt64BE(8);
      if (type === NBD_CMD.DISC) return void socket.end();
      for (const bytes of script(cookie, Number(request.readBigUInt64BE(16)), request.readUInt32BE(24))) socket.write(bytes);
    }
  }
  await new Promise<void>((resolve) => server.listen(socketPath, resolve));
  t.after(async () => {
    for (const socket of connections) socket.destroy();
    await new Promise<void>((resolve) => server.close(() => resolve()));
    await removeDir(dir);
  });
  return { path: socketPath };
}

test('reassembles a structured read from out-of-order data and hole chunks', async (t) => {
  const content = pattern(8192, 4);
  const server = await scriptedServer(t, MiB, (cookie, offset, length) => {
    assert.equal(length, 16384);
    // [0,4K) data, [4K,8K) hole, [8K,12K) data, [12K,16K) hole -- sent out of order.
    return [
      offsetHole(cookie, offset + 12288, 4096),
      offsetData(cookie, offset + 8192, content.subarray(4096)),
      offsetHole(cookie, offset + 4096, 4096),
      offsetData(cookie, offset, content.subarray(0, 4096)),
      chunk(NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE.NONE, cookie, Buffer.alloc(0)),
    ];
  });
  const client = await NbdClient.connect({ ...server, exportName: 'x', structuredReplies: true });
  t.after(() => client.close());
  const [a, b] = await Promise.all([client.read(0, 16384), client.read(65536, 16384)]);
  const expected = Buffer.concat([content.subarray(0, 4096), Buffer.alloc(4096), content.subarray(4096), Buffer.alloc(4096)]);
  assert.deepEqual(a, expected);
  assert.deepEqual(b, expected);
  await client.disconnect();
});

test('a structured read missing a chunk, or with an ERROR_OFFSET chunk, rejects', async (t) => {
  const server = await scriptedServer(t, MiB, (cookie, offset, length) => {
    if (offset === 0) {
      // Claims success after covering only half the request.
      return [offsetData(cookie, offset, Buffer.alloc(length / 2), NBD_REPLY_FLAG_DONE)];
    }
    const message = Buffer.from('disk on fire');
    const payload = Buffer.alloc(6 + message.length + 8);
    payload.writeUInt32BE(NBD_ERRNO.EIO, 0);
    payload.writeUInt16BE(message.length, 4);
    message.copy(payload, 6);
    payload.writeBigUInt64BE(BigInt(offset + 512), 6 + message.length);
    return [
      offsetData(cookie, offset, Buffer.alloc(512)),
      chunk(0, NBD_REPLY_TYPE.ERROR_OFFSET, cookie, payload),
      chunk(NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE.NONE, cookie, Buffer.alloc(0)),
    ];
  });
  const client = await NbdClient.connect({ ...server, exportName: 'x', structuredReplies: true });
  t.after(() => client.close());
  await assert.rejects(client.read(0, 4096), /reply covered 2048 bytes/);
  await assert.rejects(client.read(8192, 4096), (err: unknown) => {
    assert.ok(err instanceof NbdCommandError);
    assert.equal(err.code, 'EIO');
    assert.equal(err.errorOffset, 8192 + 512);
    assert.equal(err.serverMessage, 'disk on fire');
    return true;
  });
  await client.disconnect();
});
