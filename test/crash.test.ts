// Crash safety (DESIGN.md invariant 1): after a FLUSH ack, data survives SIGKILL of the
// daemon and a restart, whatever else was going on at the kill.
//
// 1. Random kill points. Each round writes a fresh region with fio (a real client, verify
//    pattern, ends with NBD FLUSH) and a byte-exact model region with the test NBD client
//    (unaligned writes, zeroes, trims, then FLUSH), while unflushed background traffic
//    (writes, FUA writes, trims, zeroes, a second fio) hammers other regions, some of them
//    sharing 128 KiB chunks with the flushed data. Sealing is tuned to run all the time
//    (tiny idle time and dirty budget), so kills land in the middle of seals and of the
//    sealer's journal commits. After a random delay the daemon is SIGKILLed and restarted,
//    and EVERY region flushed so far is checked: fio --verify_only for the fio regions,
//    byte-exact reads for the model regions. The run is driven by one seeded PRNG; the
//    seed is printed and UPDRAFT_CRASH_SEED replays it (the layout, sizes, operations and
//    delays repeat; the exact interleaving with the daemon's timers cannot).
//
// 2. Overwrite without flush: 8 MiB written and flushed, then overwritten without flush,
//    then SIGKILL. Every 4 KiB sector must read back as the flushed or the unflushed
//    content, never anything else (in particular never zeros).

import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { spawn } from 'node:child_process';
import { writeFile } from 'node:fs/promises';
import path from 'node:path';
import { test, type TestContext } from 'node:test';
import { removeDir, scratchDir, startDaemon, type Daemon } from './harness/daemon.js';
import { NbdClient } from './harness/nbd-client.js';
import { TOOLS, killTree, requireTools, run, tail, type RunResult } from './harness/tools.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const SECTOR = 4 * KiB;
const CHUNK = 128 * KiB;
const VOLUME = 'crashvol';
const VOLUME_SIZE = 1024 * MiB;
const ROUNDS = 24;
const SLOT = 40 * MiB;
/** Sealing all the time: 50 ms idle, 8 MB dirty budget. */
const SEALING_ALL_THE_TIME = { volumes: { seal_idle_ms: 50, seal_dirty_mb: 8 } };

// ---------------------------------------------------------------------------------------
// Seeded PRNG (mulberry32): the whole run follows from one 32-bit seed.

class Rng {
  private state: number;
  constructor(seed: number) {
    this.state = seed >>> 0;
  }
  /** Uniform 32-bit unsigned integer. */
  u32(): number {
    this.state = (this.state + 0x6d2b79f5) >>> 0;
    let z = this.state;
    z = Math.imul(z ^ (z >>> 15), z | 1);
    z ^= z + Math.imul(z ^ (z >>> 7), z | 61);
    return (z ^ (z >>> 14)) >>> 0;
  }
  /** Uniform integer in [lo, hi]. */
  int(lo: number, hi: number): number {
    return lo + Math.floor((this.u32() / 2 ** 32) * (hi - lo + 1));
  }
  /** A multiple of `unit` in [lo, hi] (both multiples of unit). */
  aligned(lo: number, hi: number, unit: number): number {
    return this.int(lo / unit, hi / unit) * unit;
  }
  chance(p: number): boolean {
    return this.u32() / 2 ** 32 < p;
  }
  pick<T>(items: readonly T[]): T {
    return items[this.int(0, items.length - 1)];
  }
}

/** One seed per run, shared by both tests. */
const SEED = seedFromEnv();

function seedFromEnv(): number {
  const fromEnv = process.env.UPDRAFT_CRASH_SEED;
  if (fromEnv !== undefined && fromEnv !== '') {
    const seed = Number(fromEnv);
    if (!Number.isInteger(seed) || seed < 0 || seed >= 2 ** 32) throw new Error(`UPDRAFT_CRASH_SEED=${fromEnv}: want an integer in [0, 2^32)`);
    return seed;
  }
  return randomBytes(4).readUInt32BE(0);
}

// ---------------------------------------------------------------------------------------
// Region layout. Slot i (40 MiB at i × 40 MiB) belongs to round i:
//
//   [bg A][fio region (flushed)][bg B][model region (flushed)][bg C .................]
//
// Boundaries are 4 KiB-aligned but not chunk-aligned, so background areas share chunks
// with flushed data. Background traffic only ever touches bg areas (of any slot), so
// flushed regions are never legitimately overwritten.

interface Range {
  offset: number;
  length: number;
}

interface Slot {
  index: number;
  fio: Range & { seed: number };
  model: Range;
  background: Range[];
}

function layoutSlots(rng: Rng): Slot[] {
  const slots: Slot[] = [];
  for (let i = 0; i < ROUNDS; i++) {
    const base = i * SLOT;
    const bgA = rng.aligned(SECTOR, 384 * KiB, SECTOR);
    const fioSize = rng.aligned(4 * MiB, 10 * MiB, 64 * KiB);
    const bgB = rng.aligned(SECTOR, 384 * KiB, SECTOR);
    const modelSize = rng.aligned(512 * KiB, 2 * MiB, SECTOR);
    const fio = { offset: base + bgA, length: fioSize, seed: rng.int(1, 2 ** 31 - 1) };
    const model = { offset: fio.offset + fioSize + bgB, length: modelSize };
    const end = base + SLOT;
    slots.push({
      index: i,
      fio,
      model,
      background: [
        { offset: base, length: bgA },
        { offset: fio.offset + fioSize, length: bgB },
        { offset: model.offset + modelSize, length: end - (model.offset + modelSize) },
      ],
    });
  }
  assert.ok(ROUNDS * SLOT <= VOLUME_SIZE);
  return slots;
}

// ---------------------------------------------------------------------------------------
// fio

const FIO_PATTERN = ['--ioengine=nbd', '--rw=randwrite', '--bsrange=4k-64k', '--verify=crc32c', '--verify_state_save=0', '--iodepth=8'];
/** Lines fio prints for a failed verification (it exits 0 on some of them without verify_fatal). */
const FIO_VERIFY_FAILURE = /verify failed|bad magic|bad header|verify: |bad pattern/;

function fioOutput(result: RunResult): string {
  return `${tail(result.stdout, 15)}\n${tail(result.stderr, 15)}`;
}

/** The flushed write of one fio region: verify pattern, FLUSH at the end (end_fsync). */
async function fioWrite(daemon: Daemon, cwd: string, region: Slot['fio'], name: string): Promise<void> {
  const args = [
    `--name=${name}`, ...FIO_PATTERN, `--uri=${daemon.uri(VOLUME)}`, `--offset=${region.offset}`, `--size=${region.length}`,
    `--randseed=${region.seed}`, '--do_verify=0', '--end_fsync=1',
  ];
  const result = await run('fio', args, { timeoutMs: 120_000, cwd });
  assert.ok(result.code === 0 && !result.timedOut, `fio write of ${name} failed (exit ${result.code}):\n${fioOutput(result)}`);
  const written = /WRITE: .*io=(\S+)/.exec(result.stdout);
  assert.ok(written, `fio reported no writes for ${name}:\n${fioOutput(result)}`);
}

/** One fio run verifying every given region (one job each) with --verify_only. */
async function fioVerify(daemon: Daemon, cwd: string, regions: Array<Slot['fio'] & { name: string }>): Promise<void> {
  const lines = [
    '[global]', 'ioengine=nbd', `uri=${daemon.uri(VOLUME)}`, 'rw=randwrite', 'bsrange=4k-64k', 'verify=crc32c',
    'verify_state_save=0', 'iodepth=8', 'do_verify=1', 'verify_only=1', 'verify_fatal=1', 'verify_dump=0',
  ];
  for (const r of regions) lines.push(`[${r.name}]`, `offset=${r.offset}`, `size=${r.length}`, `randseed=${r.seed}`);
  const jobFile = path.join(cwd, 'verify.fio');
  await writeFile(jobFile, lines.join('\n') + '\n');
  const result = await run('fio', [jobFile], { timeoutMs: 180_000, cwd });
  const output = result.stdout + result.stderr;
  const failures = output.split('\n').filter((line) => FIO_VERIFY_FAILURE.test(line));
  assert.ok(
    result.code === 0 && !result.timedOut && failures.length === 0,
    `fio --verify_only of ${regions.map((r) => r.name).join(',')} failed (exit ${result.code}):\n` +
      `${failures.slice(0, 10).join('\n')}\n${fioOutput(result)}`,
  );
  const read = /READ: .*io=(\S+)/.exec(result.stdout);
  assert.ok(read, `fio --verify_only read nothing:\n${fioOutput(result)}`);
}

// ---------------------------------------------------------------------------------------
// Byte-exact model of a region written by the test client.

interface ModelRegion extends Range {
  name: string;
  /** What every byte must read as. */
  expected: Buffer;
  /** Sectors (index within the region) that were trimmed last: zeros are allowed too. */
  trimmed: Set<number>;
  /** The operations after the first full write, for failure reports (region-relative). */
  ops: string[];
}

/**
 * Writes (unaligned), zeroes and trims a model region in order, then FLUSH. Returns the
 * model, which is exact from the flush ack on.
 */
async function writeModel(client: NbdClient, rng: Rng, range: Range, name: string): Promise<ModelRegion> {
  const model: ModelRegion = { ...range, name, expected: Buffer.alloc(range.length), trimmed: new Set(), ops: [] };
  const apply = (at: number, data: Buffer) => data.copy(model.expected, at);
  // The whole region once (so nothing is left as never-written zeros), in random pieces.
  for (let at = 0; at < range.length; ) {
    const n = Math.min(range.length - at, rng.aligned(SECTOR, 256 * KiB, SECTOR));
    const data = randomBytes(n);
    await client.write(range.offset + at, data);
    apply(at, data);
    at += n;
  }
  // Unaligned overwrites: read-modify-write of partial sectors, writes across chunks.
  for (let k = rng.int(3, 10); k > 0; k--) {
    const at = rng.int(0, range.length - 1);
    const n = rng.int(1, Math.min(range.length - at, 200 * KiB));
    const data = randomBytes(n);
    const fua = rng.chance(0.1);
    await client.write(range.offset + at, data, { fua });
    apply(at, data);
    model.ops.push(`write${fua ? '+fua' : ''} ${at}+${n}`);
  }
  if (rng.chance(0.5)) {
    const at = rng.int(0, range.length - 1);
    const n = rng.int(1, Math.min(range.length - at, 300 * KiB));
    const noHole = rng.chance(0.5);
    await client.writeZeroes(range.offset + at, n, { noHole });
    model.expected.fill(0, at, at + n);
    model.ops.push(`zero${noHole ? '+nohole' : ''} ${at}+${n}`);
  }
  if (rng.chance(0.4)) {
    // Sector-aligned trim, often covering whole chunks. NBD leaves trimmed contents
    // unspecified; Updraft discards whole chunks (zeros) and leaves partial ones, so each
    // trimmed sector may read as its old content or as zeros, nothing else.
    const first = rng.int(0, range.length / SECTOR - 1);
    const count = rng.int(1, Math.min(range.length / SECTOR - first, 96));
    await client.trim(range.offset + first * SECTOR, count * SECTOR);
    for (let s = first; s < first + count; s++) model.trimmed.add(s);
    model.ops.push(`trim ${first * SECTOR}+${count * SECTOR}`);
  }
  await client.flush();
  return model;
}

/** Compares a model region with what the daemon returns; a description of each bad sector. */
async function checkModel(client: NbdClient, model: ModelRegion): Promise<string[]> {
  const actual = await client.read(model.offset, model.length);
  const zeros = Buffer.alloc(SECTOR);
  const bad: string[] = [];
  // On a mismatch read again: tells corrupt data from a corrupt read reply.
  let again: Buffer | undefined;
  for (let s = 0; s < model.length / SECTOR; s++) {
    const got = actual.subarray(s * SECTOR, (s + 1) * SECTOR);
    const want = model.expected.subarray(s * SECTOR, (s + 1) * SECTOR);
    if (got.equals(want)) continue;
    if (model.trimmed.has(s) && got.equals(zeros)) continue;
    let firstDiff = 0;
    while (got[firstDiff] === want[firstDiff]) firstDiff++;
    let lastDiff = SECTOR - 1;
    while (got[lastDiff] === want[lastDiff]) lastDiff--;
    again ??= await client.read(model.offset, model.length);
    const second = again.subarray(s * SECTOR, (s + 1) * SECTOR);
    const reread = second.equals(got) ? 'same on re-read' : second.equals(want) ? 'CORRECT on re-read' : 'different again on re-read';
    bad.push(
      `${model.name}: sector ${s} (volume offset ${model.offset + s * SECTOR}) bytes ${firstDiff}..${lastDiff} differ` +
        `${got.equals(zeros) ? ' (reads as zeros)' : ''}${model.trimmed.has(s) ? ' (trimmed)' : ''}, ${reread}`,
    );
  }
  if (bad.length > 0) bad.push(`${model.name} at volume offset ${model.offset}, ${model.length} bytes; ops: ${model.ops.join(', ')}`);
  return bad;
}

// ---------------------------------------------------------------------------------------
// Unflushed background traffic on the background areas.

class BackgroundTraffic {
  private stopping = false;
  private workers: Promise<void>[] = [];
  ops = 0;
  bytes = 0;
  /** Why the traffic ended, when it ended by itself (the kill closes the connection). */
  ended: string | null = null;

  constructor(
    private readonly client: NbdClient,
    private readonly rng: Rng,
    /** Areas of this round's slot (hit half the time) and of every slot. */
    private readonly near: Range[],
    private readonly all: Range[],
  ) {}

  start(depth: number): void {
    for (let w = 0; w < depth; w++) this.workers.push(this.loop());
  }

  private async loop(): Promise<void> {
    try {
      while (!this.stopping) await this.one();
    } catch (err) {
      this.ended ??= (err as Error).message;
    }
  }

  private async one(): Promise<void> {
    const rng = this.rng;
    const area = rng.pick(rng.chance(0.5) ? this.near : this.all);
    const kind = rng.u32() % 100;
    const at = area.offset + rng.int(0, area.length - 1);
    const room = area.offset + area.length - at;
    if (kind < 70) {
      // Mostly aligned, sometimes byte-unaligned; up to 256 KiB, across chunk boundaries.
      const aligned = rng.chance(0.7);
      const start = aligned ? area.offset + Math.floor((at - area.offset) / SECTOR) * SECTOR : at;
      const max = Math.min(area.offset + area.length - start, 256 * KiB);
      const n = aligned ? Math.max(SECTOR, Math.floor(rng.int(1, max) / SECTOR) * SECTOR) : rng.int(1, max);
      if (start + n > area.offset + area.length) return;
      await this.client.write(start, randomBytes(n), { fua: rng.chance(0.05) });
      this.bytes += n;
    } else if (kind < 85) {
      const n = rng.int(1, Math.min(room, 512 * KiB));
      await this.client.writeZeroes(at, n, { noHole: rng.chance(0.5) });
    } else {
      const n = rng.int(1, Math.min(room, 1024 * KiB));
      await this.client.trim(at, n);
    }
    this.ops++;
  }

  /** Stops issuing and waits for the requests in flight (or for the connection to die). */
  async stop(): Promise<void> {
    this.stopping = true;
    await Promise.all(this.workers);
  }
}

/** A background fio, stopped by pid (see backgroundFio). */
interface BackgroundFio {
  pid: number;
  /** Last 4 KiB of its stderr. */
  stderr(): string;
  /** SIGKILL its process group and wait for it to exit; resolves to how it ended. */
  stop(): Promise<string>;
}

/**
 * A fio that writes a background area without any flush until it is stopped. Started
 * here rather than through run(): after the daemon dies, fio's nbd engine sometimes
 * spins forever printing "nbd_poll: nothing to poll for in state DEAD", so it is killed
 * by pid right after the daemon, and only the tail of its stderr is kept.
 */
function backgroundFio(daemon: Daemon, cwd: string, area: Range, seed: number): BackgroundFio {
  const size = Math.floor(area.length / (64 * KiB)) * 64 * KiB;
  const args = [
    '--name=background', '--ioengine=nbd', `--uri=${daemon.uri(VOLUME)}`, '--rw=randwrite', '--bsrange=4k-64k',
    '--iodepth=2', `--offset=${area.offset}`, `--size=${size}`, '--norandommap', '--time_based', '--runtime=120',
    `--randseed=${seed}`, '--end_fsync=0',
    // The job as a thread of this process: a forked job process can outlive its parent's
    // SIGKILL in a session of its own and keep the stderr pipe open.
    '--thread',
  ];
  // Its own process group, so the stop reaches anything it starts.
  const child = spawn('fio', args, { cwd, stdio: ['ignore', 'ignore', 'pipe'], detached: true });
  let stderr = '';
  child.stderr!.on('data', (chunk: Buffer) => {
    stderr = (stderr + chunk.toString('utf8')).slice(-4096);
  });
  const exited = new Promise<string>((resolve) => {
    // 'exit', not 'close': the process is gone even if something still holds its stderr.
    child.once('exit', (code, signal) => resolve(code !== null ? `exit ${code}` : `${signal}`));
    child.once('error', (err) => resolve(`spawn failed: ${err.message}`));
  });
  const pid = child.pid ?? -1;
  return {
    pid,
    stderr: () => stderr,
    async stop() {
      if (pid > 0 && child.exitCode === null && child.signalCode === null) killTree(pid);
      return exited;
    },
  };
}

// ---------------------------------------------------------------------------------------

async function metrics(daemon: Daemon): Promise<any> {
  const response = await daemon.api('GET', `/api/exports/${VOLUME}/metrics`);
  assert.equal(response.status, 200, `GET metrics: ${response.text}`);
  return response.json;
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * The tests only SIGKILL the daemon (SIGTERM comes from cleanup, after the test). A
 * "shutting down" line in the log means something outside the test signalled it, which
 * explains a "connection closed by peer" that is no fault of the daemon.
 */
function outsideSignal(daemon: Daemon): string {
  const line = daemon.log().split('\n').find((l) => l.includes('shutting down'));
  return line ? ` [NOTE: the daemon was signalled from outside the test: ${line.trim()}]` : '';
}

/** Error-level lines (failed seals, flushes, slab writes, requests) and lost-state warnings. */
function recoveryProblems(log: string): string[] {
  return log.split('\n').filter((line) => / ERROR |cannot recover|does not hold/.test(line));
}

test(`flushed data survives SIGKILL at ${ROUNDS} random points under load and background sealing`, async (t: TestContext) => {
  if (!requireTools(t, [TOOLS.fio])) return;
  const seed = SEED;
  t.diagnostic(`crash seed ${seed} (replay: UPDRAFT_CRASH_SEED=${seed})`);
  console.log(`crash seed ${seed} (replay: UPDRAFT_CRASH_SEED=${seed})`);
  const rng = new Rng(seed);
  const slots = layoutSlots(rng);
  const allBackground = slots.flatMap((s) => s.background);

  const work = await scratchDir('updraft-crash-');
  const daemon = await startDaemon({ toml: { ...SEALING_ALL_THE_TIME, servers: { nbd: { auto_create_size_gb: 1 } } } });
  const clients = new Set<NbdClient>();
  const fios = new Set<BackgroundFio>();
  t.after(async () => {
    for (const client of clients) client.close();
    await daemon.kill9();
    await Promise.allSettled([...fios].map((fio) => fio.stop()));
    await daemon.cleanup();
    await removeDir(work);
  });
  const connect = async () => {
    const client = await NbdClient.connect({ path: daemon.socket, exportName: VOLUME, commandTimeoutMs: 60_000 });
    clients.add(client);
    return client;
  };

  const fioDone: Array<Slot['fio'] & { name: string }> = [];
  const models: ModelRegion[] = [];
  const summary: string[] = [];
  let sealedTotal = 0;
  let killsWhileDirty = 0;
  /** Rounds where chunks were sealed in the delay just before the kill. */
  let killsWhileSealing = 0;

  for (const slot of slots) {
    const i = slot.index;
    const where = `seed ${seed}, round ${i}`;
    const roundStart = performance.now();
    try {
      // busy: client traffic and a fio through the kill; client: client traffic only;
      // idle: traffic stops before the delay, so the idle sealer seals and commits in it.
      const mode = rng.pick(['busy', 'busy', 'client', 'idle'] as const);
      const killDelay = rng.int(0, 400);
      const bgRng = new Rng(rng.u32());
      const bgClient = await connect();
      const modelClient = await connect();
      const background = new BackgroundTraffic(bgClient, bgRng, slot.background, allBackground);
      background.start(rng.int(1, 3));
      let bgFio: BackgroundFio | null = null;
      if (mode === 'busy') {
        const area = rng.pick(allBackground.filter((a) => a.length >= 4 * MiB));
        bgFio = backgroundFio(daemon, work, area, rng.int(1, 2 ** 31 - 1));
        fios.add(bgFio);
      }

      // (a) fio writes its region and ends with FLUSH; the daemon must have seen the FLUSH.
      const flushesBefore = (await metrics(daemon)).ops.flush.count;
      const name = `r${i}`;
      const tw0 = performance.now();
      await fioWrite(daemon, work, slot.fio, name);
      const fioMs = performance.now() - tw0;
      const flushesAfter = (await metrics(daemon)).ops.flush.count;
      assert.ok(flushesAfter > flushesBefore, `fio --end_fsync=1 sent NBD FLUSH (flush count ${flushesBefore} -> ${flushesAfter})`);
      fioDone.push({ ...slot.fio, name });

      // The model region: exact bytes, flushed. Checked once before the kill too, so a
      // mismatch after it is known to come from the crash.
      const tm0 = performance.now();
      const model = await writeModel(modelClient, rng, slot.model, `model${i}`);
      const modelMs = performance.now() - tm0;
      const beforeKill = await checkModel(modelClient, model);
      assert.deepEqual(beforeKill, [], `model region ${i} is wrong BEFORE the kill (${where})`);
      models.push(model);

      // (b)/(c) background traffic keeps going ('busy', 'fio') or stops so the idle sealer
      // seals and commits during the delay ('idle'); then SIGKILL.
      if (mode === 'idle') await background.stop();
      const atDelay = await metrics(daemon);
      await sleep(killDelay);
      const m = await metrics(daemon);
      await daemon.kill9();
      sealedTotal += m.chunks_sealed;
      if (m.dirty_bytes > 0) killsWhileDirty++;
      const sealedInDelay = m.chunks_sealed - atDelay.chunks_sealed;
      if (sealedInDelay > 0) killsWhileSealing++;
      await background.stop();
      const bgFioEnd = bgFio ? await bgFio.stop() : null;
      if (bgFio) fios.delete(bgFio);
      bgClient.close();
      modelClient.close();
      clients.delete(bgClient);
      clients.delete(modelClient);
      summary.push(
        `round ${i}: ${mode}, kill after ${killDelay} ms; background ${background.ops} ops` +
          `${bgFioEnd ? ` + fio (${bgFioEnd})` : ''}; at the kill: sealed=${m.chunks_sealed} ` +
          `(${sealedInDelay} in the delay) ` +
          `dirty=${(m.dirty_bytes / MiB).toFixed(1)}MiB mapped=${m.mapped_chunks}; ` +
          `fio write ${(slot.fio.length / MiB).toFixed(1)} MiB ${fioMs.toFixed(0)} ms, model ${modelMs.toFixed(0)} ms`,
      );

      // (d) restart; every region flushed so far must be intact.
      const t0 = performance.now();
      await daemon.restart();
      const t1 = performance.now();
      await fioVerify(daemon, work, fioDone);
      const t2 = performance.now();
      const checker = await connect();
      const bad: string[] = [];
      for (const region of models) bad.push(...(await checkModel(checker, region)));
      await checker.disconnect();
      clients.delete(checker);
      assert.deepEqual(bad.slice(0, 30), [], `model regions are wrong after the kill (${where})`);
      summary[summary.length - 1] += `; restart ${(t1 - t0).toFixed(0)} ms, fio verify ${(t2 - t1).toFixed(0)} ms, round ${(performance.now() - roundStart).toFixed(0)} ms`;
      console.log(summary[summary.length - 1]); // progress now; the diagnostics come at the end
    } catch (err) {
      for (const line of summary) t.diagnostic(line);
      t.diagnostic(`daemon log (tail):`);
      for (const line of tail(daemon.log(), 40).split('\n')) t.diagnostic(line);
      (err as Error).message = `[${where}] ${(err as Error).message}${outsideSignal(daemon)}`;
      throw err;
    }
  }

  const log = daemon.log();
  const recovered = log.split('\n').filter((line) => line.includes(`recovered volume volume=${VOLUME} `)).length;
  assert.equal(recovered, ROUNDS, 'the daemon log shows one "recovered volume" line per restart');
  assert.deepEqual(recoveryProblems(log), [], 'no errors in the daemon log');
  assert.ok(sealedTotal > 0, 'background sealing ran before the kills');
  assert.ok(killsWhileDirty > 0, 'some kills found unsealed overlay data');
  assert.ok(killsWhileSealing > 0, 'some kills came while the sealer was sealing');
  t.diagnostic(
    `seed ${seed}: ${ROUNDS} kills (${killsWhileDirty} with overlay data, ${killsWhileSealing} with sealing in the last ` +
      `delay), ${fioDone.length} fio regions and ${models.length} model regions verified`,
  );
});

test('an unflushed overwrite of flushed data reads back per sector as old or new after SIGKILL', async (t: TestContext) => {
  const seed = SEED;
  t.diagnostic(`overwrite seed ${seed} (replay: UPDRAFT_CRASH_SEED=${seed})`);
  const rng = new Rng(seed ^ 0x5a5a5a5a);
  const daemon = await startDaemon({ toml: { ...SEALING_ALL_THE_TIME, servers: { nbd: { auto_create_size_gb: 1 } } } });
  const clients = new Set<NbdClient>();
  t.after(async () => {
    for (const client of clients) client.close();
    await daemon.cleanup();
  });
  const connect = async () => {
    const client = await NbdClient.connect({ path: daemon.socket, exportName: VOLUME, commandTimeoutMs: 60_000 });
    clients.add(client);
    return client;
  };

  /** Writes `data` at offset in aligned pieces of random size, pipelined. */
  const writePieces = (client: NbdClient, offset: number, data: Buffer): Promise<void>[] => {
    const writes: Promise<void>[] = [];
    for (let at = 0; at < data.length; ) {
      const n = Math.min(data.length - at, rng.aligned(SECTOR, MiB, SECTOR));
      writes.push(client.write(offset + at, data.subarray(at, at + n)));
      at += n;
    }
    return writes;
  };

  const SIZE = 8 * MiB;
  const variants = [
    { name: 'overwrite right after the flush, kill at once', sealA: false, awaitB: true, delay: 0 },
    { name: 'A sealed and committed first, B in the overlay at the kill', sealA: true, awaitB: true, delay: 0 },
    { name: 'B being sealed at the kill', sealA: true, awaitB: true, delay: rng.int(40, 200) },
    { name: 'kill with B writes still in flight', sealA: false, awaitB: false, delay: 0 },
    { name: 'A sealed, kill with B writes in flight', sealA: true, awaitB: false, delay: rng.int(0, 30) },
  ];
  const regions: Array<{ name: string; offset: number; a: Buffer; b: Buffer }> = [];

  try {
    for (const [k, variant] of variants.entries()) {
      // Fresh region per variant, not chunk-aligned.
      const offset = k * 32 * MiB + rng.aligned(SECTOR, CHUNK - SECTOR, SECTOR);
      const a = randomBytes(SIZE);
      const b = randomBytes(SIZE);
      const client = await connect();
      await Promise.all(writePieces(client, offset, a));
      await client.flush();
      if (variant.sealA) {
        const deadline = Date.now() + 20_000;
        while ((await metrics(daemon)).dirty_bytes > 0) {
          assert.ok(Date.now() < deadline, 'the volume never became clean (sealing stalled)');
          await sleep(20);
        }
        await sleep(100); // the sealer's journal commit follows the seal
      }
      const writesB = writePieces(client, offset, b);
      for (const w of writesB) w.catch(() => undefined); // in-flight writes fail with the kill
      if (variant.awaitB) await Promise.all(writesB);
      if (variant.delay > 0) await sleep(variant.delay);
      await daemon.kill9();
      client.close();
      clients.delete(client);
      regions.push({ name: variant.name, offset, a, b });

      await daemon.restart();
      const checker = await connect();
      for (const region of regions) {
        const got = await checker.read(region.offset, SIZE);
        let asA = 0;
        let asB = 0;
        const bad: string[] = [];
        for (let s = 0; s < SIZE / SECTOR; s++) {
          const sector = got.subarray(s * SECTOR, (s + 1) * SECTOR);
          if (sector.equals(region.a.subarray(s * SECTOR, (s + 1) * SECTOR))) asA++;
          else if (sector.equals(region.b.subarray(s * SECTOR, (s + 1) * SECTOR))) asB++;
          else bad.push(`sector ${s} (offset ${region.offset + s * SECTOR})${sector.equals(Buffer.alloc(SECTOR)) ? ' is zeros' : ''}`);
        }
        if (region === regions[regions.length - 1]) t.diagnostic(`${region.name}: ${asA} sectors old, ${asB} new, ${bad.length} neither`);
        assert.deepEqual(
          bad.slice(0, 20),
          [],
          `"${region.name}" (checked after kill ${regions.length}, seed ${seed}): ${bad.length} sectors are neither the flushed nor the unflushed data`,
        );
      }
      await checker.disconnect();
      clients.delete(checker);
    }
  } catch (err) {
    (err as Error).message = `[seed ${seed}] ${(err as Error).message}${outsideSignal(daemon)}`;
    throw err;
  }
  assert.deepEqual(recoveryProblems(daemon.log()), [], 'no errors in the daemon log');
});
