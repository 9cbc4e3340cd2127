// The volume engine (overlay, seal, block map, block cache) seen through NBD: dedup,
// zero chunks, write amplification of small writes, unaligned writes against a model,
// the local disk budget, memory-tier eviction, trim, many volumes across a restart, and a
// clean shutdown with a client attached.
// Every test runs the real daemon and looks only at what a client or an operator sees:
// NBD replies, the HTTP API, /metrics, the log and the files in the daemon's folder.

import assert from 'node:assert/strict';
import { randomBytes, randomInt } from 'node:crypto';
import { openSync, closeSync, statSync, writeSync } from 'node:fs';
import path from 'node:path';
import { test, type TestContext } from 'node:test';
import { Journal } from '../src/volume/journal.js';
import { maskBytesOf } from '../src/volume/sectors.js';
import { startDaemon, type Daemon, type StartDaemonOptions } from './harness/daemon.js';
import { NBD_STATE_HOLE, NbdClient, NbdCommandError, type ConnectOptions } from './harness/nbd-client.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;
const BLOCK = 128 * KiB;

// ---------------------------------------------------------------------------
// Helpers

/** Clients each test daemon has served, closed before the daemon is stopped. */
const clientsOf = new Map<Daemon, NbdClient[]>();

async function daemonFor(t: TestContext, opts: StartDaemonOptions = {}): Promise<Daemon> {
  const daemon = await startDaemon(opts);
  clientsOf.set(daemon, []);
  t.after(async () => {
    // Clients go first: stopping a daemon with a client attached is its own test below.
    for (const client of clientsOf.get(daemon) ?? []) client.close();
    clientsOf.delete(daemon);
    await daemon.cleanup();
  });
  return daemon;
}

async function connect(t: TestContext, daemon: Daemon, name: string, opts: Partial<ConnectOptions> = {}): Promise<NbdClient> {
  const client = await NbdClient.connect({ path: daemon.socket, exportName: name, commandTimeoutMs: 60_000, ...opts });
  clientsOf.get(daemon)?.push(client);
  t.after(() => client.close());
  return client;
}

/** Writes `data` at `offset` in pieces of at most `piece` bytes, `depth` in flight. */
async function writeAll(client: NbdClient, offset: number, data: Buffer, piece = MiB, depth = 8): Promise<void> {
  const pieces: Array<[number, Buffer]> = [];
  for (let at = 0; at < data.length; at += piece) pieces.push([offset + at, data.subarray(at, Math.min(data.length, at + piece))]);
  for (let i = 0; i < pieces.length; i += depth) {
    await Promise.all(pieces.slice(i, i + depth).map(([o, d]) => client.write(o, d)));
  }
}

async function readAll(client: NbdClient, offset: number, length: number, piece = MiB): Promise<Buffer> {
  const out = Buffer.alloc(length);
  const jobs: Promise<void>[] = [];
  for (let at = 0; at < length; at += piece) {
    const n = Math.min(piece, length - at);
    jobs.push(client.read(offset + at, n).then((d) => void d.copy(out, at)));
  }
  await Promise.all(jobs);
  return out;
}

/** Reads [offset, offset + expected.length) and names the first differing byte. */
async function expectData(client: NbdClient, offset: number, expected: Buffer, what: string): Promise<void> {
  const actual = await readAll(client, offset, expected.length);
  if (actual.equals(expected)) return;
  let i = 0;
  while (actual[i] === expected[i]) i++;
  assert.fail(
    `${what}: byte ${offset + i} (offset ${i} of ${expected.length}) reads 0x${actual[i].toString(16)}, want 0x${expected[i].toString(16)}`,
  );
}

/** One sample of a Prometheus series from /metrics (labels matched as given). */
async function metric(daemon: Daemon, name: string, labels: Record<string, string> = {}): Promise<number> {
  const res = await daemon.api('GET', '/metrics');
  assert.equal(res.status, 200);
  const want = Object.entries(labels).map(([k, v]) => `${k}="${v}"`);
  for (const line of res.text.split('\n')) {
    if (line.startsWith('#')) continue;
    const match = /^([A-Za-z_:][A-Za-z0-9_:]*)(\{[^}]*\})?\s+(\S+)$/.exec(line);
    if (!match || match[1] !== name) continue;
    const labelText = match[2] ?? '';
    if (want.every((w) => labelText.includes(w))) return Number(match[3]);
  }
  throw new Error(`/metrics has no ${name}${want.length ? `{${want.join(',')}}` : ''}`);
}

async function volumeMetrics(daemon: Daemon, name: string): Promise<any> {
  const res = await daemon.api('GET', `/api/exports/${encodeURIComponent(name)}/metrics`);
  assert.equal(res.status, 200, `GET /api/exports/${name}/metrics: ${res.status} ${res.text}`);
  return res.json;
}

async function waitFor(what: string, timeoutMs: number, check: () => Promise<boolean>): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (await check()) return;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(50);
  }
}

/** Waits until the background sealer has sealed every named volume (dirty_bytes 0). */
async function waitSealed(daemon: Daemon, names: string[], timeoutMs = 20_000): Promise<void> {
  await waitFor(`${names.join(', ')} sealed (dirty_bytes 0)`, timeoutMs, async () => {
    for (const name of names) if ((await volumeMetrics(daemon, name)).dirty_bytes !== 0) return false;
    return true;
  });
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function isEnospc(err: unknown): boolean {
  return err instanceof NbdCommandError && err.code === 'ENOSPC';
}

// ---------------------------------------------------------------------------

test('dedup: the same 8 MiB in two volumes (and twice in one) is stored once in the block cache, also after a restart', async (t) => {
  const daemon = await daemonFor(t, { toml: { volumes: { seal_idle_ms: 100 } } });
  const data = randomBytes(8 * MiB); // 64 distinct 128 KiB blocks
  let a = await connect(t, daemon, 'dedup-a');
  let b = await connect(t, daemon, 'dedup-b');
  await writeAll(a, 0, data);
  await writeAll(a, 64 * MiB, data); // same content, other offset, same volume
  await writeAll(b, 16 * MiB, data);
  await waitSealed(daemon, ['dedup-a', 'dedup-b']);

  assert.equal((await volumeMetrics(daemon, 'dedup-a')).mapped_chunks, 128);
  assert.equal((await volumeMetrics(daemon, 'dedup-b')).mapped_chunks, 64);
  assert.equal(await metric(daemon, 'updraft_cache_blocks'), 64, 'one cached block per distinct 128 KiB of content');
  assert.equal(await metric(daemon, 'updraft_cache_blocks_written_total'), 64);
  assert.equal(await metric(daemon, 'updraft_cache_dedup_hits_total'), 128, 'the second and third copies were dedup hits');

  await expectData(a, 0, data, 'A at 0');
  await expectData(a, 64 * MiB, data, 'A at 64 MiB');
  await expectData(b, 16 * MiB, data, 'B at 16 MiB');
  await expectData(b, 0, Buffer.alloc(MiB), 'B before its data');

  await a.flush();
  await b.flush();
  a.close();
  b.close();
  // A crash, not SIGTERM: a clean stop drains the volumes into the store, after which
  // their blocks are evictable cache rather than reference-counted local data.
  await daemon.kill9();
  await daemon.restart();
  assert.equal(await metric(daemon, 'updraft_cache_blocks'), 64, 'same block count after a restart');
  a = await connect(t, daemon, 'dedup-a');
  b = await connect(t, daemon, 'dedup-b');
  await expectData(a, 0, data, 'A at 0 after restart');
  await expectData(a, 64 * MiB, data, 'A at 64 MiB after restart');
  await expectData(b, 16 * MiB, data, 'B at 16 MiB after restart');
  assert.equal(await metric(daemon, 'updraft_cache_blocks'), 64, 'reading stored nothing new');

  // The shared blocks are reference counted (counts rebuilt from the journals at start-up):
  // trimming both copies in A leaves them for B; trimming B too frees them.
  await a.trim(0, data.length);
  await a.trim(64 * MiB, data.length);
  await a.flush();
  assert.equal(await metric(daemon, 'updraft_cache_blocks'), 64, 'B still holds every block');
  await expectData(b, 16 * MiB, data, 'B after A trimmed its copies');
  await expectData(a, 0, Buffer.alloc(data.length), 'A after trim');
  await b.trim(16 * MiB, data.length);
  await b.flush();
  await waitFor('the unreferenced blocks to be freed', 5000, async () => (await metric(daemon, 'updraft_cache_blocks')) === 0);
});

test('zero chunks are never stored: written zeros seal to holes, and zeros over data release its blocks', async (t) => {
  const daemon = await daemonFor(t, { toml: { volumes: { seal_idle_ms: 100 } } });
  const client = await connect(t, daemon, 'zeros', { metaContexts: ['base:allocation'] });

  const holeFlags = async (offset: number, length: number): Promise<number[]> => {
    const flags: number[] = [];
    let at = offset;
    while (at < offset + length) {
      const extents = await client.blockStatus(at, offset + length - at);
      assert.ok(extents.length > 0);
      for (const e of extents) {
        flags.push(e.flags);
        at += e.length;
      }
    }
    return flags;
  };

  // 4 MiB of zeros through real WRITEs (not WRITE_ZEROES).
  await writeAll(client, 0, Buffer.alloc(4 * MiB));
  await waitSealed(daemon, ['zeros']);
  assert.ok((await volumeMetrics(daemon, 'zeros')).chunks_sealed >= 32, 'the zero chunks went through sealing');
  assert.equal(await metric(daemon, 'updraft_cache_blocks'), 0, 'no block stored for zero chunks');
  assert.equal(await metric(daemon, 'updraft_cache_blocks_written_total'), 0);
  for (const f of await holeFlags(0, 4 * MiB)) assert.ok(f & NBD_STATE_HOLE, `sealed zeros report a hole (flags ${f})`);
  await expectData(client, 0, Buffer.alloc(4 * MiB), 'zeros');

  // Data, sealed, then overwritten with zeros: its blocks go away.
  const data = randomBytes(4 * MiB);
  await writeAll(client, 8 * MiB, data);
  await waitSealed(daemon, ['zeros']);
  assert.equal(await metric(daemon, 'updraft_cache_blocks'), 32);
  for (const f of await holeFlags(8 * MiB, 4 * MiB)) assert.equal(f & NBD_STATE_HOLE, 0, 'sealed data is not a hole');
  await writeAll(client, 8 * MiB, Buffer.alloc(4 * MiB));
  await waitSealed(daemon, ['zeros']);
  await waitFor('the overwritten blocks to be released', 5000, async () => (await metric(daemon, 'updraft_cache_blocks')) === 0);
  for (const f of await holeFlags(8 * MiB, 4 * MiB)) assert.ok(f & NBD_STATE_HOLE, `zeros over sealed data report a hole (flags ${f})`);
  await expectData(client, 8 * MiB, Buffer.alloc(4 * MiB), 'zeros over data');
});

test('small writes cost small writes: 4 KiB into 1000 chunks allocates about 4 MB of overlay, not 125 MiB', async (t) => {
  const daemon = await daemonFor(t, { toml: { volumes: { seal_idle_ms: 3_600_000 } } });
  const client = await connect(t, daemon, 'small');
  const count = 1000;
  const pieces = Array.from({ length: count }, (_, i) => ({ offset: i * BLOCK + (i % 32) * 4096, data: randomBytes(4096) }));
  for (let i = 0; i < count; i += 64) await Promise.all(pieces.slice(i, i + 64).map((p) => client.write(p.offset, p.data)));
  await client.flush();

  const m = await volumeMetrics(daemon, 'small');
  assert.equal(m.dirty_bytes, count * 4096, 'nothing sealed yet; 4 KiB dirty per chunk');
  assert.equal(m.dirty_chunks, count);
  const overlay = statSync(path.join(daemon.dir, 'cache', 'volumes', 'small', '@', 'overlay'));
  const allocated = overlay.blocks * 512;
  t.diagnostic(`overlay: apparent size ${overlay.size} bytes, allocated ${allocated} bytes for ${count} x 4 KiB`);
  assert.ok(allocated >= count * 4096, `overlay allocates ${allocated} bytes; the data alone is ${count * 4096}`);
  assert.ok(allocated <= count * 4096 * 1.5, `overlay allocates ${allocated} bytes for ${count} x 4 KiB (a whole chunk each would be ${count * BLOCK})`);
  for (let i = 0; i < count; i += 64) {
    await Promise.all(
      pieces.slice(i, i + 64).map(async (p) => assert.ok((await client.read(p.offset, 4096)).equals(p.data), `4 KiB at ${p.offset}`)),
    );
  }
  // The rest of each chunk still reads as zeros.
  await expectData(client, 0, Buffer.concat([pieces[0].data, Buffer.alloc(BLOCK - 4096)]), 'chunk 0');
});

test('unaligned and partial writes across chunk boundaries match a model, over sealed and unsealed data, after a seal and a restart', async (t) => {
  const SIZE = 16 * MiB;
  const daemon = await daemonFor(t, {
    toml: { volumes: { seal_idle_ms: 100 }, servers: { nbd: { auto_create_size_gb: SIZE / GiB } } },
  });
  const name = 'unaligned';
  let client = await connect(t, daemon, name);
  assert.equal(client.size, SIZE);
  const model = Buffer.alloc(SIZE);

  const verify = async (what: string) => {
    await expectData(client, 0, model, `${what}: whole volume`);
    for (let i = 0; i < 50; i++) {
      const length = randomInt(1, 300_000);
      const offset = randomInt(0, SIZE - length);
      const got = await client.read(offset, length);
      assert.ok(got.equals(model.subarray(offset, offset + length)), `${what}: unaligned read ${offset}+${length}`);
    }
  };
  const sizes = [1, 511, 4097, 1, 511, 4097, 4095, 4096, 8191, 131073, 300_001];
  const oneWrite = async () => {
    const length = sizes[randomInt(0, sizes.length)];
    let offset: number;
    if (randomInt(0, 3) > 0) {
      // Around a chunk boundary, so most writes straddle two chunks.
      const boundary = randomInt(1, SIZE / BLOCK) * BLOCK;
      offset = boundary - randomInt(1, Math.min(length, 5000) + 1);
    } else {
      offset = randomInt(0, SIZE - length) | 1; // odd, anywhere
    }
    offset = Math.max(0, Math.min(SIZE - length, offset));
    const data = randomBytes(length);
    await client.write(offset, data);
    data.copy(model, offset);
  };

  // The first half holds sealed data; the second half is never-written holes.
  const base = randomBytes(SIZE / 2);
  await writeAll(client, 0, base);
  base.copy(model, 0);
  await waitSealed(daemon, [name]);
  await verify('after the base was sealed');

  for (let i = 0; i < 300; i++) await oneWrite();
  await verify('unaligned writes over sealed data and holes (unsealed)');
  await waitSealed(daemon, [name]);
  await verify('after sealing the unaligned writes');

  // Writes interleaved with pauses, so the sealer runs between (and during) them.
  for (let round = 0; round < 6; round++) {
    for (let i = 0; i < 40; i++) await oneWrite();
    await sleep(randomInt(80, 200));
  }
  await verify('writes while sealing runs');

  // Unsealed writes, then a clean restart.
  for (let i = 0; i < 100; i++) await oneWrite();
  client.close();
  await daemon.restart();
  client = await connect(t, daemon, name);
  await verify('after a restart');
  await waitSealed(daemon, [name]);
  await verify('after sealing following the restart');

  // Acknowledged and flushed writes survive a crash.
  for (let i = 0; i < 100; i++) await oneWrite();
  await client.flush();
  client.close();
  await daemon.kill9();
  await daemon.restart();
  client = await connect(t, daemon, name);
  await verify('after FLUSH and SIGKILL');
});

/**
 * Fills fresh space from chunk `first` on, 128 KiB at a time and then 4 KiB at a time,
 * until the daemon refuses; returns the first refusal and the offset where the fill stopped.
 */
async function fillToTheBrim(client: NbdClient, model: Buffer, first: number): Promise<{ refused: unknown; end: number }> {
  let at = first * BLOCK;
  let refused: unknown;
  for (const piece of [BLOCK, 4096]) {
    for (;;) {
      if (at + piece > model.length) throw new Error(`the daemon took ${at} bytes without refusing`);
      const data = randomBytes(piece);
      try {
        await client.write(at, data);
      } catch (err) {
        refused ??= err;
        if (!isEnospc(err)) return { refused, end: at };
        break;
      }
      data.copy(model, at);
      at += piece;
    }
  }
  return { refused, end: at };
}

test('the disk budget: new data past it is ENOSPC with the reason logged; old data intact; overwrites work; trim frees room', async (t) => {
  const daemon = await daemonFor(t, { toml: { cache: { disk_size_gb: 0.01 }, volumes: { seal_idle_ms: 3_600_000 } } });
  const capacity = await metric(daemon, 'updraft_local_capacity_bytes');
  const client = await connect(t, daemon, 'full', { structuredReplies: true });
  const model = Buffer.alloc(200 * BLOCK);
  const { refused, end } = await fillToTheBrim(client, model, 0);
  assert.ok(isEnospc(refused), `writing past the budget fails with ENOSPC, got ${String(refused)}`);
  assert.match((refused as NbdCommandError).serverMessage, /disk budget/, 'the error reply says why');
  assert.ok(end <= capacity, `${end} bytes accepted; the budget is ${capacity} bytes`);
  assert.ok(end > capacity - 4096, `only ${end} bytes accepted; the budget is ${capacity} bytes`);
  assert.match(daemon.log(), /WARN .*disk budget/, 'the daemon log says why');
  await expectData(client, 0, model, 'everything written before the budget ran out (and nothing of the refused writes)');

  // Overwriting what is already there needs no new room: whole chunks and unaligned pieces.
  const lastChunk = Math.floor(end / BLOCK) - 1;
  for (const chunk of [3, 17, lastChunk]) {
    const data = randomBytes(BLOCK);
    await client.write(chunk * BLOCK, data);
    data.copy(model, chunk * BLOCK);
    const piece = randomBytes(1000);
    await client.write(chunk * BLOCK + 4097, piece);
    piece.copy(model, chunk * BLOCK + 4097);
  }
  await expectData(client, 0, model, 'after overwrites at a full budget');

  // Trim 8 chunks and flush: 8 new chunks fit again.
  await client.trim(0, 8 * BLOCK);
  await client.flush();
  model.fill(0, 0, 8 * BLOCK);
  const fresh = Math.ceil(end / BLOCK) + 1;
  for (let chunk = fresh; chunk < fresh + 8; chunk++) {
    const data = randomBytes(BLOCK);
    await client.write(chunk * BLOCK, data);
    data.copy(model, chunk * BLOCK);
  }
  await expectData(client, 0, model, 'after trim and new writes');
});

test('the disk budget counts sealed (pinned) blocks: ENOSPC; overwrites still work; trim + flush releases blocks for new writes', async (t) => {
  const daemon = await daemonFor(t, { toml: { cache: { disk_size_gb: 0.01 }, volumes: { seal_idle_ms: 100 } } });
  const client = await connect(t, daemon, 'pinned');
  const model = Buffer.alloc(200 * BLOCK);
  randomBytes(48 * BLOCK).copy(model, 0);
  await writeAll(client, 0, model.subarray(0, 48 * BLOCK));
  await waitSealed(daemon, ['pinned']);
  assert.equal(await metric(daemon, 'updraft_cache_pinned_blocks'), 48, 'sealed blocks are pinned (in no store yet)');

  const { refused, end } = await fillToTheBrim(client, model, 64);
  assert.ok(isEnospc(refused), `writing past the budget fails with ENOSPC, got ${String(refused)}`);
  assert.ok(end > 64 * BLOCK, 'some new data fitted after the sealed 6 MiB');
  await expectData(client, 0, model, 'everything written before the budget ran out');

  // Overwriting sectors that were written (and sealed) before, at a full budget: a guest
  // rewriting its own files must not see ENOSPC.
  const overwrite = async (what: string) => {
    for (const chunk of [20, 21]) {
      const piece = randomBytes(4096);
      try {
        await client.write(chunk * BLOCK + 8192, piece);
      } catch (err) {
        assert.fail(`${what}: overwriting 4 KiB of sealed chunk ${chunk} at a full budget failed: ${(err as Error).message}`);
      }
      piece.copy(model, chunk * BLOCK + 8192);
    }
  };
  await overwrite('right after ENOSPC');
  await sleep(500); // the sealer's turn
  await overwrite('after the sealer ran');
  await expectData(client, 0, model, 'after overwrites');

  // Trim 16 sealed chunks; once the FLUSH has committed that, their blocks are released.
  await client.trim(0, 16 * BLOCK);
  await client.flush();
  model.fill(0, 0, 16 * BLOCK);
  const fresh = Math.ceil(end / BLOCK) + 1;
  for (let chunk = fresh; chunk < fresh + 15; chunk++) {
    const data = randomBytes(BLOCK);
    await client.write(chunk * BLOCK, data);
    data.copy(model, chunk * BLOCK);
  }
  await expectData(client, 0, model, 'after trim and new writes');
});

test('memory tier eviction: a 2 MiB memory tier under 16 MiB of blocks evicts, and reads come from the disk tier, correct', async (t) => {
  const daemon = await daemonFor(t, { toml: { cache: { memory_size_gb: 0.002 }, volumes: { seal_idle_ms: 100 } } });
  const client = await connect(t, daemon, 'evict');
  const data = randomBytes(16 * MiB);
  await writeAll(client, 0, data);
  await waitSealed(daemon, ['evict']);
  assert.equal(await metric(daemon, 'updraft_cache_blocks'), 128);
  await expectData(client, 0, data, 'first read');
  await expectData(client, 0, data, 'second read');
  const memoryEvictions = await metric(daemon, 'updraft_cache_evictions_total', { tier: 'memory' });
  const diskHits = await metric(daemon, 'updraft_cache_hits_total', { tier: 'disk' });
  const memoryBytes = await metric(daemon, 'updraft_cache_memory_bytes');
  t.diagnostic(`memory evictions ${memoryEvictions}, disk hits ${diskHits}, memory tier ${memoryBytes} bytes`);
  assert.ok(memoryEvictions > 0, 'the memory tier evicted blocks');
  assert.ok(diskHits > 0, 'reads were served from the disk tier');
  assert.ok(memoryBytes <= 0.002 * GiB, `the memory tier holds ${memoryBytes} bytes, over its budget`);
});

test('trim then rewrite: a trimmed chunk rewritten in part reads zeros plus the new data (sealed, unsealed, mixed)', async (t) => {
  const daemon = await daemonFor(t, { toml: { volumes: { seal_idle_ms: 100 } } });
  let client = await connect(t, daemon, 'trim');
  const SPAN = 32 * BLOCK;
  const model = Buffer.alloc(SPAN);
  const write = async (offset: number, data: Buffer) => {
    await client.write(offset, data);
    data.copy(model, offset);
  };
  const trim = async (offset: number, length: number) => {
    await client.trim(offset, length);
    model.fill(0, offset, offset + length);
  };

  // Neighbours that must not be touched, and the chunks under test.
  for (const chunk of [3, 4, 5, 11, 12, 13]) await write(chunk * BLOCK, randomBytes(BLOCK));
  await waitSealed(daemon, ['trim']);

  // Sealed chunk 4: trim, rewrite 1000 bytes in the middle.
  await trim(4 * BLOCK, BLOCK);
  await write(4 * BLOCK + 5000, randomBytes(1000));
  // Unsealed chunk 8: write, trim and rewrite at once.
  await write(8 * BLOCK, randomBytes(BLOCK));
  await trim(8 * BLOCK, BLOCK);
  await write(8 * BLOCK + 70_000, randomBytes(1000));
  // Sealed chunk 12 with an overlay sector on top: trim, rewrite its last 3 bytes.
  await write(12 * BLOCK, randomBytes(4096));
  await trim(12 * BLOCK, BLOCK);
  await write(13 * BLOCK - 3, randomBytes(3));
  // Two more sealed chunks trimmed, then one sector (or one byte) back in each.
  await trim(3 * BLOCK, BLOCK);
  await trim(11 * BLOCK, 1 * BLOCK);
  await write(3 * BLOCK + 4096, randomBytes(4096));
  await write(11 * BLOCK, randomBytes(1));

  await expectData(client, 0, model, 'right after trim and rewrite');
  for (const [chunk, offset, length] of [
    [4, 5000, 1000],
    [8, 70_000, 1000],
    [12, BLOCK - 3, 3],
  ]) {
    const got = await client.read(chunk * BLOCK, BLOCK);
    assert.ok(got.subarray(0, offset).equals(Buffer.alloc(offset)), `chunk ${chunk}: zeros before the rewrite`);
    assert.ok(got.subarray(offset + length).equals(Buffer.alloc(BLOCK - offset - length)), `chunk ${chunk}: zeros after the rewrite`);
  }
  await waitSealed(daemon, ['trim']);
  await expectData(client, 0, model, 'after sealing');
  client.close();
  await daemon.restart();
  client = await connect(t, daemon, 'trim');
  await expectData(client, 0, model, 'after a restart');
});

test('50 volumes auto-created and written concurrently all read back after a restart', async (t) => {
  const daemon = await daemonFor(t);
  const count = 50;
  const volumes = Array.from({ length: count }, (_, i) => ({
    name: `many-${String(i).padStart(2, '0')}`,
    offset: (i * 7919 * 4096) % (GiB - 4096),
    data: randomBytes(4096),
  }));
  await Promise.all(
    volumes.map(async (v) => {
      const client = await NbdClient.connect({ path: daemon.socket, exportName: v.name, commandTimeoutMs: 60_000 });
      try {
        await client.write(v.offset, v.data);
      } finally {
        await client.disconnect();
      }
    }),
  );
  const listed = await daemon.api('GET', '/api/exports');
  assert.equal((listed.json as unknown[]).length, count);

  await daemon.restart();
  const ready = [...daemon.log().matchAll(/host ready .*?volumes=(\d+).*? ms=([\d.]+)/g)].at(-1);
  assert.ok(ready, 'the log has a "host ready" line');
  t.diagnostic(`restart with ${count} volumes: host ready in ${ready[2]} ms`);
  assert.equal(Number(ready[1]), count, 'every volume was recovered');

  await Promise.all(
    volumes.map(async (v) => {
      const client = await NbdClient.connect({ path: daemon.socket, exportName: v.name, commandTimeoutMs: 60_000 });
      try {
        assert.ok((await client.read(v.offset, 4096)).equals(v.data), `${v.name} reads back its own 4 KiB`);
        assert.ok((await client.read(v.offset + 4096, 4096)).equals(Buffer.alloc(4096)), `${v.name} has nothing else`);
      } finally {
        await client.disconnect();
      }
    }),
  );
  assert.equal(((await daemon.api('GET', '/api/exports')).json as unknown[]).length, count, 'no volume appeared or vanished');
});

test('SIGTERM with a client attached stops the daemon cleanly and promptly, and keeps unflushed writes', async (t) => {
  const daemon = await daemonFor(t);
  const client = await connect(t, daemon, 'attached');
  const data = randomBytes(3 * MiB + 5000);
  await writeAll(client, 123 * KiB + 7, data);
  // No FLUSH: a clean shutdown flushes every volume itself (daemon.ts: "closing connections and flushing volumes").
  const started = Date.now();
  const code = await daemon.stop();
  const took = Date.now() - started;
  const log = daemon.log();
  assert.ok(
    code === 0 && took < 10_000 && log.includes('stopped cleanly'),
    `SIGTERM with a client attached: exit code ${code} after ${took} ms; ` +
      `log ${log.includes('stopped cleanly') ? 'says' : 'does not say'} "stopped cleanly"\n${log.split('\n').slice(-4).join('\n')}`,
  );
  client.close();
  await daemon.restart();
  const again = await connect(t, daemon, 'attached');
  await expectData(again, 123 * KiB + 7, data, 'writes acknowledged before the SIGTERM');
});

test('a FLUSH over rewritten sectors syncs the overlay alone; the idle write-back commits the sequence; both survive SIGKILL', async (t) => {
  const daemon = await daemonFor(t, { toml: { volumes: { seal_idle_ms: 3_600_000 } } });
  const syncs = async () => {
    const m = await volumeMetrics(daemon, 'rewrites');
    return { journal: m.journal_commits as number, overlay: m.overlay_only_flushes as number, sequence: m.sequence as number };
  };
  let client = await connect(t, daemon, 'rewrites');
  const versions = [randomBytes(64 * KiB), randomBytes(64 * KiB), randomBytes(64 * KiB), randomBytes(64 * KiB)];
  // More than a FLUSH logs in its batch, so this FLUSH syncs the overlay and commits.
  await client.write(MiB, Buffer.concat([versions[0], randomBytes(448 * KiB)]));
  await client.flush();
  const first = await syncs();
  assert.ok(first.journal >= 1, `new sectors: the FLUSH commits a journal batch (${JSON.stringify(first)})`);

  // Only sectors already in the overlay: one sync, no journal batch; a FLUSH with nothing new syncs nothing.
  await client.write(MiB, versions[1]);
  await client.flush();
  await client.flush();
  const rewritten = await syncs();
  assert.deepEqual([rewritten.journal, rewritten.overlay], [first.journal, first.overlay + 1], `a rewrite's FLUSH: ${JSON.stringify(rewritten)}`);

  // The next rewrite is flushed and the daemon killed before the volume goes idle.
  await client.write(MiB, versions[2]);
  await client.flush();
  client.close();
  await daemon.kill9();
  await daemon.restart();
  client = await connect(t, daemon, 'rewrites');
  await expectData(client, MiB, versions[2], 'a rewrite whose FLUSH synced the overlay alone, after SIGKILL');

  // A second after the last write the write-back commits the sequence an overlay-only FLUSH
  // left (the first FLUSH after a restart commits the whole journal anyway).
  await client.write(MiB, versions[0]);
  await client.flush();
  await client.write(MiB, versions[3]);
  await client.flush();
  const before = await syncs();
  assert.ok(before.overlay >= 1, `after the restart, a rewrite's FLUSH synced the overlay alone (${JSON.stringify(before)})`);
  await waitFor('the idle write-back to commit the sequence', 10_000, async () => (await syncs()).journal > before.journal);
  const committed = (await syncs()).sequence;
  client.close();
  await daemon.kill9();
  await daemon.restart();
  client = await connect(t, daemon, 'rewrites');
  await expectData(client, MiB, versions[3], 'the last rewrite, after SIGKILL');
  assert.equal((await syncs()).sequence, committed, 'the restarted volume is at the sequence the write-back committed');
});

test('a FLUSH covering few writes logs them in its journal batch and syncs the journal alone; a restart lays them over an overlay that lost them', async (t) => {
  const daemon = await daemonFor(t, { toml: { volumes: { seal_idle_ms: 3_600_000 } } });
  const client = await connect(t, daemon, 'logged');
  const metrics = async () => {
    const m = await volumeMetrics(daemon, 'logged');
    return { journal: m.journal_commits as number, overlay: m.overlay_only_flushes as number, logged: m.logged_flushes as number };
  };
  const before = await metrics();
  const fresh = randomBytes(8 * KiB);
  await client.write(2 * MiB, fresh);
  await client.flush();
  const first = await metrics();
  assert.deepEqual(first, { ...before, logged: before.logged + 1 }, 'new sectors: one logged FLUSH, no overlay sync, no other commit');

  // While the journal holds logged writes, a rewrite's FLUSH logs it too: synced in the
  // overlay alone, replay would lay the older logged copy over it.
  const rewrite = randomBytes(8 * KiB);
  const edge = randomBytes(1000);
  await client.write(2 * MiB, rewrite);
  await client.flush();
  const second = await metrics();
  assert.deepEqual(second, { ...first, logged: first.logged + 1 }, 'a rewrite with logged writes pending: logged again');
  // An unaligned write (widened to its sector) and the daemon killed well within the second
  // before the idle write-back would sync the overlay.
  await client.write(5 * MiB + 100, edge);
  await client.flush();
  client.close();
  await daemon.kill9();

  const dir = path.join(daemon.dir, 'cache', 'volumes', 'logged', '@');
  const { journal, state } = Journal.open(path.join(dir, 'journal'), 128 * KiB, maskBytesOf(128 * KiB));
  journal.close();
  const logged = state.logged.map((e) => `${e.position}+${e.data.length}`);
  assert.deepEqual(logged, [`${2 * MiB}+${8 * KiB}`, `${2 * MiB}+${8 * KiB}`, `${5 * MiB}+${4 * KiB}`], 'the journal logs the three writes after its last other batch');
  // What a power cut leaves of overlay pages no sync covered: anything.
  const fd = openSync(path.join(dir, 'overlay'), 'r+');
  try {
    writeSync(fd, randomBytes(8 * KiB), 0, 8 * KiB, 2 * MiB);
    writeSync(fd, randomBytes(4 * KiB), 0, 4 * KiB, 5 * MiB);
  } finally {
    closeSync(fd);
  }
  await daemon.restart();
  const again = await connect(t, daemon, 'logged');
  await expectData(again, 2 * MiB, rewrite, 'the rewrite, laid from the journal');
  await expectData(again, 5 * MiB + 100, edge, 'the unaligned write, laid from the journal');
  await expectData(again, 5 * MiB, Buffer.alloc(100), 'the zeros before it in its sector');
});
