// A power cut loses no FLUSHed write (DESIGN.md invariant 1).
//
// SIGKILL (crash.test.ts) keeps the kernel's page cache, so it cannot see a missing
// fdatasync. Here the cache folder is on ext4 on a disk with a volatile write cache
// (harness/power-cut-disk.ts): a cut loses every write the filesystem did not flush, as
// a real power cut does. Each round runs, in an order that puts a different one last,
// the writes whose FLUSH takes a different path: new writes into fresh chunks (journal
// records change), rewrites of present sectors (only the overlay and the sequence change),
// writes over chunks sealed into the block cache, FUA writes, and zeroes and trims. Then
// unflushed writes, SIGKILL of the daemon, the power cut, the disk and the daemon back on
// the same folder: every 4 KiB sector reads as its last flushed content or as a write
// after it, never older content and never zeros where data was flushed. One seeded PRNG
// drives the run; the seed is printed and UPDRAFT_POWER_CUT_SEED replays it.

import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { test } from 'node:test';
import { startDaemon, type Daemon } from './harness/daemon.js';
import { Rng } from './harness/history-load.js';
import { canMountNbdDisks } from './harness/nbd-disk.js';
import { NbdClient } from './harness/nbd-client.js';
import { startPowerCutDisk, type PowerCutDisk } from './harness/power-cut-disk.js';

const KiB = 1024;
const SECTOR = 4 * KiB;
const CHUNK = 128 * KiB;
const VOLUME = 'powercut';
const ROUNDS = 5;
/** Chunks the model covers; each round writes fresh ones from the next unused. */
const CHUNKS = 64;
const SECTORS = (CHUNKS * CHUNK) / SECTOR;
const SEAL_IDLE_MS = 200;
/** What the daemon logs when a restart lays writes a FLUSH logged in the journal over the overlay. */
const LAID_LOGGED = 'laid logged writes over the overlay';
const ZEROS = Buffer.alloc(SECTOR);

/** Sector contents that follow from the PRNG, so a replay writes the same bytes. */
function sectorBytes(rng: Rng, count: number): Buffer {
  const bytes = Buffer.alloc(count * SECTOR);
  for (let i = 0; i < bytes.length; i += 4) bytes.writeUInt32LE(rng.u32(), i);
  return bytes;
}

function seedFromEnv(): number {
  const fromEnv = process.env.UPDRAFT_POWER_CUT_SEED;
  if (fromEnv === undefined || fromEnv === '') return randomBytes(4).readUInt32BE(0);
  const seed = Number(fromEnv);
  if (!Number.isInteger(seed) || seed < 0 || seed >= 2 ** 32) throw new Error(`UPDRAFT_POWER_CUT_SEED=${fromEnv}: want an integer in [0, 2^32)`);
  return seed;
}

/**
 * What each sector may read as. `now`: before a cut (more than one after a trim, which may
 * leave the old content). `flushed`: after a cut, as of the last FLUSH or FUA write that
 * covered it; `later`: what was written after that, also allowed after a cut.
 */
interface SectorModel {
  now: Buffer[];
  flushed: Buffer[];
  later: Buffer[];
  /** What `flushed` was before the last durable write replaced it, for failure reports. */
  older: Buffer[];
  /** The last operation on the sector, for failure reports. */
  last: string;
}

class VolumeModel {
  readonly sectors: SectorModel[] = Array.from({ length: SECTORS }, () => ({ now: [ZEROS], flushed: [ZEROS], later: [], older: [], last: 'never written' }));

  private set(first: number, count: number, what: string, contents: (s: number) => Buffer[], durable: boolean): void {
    for (let s = first; s < first + count; s++) {
      const sector = this.sectors[s];
      sector.now = contents(s);
      sector.last = what;
      if (durable) {
        sector.older = sector.flushed;
        sector.flushed = sector.now;
        sector.later = [];
      } else {
        sector.later.push(...sector.now);
      }
    }
  }

  write(first: number, data: Buffer, what: string, fua: boolean): void {
    this.set(first, data.length / SECTOR, what, (s) => [data.subarray((s - first) * SECTOR, (s - first + 1) * SECTOR)], fua);
  }

  zero(first: number, count: number, what: string): void {
    this.set(first, count, what, () => [ZEROS], false);
  }

  /** NBD leaves trimmed contents unspecified; Updraft reads them as zeros or the old content. */
  trim(first: number, count: number, what: string): void {
    this.set(first, count, what, (s) => [...this.sectors[s].now, ZEROS], false);
  }

  flush(): void {
    for (const sector of this.sectors) {
      if (sector.later.length > 0) sector.older = sector.flushed;
      sector.flushed = sector.now;
      sector.later = [];
    }
  }

  /** Sectors of `volume` (the model's range read back) that read as nothing allowed `when`. */
  check(volume: Buffer, when: 'now' | 'after the cut'): string[] {
    const bad: string[] = [];
    for (let s = 0; s < SECTORS; s++) {
      const got = volume.subarray(s * SECTOR, (s + 1) * SECTOR);
      const sector = this.sectors[s];
      const allowed = when === 'now' ? sector.now : [...sector.flushed, ...sector.later];
      if (allowed.some((content) => content.equals(got))) continue;
      const older = sector.older.some((content) => content.equals(got)) ? ', reads as the content flushed before' : '';
      const zeros = got.equals(ZEROS) ? ', reads as zeros' : '';
      bad.push(`sector ${s} (offset ${s * SECTOR}, chunk ${Math.floor((s * SECTOR) / CHUNK)}) ${when}: not any allowed content${older}${zeros}; last op: ${sector.last}`);
    }
    return bad;
  }

  /** After a cut, what was read is exact. */
  settle(volume: Buffer): void {
    for (let s = 0; s < SECTORS; s++) {
      const sector = this.sectors[s];
      sector.now = [Buffer.from(volume.subarray(s * SECTOR, (s + 1) * SECTOR))];
      sector.flushed = sector.now;
      sector.later = [];
    }
  }
}

type Step = 'fresh' | 'rewrite' | 'sealed' | 'fua' | 'zero-trim';
const STEPS: readonly Step[] = ['fresh', 'rewrite', 'sealed', 'fua', 'zero-trim'];

test('a power cut loses no FLUSHed write: fresh chunks, rewrites of present sectors, sealed chunks, FUA, zeroes and trims', { timeout: 600_000 }, async (t) => {
  if (!canMountNbdDisks(t)) return;
  const seed = seedFromEnv();
  t.diagnostic(`seed ${seed} (replay: UPDRAFT_POWER_CUT_SEED=${seed})`);
  const rng = new Rng(seed);
  let disk: PowerCutDisk | undefined;
  let daemon: Daemon | undefined;
  let client: NbdClient | undefined;
  try {
    disk = await startPowerCutDisk();
    const cacheDir = path.join(disk.mountDir, 'cache');
    daemon = await startDaemon({ toml: { cache: { dir: cacheDir }, volumes: { seal_idle_ms: SEAL_IDLE_MS } } });
    const connect = () => NbdClient.connect({ path: daemon!.socket, exportName: VOLUME });
    const dirtyChunks = async () => (await daemon!.api('GET', `/api/exports/${VOLUME}/metrics`)).json.dirty_chunks as number;
    client = await connect();
    const model = new VolumeModel();
    const log: string[] = [];
    let nextFresh = 0;

    const write = async (first: number, count: number, opts: { fua?: boolean } = {}) => {
      const data = sectorBytes(rng, count);
      const what = `write${opts.fua ? '+fua' : ''} sectors ${first}+${count}`;
      await client!.write(first * SECTOR, data, opts);
      model.write(first, data, what, opts.fua === true);
      log.push(what);
    };
    const flush = async () => {
      await client!.flush();
      model.flush();
      log.push('flush');
    };
    /** A run of sectors already written, within one chunk or across two. */
    const written = (maxCount: number): [number, number] => {
      const end = (nextFresh * CHUNK) / SECTOR;
      const first = rng.int(0, end - 1);
      return [first, rng.int(1, Math.min(maxCount, end - first))];
    };
    /** Writes 1 to 3 chunks never written before (or `count`) and FLUSHes: the journal gets records for them. */
    const freshChunks = async (count?: number): Promise<[number, number]> => {
      const chunks = count ?? rng.int(1, 3);
      assert.ok(nextFresh + chunks <= CHUNKS, 'the model has fresh chunks left');
      const first = (nextFresh * CHUNK) / SECTOR;
      for (let c = nextFresh; c < nextFresh + chunks; c++) await write((c * CHUNK) / SECTOR, CHUNK / SECTOR);
      nextFresh += chunks;
      await flush();
      return [first, (chunks * CHUNK) / SECTOR];
    };
    const steps: Record<Step, () => Promise<void>> = {
      async fresh() {
        await freshChunks();
      },
      // Sectors present in the overlay written again: no record changes, the FLUSH may sync only the overlay.
      async rewrite() {
        const [start, count] = await freshChunks();
        for (let k = rng.int(2, 6); k > 0; k--) {
          const first = start + rng.int(0, count - 1);
          await write(first, rng.int(1, Math.min(24, start + count - first)));
        }
        await flush();
      },
      // Chunks sealed into blocks, then written over: the overlay holds the new sectors over the block.
      async sealed() {
        await freshChunks();
        const deadline = Date.now() + 30_000;
        while ((await dirtyChunks()) > 0) {
          assert.ok(Date.now() < deadline, 'the volume sealed its chunks within 30 s');
          await new Promise((resolve) => setTimeout(resolve, 50));
        }
        log.push('sealed');
        for (let k = rng.int(2, 6); k > 0; k--) await write(...written(48));
        await flush();
      },
      // FUA writes: durable on their own, no FLUSH.
      async fua() {
        for (let k = rng.int(2, 5); k > 0; k--) await write(...written(32), { fua: true });
      },
      async 'zero-trim'() {
        for (let k = rng.int(2, 5); k > 0; k--) {
          const [first, count] = written(64);
          if (rng.chance(0.5)) {
            await client!.writeZeroes(first * SECTOR, count * SECTOR);
            model.zero(first, count, `zero sectors ${first}+${count}`);
            log.push(`zero sectors ${first}+${count}`);
          } else {
            await client!.trim(first * SECTOR, count * SECTOR);
            model.trim(first, count, `trim sectors ${first}+${count}`);
            log.push(`trim sectors ${first}+${count}`);
          }
        }
        await flush();
      },
    };

    await steps.fresh();
    let laidRounds = 0;
    for (let round = 1; round <= ROUNDS; round++) {
      // A different kind of step last in each round, just before the unflushed writes and the cut.
      const last = STEPS[(round - 1) % STEPS.length];
      const order = STEPS.filter((step) => step !== last);
      for (let i = order.length - 1; i > 0; i--) {
        const j = rng.int(0, i);
        [order[i], order[j]] = [order[j], order[i]];
      }
      for (const step of [...order, last]) {
        log.push(`-- ${step}`);
        await steps[step]();
      }
      // Even rounds cut before the volume is idle long enough to seal (a seal syncs what it
      // seals), odd rounds while or after it seals.
      const early = round % 2 === 0;
      // An early cut comes before the idle write-back syncs the overlay: a last FLUSH of one
      // fresh chunk (less than a FLUSH logs) leaves the restart a logged write to lay.
      if (early) {
        log.push('-- fresh chunk, logged');
        await freshChunks(1);
      }
      const mismatches = model.check(await client.read(0, CHUNKS * CHUNK), 'now');
      assert.deepEqual(mismatches, [], `round ${round}: the volume reads as written before the cut (seed ${seed})`);
      log.push('-- unflushed');
      for (let k = rng.int(1, 6); k > 0; k--) await write(...written(40));
      await new Promise((resolve) => setTimeout(resolve, early ? rng.int(0, SEAL_IDLE_MS / 4) : rng.int(SEAL_IDLE_MS, 2 * SEAL_IDLE_MS)));
      await daemon.kill9();
      client.close();
      client = undefined;
      // Written, never synced: the cut must lose it, or the harness cuts no power.
      const unsynced = path.join(disk.mountDir, 'unsynced');
      const unsyncedBytes = Buffer.alloc(256 * KiB, 'written, never synced ');
      if (round === 1) await fsp.writeFile(unsynced, unsyncedBytes);
      await disk.cut();
      await disk.restart();
      if (round === 1) {
        const survived = await fsp.readFile(unsynced).catch((err: NodeJS.ErrnoException) => {
          if (err.code === 'ENOENT') return Buffer.alloc(0);
          throw err;
        });
        assert.ok(!survived.equals(unsyncedBytes), 'a file written without fsync before the power cut is lost');
        t.diagnostic(`the unsynced file after the cut: ${survived.length === 0 ? 'gone or empty' : `${survived.length} bytes, not the written ones`}`);
      }
      const laidBefore = daemon.log().split(LAID_LOGGED).length;
      await daemon.restart();
      if (daemon.log().split(LAID_LOGGED).length > laidBefore) laidRounds++;
      client = await connect();
      const replay = `seed ${seed}, replay UPDRAFT_POWER_CUT_SEED=${seed}`;
      const volume = await client.read(0, CHUNKS * CHUNK).catch((err: Error) => {
        assert.fail(`round ${round}: reading the volume after the power cut failed: ${err.message} (${replay})\noperations this round:\n${log.join('\n')}`);
      });
      const lost = model.check(volume, 'after the cut');
      assert.deepEqual(lost.slice(0, 20), [], `round ${round}: ${lost.length} sectors lost a flushed write across the power cut (${replay})\noperations this round:\n${log.join('\n')}`);
      model.settle(volume);
      log.length = 0;
    }
    // The early rounds recover writes that FLUSHes logged in the journal.
    assert.ok(laidRounds >= Math.floor(ROUNDS / 2), `only ${laidRounds} restarts laid logged writes over the overlay (${ROUNDS} rounds, seed ${seed})`);
    t.diagnostic(`${laidRounds} of ${ROUNDS} restarts laid logged writes over the overlay`);
  } finally {
    client?.close();
    await daemon?.cleanup();
    await disk?.stop();
  }
});
