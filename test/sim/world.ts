// The simulated fleet of one seed: hosts (each its own disk and process incarnation),
// one object store bucket and one refcount database shared by all of them.
import { PLAINTEXT } from '../../src/crypto/cipher.js';
import { parseCompression } from '../../src/crypto/compress.js';
import { useDisk } from '../../src/disk/disk.js';
import { Collector } from '../../src/gc/collector.js';
import { PackRefcounts } from '../../src/gc/refcounts.js';
import { SqliteDatabase } from '../../src/gc/sql.js';
import { Host } from '../../src/host/host.js';
import type { Logger } from '../../src/log.js';
import { setPackThreads } from '../../src/store/pack-threads.js';
import { clock, runAs, type Actor } from './clock.js';
import { routedDisk, SimDisk, type DiskFaults } from './disk.js';
import { SimBucket, type StoreFaults } from './store.js';

export const BLOCK = 65536;
export const MEMORY_BLOCKS = 6;
export const LEASE_TTL_MS = 10_000;

/** Log lines of the hosts, kept for the failure report (the last ones only). */
export class SimLog {
  lines: string[] = [];
  logger(component: string): Logger {
    const emit = (level: string) => (msg: string, fields?: Record<string, unknown>) => {
      if (level === 'debug') return;
      this.lines.push(`${clock.now - 1893456000000}ms ${level} ${component}: ${msg}${fields ? ' ' + JSON.stringify(fields) : ''}`);
      if (this.lines.length > 400) this.lines.splice(0, 200);
    };
    return { debug: emit('debug'), info: emit('info'), warn: emit('warn'), error: emit('error'), child: (name) => this.logger(`${component}.${name}`) };
  }
}

export interface Slot {
  index: number;
  id: string;
  disk: SimDisk;
  actor: Actor;
  host?: Host;
  refcounts?: PackRefcounts;
  collector?: Collector;
  up: boolean;
  incarnation: number;
}

/** How long after its intent a manifest PUT may still land in the simulated store. */
const INTENT_SETTLE_MS = 1000;
const disks = new WeakMap<Actor, SimDisk>();
let installed = false;

export interface WorldSettings {
  hosts: number;
  disk: DiskFaults;
  store: StoreFaults;
  gracePeriodMs: number;
  dirtyBudgetBytes: number;
  /** Blocks the disk tier of each cache holds. */
  diskBlocks: number;
}

export class World {
  readonly slots: Slot[] = [];
  readonly bucket: SimBucket;
  readonly db: SqliteDatabase;
  readonly log = new SimLog();

  constructor(
    readonly random: () => number,
    readonly settings: WorldSettings,
  ) {
    if (!installed) {
      installed = true;
      clock.install();
      useDisk(routedDisk((actor) => disks.get(actor)!));
      setPackThreads(0);
    }
    clock.reset();
    this.bucket = new SimBucket(random, settings.store);
    this.db = new SqliteDatabase(':memory:');
    for (let i = 0; i < settings.hosts; i++) {
      const disk = new SimDisk(random, { ...settings.disk });
      const actor = { name: `h${i}#0`, alive: false };
      this.slots.push({ index: i, id: `h${i}`, disk, actor, up: false, incarnation: 0 });
    }
  }

  /** Start (or restart) the host process of a slot: recover its volumes from its disk. */
  async boot(slot: Slot): Promise<void> {
    slot.incarnation++;
    slot.actor = { name: `${slot.id}#${slot.incarnation}`, alive: true };
    disks.set(slot.actor, slot.disk);
    const store = this.bucket.view(slot.id);
    const log = this.log.logger(slot.id);
    const started = runAs(slot.actor, async () => {
      // A simulated PUT lands within the store's latency (at most 50 ms) of being sent, so an
      // intent a second old can no longer land; with 0, a GC cycle reverted a drain's manifest
      // write still in flight and the pack it named was deleted once it landed.
      const refcounts = await PackRefcounts.open(this.db, { hostId: slot.id, store, settleMs: INTENT_SETTLE_MS, log: log.child('gc') });
      const host = Host.open(
        {
          cacheDir: `/${slot.id}`, blockSize: BLOCK, diskBytes: this.settings.diskBlocks * BLOCK, memoryBytes: MEMORY_BLOCKS * BLOCK, autoCreateBytes: 0,
          sealIdleMs: 300, sealDirtyBytes: 4 * BLOCK, store, compression: parseCompression('zstd'), manifestCompression: parseCompression('zstd'),
          cipher: PLAINTEXT, blocksPerPack: 4, readAheadPacks: 1, hostId: slot.id, leaseTtlMs: LEASE_TTL_MS, clockSkewMarginMs: 1000, flushMode: 'demand',
          dirtyBudgetBytes: this.settings.dirtyBudgetBytes, continuousBlockIntervalMs: 1000, continuousManifestIntervalMs: 5000, refcounts,
          // Read-only copies follow their writers (a durable one its log too): failovers promote what a replica served.
          replicaFollowIntervalMs: 1000,
        },
        log,
      );
      const collector = new Collector(
        refcounts, store, PLAINTEXT,
        { gracePeriodMs: this.settings.gracePeriodMs, intervalMs: 5000, reconcileIntervalMs: 20_000, maxDeletionsPerCycle: 100, dryRun: false },
        log.child('collector'), host.packIndex,
      );
      return { refcounts, host, collector };
    });
    let done: { refcounts: PackRefcounts; host: Host; collector: Collector } | undefined;
    let failed: unknown;
    started.then((r) => (done = r), (err) => (failed = err));
    await clock.until(() => done !== undefined || failed !== undefined, 60_000);
    if (failed !== undefined) throw failed;
    if (done === undefined) throw new Error(`host ${slot.id} did not start within 60 s of virtual time`);
    Object.assign(slot, done, { up: true });
  }

  /** SIGKILL: the process is gone; the page cache keeps every write it made. */
  kill(slot: Slot): void {
    slot.actor.alive = false;
    slot.up = false;
    slot.host = undefined;
    slot.collector = undefined;
    slot.refcounts = undefined;
    slot.disk.kill();
  }

  /** Power cut: the process is gone and only what reached the medium survives. */
  powerCut(slot: Slot): void {
    this.kill(slot);
    slot.disk.powerCut();
  }
}
