// Read replies come from a per-connection pool of buffers (src/nbd/transmission.ts,
// replyBuffer) that go back to the pool only once the socket has written them. A client
// that reads its replies late, while it keeps sending reads, must still get every reply
// with its own bytes: a buffer handed out again while an earlier reply in it was still
// queued would show up here as another read's data.

import assert from 'node:assert/strict';
import { randomBytes, randomInt } from 'node:crypto';
import { after, before, test } from 'node:test';
import { startDaemon, type Daemon } from './harness/daemon.js';
import { NBD_CMD, NbdClient, encodeRequest, rawSocket, type RawConnection } from './harness/nbd-client.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const T = 30_000;
const VOLUME = 'replies';
const DATA = 16 * MiB;
/** Below, at and above the pool's class steps, and one large enough for the thread-pool read path. */
const LENGTHS = [512, 4 * KiB, 4 * KiB, 4 * KiB, 12 * KiB + 512, 64 * KiB - 512, 64 * KiB, 200 * KiB, 300 * KiB];

let daemon: Daemon;
let written: Buffer;

before(async () => {
  daemon = await startDaemon({ toml: { volumes: { seal_idle_ms: 600_000 } } });
  const client = await NbdClient.connect({ path: daemon.socket, exportName: VOLUME, commandTimeoutMs: T });
  written = randomBytes(DATA);
  for (let at = 0; at < DATA; at += MiB) await client.write(at, written.subarray(at, at + MiB));
  await client.disconnect();
});

after(async () => {
  await daemon?.cleanup();
});

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Reads `count` replies, in whatever order they come, each checked against the read its cookie names. */
async function readReplies(conn: RawConnection, structured: boolean, asked: Map<number, { offset: number; length: number }>, count: number): Promise<void> {
  for (let i = 0; i < count; i++) {
    const reply = await conn.readReply(T);
    const cookie = Number(reply.cookie);
    const read = asked.get(cookie);
    assert.ok(read !== undefined, `a reply for cookie ${cookie}, which is not outstanding`);
    asked.delete(cookie);
    let data: Buffer;
    if (reply.kind === 'simple') {
      assert.ok(!structured, 'a simple reply after structured replies were negotiated');
      assert.equal(reply.error, 0, `read ${cookie} failed with ${reply.error}`);
      data = await conn.read(read.length, T);
    } else {
      assert.equal(reply.payload.readBigUInt64BE(0), BigInt(read.offset), `read ${cookie}: the chunk's offset`);
      data = reply.payload.subarray(8);
    }
    const expected = written.subarray(read.offset, read.offset + read.length);
    assert.ok(data.equals(expected), `read ${cookie} (${read.length} bytes at ${read.offset}) came back with other bytes`);
  }
}

for (const structured of [false, true]) {
  test(`reads sent while earlier replies sit unread each come back with their own bytes (${structured ? 'structured' : 'simple'} replies)`, async () => {
    const conn = await rawSocket({ path: daemon.socket, exportName: VOLUME, structuredReplies: structured, timeoutMs: T });
    try {
      const asked = new Map<number, { offset: number; length: number }>();
      let cookie = 0;
      conn.socket.pause();
      for (let wave = 0; wave < 6; wave++) {
        // Far more reply bytes than a socket buffer holds: most stay queued in the daemon.
        const requests: Buffer[] = [];
        for (let i = 0; i < 600; i++) {
          const length = LENGTHS[i % LENGTHS.length];
          const offset = randomInt(0, (DATA - length) / 512) * 512;
          asked.set(++cookie, { offset, length });
          requests.push(encodeRequest({ type: NBD_CMD.READ, cookie, offset, length }));
        }
        await conn.write(Buffer.concat(requests));
        await sleep(200);
        // Take half of what is outstanding: those replies' buffers go back to the pool while
        // the rest stay queued, and the next wave's reads take buffers from it.
        conn.socket.resume();
        await readReplies(conn, structured, asked, Math.floor(asked.size / 2));
        conn.socket.pause();
      }
      conn.socket.resume();
      await readReplies(conn, structured, asked, asked.size);
    } finally {
      conn.destroy();
    }
  });
}

test('large replies paced while another connection reads each come back with their own bytes, and so do that connection\'s reads', async () => {
  const big = await rawSocket({ path: daemon.socket, exportName: VOLUME, structuredReplies: true, timeoutMs: T });
  const small = await NbdClient.connect({ path: daemon.socket, exportName: VOLUME, commandTimeoutMs: T });
  try {
    const asked = new Map<number, { offset: number; length: number }>();
    const requests: Buffer[] = [];
    for (let cookie = 1; cookie <= 48; cookie++) {
      const length = cookie % 3 === 0 ? 300 * KiB : MiB;
      const offset = randomInt(0, (DATA - length) / 512) * 512;
      asked.set(cookie, { offset, length });
      requests.push(encodeRequest({ type: NBD_CMD.READ, cookie, offset, length }));
    }
    // The other connection keeps sending requests, so the large replies go a turn's budget at a time.
    let reading = true;
    let smallReads = 0;
    const reader = (async () => {
      while (reading) {
        const offset = randomInt(0, (DATA - 4 * KiB) / 512) * 512;
        const data = await small.read(offset, 4 * KiB);
        assert.ok(data.equals(written.subarray(offset, offset + 4 * KiB)), `the small read at ${offset} came back with other bytes`);
        smallReads++;
      }
    })();
    await sleep(50);
    await big.write(Buffer.concat(requests));
    await readReplies(big, true, asked, asked.size);
    reading = false;
    await reader;
    assert.ok(smallReads > 0);
  } finally {
    big.destroy();
    await small.disconnect();
  }
});
