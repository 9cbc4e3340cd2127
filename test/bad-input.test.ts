// Bad input never takes the daemon down. One well-behaved client writes, reads and
// verifies in a loop for the whole file while every other case throws malformed
// handshakes, bad options and bad requests at the same daemon on connections of its own.
// Each case checks the answer the NBD spec asks for (an error reply and the connection
// still in step, or the connection closed), and at the end the well-behaved client must
// never have seen a failure and the daemon must be the same, healthy process.

import assert from 'node:assert/strict';
import { randomBytes, randomInt } from 'node:crypto';
import { existsSync, readdirSync } from 'node:fs';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { rssBytes, startDaemon, type Daemon } from './harness/daemon.js';
import {
  NBD_CMD,
  NBD_CMD_FLAG,
  NBD_ERRNO,
  NBD_FLAG_C_FIXED_NEWSTYLE,
  NBD_FLAG_C_NO_ZEROES,
  NBD_INFO,
  NBD_MAGIC,
  NBD_OPT,
  NBD_OPTS_MAGIC,
  NBD_REP,
  NBD_REP_ERR,
  NBD_REPLY_FLAG_DONE,
  NBD_REPLY_TYPE,
  NbdClient,
  RawConnection,
  encodeInfoRequest,
  encodeMetaContextRequest,
  encodeOption,
  encodeRequest,
  optionReplyName,
  rawSocket,
  type OptionReply,
} from './harness/nbd-client.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;
/** Per-step timeout for raw reads. */
const T = 5000;
/** How long a connection the daemon should drop gets to be closed. */
const CLOSE_MS = 3000;
/** The harness auto-creates volumes of 1 GiB. */
const VOLUME_SIZE = GiB;
/** The well-behaved client works in the first REGION bytes of its own volume. */
const REGION = 16 * MiB;
const GOOD = 'good';
const BAD = 'bad';

// ---------------------------------------------------------------------------
// The well-behaved client

class Worker {
  iterations = 0;
  failures: Error[] = [];
  readonly model = Buffer.alloc(REGION);
  private stopped = false;
  private loop: Promise<void> = Promise.resolve();

  constructor(readonly client: NbdClient) {}

  start(): void {
    this.loop = (async () => {
      while (!this.stopped) {
        try {
          await this.step();
          this.iterations++;
        } catch (err) {
          this.failures.push(err as Error);
          return;
        }
      }
    })();
  }

  private async step(): Promise<void> {
    const aligned = this.iterations % 2 === 0;
    const length = aligned ? 4 * KiB * randomInt(1, 65) : randomInt(1, 200 * KiB);
    const offset = aligned ? 4 * KiB * randomInt(0, (REGION - length) / (4 * KiB)) : randomInt(0, REGION - length);
    const data = randomBytes(length);
    await this.client.write(offset, data);
    data.copy(this.model, offset);
    const back = await this.client.read(offset, length);
    if (!back.equals(data)) throw new Error(`read after write at ${offset}+${length} returned other bytes`);
    if (this.iterations % 10 === 0) {
      await this.client.flush();
      const at = randomInt(0, REGION - MiB);
      const check = await this.client.read(at, MiB);
      if (!check.equals(this.model.subarray(at, at + MiB))) throw new Error(`read of ${at}+1MiB does not match the model`);
    }
  }

  async stop(): Promise<void> {
    this.stopped = true;
    await this.loop;
  }
}

// ---------------------------------------------------------------------------
// Raw protocol helpers

async function readGreeting(conn: RawConnection): Promise<void> {
  const greeting = await conn.read(18, T);
  assert.equal(greeting.readBigUInt64BE(0), NBD_MAGIC, 'greeting starts with NBDMAGIC');
  assert.equal(greeting.readBigUInt64BE(8), NBD_OPTS_MAGIC, 'newstyle greeting');
}

function u32(value: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(value, 0);
  return b;
}

function optionHeader(option: number, length: number, magic: bigint = NBD_OPTS_MAGIC): Buffer {
  const head = Buffer.alloc(16);
  head.writeBigUInt64BE(magic, 0);
  head.writeUInt32BE(option, 8);
  head.writeUInt32BE(length, 12);
  return head;
}

/** Writes, ignoring a failure because the daemon already hung up (what some cases expect). */
async function writeQuietly(conn: RawConnection, bytes: Buffer): Promise<void> {
  try {
    await conn.write(bytes);
  } catch {
    // EPIPE / ECONNRESET: the peer is gone, which the caller checks next.
  }
}

async function expectClosed(conn: RawConnection, what: string): Promise<void> {
  try {
    assert.ok(await conn.waitClosed(CLOSE_MS), `${what}: the daemon should close the connection within ${CLOSE_MS} ms`);
  } finally {
    conn.destroy();
  }
}

/** One option reply, checked to be for `option` and of type `type`. */
async function expectOptionReply(conn: RawConnection, option: number, type: number, what: string): Promise<OptionReply> {
  const reply = await conn.readOptionReply(T);
  assert.equal(reply.option, option, `${what}: reply is for option ${reply.option}`);
  assert.equal(
    reply.type,
    type,
    `${what}: got ${optionReplyName(reply.type)} (${reply.data.toString('utf8')}), want ${optionReplyName(type)}`,
  );
  return reply;
}

/** Sends NBD_OPT_GO for `name` and reads replies up to the ACK; returns the export size. */
async function goRaw(conn: RawConnection, name: string): Promise<number> {
  await conn.sendOption(NBD_OPT.GO, encodeInfoRequest(name, [NBD_INFO.BLOCK_SIZE]));
  let size: number | undefined;
  for (;;) {
    const reply = await conn.readOptionReply(T);
    assert.equal(reply.option, NBD_OPT.GO);
    assert.ok(reply.type < 2 ** 31, `NBD_OPT_GO failed: ${optionReplyName(reply.type)} ${reply.data.toString('utf8')}`);
    if (reply.type === NBD_REP.ACK) break;
    assert.equal(reply.type, NBD_REP.INFO);
    if (reply.data.readUInt16BE(0) === NBD_INFO.EXPORT) size = Number(reply.data.readBigUInt64BE(2));
  }
  assert.ok(size !== undefined, 'NBD_OPT_GO sent NBD_INFO_EXPORT');
  return size;
}

/** Reads the next reply and checks it is an error `errno` for `cookie` (simple or structured). */
async function expectErrorReply(conn: RawConnection, cookie: number, errno: number, what: string): Promise<void> {
  const reply = await conn.readReply(T);
  assert.equal(reply.cookie, BigInt(cookie), `${what}: reply cookie`);
  if (reply.kind === 'simple') {
    assert.equal(reply.error, errno, `${what}: simple reply error ${reply.error}, want ${errno}`);
    return;
  }
  assert.ok(reply.type === NBD_REPLY_TYPE.ERROR || reply.type === NBD_REPLY_TYPE.ERROR_OFFSET, `${what}: chunk type ${reply.type}, want an error chunk`);
  assert.ok(reply.flags & NBD_REPLY_FLAG_DONE, `${what}: error chunk ends the reply`);
  assert.equal(reply.payload.readUInt32BE(0), errno, `${what}: structured error ${reply.payload.readUInt32BE(0)}, want ${errno}`);
}

/**
 * A READ on the same connection gets a correct reply: proves the daemon kept the
 * connection in step after whatever came before (e.g. consumed a refused write's payload).
 */
async function expectInStep(conn: RawConnection, structured: boolean, cookie: number, expected: Buffer, offset = 0): Promise<void> {
  await conn.sendRequest({ type: NBD_CMD.READ, cookie, offset, length: expected.length });
  const reply = await conn.readReply(T);
  assert.equal(reply.cookie, BigInt(cookie), 'read after the bad request: reply cookie');
  if (reply.kind === 'simple') {
    assert.ok(!structured, 'simple reply to a read after structured replies were negotiated');
    assert.equal(reply.error, 0, `read after the bad request failed with ${reply.error}`);
    const data = await conn.read(expected.length, T);
    assert.ok(data.equals(expected), 'read after the bad request returned the right bytes');
    return;
  }
  assert.ok(structured, 'structured reply without negotiation');
  assert.equal(reply.type, NBD_REPLY_TYPE.OFFSET_DATA, `read after the bad request: chunk type ${reply.type}`);
  assert.ok(reply.flags & NBD_REPLY_FLAG_DONE);
  assert.equal(Number(reply.payload.readBigUInt64BE(0)), offset);
  assert.ok(reply.payload.subarray(8).equals(expected), 'read after the bad request returned the right bytes');
}

// ---------------------------------------------------------------------------

describe('bad input never takes the daemon down', { timeout: 120_000 }, () => {
  let daemon: Daemon;
  let worker: Worker;
  let pid: number;
  /** Connections that connect and never say anything; held open across all cases. */
  const silent: RawConnection[] = [];
  const target = () => ({ path: daemon.socket, timeoutMs: T });
  /** Contents of the BAD volume's first MiB, written before the cases start. */
  const badHead = randomBytes(MiB);

  before(async () => {
    daemon = await startDaemon();
    pid = daemon.pid;
    const good = await NbdClient.connect({ ...target(), exportName: GOOD, commandTimeoutMs: 30_000 });
    worker = new Worker(good);
    worker.start();
    const setup = await NbdClient.connect({ ...target(), exportName: BAD });
    await setup.write(0, badHead);
    await setup.disconnect();
  });

  after(async () => {
    for (const conn of silent) conn.destroy();
    await worker?.stop();
    worker?.client.close();
    await daemon?.cleanup();
  });

  /** After each case: the daemon is the same process, healthy, and the worker is fine. */
  async function assertAlive(what: string): Promise<void> {
    assert.equal(worker.failures.length, 0, `${what}: the well-behaved client failed: ${worker.failures[0]?.message}`);
    assert.ok(daemon.running, `${what}: the daemon exited\n${daemon.log().slice(-3000)}`);
    assert.equal(daemon.pid, pid);
    const health = await daemon.api('GET', '/healthz');
    assert.equal(health.status, 200, `${what}: /healthz answered ${health.status}`);
  }

  // ---- malformed handshake ---------------------------------------------------------

  it('holds silent clients (connected, never sending a byte) while it serves others', async () => {
    for (let i = 0; i < 10; i++) {
      const conn = await rawSocket({ ...target(), stage: 'connected' });
      silent.push(conn);
    }
    // The greeting arrives without the client saying anything.
    await readGreeting(silent[0]);
    // Others negotiate and do I/O meanwhile.
    const client = await NbdClient.connect({ ...target(), exportName: BAD });
    assert.ok((await client.read(0, MiB)).equals(badHead));
    await client.disconnect();
    const before = worker.iterations;
    await new Promise((resolve) => setTimeout(resolve, 300));
    assert.ok(worker.iterations > before, 'the well-behaved client made progress while silent clients were connected');
    await assertAlive('silent clients');
  });

  it('closes a connection that sends garbage instead of client flags', async () => {
    const conn = await rawSocket({ ...target(), stage: 'connected' });
    await readGreeting(conn);
    await writeQuietly(conn, Buffer.from('GARBAGE! this is not an NBD client\r\n\0\xff'));
    await expectClosed(conn, 'garbage client flags');
    await assertAlive('garbage client flags');
  });

  it('closes a connection whose client flags carry unknown bits', async () => {
    const conn = await rawSocket({ ...target(), stage: 'connected' });
    await readGreeting(conn);
    await writeQuietly(conn, u32(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES | (1 << 7) | (1 << 30)));
    await expectClosed(conn, 'unknown client flag bits');
    await assertAlive('unknown client flag bits');
  });

  it('closes a connection whose option lacks the IHAVEOPT magic', async () => {
    const conn = await rawSocket({ ...target(), stage: 'greeted' });
    const data = encodeInfoRequest(BAD, []);
    await writeQuietly(conn, Buffer.concat([optionHeader(NBD_OPT.GO, data.length, 0x49484156454f5055n), data]));
    await expectClosed(conn, 'wrong IHAVEOPT magic');
    await assertAlive('wrong IHAVEOPT magic');
  });

  it('closes a connection announcing a 1 GiB option at once, without waiting for (or allocating) the data', async () => {
    const rssBefore = rssBytes(daemon.pid);
    const conn = await rawSocket({ ...target(), stage: 'greeted' });
    await writeQuietly(conn, optionHeader(NBD_OPT.GO, GiB));
    await writeQuietly(conn, Buffer.alloc(64 * KiB, 0x41));
    await expectClosed(conn, '1 GiB option');
    // A second one with an unknown option number, so the limit is not only for known options.
    const conn2 = await rawSocket({ ...target(), stage: 'greeted' });
    await writeQuietly(conn2, optionHeader(4242, 0xffffffff));
    await expectClosed(conn2, '4 GiB unknown option');
    const rssAfter = rssBytes(daemon.pid);
    assert.ok(rssAfter - rssBefore < 256 * MiB, `daemon RSS grew by ${rssAfter - rssBefore} bytes`);
    await assertAlive('1 GiB option');
  });

  it('survives clients that disconnect in the middle of an option', async () => {
    // Half an option header.
    const a = await rawSocket({ ...target(), stage: 'greeted' });
    await a.write(optionHeader(NBD_OPT.GO, 20).subarray(0, 9));
    a.destroy();
    // A whole header and half the option data.
    const b = await rawSocket({ ...target(), stage: 'greeted' });
    const data = encodeInfoRequest(BAD, [NBD_INFO.NAME, NBD_INFO.DESCRIPTION, NBD_INFO.BLOCK_SIZE]);
    await b.write(Buffer.concat([optionHeader(NBD_OPT.GO, data.length), data.subarray(0, 7)]));
    b.destroy();
    // Half the client flags.
    const c = await rawSocket({ ...target(), stage: 'connected' });
    await readGreeting(c);
    await c.write(Buffer.from([0, 0]));
    c.destroy();
    // A complete option, then gone before reading the reply.
    const d = await rawSocket({ ...target(), stage: 'greeted' });
    await d.sendOption(NBD_OPT.LIST);
    d.destroy();
    await new Promise((resolve) => setTimeout(resolve, 200));
    // The next client negotiates normally.
    const client = await NbdClient.connect({ ...target(), exportName: BAD });
    assert.ok((await client.read(0, 4096)).equals(badHead.subarray(0, 4096)));
    await client.disconnect();
    await assertAlive('disconnect mid-option');
  });

  it('leaks no file descriptors or attached clients over 150 abrupt disconnects at every stage', async () => {
    const fdsBefore = readdirSync(`/proc/${daemon.pid}/fd`).length;
    for (let round = 0; round < 50; round++) {
      const stages = await Promise.all([
        rawSocket({ ...target(), stage: 'connected' }),
        rawSocket({ ...target(), stage: 'greeted' }),
        rawSocket({ ...target(), exportName: BAD, structuredReplies: round % 2 === 0 }),
      ]);
      // The one in transmission leaves with a read in flight.
      await stages[2].sendRequest({ type: NBD_CMD.READ, cookie: 1, offset: 0, length: MiB });
      for (const conn of stages) conn.destroy();
    }
    await waitFor(
      async () => (await daemon.api('GET', `/api/exports/${BAD}`)).json?.clients === 0,
      3000,
      `every client of ${BAD} detached`,
    );
    await waitFor(() => readdirSync(`/proc/${daemon.pid}/fd`).length <= fdsBefore + 2, 3000, 'the daemon to close the sockets');
    await assertAlive('abrupt disconnects');
  });

  // ---- options -------------------------------------------------------------------

  it('answers an unknown option with NBD_REP_ERR_UNSUP and goes on negotiating (NBD_OPT_GO then works)', async () => {
    const conn = await rawSocket({ ...target(), stage: 'greeted' });
    try {
      await conn.sendOption(99, Buffer.from('hello'));
      await expectOptionReply(conn, 99, NBD_REP_ERR.UNSUP, 'option 99');
      await conn.sendOption(0x7fffffff);
      await expectOptionReply(conn, 0x7fffffff, NBD_REP_ERR.UNSUP, 'option 0x7fffffff');
      assert.equal(await goRaw(conn, BAD), VOLUME_SIZE);
      await expectInStep(conn, false, 1, badHead.subarray(0, 8192));
    } finally {
      conn.destroy();
    }
    await assertAlive('unknown option');
  });

  it('answers NBD_OPT_LIST with data with NBD_REP_ERR_INVALID and goes on', async () => {
    const conn = await rawSocket({ ...target(), stage: 'greeted' });
    try {
      await conn.sendOption(NBD_OPT.LIST, Buffer.from('unexpected'));
      await expectOptionReply(conn, NBD_OPT.LIST, NBD_REP_ERR.INVALID, 'NBD_OPT_LIST with data');
      // A proper LIST on the same connection lists both volumes.
      await conn.sendOption(NBD_OPT.LIST);
      const names: string[] = [];
      for (;;) {
        const reply = await conn.readOptionReply(T);
        assert.equal(reply.option, NBD_OPT.LIST);
        if (reply.type === NBD_REP.ACK) break;
        assert.equal(reply.type, NBD_REP.SERVER, `NBD_OPT_LIST: ${optionReplyName(reply.type)}`);
        names.push(reply.data.subarray(4, 4 + reply.data.readUInt32BE(0)).toString('utf8'));
      }
      assert.ok(names.includes(GOOD) && names.includes(BAD), `NBD_OPT_LIST named ${names.join(', ')}`);
    } finally {
      conn.destroy();
    }
    await assertAlive('NBD_OPT_LIST with data');
  });

  it('answers NBD_OPT_GO / NBD_OPT_INFO with inconsistent lengths with NBD_REP_ERR_INVALID and goes on', async () => {
    const conn = await rawSocket({ ...target(), stage: 'greeted' });
    try {
      const good = encodeInfoRequest(BAD, [NBD_INFO.BLOCK_SIZE]);
      // The name length says more than the option carries.
      const longName = Buffer.from(good);
      longName.writeUInt32BE(1000, 0);
      // Three information requests announced, one present.
      const fewRequests = Buffer.from(good);
      fewRequests.writeUInt16BE(3, 4 + BAD.length);
      // Two requests announced, with trailing bytes beyond them.
      const trailing = Buffer.concat([encodeInfoRequest(BAD, [NBD_INFO.NAME, NBD_INFO.BLOCK_SIZE]), Buffer.from([1, 2, 3])]);
      // Shorter than the fixed part.
      const tiny = Buffer.from([0, 0, 0]);
      // A name length of 4 GiB - 1 (an overflow trap for 4 + length arithmetic).
      const hugeName = Buffer.from(good);
      hugeName.writeUInt32BE(0xffffffff, 0);
      const cases: Array<[string, Buffer]> = [
        ['name length past the data', longName],
        ['fewer information requests than announced', fewRequests],
        ['trailing bytes', trailing],
        ['3 bytes of data', tiny],
        ['name length 0xffffffff', hugeName],
      ];
      for (const option of [NBD_OPT.GO, NBD_OPT.INFO]) {
        for (const [what, data] of cases) {
          await conn.sendOption(option, data);
          await expectOptionReply(conn, option, NBD_REP_ERR.INVALID, `${option === NBD_OPT.GO ? 'NBD_OPT_GO' : 'NBD_OPT_INFO'}: ${what}`);
        }
      }
      // Negotiation goes on: a proper GO enters transmission.
      assert.equal(await goRaw(conn, BAD), VOLUME_SIZE);
      await expectInStep(conn, false, 7, badHead.subarray(4096, 8192), 4096);
    } finally {
      conn.destroy();
    }
    await assertAlive('NBD_OPT_GO with inconsistent lengths');
  });

  it('answers NBD_OPT_SET_META_CONTEXT before NBD_OPT_STRUCTURED_REPLY with NBD_REP_ERR_INVALID', async () => {
    const conn = await rawSocket({ ...target(), stage: 'greeted' });
    try {
      const request = encodeMetaContextRequest(BAD, ['base:allocation']);
      await conn.sendOption(NBD_OPT.SET_META_CONTEXT, request);
      await expectOptionReply(conn, NBD_OPT.SET_META_CONTEXT, NBD_REP_ERR.INVALID, 'SET_META_CONTEXT first');
      // After STRUCTURED_REPLY the same request succeeds.
      await conn.sendOption(NBD_OPT.STRUCTURED_REPLY);
      await expectOptionReply(conn, NBD_OPT.STRUCTURED_REPLY, NBD_REP.ACK, 'STRUCTURED_REPLY');
      await conn.sendOption(NBD_OPT.SET_META_CONTEXT, request);
      const ctx = await expectOptionReply(conn, NBD_OPT.SET_META_CONTEXT, NBD_REP.META_CONTEXT, 'SET_META_CONTEXT');
      assert.equal(ctx.data.subarray(4).toString('utf8'), 'base:allocation');
      await expectOptionReply(conn, NBD_OPT.SET_META_CONTEXT, NBD_REP.ACK, 'SET_META_CONTEXT');
      // A meta context request with a query longer than the option is refused too.
      const broken = Buffer.from(request);
      broken.writeUInt32BE(5000, broken.length - 'base:allocation'.length - 4);
      await conn.sendOption(NBD_OPT.SET_META_CONTEXT, broken);
      await expectOptionReply(conn, NBD_OPT.SET_META_CONTEXT, NBD_REP_ERR.INVALID, 'SET_META_CONTEXT with a cut query');
    } finally {
      conn.destroy();
    }
    await assertAlive('SET_META_CONTEXT before STRUCTURED_REPLY');
  });

  it('closes the connection on NBD_OPT_EXPORT_NAME for an invalid name, and creates nothing', async () => {
    const names = ['', '../escape', 'a//b', '/abs', 'x/./y', 'bad name', 'semi;colon', 'n'.repeat(300), 'nul\0byte'];
    for (const name of names) {
      const conn = await rawSocket({ ...target(), stage: 'greeted' });
      await writeQuietly(conn, encodeOption(NBD_OPT.EXPORT_NAME, Buffer.from(name, 'utf8')));
      await expectClosed(conn, `NBD_OPT_EXPORT_NAME ${JSON.stringify(name.slice(0, 40))}`);
    }
    assert.ok(!existsSync(path.join(daemon.dir, 'cache', 'escape')), 'no folder was created outside the volumes folder');
    const list = await daemon.api('GET', '/api/exports');
    const exported = (list.json as Array<{ name: string }>).map((v) => v.name).sort();
    assert.deepEqual(exported, [BAD, GOOD], 'no volume was created for an invalid name');
    await assertAlive('NBD_OPT_EXPORT_NAME invalid name');
  });

  it('answers NBD_OPT_ABORT with an ACK and closes', async () => {
    const conn = await rawSocket({ ...target(), stage: 'greeted' });
    await conn.sendOption(NBD_OPT.ABORT);
    await expectOptionReply(conn, NBD_OPT.ABORT, NBD_REP.ACK, 'NBD_OPT_ABORT');
    await expectClosed(conn, 'NBD_OPT_ABORT');
    await assertAlive('NBD_OPT_ABORT');
  });

  // ---- transmission ----------------------------------------------------------------

  for (const structured of [false, true]) {
    const mode = structured ? 'structured' : 'simple';

    it(`answers requests past the end with EINVAL (read, trim) and ENOSPC (write) and stays in step (${mode} replies)`, async () => {
      const conn = await rawSocket({ ...target(), exportName: BAD, structuredReplies: structured });
      try {
        assert.equal(conn.negotiated!.export.size, VOLUME_SIZE);
        let cookie = 100;
        const end = VOLUME_SIZE;
        // Read straddling the end, and wholly past it.
        await conn.sendRequest({ type: NBD_CMD.READ, cookie: ++cookie, offset: end - 4096, length: 8192 });
        await expectErrorReply(conn, cookie, NBD_ERRNO.EINVAL, 'read across the end');
        await conn.sendRequest({ type: NBD_CMD.READ, cookie: ++cookie, offset: end, length: 1 });
        await expectErrorReply(conn, cookie, NBD_ERRNO.EINVAL, 'read at the end');
        await expectInStep(conn, structured, ++cookie, badHead.subarray(0, 4096));
        // Write straddling the end: its payload must be consumed, not parsed as requests.
        const payload = Buffer.alloc(8192, 0x5a);
        payload.write('NOT A REQUEST', 0);
        await conn.sendRequest({ type: NBD_CMD.WRITE, cookie: ++cookie, offset: end - 4096, length: 8192 }, payload);
        await expectErrorReply(conn, cookie, NBD_ERRNO.ENOSPC, 'write across the end');
        await conn.sendRequest({ type: NBD_CMD.WRITE, cookie: ++cookie, offset: end + 10 * GiB, length: 512 }, payload.subarray(0, 512));
        await expectErrorReply(conn, cookie, NBD_ERRNO.ENOSPC, 'write far past the end');
        await expectInStep(conn, structured, ++cookie, badHead.subarray(4096, 12288), 4096);
        // The refused write changed nothing at the end of the volume.
        await expectInStep(conn, structured, ++cookie, Buffer.alloc(4096), end - 4096);
        // Trim and write-zeroes straddling the end.
        await conn.sendRequest({ type: NBD_CMD.TRIM, cookie: ++cookie, offset: end - 4096, length: 1 * MiB });
        await expectErrorReply(conn, cookie, NBD_ERRNO.EINVAL, 'trim across the end');
        await conn.sendRequest({ type: NBD_CMD.WRITE_ZEROES, cookie: ++cookie, offset: end - 4096, length: 1 * MiB });
        await expectErrorReply(conn, cookie, NBD_ERRNO.ENOSPC, 'write zeroes across the end');
        await expectInStep(conn, structured, ++cookie, badHead.subarray(0, 512));
      } finally {
        conn.destroy();
      }
      await assertAlive(`past the end (${mode})`);
    });

    it(`answers offsets near 2^64 with an error reply, not a crash (${mode} replies)`, async () => {
      const conn = await rawSocket({ ...target(), exportName: BAD, structuredReplies: structured });
      try {
        let cookie = 200;
        const max = 2n ** 64n;
        const requests: Array<[string, number, bigint, number, number]> = [
          ['read at 2^64 - 4096', NBD_CMD.READ, max - 4096n, 4096, NBD_ERRNO.EINVAL],
          ['read wrapping past 2^64', NBD_CMD.READ, max - 1n, 4096, NBD_ERRNO.EINVAL],
          ['read at 2^53', NBD_CMD.READ, 2n ** 53n, 4096, NBD_ERRNO.EINVAL],
          ['read at 2^53 - 4096', NBD_CMD.READ, 2n ** 53n - 4096n, 4096, NBD_ERRNO.EINVAL],
          ['read at 2^63', NBD_CMD.READ, 2n ** 63n, 1, NBD_ERRNO.EINVAL],
          ['trim at 2^64 - 1', NBD_CMD.TRIM, max - 1n, 1, NBD_ERRNO.EINVAL],
          ['cache at 2^64 - 512', NBD_CMD.CACHE, max - 512n, 512, NBD_ERRNO.EINVAL],
          ['write zeroes wrapping past 2^64', NBD_CMD.WRITE_ZEROES, max - 4096n, 8192, NBD_ERRNO.ENOSPC],
        ];
        for (const [what, type, offset, length, errno] of requests) {
          await conn.sendRequest({ type, cookie: ++cookie, offset, length });
          await expectErrorReply(conn, cookie, errno, what);
        }
        // A write wrapping past 2^64, with its payload.
        await conn.sendRequest({ type: NBD_CMD.WRITE, cookie: ++cookie, offset: max - 512n, length: 4096 }, Buffer.alloc(4096, 1));
        await expectErrorReply(conn, cookie, NBD_ERRNO.ENOSPC, 'write wrapping past 2^64');
        await expectInStep(conn, structured, ++cookie, badHead.subarray(0, 4096));
        // Nothing wrapped around to the start of the volume.
        await expectInStep(conn, structured, ++cookie, badHead.subarray(0, 4096));
      } finally {
        conn.destroy();
      }
      await assertAlive(`offsets near 2^64 (${mode})`);
    });

    it(`answers an unknown command and invalid flags with EINVAL and stays in step (${mode} replies)`, async () => {
      const conn = await rawSocket({ ...target(), exportName: BAD, structuredReplies: structured });
      try {
        let cookie = 300;
        await conn.sendRequest({ type: 42, cookie: ++cookie, offset: 0, length: 4096 });
        await expectErrorReply(conn, cookie, NBD_ERRNO.EINVAL, 'command 42');
        await conn.sendRequest({ type: 0xffff, cookie: ++cookie, offset: 0, length: 0 });
        await expectErrorReply(conn, cookie, NBD_ERRNO.EINVAL, 'command 0xffff');
        await expectInStep(conn, structured, ++cookie, badHead.subarray(0, 4096));
        // REQ_ONE on a WRITE: refused, and its payload neither written nor parsed as requests.
        const payload = Buffer.alloc(8192, 0xee);
        await conn.sendRequest({ type: NBD_CMD.WRITE, flags: NBD_CMD_FLAG.REQ_ONE, cookie: ++cookie, offset: 2 * MiB, length: 8192 }, payload);
        await expectErrorReply(conn, cookie, NBD_ERRNO.EINVAL, 'REQ_ONE on WRITE');
        await expectInStep(conn, structured, ++cookie, Buffer.alloc(8192), 2 * MiB);
        // Other flags that do not belong: NO_HOLE on READ, DF on TRIM, an undefined bit on FLUSH.
        await conn.sendRequest({ type: NBD_CMD.READ, flags: NBD_CMD_FLAG.NO_HOLE, cookie: ++cookie, offset: 0, length: 4096 });
        await expectErrorReply(conn, cookie, NBD_ERRNO.EINVAL, 'NO_HOLE on READ');
        await conn.sendRequest({ type: NBD_CMD.TRIM, flags: NBD_CMD_FLAG.DF, cookie: ++cookie, offset: 0, length: 4096 });
        await expectErrorReply(conn, cookie, NBD_ERRNO.EINVAL, 'DF on TRIM');
        await conn.sendRequest({ type: NBD_CMD.FLUSH, flags: 1 << 12, cookie: ++cookie });
        await expectErrorReply(conn, cookie, NBD_ERRNO.EINVAL, 'bit 12 on FLUSH');
        // The trim was refused: the data is still there.
        await expectInStep(conn, structured, ++cookie, badHead.subarray(0, 4096));
      } finally {
        conn.destroy();
      }
      await assertAlive(`unknown command (${mode})`);
    });

    it(`answers NBD_CMD_BLOCK_STATUS without base:allocation negotiated with EINVAL (${mode} replies)`, async () => {
      const conn = await rawSocket({ ...target(), exportName: BAD, structuredReplies: structured });
      try {
        await conn.sendRequest({ type: NBD_CMD.BLOCK_STATUS, cookie: 400, offset: 0, length: MiB });
        await expectErrorReply(conn, 400, NBD_ERRNO.EINVAL, 'BLOCK_STATUS without a context');
        await expectInStep(conn, structured, 401, badHead.subarray(0, 4096));
      } finally {
        conn.destroy();
      }
      await assertAlive(`BLOCK_STATUS without a context (${mode})`);
    });
  }

  it('closes a connection that announces a 64 MiB write, and logs why', async () => {
    const conn = await rawSocket({ ...target(), exportName: BAD });
    await writeQuietly(conn, encodeRequest({ type: NBD_CMD.WRITE, cookie: 1, offset: 0, length: 64 * MiB }));
    await writeQuietly(conn, Buffer.alloc(MiB, 0x77));
    await expectClosed(conn, '64 MiB write');
    await waitFor(() => /malformed request.*67108864/.test(daemon.log()), 2000, 'a log line about the 64 MiB write');
    await assertAlive('64 MiB write');
  });

  it('closes a connection that asks for a 64 MiB read, and logs why', async () => {
    const conn = await rawSocket({ ...target(), exportName: BAD, structuredReplies: true });
    await writeQuietly(conn, encodeRequest({ type: NBD_CMD.READ, cookie: 1, offset: 0, length: 64 * MiB }));
    await expectClosed(conn, '64 MiB read');
    await waitFor(() => /malformed request.*read of 67108864/.test(daemon.log()), 2000, 'a log line about the 64 MiB read');
    await assertAlive('64 MiB read');
  });

  it('closes a connection that sends a bad request magic', async () => {
    const conn = await rawSocket({ ...target(), exportName: BAD });
    await conn.sendRequest({ type: NBD_CMD.READ, cookie: 1, offset: 0, length: 4096 });
    const first = await conn.readReply(T);
    assert.equal(first.kind === 'simple' && first.error, 0);
    await conn.read(4096, T);
    await writeQuietly(conn, encodeRequest({ magic: 0x25609514, type: NBD_CMD.READ, cookie: 2, offset: 0, length: 4096 }));
    await expectClosed(conn, 'bad request magic');
    await waitFor(() => daemon.log().includes('bad request magic'), 2000, 'a log line about the bad magic');
    await assertAlive('bad request magic');
  });

  it('survives a client that sends a write header and half the payload, then disconnects', async () => {
    const client = await NbdClient.connect({ ...target(), exportName: BAD });
    try {
      const base = 100 * MiB;
      const before = randomBytes(3 * MiB);
      await client.write(base, before);
      await client.flush();
      for (const [offset, length, sent] of [
        [base + MiB, MiB, 512 * KiB],
        [base + MiB - 1000, 2 * MiB - 5000, MiB + 3],
        [base, 4096, 0],
      ] as const) {
        const conn = await rawSocket({ ...target(), exportName: BAD });
        await conn.write(encodeRequest({ type: NBD_CMD.WRITE, cookie: 9, offset, length }));
        if (sent > 0) await conn.write(randomBytes(sent));
        conn.destroy();
      }
      await new Promise((resolve) => setTimeout(resolve, 300));
      // The incomplete writes were never applied: the whole range reads as before.
      const back = await client.read(base, 3 * MiB);
      assert.ok(back.equals(before), 'data around (and under) the half-sent writes is intact');
      // And the connection of another client on that volume still works for writes.
      const next = randomBytes(64 * KiB);
      await client.write(base + MiB, next);
      assert.ok((await client.read(base + MiB, next.length)).equals(next));
    } finally {
      await client.disconnect();
    }
    await assertAlive('half-sent write');
  });

  it('serves a handshake and requests trickled one byte at a time', async () => {
    const conn = await rawSocket({ ...target(), stage: 'connected' });
    try {
      const trickle = async (bytes: Buffer) => {
        for (const byte of bytes) {
          await conn.write(Buffer.from([byte]));
          await new Promise((resolve) => setImmediate(resolve));
        }
      };
      await readGreeting(conn);
      await trickle(u32(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES));
      await trickle(encodeOption(NBD_OPT.STRUCTURED_REPLY));
      await expectOptionReply(conn, NBD_OPT.STRUCTURED_REPLY, NBD_REP.ACK, 'trickled STRUCTURED_REPLY');
      const go = encodeInfoRequest(BAD, [NBD_INFO.BLOCK_SIZE]);
      await trickle(encodeOption(NBD_OPT.GO, go));
      for (;;) {
        const reply = await conn.readOptionReply(T);
        assert.ok(reply.type < 2 ** 31, `trickled GO: ${optionReplyName(reply.type)}`);
        if (reply.type === NBD_REP.ACK) break;
      }
      const data = randomBytes(5000);
      await trickle(Buffer.concat([encodeRequest({ type: NBD_CMD.WRITE, cookie: 77, offset: 3 * MiB + 3, length: data.length }), data.subarray(0, 300)]));
      await conn.write(data.subarray(300));
      const reply = await conn.readReply(T);
      assert.equal(reply.cookie, 77n);
      assert.ok(reply.kind === 'simple' && reply.error === 0, 'trickled write succeeded');
      await trickle(encodeRequest({ type: NBD_CMD.READ, cookie: 78, offset: 3 * MiB + 3, length: data.length }));
      const read = await conn.readReply(T);
      assert.ok(read.kind === 'structured' && read.type === NBD_REPLY_TYPE.OFFSET_DATA, 'trickled read answered with data');
      assert.ok(read.payload.subarray(8).equals(data), 'trickled write reads back');
    } finally {
      conn.destroy();
    }
    await assertAlive('trickled bytes');
  });

  it('keeps its memory bounded for a client that floods options and never reads the replies', async () => {
    const rssBefore = rssBytes(daemon.pid);
    const conn = await rawSocket({ ...target(), stage: 'greeted' });
    let peak = 0;
    try {
      conn.socket.pause(); // never read a reply
      const one = encodeOption(NBD_OPT.INFO, encodeInfoRequest(BAD, [NBD_INFO.NAME, NBD_INFO.DESCRIPTION, NBD_INFO.BLOCK_SIZE]));
      const batch = Buffer.concat(Array<Buffer>(10_000).fill(one));
      // About 9 MB of options: written without waiting, the daemon reads what it wants.
      for (let i = 0; i < 30; i++) conn.socket.write(batch);
      const deadline = Date.now() + 4500;
      while (Date.now() < deadline) {
        peak = Math.max(peak, rssBytes(daemon.pid) - rssBefore);
        await new Promise((resolve) => setTimeout(resolve, 100));
      }
      await assertAlive('options never collected');
      // The daemon stopped taking options once its replies went unread: most of the 9 MB is
      // still queued on the client's side.
      const unsent = conn.socket.writableLength;
      assert.ok(unsent > 4 * MiB, `the daemon read all but ${(unsent / MiB).toFixed(1)} MiB of the options without its replies being read`);
    } finally {
      conn.destroy();
    }
    // RSS also counts garbage the collector has not reclaimed yet, which varies with the
    // machine: this bound is a backstop, the check above is the backpressure itself.
    assert.ok(peak < 320 * MiB, `daemon RSS grew by ${(peak / MiB).toFixed(0)} MiB for one client sending 9 MB of options without reading the replies`);
  });

  it('stays responsive and bounded for a client that sends many 32 MiB reads and never reads the replies', async () => {
    const rssBefore = rssBytes(daemon.pid);
    const conn = await rawSocket({ ...target(), exportName: BAD });
    let peak = 0;
    let slowest = 0;
    const progress = worker.iterations;
    try {
      conn.socket.pause(); // never read a reply
      const requests: Buffer[] = [];
      const count = 40; // 1.25 GiB of replies in all, asked for in 1120 bytes
      for (let i = 0; i < count; i++) requests.push(encodeRequest({ type: NBD_CMD.READ, cookie: i, offset: 0, length: 32 * MiB }));
      await conn.write(Buffer.concat(requests));
      const deadline = Date.now() + 3000;
      while (Date.now() < deadline) {
        const asked = Date.now();
        const health = await daemon.api('GET', '/healthz');
        assert.equal(health.status, 200);
        slowest = Math.max(slowest, Date.now() - asked);
        peak = Math.max(peak, rssBytes(daemon.pid) - rssBefore);
        await new Promise((resolve) => setTimeout(resolve, 100));
      }
      await assertAlive('reads never collected');
    } finally {
      conn.destroy();
    }
    const problems: string[] = [];
    // The daemon bounds queued replies at 64 MiB per client (transmission.ts); allow for that plus slack.
    if (peak >= 384 * MiB) problems.push(`daemon RSS grew by ${(peak / MiB).toFixed(0)} MiB`);
    if (slowest >= 1000) problems.push(`GET /healthz took up to ${slowest} ms (the event loop was blocked)`);
    if (worker.iterations === progress) problems.push('the well-behaved client made no progress in 3 s');
    assert.deepEqual(problems, [], `one client that never reads its replies: ${problems.join('; ')}`);
  });

  it('keeps its memory bounded for a client that reads thousands of different lengths', async () => {
    // Large read replies come from a per-connection pool: one list per exact length once
    // kept a buffer for every length a client ever read (about 1 GiB here).
    const client = await NbdClient.connect({ ...target(), exportName: BAD });
    const rssBefore = rssBytes(daemon.pid);
    let peak = 0;
    try {
      const reads = 6000;
      let next = 0;
      const reader = async () => {
        while (next < reads) {
          next++;
          const length = randomInt(64 * KiB, 256 * KiB);
          const data = await client.read(0, length);
          assert.ok(data.subarray(0, Math.min(length, MiB)).equals(badHead.subarray(0, Math.min(length, MiB))), `read of ${length} bytes returned other bytes`);
          if (next % 500 === 0) peak = Math.max(peak, rssBytes(daemon.pid) - rssBefore);
        }
      };
      await Promise.all(Array.from({ length: 8 }, reader));
      peak = Math.max(peak, rssBytes(daemon.pid) - rssBefore);
    } finally {
      await client.disconnect();
    }
    await assertAlive('reads of many lengths');
    assert.ok(peak < 192 * MiB, `daemon RSS grew by ${(peak / MiB).toFixed(0)} MiB over 6,000 reads of different lengths`);
  });

  it('after all of that: the well-behaved client never failed, its data is right, and the log is clean', async () => {
    // Every raw connection is gone, so only the worker is attached.
    for (const conn of silent) conn.destroy();
    await waitFor(
      async () => {
        const bad = await daemon.api('GET', `/api/exports/${BAD}`);
        return bad.status === 200 && bad.json.clients === 0;
      },
      3000,
      `no client left attached to ${BAD}`,
    );
    const iterations = worker.iterations;
    await worker.stop();
    assert.equal(worker.failures.length, 0, `the well-behaved client failed: ${worker.failures[0]?.stack}`);
    assert.ok(iterations >= 20, `the well-behaved client did ${iterations} iterations`);
    const all = await worker.client.read(0, REGION);
    assert.ok(all.equals(worker.model), 'the well-behaved client reads back everything it wrote');
    const good = await daemon.api('GET', `/api/exports/${GOOD}`);
    assert.equal(good.json.clients, 1);
    assert.equal(daemon.pid, pid, 'the daemon was never restarted');
    assert.ok(daemon.running);
    assert.equal((await daemon.api('GET', '/healthz')).status, 200);
    const log = daemon.log();
    const unexpected = log.split('\n').filter((line) => /unexpectedly/i.test(line));
    assert.deepEqual(unexpected, [], 'no "unexpectedly" lines in the daemon log');
    const errors = log.split('\n').filter((line) => / ERROR /.test(line));
    assert.deepEqual(errors, [], 'no ERROR lines in the daemon log');
  });
});

// ---------------------------------------------------------------------------

async function waitFor(check: () => boolean | Promise<boolean>, timeoutMs: number, what: string): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (await check()) return;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}
