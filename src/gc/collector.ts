// The deletion worker and reconciliation (DESIGN.md: gc/, invariant 6).
//
// Deletion cycle: resolve unfinished manifest writes that can no longer land, mark up to
// `maxDeletionsPerCycle` packs that have been at refcount 0 for longer than the grace
// period 'deleting' (an increment refuses them from then on, so a writer that dedups
// against one uploads its blocks again), delete their objects, forget their rows. A crash
// leaves rows 'deleting'; the next cycle finishes them.
//
// Reconciliation, the safety net, correct on its own even with an empty database: list
// every manifest and checkpoint, read them, make each key's counted packs match its
// object, drop keys whose object is gone, set every pack's refcount to what is counted,
// give packs in the store without a row one (unreferenced since the object was written),
// then run a deletion cycle: packs neither live nor young go. Writers keep going
// meanwhile: a key with a pending write is skipped (the write keeps it right), a key is
// only changed if its counted version is still the one read, and a pack referenced after
// the listing has refs > 0 or refuses the increment because it is 'deleting'.
//
// Deletion is only allowed once the database has been reconciled with the store at least
// once (a new database knows nothing of the manifests already there), and only while the
// store's gc.json names this database: two hosts with separate embedded databases on one
// store would each delete what only the other counts.
import type { StoreCipher } from '../crypto/cipher.js';
import { errorMessage, type Logger } from '../log.js';
import { isPreconditionFailed, type ObjectStore } from '../objectstore/types.js';
import { decodeManifest } from '../store/manifest-decode.js';
import { storedManifestMeta, sweepLogObjects } from '../store/log.js';
import { packIdFromKey, packKey } from '../store/pack.js';
import type { PackIndex } from '../store/pack-index.js';
import { crashPoint } from '../faults/crash-points.js';
import { packsOf, WritePendingError } from '../store/counted.js';
import { eachLimit } from './each-limit.js';
import type { PackRefcounts } from './refcounts.js';

/** The store object naming the refcount database that may delete packs from it. */
export const CLAIM_KEY = 'gc.json';

export interface CollectorSettings {
  /** A pack unreferenced for less than this is kept. */
  gracePeriodMs: number;
  /** Deletion cycles run this often in the daemon. */
  intervalMs: number;
  /** Reconciliation runs when the last one is older than this. */
  reconcileIntervalMs: number;
  maxDeletionsPerCycle: number;
  /** Log what would be deleted; delete nothing. */
  dryRun: boolean;
}

export interface GcCounters {
  cycles: number;
  packsDeleted: number;
  deleteFailures: number;
  reconciliations: number;
  /** Pack refcounts set to what is counted (drift). */
  refcountCorrections: number;
  /** Keys whose counted packs did not match their object, or whose object was gone. */
  manifestCorrections: number;
  /** Pack sets whose holder count reconciliation corrected. */
  setCorrections: number;
  /** Packs in the store that had no refcount row. */
  packsAdopted: number;
  intentsCommitted: number;
  intentsReverted: number;
}

export interface CycleResult {
  /** Why nothing was deleted, when deletion is not allowed. */
  skipped?: string;
  dry_run: boolean;
  /** Packs deleted (or, dry run, that would be). */
  deleted: string[];
  failed: number;
  intents_committed: number;
  intents_reverted: number;
  duration_ms: number;
}

export interface ReconcileResult {
  manifests: number;
  live_packs: number;
  store_packs: number;
  manifest_corrections: number;
  /** Pack sets whose holder count (keys and intents sharing them) was wrong. */
  set_corrections: number;
  refcount_corrections: number;
  packs_adopted: number;
  unreadable_manifests: number;
  /** Log objects of durable volumes deleted because manifests cover every entry in them (their writer died or was fenced). */
  log_objects_deleted: number;
  duration_ms: number;
}

const DELETE_CONCURRENCY = 8;
const READ_CONCURRENCY = 8;

/** A manifest or checkpoint key (not a lease, boot set or anything else under volumes/). */
export function isManifestKey(key: string): boolean {
  return /^volumes\/.+\/(manifest|checkpoints\/[^/]+)$/.test(key);
}

export class Collector {
  readonly counters: GcCounters = {
    cycles: 0, packsDeleted: 0, deleteFailures: 0, reconciliations: 0, refcountCorrections: 0, manifestCorrections: 0, setCorrections: 0,
    packsAdopted: 0, intentsCommitted: 0, intentsReverted: 0,
  };
  /** The last deletion cycle of this process: when it ended and what it did. */
  lastCycle: { at: number; deleted: number; failed: number; dryRun: boolean; skipped?: string; durationMs: number } | undefined;
  /** Cycles and reconciliations of this process take turns. */
  private tail: Promise<unknown> = Promise.resolve();
  private timer: NodeJS.Timeout | undefined;
  private stopped = false;
  private warnedClaim = '';

  constructor(
    readonly refcounts: PackRefcounts,
    private readonly store: ObjectStore,
    /** Opens the manifests reconciliation reads (crypto/cipher.ts). */
    private readonly cipher: StoreCipher,
    readonly settings: CollectorSettings,
    private readonly log: Logger,
    /** This host's pack index: a deleted pack leaves it before its object goes. */
    public packIndex?: PackIndex,
  ) {}

  private serial<T>(work: () => Promise<T>): Promise<T> {
    const run = this.tail.then(work);
    this.tail = run.catch(() => undefined);
    return run;
  }

  /** One deletion cycle now (what `updraft gc` and POST /api/gc run). */
  cycle(opts: { dryRun?: boolean } = {}): Promise<CycleResult> {
    return this.serial(() => this.cycleNow(opts.dryRun ?? this.settings.dryRun));
  }

  /** Reconciliation, then a deletion cycle. */
  reconcile(opts: { dryRun?: boolean } = {}): Promise<{ reconcile: ReconcileResult; cycle: CycleResult }> {
    return this.serial(async () => {
      const reconcile = await this.reconcileNow();
      return { reconcile, cycle: await this.cycleNow(opts.dryRun ?? this.settings.dryRun) };
    });
  }

  /**
   * Whether this database may delete from the store: gc.json names it (written here if
   * the store has none). A store another database claimed is marked contested, so that
   * its owner stops deleting too.
   */
  private async claim(): Promise<string | undefined> {
    const refcounts = this.refcounts;
    const mine = { format: 1, database: refcounts.databaseId, kind: refcounts.db.kind };
    for (let attempt = 0; attempt < 3; attempt++) {
      const object = await this.store.get(CLAIM_KEY);
      if (object === undefined) {
        try {
          await this.store.put(CLAIM_KEY, Buffer.from(JSON.stringify(mine, null, 2) + '\n'), { ifNoneMatch: '*' });
          this.log.info('this refcount database now collects the store', { store: this.store.description, database: refcounts.db.description });
          return undefined;
        } catch (err) {
          if (!isPreconditionFailed(err)) throw err;
          continue;
        }
      }
      let claim: { database?: string; kind?: string; contested_by?: string[] };
      try {
        claim = JSON.parse(object.body.toString('utf8')) as typeof claim;
      } catch {
        return `${CLAIM_KEY} in the store is not JSON; fix or delete it`;
      }
      if (claim.database === refcounts.databaseId && !claim.contested_by?.length) return undefined;
      if (claim.database !== refcounts.databaseId && !claim.contested_by?.includes(refcounts.databaseId)) {
        const contested = { ...claim, contested_by: [...(claim.contested_by ?? []), refcounts.databaseId] };
        try {
          await this.store.put(CLAIM_KEY, Buffer.from(JSON.stringify(contested, null, 2) + '\n'), { ifMatch: object.etag });
        } catch (err) {
          if (!isPreconditionFailed(err)) throw err;
          continue;
        }
      }
      return `the store is shared by more than one refcount database (${CLAIM_KEY}: ${claim.kind ?? '?'} ${claim.database ?? '?'}, contested); ` +
        'hosts sharing a store need one PostgreSQL database ([gc] database_url). Refcounts are kept; nothing is deleted';
    }
    return `${CLAIM_KEY} keeps changing; not deleting this cycle`;
  }

  private async cycleNow(dryRun: boolean): Promise<CycleResult> {
    const started = performance.now();
    const result: CycleResult = { dry_run: dryRun, deleted: [], failed: 0, intents_committed: 0, intents_reverted: 0, duration_ms: 0 };
    const resolved = await this.refcounts.resolveIntents();
    result.intents_committed = resolved.committed;
    result.intents_reverted = resolved.reverted;
    this.counters.intentsCommitted += resolved.committed;
    this.counters.intentsReverted += resolved.reverted;
    const cutoff = this.refcounts.now() - this.settings.gracePeriodMs;
    // Nothing to delete: no claim either (a daemon that never stores a volume makes no PUT, invariant 5).
    const idle = !(await this.refcounts.anyDeletable(cutoff));
    const why = idle
      ? undefined
      : ((await this.claim()) ?? ((await this.refcounts.meta('reconciled_at')) === undefined ? 'the database has not been reconciled with the store yet' : undefined));
    if (idle) {
      this.warnedClaim = '';
    } else if (why !== undefined) {
      if (this.warnedClaim !== why) this.log.warn('gc: not deleting', { why });
      this.warnedClaim = why;
      result.skipped = why;
    } else {
      this.warnedClaim = '';
      if (dryRun) {
        result.deleted = await this.refcounts.deletable(cutoff, this.settings.maxDeletionsPerCycle);
        for (const id of result.deleted) this.log.info('gc dry run: would delete pack', { pack: packKey(id) });
      } else {
        await this.deletePacks(await this.refcounts.claimDeletable(cutoff, this.settings.maxDeletionsPerCycle), result);
      }
    }
    this.counters.cycles++;
    result.duration_ms = Math.round(performance.now() - started);
    this.lastCycle = { at: Date.now(), deleted: result.deleted.length, failed: result.failed, dryRun, skipped: result.skipped, durationMs: result.duration_ms };
    if (result.deleted.length > 0 || result.failed > 0) {
      this.log.info('gc cycle', { deleted: result.deleted.length, failed: result.failed, dry_run: dryRun, ms: result.duration_ms });
    }
    return result;
  }

  private async deletePacks(ids: string[], result: CycleResult): Promise<void> {
    const deleted: string[] = [];
    await eachLimit(ids, DELETE_CONCURRENCY, async (id) => {
      try {
        // Uploads on this host must stop deduplicating against it before it goes.
        this.packIndex?.removePack(id);
        await crashPoint('pack-delete');
        await this.store.delete(packKey(id));
        deleted.push(id);
        this.log.debug('deleted pack', { pack: packKey(id) });
      } catch (err) {
        result.failed++;
        this.counters.deleteFailures++;
        this.log.warn('gc: deleting a pack failed; the next cycle tries again', { pack: packKey(id), error: errorMessage(err) });
      }
    });
    await this.packIndex?.sync();
    await crashPoint('pack-forget');
    await this.refcounts.forgetDeleted(deleted);
    result.deleted = deleted;
    this.counters.packsDeleted += deleted.length;
  }

  private async reconcileNow(): Promise<ReconcileResult> {
    const started = performance.now();
    const refcounts = this.refcounts;
    const result: ReconcileResult = {
      manifests: 0, live_packs: 0, store_packs: 0, manifest_corrections: 0, set_corrections: 0, refcount_corrections: 0, packs_adopted: 0,
      unreadable_manifests: 0, log_objects_deleted: 0, duration_ms: 0,
    };
    const resolved = await refcounts.resolveIntents();
    this.counters.intentsCommitted += resolved.committed;
    this.counters.intentsReverted += resolved.reverted;
    const counted = await refcounts.countedKeys();
    const keys = (await this.store.list('volumes/')).filter((o) => isManifestKey(o.key));
    const listed = new Set(keys.map((o) => o.key));
    const live = new Set<string>();
    const correct = (what: string, fields: Record<string, string | number>) => {
      result.manifest_corrections++;
      this.counters.manifestCorrections++;
      this.log.warn(`reconcile: ${what}`, fields);
    };
    await eachLimit(keys, READ_CONCURRENCY, async ({ key }) => {
      const object = await this.store.get(key);
      if (object === undefined) return; // deleted since the listing
      let packs: Set<string>;
      try {
        packs = packsOf(decodeManifest(key, object.body, this.cipher).blocks);
      } catch (err) {
        result.unreadable_manifests++;
        this.log.error('reconcile: cannot read a manifest; its packs are unknown, so nothing is deleted this time', { key, error: errorMessage(err) });
        return;
      }
      result.manifests++;
      for (const p of packs) live.add(p);
      const changed = await refcounts.setCounted(key, counted.get(key), object.etag, packs);
      if (changed !== undefined && (changed.added.length > 0 || changed.dropped.length > 0 || counted.get(key) !== object.etag)) {
        correct('counted packs of a manifest did not match it', { key, added: changed.added.length, dropped: changed.dropped.length });
      }
    });
    // Keys counted whose object is gone (a delete whose refcount step did not happen).
    for (const [key, etag] of counted) {
      if (listed.has(key) || (await this.store.head(key)) !== undefined) continue;
      try {
        const released = await refcounts.removeManifest(key, etag);
        if (released > 0) correct('a counted manifest is gone from the store; released its packs', { key, packs: released });
      } catch (err) {
        if (!(err instanceof WritePendingError)) throw err;
      }
    }
    // Holder counts of pack sets first: a set released here changes pack refcounts.
    result.set_corrections = await refcounts.fixSetHolders();
    this.counters.setCorrections += result.set_corrections;
    if (result.set_corrections > 0) this.log.warn('reconcile: pack sets held by a wrong count corrected', { sets: result.set_corrections });
    for (const drift of await refcounts.refcountDrift()) {
      const fixed = await refcounts.fixRefcount(drift.id);
      if (fixed === undefined || fixed.before === fixed.after) continue;
      result.refcount_corrections++;
      this.counters.refcountCorrections++;
      this.log.warn('reconcile: refcount drift corrected', { pack: drift.id, was: fixed.before, now: fixed.after });
    }
    const rows = await refcounts.packRows();
    const packObjects = await this.store.list('packs/');
    result.store_packs = packObjects.length;
    const orphans: Array<{ id: string; since: number }> = [];
    const inStore = new Set<string>();
    for (const o of packObjects) {
      const id = packIdFromKey(o.key);
      if (id === undefined) continue;
      inStore.add(id);
      if (!rows.has(id)) orphans.push({ id, since: o.lastModified.getTime() });
    }
    result.packs_adopted = await refcounts.adoptPacks(orphans);
    this.counters.packsAdopted += result.packs_adopted;
    for (const id of live) {
      if (rows.get(id)?.state === 'deleting') this.log.error('reconcile: a manifest names a pack that is being deleted', { pack: packKey(id) });
      else if (!inStore.has(id)) this.log.error('reconcile: a manifest names a pack that is not in the store (run `updraft scrub`)', { pack: packKey(id) });
    }
    result.live_packs = live.size;
    if (result.unreadable_manifests === 0) {
      const previous = await refcounts.meta('reconciled_at');
      await refcounts.setMeta('reconciled_at', previous, String(refcounts.now()));
    } else {
      // Until every manifest can be read, the live set is not known: no deletion.
      await refcounts.db.tx((tx) => tx.run(`DELETE FROM gc_meta WHERE name = 'reconciled_at'`));
    }
    // Log objects are not packs: nothing counts them; those no replay can need any more go here.
    const swept = await sweepLogObjects(this.store, this.cipher, storedManifestMeta(this.store, this.cipher));
    result.log_objects_deleted = swept.deleted.length;
    for (const key of swept.unreadable) this.log.error('reconcile: a log object does not decode; a promotion that needs it will fail', { key });
    this.counters.reconciliations++;
    result.duration_ms = Math.round(performance.now() - started);
    this.log.info('reconciled refcounts with the store', { ...result });
    return result;
  }

  /**
   * Run on a timer: a deletion cycle every `intervalMs` (the first soon after start),
   * reconciliation first when the last one (by any host sharing the database) is older
   * than `reconcileIntervalMs`, or there never was one and a pack is waiting for deletion.
   */
  start(): void {
    const tick = async () => {
      if (this.stopped) return;
      try {
        const last = await this.refcounts.meta('reconciled_at');
        const now = this.refcounts.now();
        // The first reconciliation waits until there is something to delete: a host that
        // only reads volumes never lists or reads the store's manifests for GC.
        const due = last === undefined
          ? await this.refcounts.anyDeletable(now - this.settings.gracePeriodMs)
          : now - Number(last) >= this.settings.reconcileIntervalMs;
        if (due) {
          // One host of a shared database wins the turn; the others just run their cycle.
          const next = String(this.refcounts.now());
          if (last === undefined || (await this.refcounts.setMeta('reconciled_at', last, next))) await this.reconcile();
          else await this.cycle();
        } else {
          await this.cycle();
        }
      } catch (err) {
        this.log.error('gc cycle failed', { error: errorMessage(err) });
      }
      if (!this.stopped) this.timer = setTimeout(() => void tick(), this.settings.intervalMs).unref();
    };
    this.timer = setTimeout(() => void tick(), Math.min(1000, this.settings.intervalMs)).unref();
  }

  /** Stop the timer and wait for a cycle in flight. */
  async stop(): Promise<void> {
    this.stopped = true;
    if (this.timer) clearTimeout(this.timer);
    await this.tail;
  }
}
