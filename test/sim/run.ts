// One seed of the simulation: a random workload over the world's hosts, checked against
// the reference model after every step. See docs/simulation.md.
import { leaseKey } from '../../src/store/manifest.js';
import { decodeManifestBody } from '../../src/store/manifest-decode.js';
import { decodeLease, leaseIsLiveAt } from '../../src/store/lease.js';
import { PLAINTEXT } from '../../src/crypto/cipher.js';
import { injected, type InjectedFault } from '../../src/faults/injected.js';
import { prng } from '../../src/objectstore/faults.js';
import { decodePackIndex, packKey } from '../../src/store/pack.js';
import { blockKey, keyHex } from '../../src/blocks/cache.js';
import { ZERO_ALLOCATED_KEY } from '../../src/volume/blockmap.js';
import { SECTOR, type Volume } from '../../src/volume/volume.js';
import { clock, runAs } from './clock.js';
import { decodeUnit, fillUnit, openInSnapshot, UNIT, VolumeModel } from './model.js';
import { followsWriter } from '../../src/host/follow.js';
import { BLOCK, LEASE_TTL_MS, MEMORY_BLOCKS, World, type Slot } from './world.js';

export interface SimOptions {
  seed: number;
  /** Steps to run (the workload is the same prefix for any budget: shrinking lowers it). */
  steps: number;
  /** Deliberate bugs to switch on (src/faults/injected.ts). */
  faults?: InjectedFault[];
  /** Steps whose operation is skipped (shrinking drops them). */
  skip?: ReadonlySet<number>;
  /** Settings that replace what the seed drew (a teeth test aims the run at its fault). */
  settings?: SimSettings;
}

/** The drawn settings a run may fix (see SimOptions.settings). */
export interface SimSettings {
  fsyncErrorRate?: number;
  gracePeriodMs?: number;
  dirtyBudgetBytes?: number;
  diskBlocks?: number;
  maxLatencyMs?: number;
}

export interface SimResult {
  seed: number;
  steps: number;
  failure?: { step: number; message: string };
  trace: string[];
  log: string[];
  /** Steps skipped (a shrunk run). */
  skipped?: number[];
}

class Failure extends Error {}

/** The operation's outcome after driving the clock until it settled or its host died. */
type Outcome<T> = { ok: true; value: T } | { ok: false; error: unknown } | { ok: false; died: true };

const MAX_OP_MS = 120_000;

export async function runSeed(opts: SimOptions): Promise<SimResult> {
  injected.clear();
  for (const f of opts.faults ?? []) injected.add(f);
  // The world (disk and store timing and faults) draws from one stream; each step's
  // workload from its own, so dropping a step (shrinking) leaves the others' operations as they were.
  const worldRandom = prng(opts.seed);
  let random = worldRandom;
  const pick = <T>(items: readonly T[]): T => items[Math.floor(random() * items.length)];
  const chance = (p: number) => random() < p;
  // Whether a write or read takes the thread-pool path: a stream of its own, so that adding
  // that choice left every seed's workload as it was.
  const ioPath = prng(opts.seed * 7_919 + 13);
  const threadPool = () => ioPath() < 0.5;
  // Whether a small read takes the slab through the thread pool, as one whose pages the
  // page cache dropped does (Volume.readLater): a stream of its own too.
  const slabPath = prng(opts.seed * 104_729 + 7);
  const slabLater = () => slabPath() < 0.5;
  const fsyncErrors = chance(0.3);
  const fixed = opts.settings ?? {};
  // Every draw is made whether or not a setting replaces it: the rest of the run stays the same.
  const drawn = {
    hosts: chance(0.5) ? 2 : 3,
    disk: { fsyncErrorRate: fsyncErrors ? 0.05 : 0, capacityBytes: chance(0.1) ? 40 * BLOCK : 1 << 30 },
    store: { errorRate: chance(0.5) ? 0.02 : 0, lostReplyRate: chance(0.5) ? 0.05 : 0, maxLatencyMs: pick([0, 5, 50]) },
    gracePeriodMs: pick([0, 1000, 30_000]),
    dirtyBudgetBytes: pick([2 * BLOCK, 4 * BLOCK, 1 << 30]),
    diskBlocks: pick([16, 24, 48]),
  };
  const world = new World(worldRandom, {
    ...drawn,
    disk: { ...drawn.disk, fsyncErrorRate: fixed.fsyncErrorRate ?? drawn.disk.fsyncErrorRate },
    store: { ...drawn.store, maxLatencyMs: fixed.maxLatencyMs ?? drawn.store.maxLatencyMs },
    gracePeriodMs: fixed.gracePeriodMs ?? drawn.gracePeriodMs,
    dirtyBudgetBytes: fixed.dirtyBudgetBytes ?? drawn.dirtyBudgetBytes,
    diskBlocks: fixed.diskBlocks ?? drawn.diskBlocks,
  });
  const trace: string[] = [`#0 settings: ${JSON.stringify(world.settings)}`];
  const models = new Map<string, VolumeModel>();
  let nextWrite = 1;
  let nextName = 0;
  let step = 0;
  const result = (failure?: { step: number; message: string }): SimResult => {
    injected.clear();
    return { seed: opts.seed, steps: step, failure, trace, log: world.log.lines.slice(-60), skipped: [...(opts.skip ?? [])].sort((a, b) => a - b) };
  };
  const note = (line: string) => trace.push(`#${step} ${line}`);

  /** Run `work` as host code of `slot`, driving the clock until it settles or the host dies. */
  async function drive<T>(slot: Slot, work: () => Promise<T>): Promise<Outcome<T>> {
    const actor = slot.actor;
    let out: Outcome<T> | undefined;
    runAs(actor, () => work().then((value) => (out = { ok: true, value }), (error) => (out = { ok: false, error })));
    await clock.until(() => out !== undefined || !actor.alive, MAX_OP_MS);
    if (out !== undefined) return out;
    if (!actor.alive) return { ok: false, died: true };
    throw new Failure(`host ${slot.id}: an operation did not finish within ${MAX_OP_MS / 1000} s of virtual time`);
  }

  const up = () => world.slots.filter((s) => s.up);
  const served = () => [...models.values()].filter((m) => m.home !== undefined && world.slots[m.home].up);

  /** A crash of some host at a random moment during the next operation (or none). */
  function maybeCrashDuring(): void {
    if (!chance(0.06)) return;
    const victim = pick(up());
    if (victim === undefined) return;
    const power = chance(0.5);
    const at = Math.floor(random() * 30);
    clock.schedule(() => {
      if (!victim.up) return;
      note(`${power ? 'power cut' : 'SIGKILL'} of ${victim.id} in the middle of the operation (+${at} ms)`);
      crash(victim, power);
    }, at);
  }

  function crash(slot: Slot, power: boolean): void {
    if (power) world.powerCut(slot);
    else world.kill(slot);
    for (const m of models.values()) if (m.home === slot.index) m.crashed();
  }

  /** Read a volume's whole content and check it; errors of the simulated network are retried. */
  async function readAll(slot: Slot, model: VolumeModel, volume: Volume): Promise<void> {
    const span = 4 * BLOCK;
    for (let offset = 0; offset < model.size; offset += span) {
      await readCheck(slot, model, volume, offset, Math.min(span, model.size - offset));
      if (!slot.up) return;
    }
  }

  async function readCheck(slot: Slot, model: VolumeModel, volume: Volume, offset: number, length: number): Promise<void> {
    const buf = Buffer.alloc(length);
    // Half the reads take the overlay and the slab through the thread pool, as a large NBD
    // read does; half the others too, as one whose pages the page cache dropped does.
    const large = threadPool();
    const later = large || slabLater();
    for (let attempt = 1; ; attempt++) {
      const out = await drive(slot, async () => {
        // Blocks evicted while the read waited are fetched again (Volume.readReady).
        // The reads that take the slab through the thread pool check restart-loaded slots there too, as a client's do.
        let ready = volume.readReady(offset, length, 0, later);
        for (let round = 1; ready; round++) {
          await ready;
          ready = volume.readReady(offset, length, round, later);
        }
        if (!later) volume.read(offset, length, buf, 0);
        // A block that left the cache while it was read: read again, as the NBD server does.
        else if (!(await volume.readLater(offset, length, buf, 0))) throw new Error('simulated: a block left the cache during the read');
      });
      if ('died' in out) return;
      if (out.ok) break;
      const message = (out.error as Error).message;
      if (/simulated/.test(message) && attempt < 20) continue;
      const named = /block ([0-9a-f]{32}) is neither/.exec(message);
      throw new Failure(`host ${slot.id}: read of volume ${model.name} at ${offset}+${length} failed: ${message}${named ? ` (${whereInStore(Buffer.from(named[1], 'hex').toString('latin1'))})` : ''}`);
    }
    const problem = model.check(offset / UNIT, buf);
    if (problem) throw new Failure(`host ${slot.id}: ${problem}`);
  }

  function payload(first: number, count: number, w: number): Buffer {
    const buf = Buffer.alloc(count * UNIT);
    for (let i = 0; i < count; i++) fillUnit(buf, i * UNIT, w, first + i);
    return buf;
  }

  /** A range in units: aligned to 4 KiB or not, within a chunk or across several. */
  function range(model: VolumeModel): { first: number; count: number } {
    const units = model.units;
    const count = chance(0.5) ? pick([1, 3, 8, 16]) : chance(0.7) ? 128 : Math.floor(random() * 384) + 1;
    let first = Math.floor(random() * units);
    if (chance(0.5)) first -= first % 8;
    const n = Math.min(count, units - first);
    return { first, count: Math.max(1, n) };
  }

  /** A client's FLUSH, as the NBD server makes it: on a durable volume it also waits for the store (the floor then survives a lost host). */
  const flushOf = (volume: Volume) => volume.flushForClient();

  /**
   * What a write's outcome tells the model: a failed write leaves each unit as it was or
   * written; a durable volume's background fold may put a manifest at the sequence it took.
   */
  function writeDone(out: Outcome<unknown>, slot: Slot, model: VolumeModel, volume: Volume, first: number, before: Int32Array, w: number): void {
    if (!out.ok && !('died' in out)) {
      note(`  write failed: ${(out.error as Error).message}`);
      model.unsure(first, before, w);
      if (model.durable && slot.up) model.snapshot(volume.sequence);
    } else if (out.ok && model.durable && slot.up) model.snapshot(volume.sequence);
  }

  /**
   * A quarter of acknowledged FUA writes are written again at once in part, FUA too (a
   * database rewriting a page), and half of those hosts are then killed: the FLUSH of a
   * rewrite must leave nothing older for a restart to lay over it. Draws from a stream of
   * its own, so that other seeds' workloads stay as they were.
   */
  async function fuaRewrite(slot: Slot, model: VolumeModel, volume: Volume, first: number, count: number): Promise<void> {
    const draw = prng(opts.seed * 104_729 + step);
    if (draw() >= 0.25) return;
    const half = Math.max(1, count >> 1);
    const w = nextWrite++;
    note(`write ${model.name} units ${first}+${half} = write ${w} FUA (rewriting the last write) on ${slot.id}`);
    const before = model.val.slice(first, first + half);
    const out = await drive(slot, async () => {
      const ready = volume.writeReady(first * UNIT, half * UNIT);
      if (ready) await ready;
      model.write(first, half, w);
      volume.write(first * UNIT, payload(first, half, w));
      await flushOf(volume);
    });
    writeDone(out, slot, model, volume, first, before, w);
    if (!out.ok || !slot.up) return;
    model.flushed();
    if (draw() < 0.5) {
      note(`SIGKILL of ${slot.id} after the rewrite`);
      crash(slot, false);
    }
  }

  /** A durable volume stays durable on the host that takes it over (its manifest says so; this makes sure of it). */
  function keepMode(slot: Slot, model: VolumeModel): void {
    if (!model.durable || slot.host?.get(model.name) === undefined) return;
    try {
      runAs(slot.actor, () => slot.host!.setVolumeSettings(model.name, { flushMode: 'durable' }));
    } catch (err) {
      // The settings file's save failed, which changes nothing: the volume keeps the mode its manifest gave it, durable.
      note(`  ${slot.id} cannot make ${model.name} durable: ${(err as Error).message}`);
    }
  }

  async function flushThenPowerCut(slot: Slot): Promise<void> {
    note(`  flush every volume of ${slot.id}, then a power cut`);
    for (const m of models.values()) {
      const volume = m.home === slot.index ? slot.host!.get(m.name) : undefined;
      if (volume === undefined) continue;
      const out = await drive(slot, () => flushOf(volume));
      if (!slot.up) return;
      if (out.ok) m.flushed();
      else if (!('died' in out)) note(`  flush of ${m.name} failed: ${(out.error as Error).message}`);
    }
    crash(slot, true);
  }

  async function restart(slot: Slot): Promise<void> {
    await world.boot(slot);
    checkReleasedStayReadOnly(slot);
    for (const m of models.values()) {
      if (m.home !== slot.index) continue;
      const volume = slot.host!.get(m.name);
      if (volume === undefined && m.purging) {
        models.delete(m.name);
        continue;
      }
      if (volume === undefined) throw new Failure(`host ${slot.id}: volume ${m.name} was not recovered at restart`);
      // An unanswered resize may have landed unsynced: a restart may show it, and a power cut after it undo it again.
      const size = m.size;
      if (!m.recovered(volume.size)) throw new Failure(`host ${slot.id}: volume ${m.name} recovered with size ${volume.size}, expected ${size === m.sizeFloor ? size : `${m.sizeFloor} to ${Math.max(size, m.maybeSize)}`}`);
      // Sequences past the recovered one were never in a manifest (a drain commits its sequence first): they will be reused.
      m.forgetAbove(volume.sequence);
      await readAll(slot, m, volume);
      if (!slot.up) return;
      // A durable volume continues above the sequences it may have logged: its next manifest is at this content.
      if (m.durable && m.resolved()) m.snapshot(volume.sequence);
    }
  }

  /**
   * Invariant 4 across a crash in a release: a host never comes back as the writer of a
   * volume whose lease it released (another host may hold it by now).
   */
  function checkReleasedStayReadOnly(slot: Slot): void {
    for (const volume of slot.host!.all()) {
      const state = slot.host!.link(volume.name)?.state;
      if (state === undefined || state.readOnly || state.generation === 0) continue;
      const object = world.bucket.objects.get(leaseKey(volume.name));
      const lease = object === undefined ? undefined : decodeLease(leaseKey(volume.name), object.body);
      if (lease?.released === true && lease.owner === slot.id && lease.generation === state.generation) {
        throw new Failure(`host ${slot.id}: restarted as the writer of ${volume.name} (generation ${lease.generation}), whose lease it released`);
      }
    }
  }

  /** The store's invariants: every manifest and checkpoint names only packs that exist. */
  function checkStore(): void {
    const objects = world.bucket.objects;
    for (const [key, o] of objects) {
      if (!key.startsWith('volumes/') || !(key.endsWith('/manifest') || key.includes('/checkpoints/'))) continue;
      let packs = decoded.get(o.etag);
      if (packs === undefined) {
        const { manifest } = decodeManifestBody(key, o.body, PLAINTEXT);
        packs = [...new Set(manifest.blocks.map((b) => b.pack))];
        decoded.set(o.etag, packs);
      }
      for (const pack of packs) {
        if (!objects.has(packKey(pack))) throw new Failure(`store: ${key} names pack ${packKey(pack)}, which is not in the store`);
      }
    }
  }
  const decoded = new Map<string, string[]>();

  /** Memory bounds: the cache's memory tier holds no more than its setting. */
  function checkMemory(): void {
    for (const slot of up()) {
      const held = slot.host!.cache.memoryBytes;
      if (held > MEMORY_BLOCKS * BLOCK) throw new Failure(`host ${slot.id}: block cache memory tier holds ${held} bytes, over its ${MEMORY_BLOCKS * BLOCK}`);
    }
  }

  /**
   * Invariant 6: every block a served volume names is on its host or in a pack in the
   * store (GC never deleted a pack a live volume needs while the cache let the block go).
   */
  function checkBlocks(): void {
    for (const m of served()) {
      const slot = world.slots[m.home!];
      const volume = slot.host!.get(m.name);
      if (volume === undefined) continue;
      for (const [chunk, key] of volume.cloneMap().entries()) {
        // A block the cache holds pinned is safe; one it may evict (the store holds it) must be in a pack now.
        const cached = slot.host!.cache.has(key);
        if (key === ZERO_ALLOCATED_KEY || (cached && !slot.host!.cache.isInStore(key))) continue;
        const where = cached ? 'which the cache may evict' : 'which left the cache';
        const location = slot.host!.packIndex.get(key);
        if (location === undefined) throw new Failure(`host ${slot.id}: volume ${m.name} chunk ${chunk} names block ${keyHex(key)}, ${where}, and no pack the host knows of holds it (${whereInStore(key)})`);
        const gone = world.bucket.deleted.get(packKey(location.pack));
        if (!world.bucket.objects.has(packKey(location.pack))) {
          throw new Failure(
            `host ${slot.id}: volume ${m.name} chunk ${chunk} names block ${keyHex(key)}, ${where}, and its pack ${packKey(location.pack)} is not in the store` +
              (gone ? ` (deleted by ${gone})` : ''),
          );
        }
      }
    }
  }

  /** Which packs in the store hold block `key` (to tell a lost pack index entry from a lost block). */
  function whereInStore(key: string): string {
    const holders: string[] = [];
    for (const [k, o] of world.bucket.objects) {
      if (!k.startsWith('packs/')) continue;
      try {
        if (decodePackIndex(k, o.body, PLAINTEXT).some((e) => blockKey(e.hash) === key)) holders.push(k);
      } catch {
        // not a pack
      }
    }
    const deleted = [...world.bucket.deleted.keys()].filter((k) => k.startsWith('packs/'));
    return holders.length > 0 ? `the store holds it in ${holders.join(', ')}` : `no pack in the store holds it; packs deleted so far: ${deleted.length}`;
  }

  /**
   * Invariant 4: only the lease holder changes a volume in the store: no manifest or
   * checkpoint lands from a host while another host holds a live, unreleased lease.
   */
  let historySeen = 0;
  function checkWriters(): void {
    const history = world.bucket.history;
    for (; historySeen < history.length; historySeen++) {
      const h = history[historySeen];
      if (h.op !== 'put' || h.lease === undefined) continue;
      if (h.lease.owner !== h.host && !h.lease.released && leaseIsLiveAt(h.lease, h.leaseModified!, h.at)) {
        throw new Failure(`store: host ${h.host} wrote ${h.key} while host ${h.lease.owner} holds the volume's lease (generation ${h.lease.generation}, until ${h.lease.expires})`);
      }
    }
  }

  try {
    for (const slot of world.slots) {
      try {
        await world.boot(slot);
      } catch (err) {
        note(`start of ${slot.id} failed: ${(err as Error).message}`);
        world.kill(slot);
      }
    }
    for (step = 1; step <= opts.steps; step++) {
      if (opts.skip?.has(step)) continue;
      random = prng(opts.seed * 1_000_003 + step);
      const roll = random();
      await runStep(roll);
      checkStore();
      checkBlocks();
      checkMemory();
      checkWriters();
    }
    return result();
  } catch (err) {
    const faults = world.slots.map((sl) => `${sl.id}: ${JSON.stringify(sl.disk.counters)}`).join('; ');
    if (err instanceof Failure) return result({ step, message: `${err.message}` + (process.env.UPDRAFT_SIM_COUNTERS ? ` [${faults}]` : '') });
    return result({ step, message: `simulation error: ${(err as Error).stack ?? String(err)}` });
  }

  async function runStep(roll: number): Promise<void> {
    const down = world.slots.filter((s) => !s.up);
    if (down.length > 0 && (roll < 0.08 || up().length === 0)) {
      const slot = pick(down);
      note(`restart ${slot.id}`);
      try {
        await restart(slot);
      } catch (err) {
        if (err instanceof Failure) throw err;
        note(`  start failed: ${(err as Error).message}`);
        world.kill(slot);
        return;
      }
      // What the restart recovered is what a FLUSH now acknowledges: it must survive a power cut.
      if (slot.up && chance(0.5)) await flushThenPowerCut(slot);
      return;
    }
    const orphans = [...models.values()].filter((m) => m.home !== undefined && !world.slots[m.home].up);
    if (orphans.length > 0 && roll < 0.14 && up().length > 0) {
      await failover(pick(orphans), pick(up()));
      return;
    }
    const stale = up().flatMap((sl) => sl.host!.all().filter((v) => {
      const m = models.get(v.name);
      return m !== undefined && m.home !== sl.index && m.home !== undefined && world.slots[m.home].up;
    }).map((v) => ({ slot: sl, name: v.name })));
    if (stale.length > 0 && roll < 0.2) {
      await staleDrain(pick(stale));
      return;
    }
    const volumes = served();
    if (volumes.length === 0 || roll < 0.05) {
      const slot = pick(up());
      const name = `v${nextName++}`;
      const size = pick([8, 16, 24]) * BLOCK;
      // A stream of its own: adding durable volumes left every seed's other draws as they were.
      const durable = prng(opts.seed * 31 + step)() < 0.3;
      note(`create ${name} (${size} bytes${durable ? ', durable' : ''}) on ${slot.id}`);
      maybeCrashDuring();
      const out = await drive(slot, () => slot.host!.create(name, size, durable ? { flushMode: 'durable' } : {}));
      if (out.ok) {
        const m = new VolumeModel(name, size);
        m.durable = durable;
        m.home = slot.index;
        // A durable volume's FLUSHes and background folds write manifests at any sequence: each one's content is recorded.
        if (durable) m.snapshot(0);
        models.set(name, m);
        // The volume's lease is taken at its first drain.
        checkWriters();
      } else if (!('died' in out)) note(`  create failed: ${(out.error as Error).message}`);
      return;
    }
    const model = pick(volumes);
    const slot = world.slots[model.home!];
    const host = slot.host!;
    const volume = host.get(model.name);
    if (volume === undefined) {
      // A purge or fork that failed part-way took it off the host; the store may still have it.
      note(`volume ${model.name} is no longer open on ${slot.id}`);
      model.home = undefined;
      return;
    }
    const op = random();
    if (op >= 0.56 && op < 0.76 && !model.resolved()) {
      // A snapshot records the model's content: read back what a crash or a failed write left open first.
      note(`read all of ${model.name} on ${slot.id} (settling what is open)`);
      await readAll(slot, model, volume);
      if (!slot.up) return;
    }
    maybeCrashDuring();
    if (op < 0.3) {
      const { first, count } = range(model);
      const w = nextWrite++;
      const fua = chance(0.15);
      const large = (first * UNIT) % SECTOR === 0 && (count * UNIT) % SECTOR === 0 && threadPool();
      note(`write ${model.name} units ${first}+${count} = write ${w}${fua ? ' FUA' : ''}${large ? ' (thread pool)' : ''} on ${slot.id}`);
      const data = payload(first, count, w);
      const before = model.val.slice(first, first + count);
      const out = await drive(slot, async () => {
        const ready = volume.writeReady(first * UNIT, count * UNIT);
        if (ready) await ready;
        model.write(first, count, w);
        // A sector-aligned write goes through the thread pool half the time, as a large NBD write does.
        if (large) await volume.writeLarge(first * UNIT, [data]);
        else volume.write(first * UNIT, data);
        if (fua) await flushOf(volume);
      });
      writeDone(out, slot, model, volume, first, before, w);
      // An acknowledged FUA write is durable, with every write before it.
      if (out.ok && fua && slot.up) {
        model.flushed();
        await fuaRewrite(slot, model, volume, first, count);
      }
    } else if (op < 0.4) {
      const { first, count } = range(model);
      note(`read ${model.name} units ${first}+${count} on ${slot.id}`);
      await readCheck(slot, model, volume, first * UNIT, count * UNIT);
    } else if (op < 0.52) {
      note(`flush ${model.name} on ${slot.id}`);
      let out = await drive(slot, () => flushOf(volume));
      let retried = false;
      if (!out.ok && !('died' in out) && slot.up) {
        note(`  flush failed: ${(out.error as Error).message}`);
        // A durable FLUSH may fail on the store alone (its writes wait for the next); a failed local sync fails the volume.
        const local = volume.failed !== undefined;
        // A guest may retry: a FLUSH after a failed one must not succeed over writes the failed sync lost (invariant 1).
        retried = true;
        out = await drive(slot, () => flushOf(volume));
        // Invariant 1: a failed sync fails the volume, and FLUSH stays failed until it is reopened.
        if (out.ok && (local || !model.durable)) throw new Failure(`host ${slot.id}: volume ${model.name}: a FLUSH succeeded right after a failed one, without a reopen`);
      }
      if (out.ok) model.flushed();
      // What the FLUSH acknowledged must survive a power cut right after it.
      if (out.ok && slot.up && chance(retried ? 1 : 0.1)) {
        note(`power cut of ${slot.id} after the flush`);
        crash(slot, true);
      } else if (out.ok && model.durable && slot.up && chance(0.3)) await followCheck(model, slot, volume);
    } else if (op < 0.56) {
      const { first, count } = range(model);
      const trim = chance(0.5);
      note(`${trim ? 'trim' : 'write-zeroes'} ${model.name} units ${first}+${count} on ${slot.id}`);
      const before = model.val.slice(first, first + count);
      const out = await drive(slot, async () => {
        if (!trim) {
          const ready = volume.writeReady(first * UNIT, count * UNIT);
          if (ready) await ready;
        }
        if (trim) {
          // Whole chunks are discarded (read as zeros); partial edges are left as they are.
          const chunkUnits = BLOCK / UNIT;
          for (let c = Math.ceil(first / chunkUnits); c * chunkUnits < first + count; c++) {
            const n = Math.min(chunkUnits, model.units - c * chunkUnits);
            if (c * chunkUnits + n <= first + count) model.write(c * chunkUnits, n, 0);
          }
          volume.trim(first * UNIT, count * UNIT);
        } else {
          model.write(first, count, 0);
          volume.zero(first * UNIT, count * UNIT, { noHole: chance(0.5), fast: false });
        }
      });
      if (!out.ok && !('died' in out)) {
        note(`  failed: ${(out.error as Error).message}`);
        model.unsure(first, before, 0);
        if (model.durable && slot.up) model.snapshot(volume.sequence);
      } else if (out.ok && model.durable && slot.up) model.snapshot(volume.sequence);
    } else if (op < 0.58) {
      const size = model.size + BLOCK * pick([1, 2]);
      note(`resize ${model.name} to ${size} on ${slot.id}`);
      model.maybeSize = Math.max(model.maybeSize, size);
      const out = await drive(slot, () => host.resize(model.name, size));
      if (out.ok) model.grow(size, true);
      else if (!('died' in out)) note(`  resize failed: ${(out.error as Error).message}`);
      if (out.ok && model.durable && slot.up) model.snapshot(volume.sequence);
    } else if (op < 0.64) {
      note(`drain ${model.name} on ${slot.id}`);
      const sequence = volume.sequence;
      model.snapshot(sequence);
      const out = await drive(slot, () => host.drain(model.name));
      if (out.ok) {
        model.flushed();
      } else if (!('died' in out)) note(`  drain failed: ${(out.error as Error).message}`);
    } else if (op < 0.68) {
      const name = `v${nextName++}`;
      const lazy = chance(0.5);
      const target = lazy ? pick(up()) : slot;
      note(`fork ${model.name} -> ${name} (${lazy ? 'lazy' : 'consistent'}) on ${target.id}`);
      const content = model.snapshot(volume.sequence);
      const out = await drive(target, () => target.host!.fork(model.name, name, { mode: lazy ? 'lazy' : 'consistent' }));
      if (out.ok && target.up) {
        const forked = target.host!.get(name)!;
        let expected: Int32Array | undefined = content;
        if (lazy) {
          const candidates = model.snapshots.get(forked.sequence) ?? [];
          expected = candidates.at(-1);
          if (expected === undefined) throw new Failure(`fork ${name}: woke at sequence ${forked.sequence}, which no manifest of ${model.name} had`);
        } else if (!('died' in out)) {
        }
        const m = new VolumeModel(name, forked.size, expected.length === forked.size / UNIT ? expected : padded(expected, forked.size / UNIT));
        m.home = target.index;
        // A fork takes its source's flush mode (from the manifest it is woken from).
        m.durable = target.host!.summary(forked).flushMode === 'durable';
        m.snapshot(forked.sequence);
        models.set(name, m);
        if (lazy) {
          const candidates = model.snapshots.get(forked.sequence)!;
          await readAllAgainst(target, m, forked, candidates);
        } else await readAll(target, m, forked);
      } else if (!out.ok && !("died" in out)) note(`  fork failed: ${(out.error as Error).message}`);
    } else if (op < 0.71) {
      const name = `c${nextName++}`;
      note(`checkpoint ${model.name}@${name} on ${slot.id}`);
      model.snapshot(volume.sequence);
      const content = Int32Array.from(model.val);
      const out = await drive(slot, () => host.createCheckpoint(model.name, name));
      if (out.ok) {
        model.checkpoints.set(name, content);
      } else if (!('died' in out)) note(`  checkpoint failed: ${(out.error as Error).message}`);
    } else if (op < 0.76 && up().length > 1) {
      const target = pick(up().filter((s) => s !== slot));
      note(`migrate ${model.name} ${slot.id} -> ${target.id}`);
      model.snapshot(volume.sequence);
      if (chance(0.15)) {
        // The source dies somewhere in its release: before, during or after the lease PUT.
        const at = Math.floor(random() * 60);
        const power = chance(0.5);
        clock.schedule(() => {
          if (!slot.up) return;
          note(`${power ? 'power cut' : 'SIGKILL'} of ${slot.id} during the release (+${at} ms)`);
          crash(slot, power);
        }, at);
      } else if (chance(0.1)) {
        // Or just as its released lease lands, before the answer.
        const power = chance(0.5);
        world.bucket.onLand = (key, body) => {
          if (key !== leaseKey(model.name) || !slot.up || decodeLease(key, body).released !== true) return;
          world.bucket.onLand = undefined;
          note(`${power ? 'power cut' : 'SIGKILL'} of ${slot.id} as its released lease lands`);
          crash(slot, power);
        };
      }
      // A volume never drained holds no lease and release() stores nothing (its writes
      // would stay behind, read-only): drain it first, as an operator must.
      const first = host.link(model.name)!.state.generation === 0;
      const released = await drive(slot, async () => {
        if (first) await host.drain(model.name);
        return host.release(model.name);
      });
      world.bucket.onLand = undefined;
      if (!released.ok) {
        if (!('died' in released)) note(`  release failed: ${(released.error as Error).message}`);
        return;
      }
      checkWriters();
      model.flushed();
      if (!target.up) return;
      const open = target.host!.get(model.name);
      const out = await drive(target, async () => {
        if (open !== undefined) await target.host!.promote(model.name);
        else await target.host!.wake(model.name);
        return target.host!.get(model.name);
      });
      if (!out.ok || !target.up) {
        if (!out.ok && !('died' in out)) note(`  wake on ${target.id} failed: ${(out.error as Error).message}`);
        return;
      }
      const moved = out.value;
      if (moved === undefined) throw new Failure(`migrate ${model.name}: ${target.id} found no volume in the store`);
      if (moved.readOnly) {
        note(`  ${target.id} serves ${model.name} read-only`);
        return;
      }
      // A resize that failed after changing the size in memory may have made it into the drain.
      if (moved.size > model.size && moved.size <= model.maybeSize) model.grow(moved.size);
      if (moved.size !== model.size) throw new Failure(`migrate ${model.name} ${slot.id} -> ${target.id}: the volume has size ${moved.size} there, ${model.size} here`);
      // The old host keeps its (read-only) folder until removed.
      await drive(slot, () => host.remove(model.name));
      model.home = target.index;
      keepMode(target, model);
      await readAll(target, model, moved);
      model.settle(model.val);
    } else if (op < 0.8) {
      note(`gc on ${slot.id}`);
      const collector = slot.collector!;
      const reconcile = chance(0.5);
      const out = await drive(slot, (): Promise<unknown> => (reconcile ? collector.reconcile() : collector.cycle()));
      if (!out.ok && !('died' in out)) note(`  gc failed: ${(out.error as Error).message}`);
    } else if (op < 0.83) {
      note(`read all of ${model.name} on ${slot.id}`);
      await readAll(slot, model, volume);
    } else if (op < 0.86) {
      const power = chance(0.5);
      note(`${power ? 'power cut' : 'SIGKILL'} of ${slot.id}`);
      crash(slot, power);
    } else if (op < 0.88) {
      note(`purge ${model.name} on ${slot.id}`);
      model.purging = true;
      const out = await drive(slot, () => host.purge(model.name));
      if (out.ok) models.delete(model.name);
      else if (!('died' in out)) note(`  purge failed: ${(out.error as Error).message}`);
    } else {
      const ms = pick([50, 300, 1000, 3000, LEASE_TTL_MS + 1000]);
      note(`time passes: ${ms} ms`);
      await clock.advance(ms);
    }
  }

  /**
   * A replica follows a durable volume's log (host/follow.ts): opened read-only on another
   * host right after a FLUSH its writer acknowledged, once it serves the sequence the store
   * holds, every unit reads the writer's content (a unit left open: one of its candidates).
   * The replica stays open there: a later failover may promote it.
   */
  async function followCheck(model: VolumeModel, home: Slot, homeVolume: Volume): Promise<void> {
    const others = up().filter((s) => s !== home);
    const stored = home.host!.summary(homeVolume).durableSequence;
    // Only beside a writer: a volume whose lease was released (a migration cut short) would be taken by the wake.
    const writing = home.host!.link(model.name)?.holdsLease === true && !homeVolume.readOnly;
    if (others.length === 0 || stored === undefined || !writing) return;
    const target = pick(others);
    note(`  ${target.id} follows ${model.name} as a replica, up to sequence ${stored}`);
    const out = await drive(target, async () => {
      if (target.host!.get(model.name) === undefined) await target.host!.wake(model.name);
      return target.host!.get(model.name);
    });
    if (!out.ok || !target.up || out.value === undefined) {
      if (!out.ok && !('died' in out)) note(`  opening the replica failed: ${(out.error as Error).message}`);
      return;
    }
    const replica = out.value;
    if (!replica.readOnly) {
      // The holder's lease lapsed and the wake took it: give it back up (a drain of the same content, then a release).
      note(`  ${target.id} took ${model.name} (its holder's lease lapsed): it removes its copy`);
      const removed = await drive(target, () => target.host!.remove(model.name));
      if (!removed.ok && !('died' in removed)) note(`  the remove failed: ${(removed.error as Error).message}`);
      return;
    }
    if (!followsWriter(target.host!.link(model.name)!)) {
      note(`  ${target.id}'s copy of ${model.name} is no replica that follows (a fenced copy with writes of its own)`);
      return;
    }
    for (let waited = 0; replica.servedSequence < stored && waited < 5000; waited += 500) {
      await clock.advance(500);
      if (!target.up || !home.up || target.host!.get(model.name) !== replica) return;
    }
    if (replica.servedSequence < stored || replica.size !== model.size) {
      note(`  the replica serves sequence ${replica.servedSequence} at size ${replica.size}, not yet ${stored} at ${model.size}`);
      return;
    }
    const buf = Buffer.alloc(replica.size);
    const read = await readWhole(target, replica, buf);
    if (!read.ok) {
      if (!('died' in read)) note(`  the replica's read failed: ${(read.error as Error).message}`);
      return;
    }
    for (let u = 0; u < model.units; u++) {
      const got = decodeUnit(buf, u * UNIT, u);
      const allowed = model.val[u] >= 0 ? [model.val[u]] : (model.open.get(u) ?? [model.floor[u]]);
      if (got < 0 || !allowed.includes(got)) {
        throw new Failure(
          `replica of ${model.name} on ${target.id} at sequence ${replica.servedSequence} (the store holds ${stored}): unit ${u} (byte ${u * UNIT}) reads ${got < 0 ? 'garbage' : `write ${got}`}; the writer's flushed content: writes ${allowed.join(',')}`,
        );
      }
    }
    note(`  the replica on ${target.id} reads the flushed content at sequence ${replica.servedSequence}${replica.servedLog === undefined ? "" : ` (${replica.servedLog.entries} log entries over its manifest)`}`);
  }

  /**
   * The volume's host is down: another host takes it over from the store (after the
   * lease expired or was released). Its content is one of the volume's manifests.
   */
  async function failover(model: VolumeModel, target: Slot): Promise<void> {
    note(`failover of ${model.name} (its host ${world.slots[model.home!].id} is down) to ${target.id}`);
    const open = target.host!.get(model.name);
    const out = await drive(target, async () => {
      if (open !== undefined) await target.host!.promote(model.name);
      else await target.host!.wake(model.name);
      return target.host!.get(model.name);
    });
    if (!out.ok || !target.up) {
      if (!out.ok && !('died' in out)) note(`  ${target.id} cannot take it: ${(out.error as Error).message}`);
      return;
    }
    let volume = out.value;
    if (volume === undefined) {
      note(`  the store has no manifest of ${model.name}`);
      return;
    }
    if (volume.readOnly && model.durable) {
      // As an operator does: promote again once the dead holder's lease ran out.
      note(`  the lease is live: ${LEASE_TTL_MS + 1000} ms pass, then ${target.id} promotes ${model.name}`);
      await clock.advance(LEASE_TTL_MS + 1000);
      if (!target.up) return;
      const again = await drive(target, () => target.host!.promote(model.name));
      if (!again.ok || !target.up) {
        if (!again.ok && !('died' in again)) note(`  ${target.id} cannot take it: ${(again.error as Error).message}`);
        return;
      }
      volume = target.host!.get(model.name)!;
    }
    if (volume.readOnly) {
      note(`  ${target.id} serves ${model.name} read-only (its lease is live)`);
      return;
    }
    if (model.durable) {
      // The replayed log: every unit reads what its last acknowledged FLUSH had, or a later write (as after a crash).
      // Its size: that of its last acknowledged resize or FLUSH, or of a resize not answered (a restart may have shown it unsynced).
      const size = model.size;
      if (!model.recovered(volume.size)) throw new Failure(`failover of durable ${model.name} to ${target.id}: size ${volume.size}, expected ${size === model.sizeFloor ? size : `${model.sizeFloor} to ${Math.max(size, model.maybeSize)}`}`);
      // The taker wrote a manifest of what it replayed: that size is in the store now.
      model.grow(volume.size, true);
      model.home = target.index;
      keepMode(target, model);
      await readAll(target, model, volume);
      if (target.up && model.resolved()) model.snapshot(volume.sequence);
      return;
    }
    const candidates = model.snapshots.get(volume.sequence);
    if (candidates === undefined) throw new Failure(`failover of ${model.name} to ${target.id}: it woke at sequence ${volume.sequence}, which no manifest of the volume had`);
    model.home = target.index;
    const m = new VolumeModel(model.name, volume.size);
    await readAllAgainst(target, m, volume, candidates);
    model.size = volume.size;
    model.settle(m.val);
  }

  /**
   * A host that still has a volume another host now holds (it was migrated or failed
   * over while this one was down) tries to drain it: it must be fenced, never write the
   * volume's manifest (checkWriters).
   */
  async function staleDrain(target: { slot: Slot; name: string }): Promise<void> {
    const { slot, name } = target;
    note(`${slot.id}, which no longer holds ${name}, writes to it and drains it`);
    const volume = slot.host!.get(name)!;
    const out = await drive(slot, async () => {
      if (!volume.readOnly) volume.write(0, payload(0, 8, nextWrite++));
      return slot.host!.drain(name);
    });
    checkWriters();
    if (out.ok && slot.up) {
      // The holder's lease had lapsed, so this host took it (checkWriters passed): it is the volume's host now, with its own content.
      note(`  the drain succeeded: ${slot.id} holds ${name} now`);
      const model = models.get(name)!;
      const buf = Buffer.alloc(volume.size);
      const read = await readWhole(slot, volume, buf);
      if (!read.ok) {
        if (!('died' in read)) throw new Failure(`host ${slot.id}: read of volume ${name} after taking it failed: ${(read.error as Error).message}`);
        return;
      }
      const content = new Int32Array(volume.size / UNIT);
      for (let u = 0; u < content.length; u++) {
        content[u] = decodeUnit(buf, u * UNIT, u);
        if (content[u] < 0) throw new Failure(`host ${slot.id}: volume ${name} unit ${u} reads garbage after taking the volume`);
      }
      model.size = volume.size;
      model.settle(content);
      model.home = slot.index;
      model.snapshot(volume.sequence);
    } else if (!out.ok && !('died' in out)) note(`  refused: ${(out.error as Error).message}`);
  }

  /** Read all of `volume` on `slot` into `buf`; blocks evicted while the read waited are fetched again (Volume.readReady). */
  function readWhole(slot: Slot, volume: Volume, buf: Buffer): Promise<Outcome<void>> {
    return drive(slot, async () => {
      let ready = volume.readReady(0, volume.size);
      for (let round = 1; ready; round++) {
        await ready;
        ready = volume.readReady(0, volume.size, round);
      }
      volume.read(0, volume.size, buf, 0);
    });
  }

  /** A lazy fork's content is one of its source's manifests at that sequence. */
  async function readAllAgainst(slot: Slot, m: VolumeModel, volume: Volume, candidates: Int32Array[]): Promise<void> {
    for (let i = candidates.length - 1; i >= 0; i--) {
      const open = openInSnapshot.get(candidates[i]);
      m.settle(padded(candidates[i], m.units), open);
      try {
        await readAll(slot, m, volume);
        // What a unit open in the manifest read is what the manifest holds.
        for (const u of open?.keys() ?? []) {
          if (u >= m.units || m.val[u] < 0) continue;
          m.floor[u] = m.val[u];
          m.open.delete(u);
        }
        return;
      } catch (err) {
        if (!(err instanceof Failure) || i === 0) throw err;
      }
    }
  }
}

function padded(content: Int32Array, units: number): Int32Array {
  const out = new Int32Array(units);
  out.set(content.subarray(0, Math.min(units, content.length)));
  return out;
}
