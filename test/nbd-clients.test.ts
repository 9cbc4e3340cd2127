// Updraft against the standard NBD clients: nbdinfo, nbdcopy and qemu-img from
// libnbd / QEMU, and the independent test client (harness/nbd-client.ts) for the
// commands those tools do not let a test aim precisely (TRIM, WRITE_ZEROES flags,
// BLOCK_STATUS on one chunk, two connections to one export).

import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { existsSync, readdirSync } from 'node:fs';
import { open, readFile, stat } from 'node:fs/promises';
import path from 'node:path';
import { test } from 'node:test';
import { removeDir, scratchDir, startDaemon, type Daemon, type TomlTable } from './harness/daemon.js';
import {
  BASE_ALLOCATION,
  ConnectionClosedError,
  NBD_FLAG,
  NBD_STATE_HOLE,
  NBD_STATE_ZERO,
  NbdClient,
  NbdCommandError,
  NbdOptionError,
  type BlockStatusExtent,
} from './harness/nbd-client.js';
import { TOOLS, requireTools, run, runOk, tail } from './harness/tools.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;
/** Set explicitly in every daemon here, so chunk-granular expectations do not follow a default. */
const CHUNK = 128 * KiB;
const TOOL_TIMEOUT_MS = 60_000;
const TEST_TIMEOUT_MS = 120_000;

type Defer = (cleanup: () => unknown) => void;

/**
 * Runs `body` against a fresh daemon. Cleanups registered with `defer` run last-in
 * first-out, then the daemon is stopped and its directory removed. A failure carries
 * the tail of the daemon's log.
 */
async function withDaemon(toml: TomlTable, body: (daemon: Daemon, defer: Defer) => Promise<void>): Promise<void> {
  const daemon = await startDaemon({ toml: mergeChunk(toml) });
  const cleanups: Array<() => unknown> = [];
  try {
    await body(daemon, (cleanup) => cleanups.push(cleanup));
  } catch (err) {
    if (err instanceof Error) err.message += `\n--- daemon log (tail) ---\n${tail(daemon.log(), 30)}`;
    throw err;
  } finally {
    while (cleanups.length > 0) {
      try {
        await cleanups.pop()!();
      } catch {
        // A cleanup failing must not hide the test's own outcome or skip the others.
      }
    }
    await daemon.cleanup();
  }
}

function mergeChunk(toml: TomlTable): TomlTable {
  const servers = (toml.servers ?? {}) as TomlTable;
  const nbd = (servers.nbd ?? {}) as TomlTable;
  return { ...toml, servers: { ...servers, nbd: { block_size: CHUNK, ...nbd } } };
}

async function scratch(defer: Defer): Promise<string> {
  const dir = await scratchDir('updraft-nbd-clients-');
  defer(() => removeDir(dir));
  return dir;
}

async function connect(
  daemon: Daemon,
  exportName: string,
  defer: Defer,
  opts: { tcp?: boolean; blockStatus?: boolean } = {},
): Promise<NbdClient> {
  const target = opts.tcp ? { host: daemon.tcp.host, port: daemon.tcp.port } : { path: daemon.socket };
  const client = await NbdClient.connect({
    ...target,
    exportName,
    structuredReplies: true,
    ...(opts.blockStatus ? { metaContexts: [BASE_ALLOCATION] } : {}),
  });
  defer(() => client.disconnect());
  return client;
}

async function putExport(daemon: Daemon, name: string, sizeGb: number): Promise<void> {
  const response = await daemon.api('PUT', `/api/exports/${encodeURIComponent(name)}`, { size_gb: sizeGb });
  assert.equal(response.status, 201, `PUT /api/exports/${name}: ${response.text}`);
}

async function nbdinfoJson(args: string[]): Promise<any> {
  const result = await runOk('nbdinfo', ['--json', ...args], { timeoutMs: TOOL_TIMEOUT_MS });
  return JSON.parse(result.stdout);
}

interface MapExtent {
  offset: number;
  length: number;
  /** base:allocation flags: NBD_STATE_HOLE | NBD_STATE_ZERO. */
  type: number;
}

async function nbdinfoMap(uri: string): Promise<MapExtent[]> {
  const extents = (await nbdinfoJson(['--map', uri])) as MapExtent[];
  return extents.map(({ offset, length, type }) => ({ offset, length, type }));
}

/** A map as [start, end, isData] runs, adjacent runs of one kind merged. */
type Run = [number, number, boolean];
function mergeRuns(runs: Run[]): Run[] {
  const out: Run[] = [];
  for (const [start, end, data] of runs) {
    const last = out[out.length - 1];
    if (last !== undefined && last[2] === data && last[1] === start) last[1] = end;
    else out.push([start, end, data]);
  }
  return out;
}

async function qemuImgDataRuns(uri: string): Promise<Run[]> {
  const result = await runOk('qemu-img', ['map', '--output=json', '-f', 'raw', uri], { timeoutMs: TOOL_TIMEOUT_MS });
  const entries = JSON.parse(result.stdout) as Array<{ start: number; length: number; data: boolean }>;
  return mergeRuns(entries.map((e) => [e.start, e.start + e.length, e.data]));
}

function sha256(buf: Buffer): string {
  return createHash('sha256').update(buf).digest('hex');
}

async function sha256File(file: string): Promise<string> {
  return sha256(await readFile(file));
}

/** Extents from BLOCK_STATUS, asked again from where the reply stopped until `length` is covered. */
async function blockStatusAll(client: NbdClient, offset: number, length: number): Promise<BlockStatusExtent[]> {
  const out: BlockStatusExtent[] = [];
  let at = offset;
  while (at < offset + length) {
    const extents = await client.blockStatus(at, offset + length - at);
    assert.ok(extents.length > 0, `BLOCK_STATUS at ${at} returned no extent`);
    for (const extent of extents) {
      out.push(extent);
      at += extent.length;
    }
  }
  return out;
}

/** The single status of [offset, offset + length), failing when it is split. */
async function statusOf(client: NbdClient, offset: number, length: number): Promise<number> {
  const extents = await blockStatusAll(client, offset, length);
  const flags = new Set(extents.map((e) => e.flags));
  assert.equal(flags.size, 1, `expected one status for ${offset}+${length}, got ${JSON.stringify(extents)}`);
  return extents[0].flags;
}

function isZero(buf: Buffer): boolean {
  for (let i = 0; i < buf.length; i++) if (buf[i] !== 0) return false;
  return true;
}

/** Polls the export's metrics until `done` holds; fails after timeoutMs. */
async function waitForMetrics(daemon: Daemon, name: string, done: (m: any) => boolean, timeoutMs = 15_000): Promise<any> {
  const deadline = Date.now() + timeoutMs;
  let last: any;
  for (;;) {
    const response = await daemon.api('GET', `/api/exports/${encodeURIComponent(name)}/metrics`);
    assert.equal(response.status, 200, response.text);
    last = response.json;
    if (done(last)) return last;
    if (Date.now() > deadline) assert.fail(`export ${name}: condition not reached in ${timeoutMs} ms; last metrics ${response.text}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

// ---------------------------------------------------------------------------

test('nbdinfo lists the exports with their sizes over the unix socket and TCP, and reports the export flags and block sizes', { timeout: TEST_TIMEOUT_MS }, async (t) => {
  if (!requireTools(t, [TOOLS.nbdinfo])) return;
  await withDaemon({ servers: { nbd: { auto_create_size_gb: 0.125 } } }, async (daemon) => {
    // Two exports made by connecting (auto-create), one of them over TCP with a '/' name,
    // and one made by the API with another size.
    await runOk('nbdinfo', [daemon.uri('alpha')], { timeoutMs: TOOL_TIMEOUT_MS });
    await runOk('nbdinfo', [daemon.tcpUri('team/beta')], { timeoutMs: TOOL_TIMEOUT_MS });
    await putExport(daemon, 'gamma', 0.0625);
    const expected = [
      { name: 'alpha', size: 128 * MiB },
      { name: 'gamma', size: 64 * MiB },
      { name: 'team/beta', size: 128 * MiB },
    ];

    for (const listUri of [daemon.uri(''), daemon.tcpUri('')]) {
      const listed = await nbdinfoJson(['--list', listUri]);
      const exports = (listed.exports as Array<Record<string, unknown>>)
        .map((e) => ({ name: e['export-name'] as string, size: e['export-size'] as number }))
        .sort((a, b) => a.name.localeCompare(b.name));
      assert.deepEqual(exports, expected, `nbdinfo --list ${listUri}`);
    }

    for (const uri of [daemon.uri('alpha'), daemon.tcpUri('team/beta')]) {
      const info = await nbdinfoJson([uri]);
      assert.equal(info.exports.length, 1);
      const e = info.exports[0];
      assert.equal(e['export-size'], 128 * MiB, uri);
      for (const flag of ['can_flush', 'can_fua', 'can_trim', 'can_zero', 'can_fast_zero', 'can_multi_conn', 'can_cache', 'can_df']) {
        assert.equal(e[flag], true, `${uri}: ${flag}`);
      }
      assert.equal(e.is_read_only, false, `${uri}: is_read_only`);
      assert.equal(e.block_size_minimum, 1, uri);
      assert.equal(e.block_size_preferred, 4096, uri);
      assert.equal(e.block_size_maximum, 33554432, uri);
    }
  });
});

test('nbdcopy round trip of a sparse 256 MiB image is byte-identical, qemu-img compare agrees, and the zero holes map as zero', { timeout: TEST_TIMEOUT_MS }, async (t) => {
  if (!requireTools(t, [TOOLS.nbdcopy, TOOLS.nbdinfo, TOOLS.qemuImg])) return;
  await withDaemon({}, async (daemon, defer) => {
    const dir = await scratch(defer);
    const size = 256 * MiB;
    const hole = 4 * MiB;
    const holes = new Set([0, 3, 10, 11, 40, 63]); // 4 MiB slots left as zeros (a sparse hole in the file)
    const source = path.join(dir, 'source.img');
    const file = await open(source, 'w');
    try {
      await file.truncate(size);
      for (let slot = 0; slot < size / hole; slot++) {
        if (!holes.has(slot)) await file.write(randomBytes(hole), 0, hole, slot * hole);
      }
    } finally {
      await file.close();
    }

    await putExport(daemon, 'image', size / GiB);
    await runOk('nbdcopy', [source, daemon.uri('image')], { timeoutMs: TOOL_TIMEOUT_MS });
    // Out over TCP: both transports carry the same bytes.
    const copy = path.join(dir, 'copy.img');
    await runOk('nbdcopy', [daemon.tcpUri('image'), copy], { timeoutMs: TOOL_TIMEOUT_MS });
    assert.equal((await stat(copy)).size, size);
    assert.equal(await sha256File(copy), await sha256File(source), 'SHA-256 of the copy differs from the source');

    const compare = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', source, daemon.uri('image')], {
      timeoutMs: TOOL_TIMEOUT_MS,
    });
    assert.equal(compare.code, 0, `qemu-img compare: ${compare.stdout}${compare.stderr}`);

    // Every hole of the source reads as zero in base:allocation; every data slot as data.
    const map = await nbdinfoMap(daemon.uri('image'));
    for (const extent of map) {
      for (let slot = Math.floor(extent.offset / hole); slot * hole < extent.offset + extent.length; slot++) {
        const what = `extent ${JSON.stringify(extent)} over 4 MiB slot ${slot}`;
        if (holes.has(slot)) assert.ok(extent.type & NBD_STATE_ZERO, `${what}: a zero hole of the source is not reported zero`);
        else assert.equal(extent.type, 0, `${what}: random data is not reported as data`);
      }
    }
  });
});

test('only written ranges map as data (nbdinfo --map and qemu-img map agree, before and after sealing) and nbdcopy keeps the copy sparse', { timeout: TEST_TIMEOUT_MS }, async (t) => {
  if (!requireTools(t, [TOOLS.nbdinfo, TOOLS.nbdcopy, TOOLS.qemuImg])) return;
  await withDaemon({ volumes: { seal_idle_ms: 200 } }, async (daemon, defer) => {
    const dir = await scratch(defer);
    const size = 64 * MiB;
    await putExport(daemon, 'sparse', size / GiB);
    const writes: Array<[number, number]> = [
      [1 * MiB, 256 * KiB], // two whole chunks
      [10 * MiB + 4096, 4096], // one sector inside a chunk
      [20 * MiB + 100, 1000], // unaligned bytes inside a chunk
      [size - CHUNK, CHUNK], // the last chunk
    ];
    const expected = Buffer.alloc(size);
    const client = await connect(daemon, 'sparse', defer);
    for (const [offset, length] of writes) {
      const data = randomBytes(length);
      data.copy(expected, offset);
      await client.write(offset, data);
    }
    await client.flush();
    await client.disconnect();

    const rounded = writes.map(([offset, length]): [number, number] => [
      Math.floor(offset / CHUNK) * CHUNK,
      Math.ceil((offset + length) / CHUNK) * CHUNK,
    ]);
    const checkMap = async (when: string) => {
      const map = await nbdinfoMap(daemon.uri('sparse'));
      let at = 0;
      for (const extent of map) {
        const what = `${when}: extent ${JSON.stringify(extent)}`;
        assert.equal(extent.offset, at, `${what}: map is not contiguous`);
        at += extent.length;
        const start = extent.offset;
        const end = start + extent.length;
        if (writes.some(([o, l]) => o < end && start < o + l)) {
          assert.equal(extent.type, 0, `${what}: covers written bytes but is not reported as data`);
        }
        if (extent.type !== (NBD_STATE_HOLE | NBD_STATE_ZERO)) {
          assert.ok(
            rounded.some(([s, e]) => s <= start && end <= e),
            `${what}: allocated beyond the chunks that were written (${JSON.stringify(rounded)})`,
          );
        }
      }
      assert.equal(at, size, `${when}: map covers ${at} of ${size} bytes`);
      const nbdRuns = mergeRuns(map.map((e): Run => [e.offset, e.offset + e.length, (e.type & NBD_STATE_HOLE) === 0]));
      assert.deepEqual(await qemuImgDataRuns(daemon.uri('sparse')), nbdRuns, `${when}: qemu-img map disagrees with nbdinfo --map`);
      const dataBytes = nbdRuns.filter((r) => r[2]).reduce((sum, [s, e]) => sum + (e - s), 0);
      assert.ok(dataBytes > 0 && dataBytes <= rounded.reduce((sum, [s, e]) => sum + (e - s), 0), `${when}: ${dataBytes} data bytes`);
    };

    await checkMap('in the overlay');
    const sealed = await waitForMetrics(daemon, 'sparse', (m) => m.dirty_chunks === 0 && m.chunks_sealed > 0);
    assert.equal(sealed.mapped_chunks, 5, 'sealing should map exactly the five written chunks');
    await checkMap('after sealing');

    const copy = path.join(dir, 'sparse-copy.img');
    await runOk('nbdcopy', [daemon.uri('sparse'), copy], { timeoutMs: TOOL_TIMEOUT_MS });
    const st = await stat(copy);
    assert.equal(st.size, size);
    assert.ok(st.blocks * 512 < size / 8, `copy allocates ${st.blocks * 512} bytes of ${size}: not sparse`);
    assert.equal(await sha256File(copy), sha256(expected), 'copy content differs from what was written');
  });
});

for (const variant of ['overlay', 'sealed'] as const) {
  test(`TRIM and WRITE_ZEROES of whole ${variant} chunks make holes, NO_HOLE keeps zeros allocated, a partial zero keeps the rest, FAST_ZERO on a partial chunk is ENOTSUP and changes nothing`, { timeout: TEST_TIMEOUT_MS }, async () => {
    // 'overlay': the chunks are still unsealed writes (sealing is far off);
    // 'sealed': every chunk is a sealed block before the commands arrive.
    const toml = { volumes: { seal_idle_ms: variant === 'sealed' ? 100 : 600_000 } };
    await withDaemon(toml, async (daemon, defer) => {
      await putExport(daemon, 'z', 0.0625);
      const client = await connect(daemon, 'z', defer, { blockStatus: true });
      const chunks = 7;
      const original = randomBytes(chunks * CHUNK);
      await client.write(0, original);
      await client.flush();
      if (variant === 'sealed') {
        await waitForMetrics(daemon, 'z', (m) => m.dirty_chunks === 0 && m.mapped_chunks === chunks);
      }
      const chunkAt = (i: number) => i * CHUNK;
      const originalChunk = (i: number) => original.subarray(chunkAt(i), chunkAt(i + 1));
      assert.equal(await statusOf(client, 0, chunks * CHUNK), 0, 'written chunks are data');
      assert.equal(await statusOf(client, chunks * CHUNK, CHUNK), NBD_STATE_HOLE | NBD_STATE_ZERO, 'unwritten chunk is a hole');

      // Chunk 1: TRIM. Chunk 2: WRITE_ZEROES. Chunk 3: WRITE_ZEROES | NO_HOLE.
      // Chunk 4: WRITE_ZEROES of two sectors inside. Chunk 5: FAST_ZERO of one sector inside.
      // Chunk 6: FAST_ZERO of the whole chunk (metadata only, so it is fast).
      await client.trim(chunkAt(1), CHUNK);
      await client.writeZeroes(chunkAt(2), CHUNK);
      await client.writeZeroes(chunkAt(3), CHUNK, { noHole: true });
      await client.writeZeroes(chunkAt(4) + 4096, 8192);
      await assert.rejects(
        client.writeZeroes(chunkAt(5) + 4096, 4096, { fastZero: true }),
        (err: unknown) => err instanceof NbdCommandError && err.code === 'ENOTSUP',
        'FAST_ZERO of a partial chunk must fail with ENOTSUP',
      );
      await client.writeZeroes(chunkAt(6), CHUNK, { fastZero: true });
      await client.flush();

      const zeros = Buffer.alloc(CHUNK);
      assert.ok((await client.read(chunkAt(0), CHUNK)).equals(originalChunk(0)), 'chunk 0 (untouched) changed');
      assert.equal(await statusOf(client, chunkAt(0), CHUNK), 0, 'chunk 0 (untouched) status');
      for (const i of [1, 2, 6]) {
        assert.ok(isZero(await client.read(chunkAt(i), CHUNK)), `chunk ${i} does not read as zeros`);
        assert.equal(await statusOf(client, chunkAt(i), CHUNK), NBD_STATE_HOLE | NBD_STATE_ZERO, `chunk ${i} is not a hole`);
      }
      assert.ok((await client.read(chunkAt(3), CHUNK)).equals(zeros), 'NO_HOLE chunk does not read as zeros');
      assert.equal(await statusOf(client, chunkAt(3), CHUNK), NBD_STATE_ZERO, 'NO_HOLE chunk should be zero but not a hole');

      const partial = await client.read(chunkAt(4), CHUNK);
      const want4 = Buffer.from(originalChunk(4));
      want4.fill(0, 4096, 4096 + 8192);
      assert.ok(partial.equals(want4), 'partial WRITE_ZEROES: zeroed range or the rest of the chunk is wrong');
      assert.equal((await statusOf(client, chunkAt(4), CHUNK)) & NBD_STATE_HOLE, 0, 'a partly zeroed chunk still holds data');

      assert.ok((await client.read(chunkAt(5), CHUNK)).equals(originalChunk(5)), 'refused FAST_ZERO changed the chunk');
      assert.equal(await statusOf(client, chunkAt(5), CHUNK), 0, 'refused FAST_ZERO changed the chunk status');
    });
  });
}

test('two connections to one export (multi-conn): a write flushed on one is read on the other, both ways, and a FLUSH on one makes the other\'s writes survive kill -9', { timeout: TEST_TIMEOUT_MS }, async () => {
  await withDaemon({}, async (daemon, defer) => {
    const a = await connect(daemon, 'shared', defer);
    const b = await connect(daemon, 'shared', defer, { tcp: true });
    assert.ok(a.flags & NBD_FLAG.CAN_MULTI_CONN, 'export does not advertise CAN_MULTI_CONN');
    const first = randomBytes(3 * CHUNK + 512);
    await a.write(CHUNK - 512, first);
    await a.flush();
    assert.ok((await b.read(CHUNK - 512, first.length)).equals(first), 'second connection does not see the first one\'s write');
    const second = randomBytes(64 * KiB);
    await b.write(CHUNK, second); // overwrites part of the first write
    await b.flush();
    const want = Buffer.from(first);
    second.copy(want, 512);
    assert.ok((await a.read(CHUNK - 512, want.length)).equals(want), 'first connection does not see the second one\'s overwrite');

    // CAN_MULTI_CONN promises that a FLUSH covers every write completed on any connection.
    const third = randomBytes(CHUNK + 4096);
    await a.write(8 * CHUNK + 4096, third);
    await b.flush();
    await daemon.kill9();
    await daemon.restart();
    const c = await connect(daemon, 'shared', defer);
    assert.ok((await c.read(CHUNK - 512, want.length)).equals(want), 'flushed writes lost by kill -9');
    assert.ok(
      (await c.read(8 * CHUNK + 4096, third.length)).equals(third),
      'a write on one connection, flushed on the other, was lost by kill -9',
    );
  });
});

test('an export grows by PUT while a client is connected, refuses to shrink (409), and keeps its data and size across a restart', { timeout: TEST_TIMEOUT_MS }, async () => {
  await withDaemon({}, async (daemon, defer) => {
    const small = 64 * MiB;
    const big = 128 * MiB;
    const created = await daemon.api('PUT', '/api/exports/grow', { size_gb: small / GiB });
    assert.equal(created.status, 201, created.text);
    assert.equal(created.json.size, small);

    const before = await connect(daemon, 'grow', defer);
    assert.equal(before.size, small);
    const head = randomBytes(CHUNK + 4096);
    await before.write(0, head);
    const nearOldEnd = randomBytes(8192);
    await before.write(small - 8192, nearOldEnd);
    await before.flush();

    const grown = await daemon.api('PUT', '/api/exports/grow', { size_gb: big / GiB });
    assert.equal(grown.status, 200, grown.text);
    assert.equal(grown.json.size, big);

    // The client connected before the resize keeps working within the size it knows.
    assert.ok((await before.read(0, head.length)).equals(head), 'data before the resize, read on the old connection');
    const oldClientWrite = randomBytes(4096);
    await before.write(small - 4096 * 4, oldClientWrite);
    await before.flush();
    assert.ok((await before.read(small - 4096 * 4, 4096)).equals(oldClientWrite));

    // A new connection sees the new size and can use the new end.
    const after = await connect(daemon, 'grow', defer, { tcp: true });
    assert.equal(after.size, big);
    const tailData = randomBytes(CHUNK);
    await after.write(big - CHUNK, tailData);
    await after.flush();
    assert.ok((await after.read(big - CHUNK, CHUNK)).equals(tailData), 'write at the new end reads back');
    assert.ok(isZero(await after.read(small, CHUNK)), 'the grown range reads as zeros');
    assert.ok((await after.read(small - 8192, 8192)).equals(nearOldEnd), 'data near the old end, read on the new connection');
    await assert.rejects(
      after.write(big, Buffer.alloc(4096)),
      (err: unknown) => err instanceof NbdCommandError && err.code === 'ENOSPC',
      'a write past the new end must fail with ENOSPC',
    );

    const shrink = await daemon.api('PUT', '/api/exports/grow', { size_gb: small / GiB });
    assert.equal(shrink.status, 409, shrink.text);
    assert.equal(typeof shrink.json?.error, 'string', `409 without a JSON error: ${shrink.text}`);
    assert.equal((await daemon.api('GET', '/api/exports/grow')).json.size, big, 'a refused shrink changed the size');

    await before.disconnect();
    await after.disconnect();
    await daemon.restart();

    assert.equal((await daemon.api('GET', '/api/exports/grow')).json.size, big, 'size after restart');
    const reopened = await connect(daemon, 'grow', defer);
    assert.equal(reopened.size, big);
    assert.ok((await reopened.read(0, head.length)).equals(head), 'data written before the resize, after restart');
    assert.ok((await reopened.read(small - 8192, 8192)).equals(nearOldEnd), 'data near the old end, after restart');
    assert.ok((await reopened.read(small - 4096 * 4, 4096)).equals(oldClientWrite), 'old connection\'s write after the resize, after restart');
    assert.ok((await reopened.read(big - CHUNK, CHUNK)).equals(tailData), 'data at the new end, after restart');

    // A grow is durable when PUT answers: it survives kill -9 right after.
    const bigger = 192 * MiB;
    assert.equal((await daemon.api('PUT', '/api/exports/grow', { size_gb: bigger / GiB })).status, 200);
    await daemon.kill9();
    await daemon.restart();
    assert.equal((await daemon.api('GET', '/api/exports/grow')).json.size, bigger, 'size after a grow and kill -9');
    const crashed = await connect(daemon, 'grow', defer);
    assert.equal(crashed.size, bigger);
    assert.ok((await crashed.read(big - CHUNK, CHUNK)).equals(tailData), 'data at the previous end, after kill -9');
  });
});

test('with auto-create off an unknown export is NBD_REP_ERR_UNKNOWN and nbdinfo fails; nothing is created', { timeout: TEST_TIMEOUT_MS }, async (t) => {
  if (!requireTools(t, [TOOLS.nbdinfo])) return;
  await withDaemon({ servers: { nbd: { auto_create_size_gb: 0 } } }, async (daemon, defer) => {
    const info = await run('nbdinfo', [daemon.uri('nobody')], { timeoutMs: TOOL_TIMEOUT_MS });
    assert.notEqual(info.code, 0, `nbdinfo on an unknown export succeeded:\n${info.stdout}`);
    await assert.rejects(
      NbdClient.connect({ path: daemon.socket, exportName: 'nobody' }),
      (err: unknown) => err instanceof NbdOptionError && err.code === 'NBD_REP_ERR_UNKNOWN',
    );
    await assert.rejects(
      NbdClient.connect({ host: daemon.tcp.host, port: daemon.tcp.port, exportName: 'nobody' }),
      (err: unknown) => err instanceof NbdOptionError && err.code === 'NBD_REP_ERR_UNKNOWN',
    );
    assert.deepEqual((await daemon.api('GET', '/api/exports')).json, []);
    assert.deepEqual(await NbdClient.list({ path: daemon.socket }), []);

    // A volume made by the API is served.
    await putExport(daemon, 'known', 0.0625);
    const client = await connect(daemon, 'known', defer);
    assert.equal(client.size, 64 * MiB);
  });
});

test('with auto-create on a new export gets the configured size, and invalid names are NBD_REP_ERR_INVALID and create nothing', { timeout: TEST_TIMEOUT_MS }, async (t) => {
  if (!requireTools(t, [TOOLS.nbdinfo])) return;
  await withDaemon({ servers: { nbd: { auto_create_size_gb: 0.125 } } }, async (daemon, defer) => {
    const info = await nbdinfoJson([daemon.uri('fresh')]);
    assert.equal(info.exports[0]['export-size'], 128 * MiB);
    const longest = 'n'.repeat(200);
    const client = await connect(daemon, longest, defer);
    assert.equal(client.size, 128 * MiB, 'a 200-character name is valid');

    const invalid = ['a/../b', 'bad name', 'x'.repeat(201), '..', 'a//b', '/lead', 'trail/', 'semi;colon', 'ünï'];
    // Every refusal is checked before the test fails, so one run shows all that are wrong.
    const problems: string[] = [];
    const expectRefusal = async (what: string, attempt: Promise<unknown>, refused: (err: unknown) => boolean) => {
      try {
        await attempt;
        problems.push(`${what}: accepted`);
      } catch (err) {
        if (!refused(err)) problems.push(`${what}: ${(err as Error).message}`);
      }
    };
    const invalidReply = (err: unknown) => err instanceof NbdOptionError && err.code === 'NBD_REP_ERR_INVALID';
    for (const name of invalid) {
      const shown = JSON.stringify(name.length > 40 ? `${name.slice(0, 12)}…(${name.length} chars)` : name);
      await expectRefusal(`NBD_OPT_GO ${shown}`, NbdClient.connect({ path: daemon.socket, exportName: name }), invalidReply);
      // NBD_OPT_EXPORT_NAME has no error reply: the server must close instead.
      await expectRefusal(
        `NBD_OPT_EXPORT_NAME ${shown}`,
        NbdClient.connect({ path: daemon.socket, exportName: name, useExportName: true }),
        (err) => err instanceof ConnectionClosedError,
      );
    }
    for (const name of ['a/../b', 'bad name']) {
      const result = await run('nbdinfo', [daemon.uri(name)], { timeoutMs: TOOL_TIMEOUT_MS });
      if (result.code === 0) problems.push(`nbdinfo accepted ${JSON.stringify(name)}`);
    }
    assert.deepEqual(problems, [], 'invalid export names not refused as they should be');

    const names = ((await daemon.api('GET', '/api/exports')).json as Array<{ name: string; size: number }>).map((e) => e.name);
    assert.deepEqual(names.sort(), ['fresh', longest].sort());
    // Nothing reached the disk under a refused name ('a/../b' would be the folder 'b').
    const volumesDir = path.join(daemon.dir, 'cache', 'volumes');
    assert.deepEqual(readdirSync(volumesDir).sort(), ['fresh', longest].sort());
    assert.equal(existsSync(path.join(daemon.dir, 'cache', 'b')), false);
  });
});

test('NBD_OPT_INFO refuses an invalid name with NBD_REP_ERR_INVALID, as NBD_OPT_GO does', { timeout: TEST_TIMEOUT_MS }, async () => {
  await withDaemon({}, async (daemon) => {
    const answers: Record<string, string> = {};
    for (const name of ['a/../b', 'bad name', 'x'.repeat(201)]) {
      const shown = name.length > 40 ? `${name.slice(0, 12)}…(${name.length} chars)` : name;
      for (const [option, attempt] of [
        ['NBD_OPT_GO', () => NbdClient.connect({ path: daemon.socket, exportName: name })],
        ['NBD_OPT_INFO', () => NbdClient.info({ path: daemon.socket }, name)],
      ] as const) {
        try {
          await attempt();
          answers[`${option} ${shown}`] = 'accepted';
        } catch (err) {
          answers[`${option} ${shown}`] = err instanceof NbdOptionError ? err.code : (err as Error).message;
        }
      }
    }
    const expected = Object.fromEntries(Object.keys(answers).map((key) => [key, 'NBD_REP_ERR_INVALID']));
    assert.deepEqual(answers, expected);
  });
});
