// Pack refcounts (DESIGN.md: gc/, invariant 6). Every manifest and checkpoint in the
// store is counted as a pack set: the packs its blocks are in. A pack's refcount is the
// number of pack sets naming it (plus writes in flight that added it); a set is counted
// once however many keys share it. Every manifest write applies its delta of packs
// (added, dropped) to its key's set, so the cost is O(packs changed), never O(volumes);
// a fork shares its source's set, so it costs O(1) rows whatever the volume holds.
//
// PackRefcounts is what the rest of the code calls; each concern is a file:
//   schema.ts           the tables (one schema for SQLite and PostgreSQL) and migrations
//   pack-sets.ts        sets and pack rows: the steps every counting transaction is made of
//   manifest-writes.ts  the manifest-write protocol: intents, begin, commit, resolution
//   uploads.ts          pack registration and the uploads keys that hold unnamed uploads
//   deletion.ts         what the deletion worker reads and claims
//   reconciliation.ts   what reconciliation reads and corrects
import type { Logger } from '../log.js';
import type { CountedManifest, ManifestWrite, PackRefcounts as CountedWrites, PutCondition } from '../store/counted.js';
import { DeletionQueries } from './deletion.js';
import { ManifestWrites, type IntentOptions } from './manifest-writes.js';
import { PackSets } from './pack-sets.js';
import { ReconciliationQueries } from './reconciliation.js';
import { openSchema } from './schema.js';
import type { SqlDatabase } from './sql.js';
import { UploadHolds } from './uploads.js';

export interface RefcountOptions extends IntentOptions {
  now?: () => number;
}

export class PackRefcounts implements CountedWrites {
  readonly now: () => number;
  private readonly writes: ManifestWrites;
  private readonly uploads: UploadHolds;
  private readonly deletion: DeletionQueries;
  private readonly reconciliation: ReconciliationQueries;

  private constructor(
    readonly db: SqlDatabase,
    readonly databaseId: string,
    private readonly options: RefcountOptions,
  ) {
    this.now = options.now ?? Date.now;
    const sets = new PackSets(db, this.now, options.store, options.log);
    this.writes = new ManifestWrites(sets, options);
    this.uploads = new UploadHolds(sets);
    this.deletion = new DeletionQueries(db);
    this.reconciliation = new ReconciliationQueries(sets, options.log);
  }

  /** Create the schema if missing (or migrate an older one) and return the refcounts of `db`. */
  static async open(db: SqlDatabase, options: RefcountOptions): Promise<PackRefcounts> {
    return new PackRefcounts(db, await openSchema(db, options.log), options);
  }

  get settleMs(): number {
    return this.options.settleMs;
  }

  get log(): Logger {
    return this.options.log;
  }

  // ---- packs and uploads keys (uploads.ts) --------------------------------------------

  /** Give a pack about to be uploaded a row; with `hold`, in the set of that uploads key. Resolves once committed. */
  registerPack(id: string, hold?: string): Promise<void> {
    return this.uploads.registerPack(id, hold);
  }

  /** Add `packs` (already in the store) to the set of uploads key `hold`; returns those being deleted or gone. */
  holdUploads(hold: string, packs: readonly string[]): Promise<string[]> {
    return this.uploads.holdUploads(hold, packs);
  }

  /** A manifest naming what the volume needs is committed: let go of what `hold` holds but `keep`. Returns how many packs. */
  settleUploads(hold: string, keep: readonly string[] = []): Promise<number> {
    return this.uploads.settleUploads(hold, keep);
  }

  /** The volume left the host: let go of uploads key `hold` and what it holds. Returns how many packs it held. */
  releaseUploads(hold: string): Promise<number> {
    return this.uploads.releaseUploads(hold);
  }

  /** The volumes whose uploads host `hostId` holds packs for. */
  heldUploads(hostId: string): Promise<string[]> {
    return this.uploads.heldUploads(hostId);
  }

  /** Let go of every host's uploads of `volume` (it is purged). Returns how many packs they held. */
  releaseUploadsOfVolume(volume: string): Promise<number> {
    return this.uploads.releaseUploadsOfVolume(volume);
  }

  // ---- manifest writes (manifest-writes.ts) -------------------------------------------

  /** Step 1 of a manifest write: increment what it adds, record the intent. */
  begin(key: string, packs: ReadonlySet<string>, hash: string, known?: CountedManifest, share?: { key: string; etag: string }, condition?: PutCondition): Promise<ManifestWrite> {
    return this.writes.begin(key, packs, hash, known, share, condition);
  }

  /** Step 3 after the PUT landed with `etag`: the key's counted packs are now `write.packs`. */
  commit(write: ManifestWrite, etag: string): Promise<CountedManifest> {
    return this.writes.commit(write, etag);
  }

  /** The PUT definitely did not land: revert the increments and the hold. */
  abort(write: ManifestWrite): Promise<void> {
    return this.writes.abort(write);
  }

  /** Resolve unfinished writes (all, or those of `key` / `host`) by reading their key in the store. */
  resolveIntents(filter: { key?: string; host?: string; settleMs?: number } = {}): Promise<{ committed: number; reverted: number; pending: number }> {
    return this.writes.resolveIntents(filter);
  }

  /** The packs counted for `key`, if any. */
  counted(key: string): Promise<CountedManifest | undefined> {
    return this.writes.counted(key);
  }

  /** The object at `key` was deleted from the store (with `etag`: that version): drop what it counted. Returns the packs it counted. */
  removeManifest(key: string, etag?: string): Promise<number> {
    return this.writes.removeManifest(key, etag);
  }

  // ---- deletion (deletion.ts) ---------------------------------------------------------

  /** Whether a cycle with `cutoff` has anything to delete (or to finish deleting). */
  anyDeletable(cutoff: number): Promise<boolean> {
    return this.deletion.anyDeletable(cutoff);
  }

  /** Packs at refcount 0 since `cutoff` or earlier, oldest first (what a cycle would delete). */
  deletable(cutoff: number, limit: number): Promise<string[]> {
    return this.deletion.deletable(cutoff, limit);
  }

  /** Mark up to `limit` deletable packs 'deleting' and return them with any an interrupted cycle left 'deleting'. */
  claimDeletable(cutoff: number, limit: number): Promise<string[]> {
    return this.deletion.claimDeletable(cutoff, limit);
  }

  /** The packs' objects are deleted: forget them. */
  forgetDeleted(ids: readonly string[]): Promise<void> {
    return this.deletion.forgetDeleted(ids);
  }

  /** Packs with a live row (referenced, or unreferenced within the grace period): what the store holds for GC. */
  livePacks(): Promise<number> {
    return this.deletion.livePacks();
  }

  // ---- reconciliation (reconciliation.ts) ---------------------------------------------

  /** Every counted manifest and checkpoint key and its etag (not the uploads keys). */
  countedKeys(): Promise<Map<string, string>> {
    return this.reconciliation.countedKeys();
  }

  /** Keys with an unresolved write. */
  pendingKeys(): Promise<Set<string>> {
    return this.reconciliation.pendingKeys();
  }

  /** Every pack row. */
  packRows(): Promise<Map<string, { refs: number; state: string; zeroSince: number | null }>> {
    return this.reconciliation.packRows();
  }

  /** Give packs in the store without a row one (refcount 0, unreferenced since `since`). Returns how many were added. */
  adoptPacks(packs: ReadonlyArray<{ id: string; since: number }>): Promise<number> {
    return this.reconciliation.adoptPacks(packs);
  }

  /** Make `key`'s counted packs exactly `packs` of the object with `etag`, if `expected` is still counted and no write is pending. */
  setCounted(key: string, expected: string | undefined, etag: string, packs: ReadonlySet<string>): Promise<{ added: string[]; dropped: string[] } | undefined> {
    return this.reconciliation.setCounted(key, expected, etag, packs);
  }

  /** Sets whose holder count differs from the keys and intents naming them get the true count. Returns how many. */
  fixSetHolders(): Promise<number> {
    return this.reconciliation.fixSetHolders();
  }

  /** Packs whose refcount differs from the counted sets plus pending intents naming them. */
  refcountDrift(): Promise<Array<{ id: string; refs: number; expected: number }>> {
    return this.reconciliation.refcountDrift();
  }

  /** Set a pack's refcount to what is counted for it, under its row lock. Returns the refcount before and after. */
  fixRefcount(id: string): Promise<{ before: number; after: number } | undefined> {
    return this.reconciliation.fixRefcount(id);
  }

  /** A gc_meta value. */
  meta(name: string): Promise<string | undefined> {
    return this.reconciliation.meta(name);
  }

  /** Set a gc_meta value if it is still `expected` (undefined: absent); false if someone else changed it. */
  setMeta(name: string, expected: string | undefined, value: string): Promise<boolean> {
    return this.reconciliation.setMeta(name, expected, value);
  }
}
