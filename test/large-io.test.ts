// Large requests run their file I/O on the thread pool (Volume.writeLarge/readLater)
// while the event loop serves the next requests. What that concurrency must not break,
// driven through libnbd (nbdsh) with many 1 MiB requests in flight at once:
//   - a FLUSH sent while large writes are in flight covers every write answered before
//     it: a SIGKILL right after its reply loses none of them;
//   - a consistent fork taken while large writes are in flight holds every write answered
//     before it, and each sector of the others is either old or new;
//   - more FUA writes in flight than a connection may defer all succeed: a request's FUA
//     wait stays in the slot its write took;
//   - a connection closed with large writes in flight, or in the middle of a payload,
//     leaves the daemon serving and the volume whole;
//   - a unix-socket connection's send buffer holds a 1 MiB read reply whole.
import assert from 'node:assert/strict';
import { test, type TestContext } from 'node:test';
import { startDaemon, type Daemon } from './harness/daemon.js';
import { encodeRequest, NBD_CMD, NbdClient } from './harness/nbd-client.js';
import { UNIX_SEND_BUFFER_BYTES } from '../src/nbd/socket-buffer.js';
import { requireTools, run, TOOLS } from './harness/tools.js';
import { connect } from './harness/cluster.js';

const TIMEOUT = 180_000;
const MiB = 1024 * 1024;
const SECTOR = 4096;
/** 1 MiB requests written at once: more than the thread pool has threads. */
const WRITES = 24;

/** Run a Python script under nbdsh (libnbd) connected to `uri` as `h`; stdout back. */
async function nbdsh(uri: string, script: string): Promise<string> {
  // nbdsh runs on Debian's python3, where python3-libnbd lives (not a python3 earlier on PATH).
  const env = { ...process.env, PATH: `/usr/bin:${process.env.PATH ?? ''}` };
  const r = await run('nbdsh', ['-u', uri, '-c', script], { env, timeoutMs: 120_000 });
  if (r.code !== 0) throw new Error(`nbdsh failed (${r.code}): ${r.stderr.trim().split('\n').slice(-5).join(' | ')}`);
  return r.stdout;
}

/** Python: the byte every sector of write `i` in round `round` is filled with (never 0). */
const PATTERN = 'def pattern(rnd, i): return 1 + (rnd * 64 + i) % 250';
const pattern = (round: number, i: number): number => 1 + ((round * 64 + i) % 250);

/** The first `length` bytes of an export, read through nbdcopy. */
async function readRange(uri: string, length: number): Promise<Buffer> {
  const r = await run('nbdcopy', ['--synchronous', uri, '-'], { timeoutMs: 120_000 });
  if (r.code !== 0) throw new Error(`nbdcopy ${uri} failed: ${r.stderr.trim()}`);
  return r.stdoutBytes.subarray(0, length);
}

/** Assert that each MiB `i` of `data` (for `i` of `which`) is all byte `byteOf(i)`. */
function assertWhole(data: Buffer, which: Iterable<number>, byteOf: (i: number) => number, what: string): void {
  for (const i of which) {
    const piece = data.subarray(i * MiB, (i + 1) * MiB);
    const bad = piece.findIndex((b) => b !== byteOf(i));
    assert.equal(bad, -1, `${what} ${i}: its byte ${bad} reads ${piece[bad]}, not ${byteOf(i)}`);
  }
}

const range = (n: number): number[] => Array.from({ length: n }, (_, i) => i);

function ready(t: TestContext): boolean {
  return requireTools(t, [TOOLS.nbdsh, TOOLS.nbdcopy]);
}

async function daemonWithVolume(name: string, sizeMiB: number): Promise<Daemon> {
  const d = await startDaemon();
  const r = await d.api('PUT', `/api/exports/${name}`, { size_gb: sizeMiB / 1024 });
  assert.equal(r.status, 201, r.text);
  return d;
}

test('a FLUSH sent while 1 MiB writes are on the write thread covers every write answered before it, across a SIGKILL', { timeout: TIMEOUT }, async (t) => {
  if (!ready(t)) return;
  const d = await daemonWithVolume('flushed', WRITES + 8);
  try {
    // Issue every write, wait until some are answered, note which, send a FLUSH, and print
    // the noted writes as soon as the FLUSH is answered: the test kills the daemon then.
    const out = await nbdsh(d.uri('flushed'), `
import sys
${PATTERN}
cookies = {}
for i in range(${WRITES}):
    cookies[h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray([pattern(1, i)]) * ${MiB}), i * ${MiB})] = i
answered = set()
while not answered:
    h.poll(-1)
    for c, i in cookies.items():
        if i not in answered and h.aio_command_completed(c):
            answered.add(i)
flush = h.aio_flush()
while not h.aio_command_completed(flush):
    h.poll(-1)
print(" ".join(str(i) for i in sorted(answered)))
print("in-flight-at-flush", ${WRITES} - len(answered))
sys.stdout.flush()
`);
    const [first, second] = out.trim().split('\n');
    const answered = first.split(' ').map(Number);
    assert.ok(answered.length > 0, `no write was answered before the FLUSH: ${out}`);
    t.diagnostic(`${answered.length} writes answered before the FLUSH; ${second}`);
    await d.kill9();
    await d.restart();
    const data = await readRange(d.uri('flushed'), WRITES * MiB);
    assertWhole(data, answered, (i) => pattern(1, i), 'after a SIGKILL, write answered before the FLUSH');
  } finally {
    await d.cleanup();
  }
});

test('a consistent fork taken while 1 MiB writes are in flight holds every write answered before it; each other sector is old or new', { timeout: TIMEOUT }, async (t) => {
  if (!ready(t)) return;
  const d = await daemonWithVolume('src', WRITES + 8);
  try {
    // Round 1 lands whole; round 2 overwrites it while the fork is taken.
    const out = await nbdsh(d.uri('src'), `
import json, urllib.request
${PATTERN}
for i in range(${WRITES}):
    h.pwrite(bytearray([pattern(1, i)]) * ${MiB}, i * ${MiB})
cookies = {}
for i in range(${WRITES}):
    cookies[h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray([pattern(2, i)]) * ${MiB}), i * ${MiB})] = i
answered = set()
while not answered:
    h.poll(-1)
    for c, i in cookies.items():
        if i not in answered and h.aio_command_completed(c):
            answered.add(i)
before = sorted(answered)
req = urllib.request.Request("${d.httpUrl}/api/exports/src/fork", method="POST",
    data=json.dumps({"target": "src-fork", "mode": "consistent"}).encode(), headers={"content-type": "application/json"})
status = urllib.request.urlopen(req, timeout=60).status
while h.aio_in_flight() > 0:
    h.poll(-1)
for c in cookies:
    h.aio_command_completed(c)
print(status, " ".join(str(i) for i in before))
`);
    const [status, ...before] = out.trim().split(' ');
    assert.equal(status, '201', `fork: ${out}`);
    const answered = new Set(before.map(Number));
    t.diagnostic(`${answered.size} of ${WRITES} writes of the second round answered before the fork`);
    const fork = await readRange(d.uri('src-fork'), WRITES * MiB);
    for (let i = 0; i < WRITES; i++) {
      const oldByte = pattern(1, i);
      const newByte = pattern(2, i);
      for (let s = 0; s < MiB / SECTOR; s++) {
        const sector = fork.subarray(i * MiB + s * SECTOR, i * MiB + (s + 1) * SECTOR);
        const byte = sector[0];
        assert.ok(sector.every((b) => b === byte), `write ${i}: sector ${s} of the fork is torn`);
        if (answered.has(i)) assert.equal(byte, newByte, `write ${i} was answered before the fork, yet its sector ${s} in the fork reads ${byte}`);
        else assert.ok(byte === oldByte || byte === newByte, `write ${i}: sector ${s} of the fork reads ${byte}, neither the old ${oldByte} nor the new ${newByte}`);
      }
    }
    // The source holds the whole second round.
    const src = await readRange(d.uri('src'), WRITES * MiB);
    assertWhole(src, range(WRITES), (i) => pattern(2, i), 'after the fork, source write');
  } finally {
    await d.cleanup();
  }
});

test('100 FUA writes of 1 MiB in flight at once, past the 64 a connection may defer, all succeed and survive a SIGKILL', { timeout: TIMEOUT }, async (t) => {
  if (!ready(t)) return;
  const d = await daemonWithVolume('fua', 104);
  try {
    const out = await nbdsh(d.uri('fua'), `
${PATTERN}
cookies = [h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray([pattern(3, i)]) * ${MiB}), i * ${MiB}, flags=nbd.CMD_FLAG_FUA) for i in range(100)]
failed = []
while h.aio_in_flight() > 0:
    h.poll(-1)
for i, c in enumerate(cookies):
    try:
        h.aio_command_completed(c)
    except nbd.Error as e:
        failed.append("%d: %s" % (i, e))
print(len(failed))
print("\\n".join(failed[:3]))
`);
    const [count, ...why] = out.trim().split('\n');
    assert.equal(count, '0', `FUA writes failed: ${why.join(' | ')}`);
    await d.kill9();
    await d.restart();
    const data = await readRange(d.uri('fua'), 100 * MiB);
    assertWhole(data, range(100), (i) => pattern(3, i), 'after a SIGKILL, FUA write');
  } finally {
    await d.cleanup();
  }
});

test('connections closed with 1 MiB writes in flight, or in the middle of a payload, leave the daemon serving and the volume whole', { timeout: TIMEOUT }, async (t) => {
  if (!ready(t)) return;
  const d = await daemonWithVolume('cut', 64);
  try {
    // A whole volume to compare against: 1 MiB of 0x11 at every MiB.
    await nbdsh(d.uri('cut'), `
for i in range(64):
    h.pwrite(bytearray([0x11]) * ${MiB}, i * ${MiB})
h.flush()
`);
    for (let round = 0; round < 5; round++) {
      // Many 1 MiB writes pipelined, then the socket is destroyed without waiting: some are
      // on the thread pool when the connection goes.
      const c = await connect(d, 'cut');
      const payload = Buffer.alloc(MiB, 0x22 + round);
      const requests: Buffer[] = [];
      for (let i = 0; i < 32; i++) {
        requests.push(encodeRequest({ flags: 0, type: NBD_CMD.WRITE, cookie: BigInt(i + 1), offset: BigInt(i * MiB), length: MiB }), payload);
      }
      c.socket.write(Buffer.concat(requests));
      await new Promise((resolve) => setTimeout(resolve, round * 3));
      c.socket.destroy();
      // A request header and half its payload, then the connection ends.
      const h = await connect(d, 'cut');
      const half = Buffer.alloc(MiB / 2, 0x77);
      h.socket.write(Buffer.concat([encodeRequest({ flags: 0, type: NBD_CMD.WRITE, cookie: 99n, offset: BigInt(40 * MiB), length: MiB }), half]));
      await new Promise((resolve) => setTimeout(resolve, 20));
      h.socket.end();
      await new Promise((resolve) => h.socket.once('close', resolve));
    }
    // Still serving: every MiB reads as 0x11 (never written over) or as one of the rounds'
    // bytes, sector by sector; the half-sent write changed nothing.
    const data = await readRange(d.uri('cut'), 64 * MiB);
    for (let s = 0; s < data.length / SECTOR; s++) {
      const sector = data.subarray(s * SECTOR, (s + 1) * SECTOR);
      const byte = sector[0];
      assert.ok(sector.every((b) => b === byte), `sector ${s} is torn`);
      assert.ok(byte === 0x11 || (byte >= 0x22 && byte < 0x22 + 5), `sector ${s} reads 0x${byte.toString(16)}, which no write sent`);
      if (s * SECTOR >= 32 * MiB) assert.equal(byte, 0x11, `sector ${s} past every whole write reads 0x${byte.toString(16)}`);
    }
    // The volume closes cleanly and comes back with the same content.
    assert.equal((await d.stop()), 0, 'the daemon did not stop cleanly');
    await d.restart();
    const again = await readRange(d.uri('cut'), 64 * MiB);
    assert.ok(again.equals(data), 'the volume reads differently after a clean restart');
  } finally {
    await d.cleanup();
  }
});

test("a unix-socket connection's send buffer is raised to hold a 1 MiB read reply whole, and 1 MiB reads over it return what was written", { timeout: TIMEOUT }, async (t) => {
  if (!requireTools(t, [TOOLS.ss])) return;
  const d = await daemonWithVolume('sndbuf', 64);
  try {
    const client = await NbdClient.connect({ path: d.socket, exportName: 'sndbuf' });
    // The daemon's end of this connection, as the kernel keeps it: "tb" is its send buffer.
    const ss = await run('ss', ['-x', '-m', '-p', '-n', 'state', 'established'], { timeoutMs: 10_000 });
    assert.equal(ss.code, 0, ss.stderr);
    const line = ss.stdout.split('\n').find((l) => l.includes(` ${d.socket} `) && l.includes(`pid=${d.pid},`));
    assert.ok(line !== undefined, `ss lists no connection of pid ${d.pid} on ${d.socket}:\n${ss.stdout}`);
    const sendBuffer = Number(/skmem:\([^)]*\btb(\d+)/.exec(line)?.[1]);
    // Linux keeps twice what is asked for; the default is 208 KiB.
    assert.ok(sendBuffer >= 2 * UNIX_SEND_BUFFER_BYTES, `the daemon's send buffer is ${sendBuffer} bytes, not ${2 * UNIX_SEND_BUFFER_BYTES}: ${line}`);
    assert.match(d.log(), /unix-socket connections: send buffer raised bytes=2097152/);
    const writes = range(8).map((i) => Buffer.alloc(MiB, pattern(0, i)));
    await Promise.all(writes.map((data, i) => client.write(i * MiB, data)));
    const reads = await Promise.all(range(8).map((i) => client.read(i * MiB, MiB)));
    assertWhole(Buffer.concat(reads), range(8), (i) => pattern(0, i), '1 MiB read');
    await client.disconnect();
  } finally {
    await d.cleanup();
  }
});
