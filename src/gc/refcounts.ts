// Pack refcounts (DESIGN.md: gc/, invariant 6). Every manifest and checkpoint in the
// store is counted as a pack set: the packs its blocks are in. A pack's refcount is the
// number of pack sets naming it (plus writes in flight that added it); a set is counted
// once however many keys share it. Every manifest write applies its delta of packs
// (added, dropped) to its key's set, so the cost is O(packs changed), never O(volumes);
// a fork shares its source's set, so it costs O(1) rows whatever the volume holds.
//
// Tables (one schema for SQLite and PostgreSQL):
//   gc_packs       id, refs, state ('live' | 'deleting'), zero_since (ms; set while refs = 0)
//   gc_manifests   key → etag of the object whose packs are counted, set_id of its set
//   gc_sets        id, refs: the keys (gc_manifests rows) and intents that hold the set (an
//                  intent that changes its key's own set in place does not: the row does)
//   gc_set_packs   (set_id, pack): the packs of that set
//   gc_intents     a manifest write between its increments and its PUT's outcome, with the
//                  condition its PUT carries (put_condition: the etag of If-Match, '*' for
//                  If-None-Match; NULL for intents recorded before schema 3: unknown)
//   gc_meta        database id, schema version, last reconciliation
//
// A key's set is its own while no other key or intent holds it: a write then changes it
// in place. A lazy fork whose source object is the one counted for the source key holds
// the source's set (one increment of gc_sets.refs) instead of counting its packs again;
// so does a consistent fork or checkpoint that names exactly the source's counted packs.
// A write of a key whose set is shared starts a new set of its own (every pack +1, once);
// the last reference to a set going releases it (its packs −1, its rows gone).
//
// A manifest write (`putCounted`, store/counted.ts):
//   1. begin: one transaction increments the added packs (only 'live' rows: a pack being
//      deleted refuses, and the writer uploads its blocks again), holds the set the key
//      will count, and records an intent (key, set, added, dropped, BLAKE3 of the body).
//      Committed before the PUT.
//   2. PUT the manifest (conditional).
//   3. commit: one transaction deletes the intent, records the new etag and set, moves
//      the set's rows, decrements the dropped packs, lets go of a set the key left. A
//      definite failure (condition lost, target exists) reverts the increments and the
//      hold instead; an ambiguous one (the store did not answer) leaves the intent.
// Crash points: before 1 nothing changed; between 1 and 3 the intent holds the added
// packs up (over-counting, which is safe); at start-up and in every deletion cycle an
// intent is resolved by reading the key: the body is ours → step 3; it is not, and the
// PUT can no longer land → revert. It can no longer land once it is older than the
// settle time, or at once when it was conditional on an etag the key no longer has: an
// s3:// etag is the body's MD5, and a key does not get the same manifest body again (each
// names when it was laid out; bless's, the image file's mtime); a file:// etag never comes
// back. So an etag that is gone stays gone. Dropped packs are only
// decremented once the new manifest is in the store, so no crash point under-counts.
//
// Uploads no manifest names yet (invariant 6): the packs a volume's uploads on a host make
// or rely on (the dirty budget's, continuous mode's, a drain's before its manifest) are a
// set held by the key `host/{host}/volumes/{name}/uploads` (etag 'held'), added in the
// same transaction that registers each pack, so the cache may evict their blocks at once.
// The set is let go once the volume's own manifest naming them is committed, or when the
// volume leaves the host (removed, purged, or gone at a restart). No store object backs
// such a key: reconciliation leaves it alone, and counts its packs like any set's.
//
// One landing write per key at a time: a key's counted packs must not move between a
// write's begin and its commit, or the delta computed at begin is wrong. A PUT with
// condition C lands only while the object satisfies C, and whichever of two PUTs with the
// same C lands first makes the other fail. So `begin` lets a write of a key proceed while
// an earlier intent on it is unresolved only if both carry the same If-Match etag (at most
// one of them lands: the delta of each is against the same counted packs, and the commit
// of the one that lands reverts the other for good, in the same transaction), or the
// earlier one is a create (If-None-Match, on a fresh set of its own, so its commit does not
// depend on the key's counted packs: it lands only if the key is deleted first). Any other
// intent on the key is resolved from the store first (a landed one is committed, and the
// caller's next PUT is conditional on its etag); `begin` refuses while one may still land.
// Over-counting meanwhile is safe: the earlier intent keeps its increments until reverted.
// A create's intent is not reverted by a successor landing (the key may be deleted and its
// PUT land after); it waits for the settle time. Removals skip keys with intents. A set
// changed in place is held by its key alone: a fork does not share the set of a key with
// a write in flight, and begin locks the key's row (an UPDATE of it) so that the two
// cannot cross.
import crypto from 'node:crypto';
import { errorMessage, type Logger } from '../log.js';
import type { StoreTime } from '../objectstore/clock.js';
import type { ObjectStore } from '../objectstore/types.js';
import {
  bodyHash, IF_NONE_MATCH, PacksGoneError, WritePendingError,
  type CountedManifest, type ManifestWrite, type PackRefcounts as CountedWrites, type PutCondition,
} from '../store/counted.js';
import type { SqlDatabase, SqlTx } from './sql.js';

/** The schema this code reads and writes, in gc_meta 'schema'. Version 1 counted packs per key (gc_manifest_packs); 2 had no put_condition. */
const SCHEMA_VERSION = 3;

const SCHEMA = [
  `CREATE TABLE IF NOT EXISTS gc_packs (id TEXT PRIMARY KEY, refs BIGINT NOT NULL, state TEXT NOT NULL, zero_since BIGINT)`,
  `CREATE INDEX IF NOT EXISTS gc_packs_unreferenced ON gc_packs (zero_since) WHERE refs = 0`,
  `CREATE TABLE IF NOT EXISTS gc_manifests (key TEXT PRIMARY KEY, etag TEXT NOT NULL, set_id TEXT NOT NULL)`,
  `CREATE TABLE IF NOT EXISTS gc_sets (id TEXT PRIMARY KEY, refs BIGINT NOT NULL)`,
  // No index by pack: each manifest written adds its new packs' rows at random places in
  // one, which makes a fork's rows several times slower to write (docs/benchmarks.md).
  // Only reconciliation counts by pack (one GROUP BY over the table, and a scan per
  // drifted pack).
  `CREATE TABLE IF NOT EXISTS gc_set_packs (set_id TEXT NOT NULL, pack TEXT NOT NULL, PRIMARY KEY (set_id, pack))`,
  `CREATE TABLE IF NOT EXISTS gc_intents (id TEXT PRIMARY KEY, key TEXT NOT NULL, set_id TEXT NOT NULL, body_hash TEXT NOT NULL, host TEXT NOT NULL,
     created BIGINT NOT NULL, added TEXT NOT NULL, dropped TEXT NOT NULL, put_condition TEXT)`,
  `CREATE INDEX IF NOT EXISTS gc_intents_key ON gc_intents (key)`,
];

/**
 * Schema 1 → 2, in one transaction: each key's rows become a set of its own named by
 * the key (new sets get random UUIDs, so the names cannot meet), held by its row, or by
 * the unresolved intents of a key with no row yet.
 */
const MIGRATE_1_TO_2 = [
  `ALTER TABLE gc_manifests ADD COLUMN set_id TEXT`,
  `UPDATE gc_manifests SET set_id = key`,
  `ALTER TABLE gc_intents ADD COLUMN set_id TEXT`,
  `UPDATE gc_intents SET set_id = key`,
  `CREATE TABLE gc_sets (id TEXT PRIMARY KEY, refs BIGINT NOT NULL)`,
  `INSERT INTO gc_sets (id, refs) SELECT key, 1 FROM gc_manifests`,
  `INSERT INTO gc_sets (id, refs) SELECT key, count(*) FROM gc_intents i WHERE NOT EXISTS (SELECT 1 FROM gc_manifests m WHERE m.key = i.key) GROUP BY key`,
  `CREATE TABLE gc_set_packs (set_id TEXT NOT NULL, pack TEXT NOT NULL, PRIMARY KEY (set_id, pack))`,
  `INSERT INTO gc_set_packs (set_id, pack) SELECT key, pack FROM gc_manifest_packs`,
  `DROP TABLE gc_manifest_packs`,
];

/** Schema 2 → 3: intents record their PUT's condition (unknown for those already there). */
const MIGRATE_2_TO_3 = [`ALTER TABLE gc_intents ADD COLUMN put_condition TEXT`];

/** SQL condition on an intent `i`: it holds its set (it is not a change of its key's own set in place). */
const HOLDING_INTENT = `NOT EXISTS (SELECT 1 FROM gc_manifests m WHERE m.key = i.key AND m.set_id = i.set_id)`;

/** Whether two sets of packs hold the same ids. */
export function sameSet(a: ReadonlySet<string>, b: ReadonlySet<string>): boolean {
  if (a.size !== b.size) return false;
  for (const id of a) if (!b.has(id)) return false;
  return true;
}

const EMPTY: ReadonlySet<string> = new Set();

/** The key holding the packs that `volume`'s uploads on host `hostId` made or rely on, until a manifest names them. */
export function uploadsKey(hostId: string, volume: string): string {
  return `${UPLOADS_PREFIX}${hostId}/volumes/${volume}/uploads`;
}
const UPLOADS_PREFIX = 'host/';
const UPLOADS_ETAG = 'held';

/** `text` for a LIKE pattern with ESCAPE '!'. */
function likeLiteral(text: string): string {
  return text.replace(/[!%_]/g, (c) => `!${c}`);
}

/** A registerPack call waiting for its transaction. */
interface PendingRegistration {
  id: string;
  /** The uploads key that holds the pack from its registration on (see uploadsKey). */
  hold?: string;
  /** Give up on a pack that stays in deletion past this (ms, the clock of `now`). */
  deadline: number;
  resolve: () => void;
  reject: (err: unknown) => void;
}

function words(text: string): string[] {
  return text === '' ? [] : text.split(' ');
}

export interface RefcountOptions {
  /** This host, recorded in intents. */
  hostId: string;
  /** The store manifests live in: intents are resolved by reading it. */
  store: ObjectStore;
  /** How long after an intent its PUT can no longer land (request timeout × attempts); 0 for file://. */
  settleMs: number;
  log: Logger;
  now?: () => number;
  /**
   * The store's clock (objectstore/clock.ts), which intents' settle time is judged on: an
   * intent records the latest the store's time can be at its start, and is reverted only
   * once the earliest the store's time can be is a settle time past that, so a host whose
   * own clock is off neither ages an intent early nor holds it forever. Without it, `now`.
   */
  storeTime?: () => Promise<StoreTime>;
}

/** HEADs in flight at once when packs without a row are adopted. */
const ADOPT_CONCURRENCY = 16;

/** Run `work` over `items`, at most `n` at a time. */
export async function eachLimit<T>(items: readonly T[], n: number, work: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  await Promise.all(Array.from({ length: Math.min(n, items.length) }, async () => {
    while (next < items.length) await work(items[next++]);
  }));
}

export class PackRefcounts implements CountedWrites {
  readonly now: () => number;
  private constructor(
    readonly db: SqlDatabase,
    readonly databaseId: string,
    private readonly options: RefcountOptions,
  ) {
    this.now = options.now ?? Date.now;
  }

  /** Create the schema if missing (or migrate an older one) and return the refcounts of `db`. */
  static async open(db: SqlDatabase, options: RefcountOptions): Promise<PackRefcounts> {
    const create = () =>
      db.tx(async (tx) => {
        await tx.run(`CREATE TABLE IF NOT EXISTS gc_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)`);
        const meta = new Map((await tx.all<{ name: string; value: string }>(`SELECT name, value FROM gc_meta WHERE name IN ('database_id', 'schema')`)).map((r) => [r.name, r.value]));
        // A database with an id and no schema version was made by schema 1.
        const version = meta.has('schema') ? Number(meta.get('schema')) : meta.has('database_id') ? 1 : SCHEMA_VERSION;
        if (!(version >= 1 && version <= SCHEMA_VERSION)) {
          throw new Error(`gc database ${db.description}: schema version ${meta.get('schema')} is newer than this updraft reads (${SCHEMA_VERSION}); upgrade updraft`);
        }
        if (version === 1) {
          for (const statement of MIGRATE_1_TO_2) await tx.run(statement);
          options.log.info('gc database: migrated the refcount schema 1 -> 2 (pack sets)', { database: db.description });
        }
        if (version <= 2) {
          for (const statement of MIGRATE_2_TO_3) await tx.run(statement);
          options.log.info('gc database: migrated the refcount schema 2 -> 3 (intents record their PUT condition)', { database: db.description });
        }
        for (const statement of SCHEMA) await tx.run(statement);
        await tx.run(`INSERT INTO gc_meta (name, value) VALUES ('database_id', $1) ON CONFLICT (name) DO NOTHING`, [crypto.randomUUID()]);
        await tx.run(`INSERT INTO gc_meta (name, value) VALUES ('schema', $1) ON CONFLICT (name) DO UPDATE SET value = excluded.value`, [String(SCHEMA_VERSION)]);
        return (await tx.all<{ value: string }>(`SELECT value FROM gc_meta WHERE name = 'database_id'`))[0].value;
      });
    let id: string;
    try {
      id = await create();
    } catch (err) {
      // Two hosts creating (or migrating) the schema at once on PostgreSQL: one loses on
      // the catalog or on a column the other added; the tables are there now.
      const code = (err as { cause?: { code?: string } }).cause?.code;
      if (code !== '23505' && code !== '42701' && code !== '42P07') throw err;
      id = await create();
    }
    return new PackRefcounts(db, id, options);
  }

  get settleMs(): number {
    return this.options.settleMs;
  }

  get log(): Logger {
    return this.options.log;
  }

  // ---- packs ------------------------------------------------------------------------

  /**
   * Give a pack about to be uploaded a row (refcount 0, unreferenced since now), so an
   * upload no manifest ever names is collected after the grace period. Resolves once the
   * row is committed (durably: SQLite's commits are synced). Waits while the pack is being
   * deleted: its PUT must come after the deletion, not before.
   *
   * Group commit: packs registered in the same turn of the event loop, or while a
   * registration transaction runs, share the next transaction. A drain's uploads register
   * a pack each, and one synced SQLite commit per pack would hold the event loop for most
   * of a second per GiB (docs/benchmarks.md).
   */
  registerPack(id: string, hold?: string): Promise<void> {
    return new Promise((resolve, reject) => this.queueRegistration({ id, hold, deadline: this.now() + 60_000, resolve, reject }));
  }

  private queueRegistration(pending: PendingRegistration): void {
    this.registrations.push(pending);
    if (!this.registering) {
      this.registering = true;
      setImmediate(() => void this.registerWaiting());
    }
  }

  /** Registrations waiting for the next transaction, and whether one is scheduled or running. */
  private registrations: PendingRegistration[] = [];
  private registering = false;

  /** One transaction for every waiting registration; then again while more came meanwhile. */
  private async registerWaiting(): Promise<void> {
    while (this.registrations.length > 0) {
      const batch = this.registrations;
      this.registrations = [];
      let refused: PendingRegistration[];
      try {
        refused = await this.db.tx(async (tx) => {
          const out: PendingRegistration[] = [];
          const now = this.now();
          for (const pending of batch) {
            if (pending.hold !== undefined) {
              if (!(await this.holdRegistered(tx, pending.hold, pending.id))) out.push(pending);
              continue;
            }
            const n = await tx.run(
              `INSERT INTO gc_packs (id, refs, state, zero_since) VALUES ($1, 0, 'live', $2)
               ON CONFLICT (id) DO UPDATE SET zero_since = CASE WHEN gc_packs.refs = 0 THEN excluded.zero_since ELSE gc_packs.zero_since END
               WHERE gc_packs.state = 'live'`,
              [pending.id, now],
            );
            if (n !== 1) out.push(pending);
          }
          return out;
        });
      } catch (err) {
        for (const pending of batch) pending.reject(err);
        continue;
      }
      const refusedSet = new Set(refused);
      for (const pending of batch) if (!refusedSet.has(pending)) pending.resolve();
      for (const pending of refused) {
        if (this.now() > pending.deadline) {
          pending.reject(new Error(`pack ${pending.id} has been in deletion for a minute; cannot upload it again (gc database ${this.db.description})`));
        } else {
          // Being deleted: ask again in a moment (the deletion worker finishes it, then the row is gone).
          setTimeout(() => this.queueRegistration(pending), 50);
        }
      }
    }
    this.registering = false;
  }

  /**
   * Inside a registration: pack `id` joins the set of uploads key `hold` (+1, a row made
   * for it if it has none). False when it is being deleted (nothing changed then).
   */
  private async holdRegistered(tx: SqlTx, hold: string, id: string): Promise<boolean> {
    const set = await this.uploadsSet(tx, hold);
    if ((await tx.run(`INSERT INTO gc_set_packs (set_id, pack) VALUES ($1, $2) ON CONFLICT (set_id, pack) DO NOTHING`, [set, id])) === 0) return true;
    const n = await tx.run(
      `INSERT INTO gc_packs (id, refs, state, zero_since) VALUES ($1, 1, 'live', NULL)
       ON CONFLICT (id) DO UPDATE SET refs = gc_packs.refs + 1, zero_since = NULL WHERE gc_packs.state = 'live'`,
      [id],
    );
    if (n === 1) return true;
    await tx.run(`DELETE FROM gc_set_packs WHERE set_id = $1 AND pack = $2`, [set, id]);
    return false;
  }

  /** The set of uploads key `key`, made (empty, held by the key's row) if it has none. */
  private async uploadsSet(tx: SqlTx, key: string): Promise<string> {
    const row = await this.lockKey(tx, key);
    if (row !== undefined) return row.set;
    const set = await this.newSet(tx);
    if ((await tx.run(`INSERT INTO gc_manifests (key, etag, set_id) VALUES ($1, $2, $3) ON CONFLICT (key) DO NOTHING`, [key, UPLOADS_ETAG, set])) === 1) return set;
    // Made meanwhile by another transaction (PostgreSQL waited for it): use that one.
    await tx.run(`DELETE FROM gc_sets WHERE id = $1`, [set]);
    const made = await this.lockKey(tx, key);
    if (made === undefined) throw new Error(`gc database ${this.db.description}: ${key}: its row vanished while it was made`);
    return made.set;
  }

  /**
   * Add `packs` (already in the store: blocks an upload found there) to the set of
   * uploads key `hold`. Returns the packs that are being deleted or gone from the store
   * (nothing is held then): the caller uploads their blocks again.
   */
  async holdUploads(hold: string, packs: readonly string[]): Promise<string[]> {
    if (packs.length === 0) return [];
    for (let attempt = 0; ; attempt++) {
      const missing = await this.db.tx(async (tx) => {
        const set = await this.uploadsSet(tx, hold);
        const added = (await tx.all<{ pack: string }>(
          `INSERT INTO gc_set_packs (set_id, pack) SELECT CAST($1 AS TEXT), v FROM ${tx.rows(2)} WHERE true ON CONFLICT (set_id, pack) DO NOTHING RETURNING pack`,
          [set, tx.list(packs)],
        )).map((r) => r.pack);
        const refused = await this.increment(tx, added);
        // Throwing rolls the set's new rows and the increments back.
        if (refused.length > 0) throw new MissingPacks(refused);
        return [];
      }).catch((err): string[] => {
        if (err instanceof MissingPacks) return err.packs;
        throw err;
      });
      if (missing.length === 0) return [];
      const gone = await this.adoptOrGone(hold, missing);
      if (gone.length > 0 || attempt >= 2) return gone.length > 0 ? gone : missing;
    }
  }

  /**
   * A manifest of the volume that names all it still needs is committed: let go of the
   * packs uploads key `hold` holds, keeping its set for the next uploads, and in it the
   * packs of `keep` (blocks the volume sealed after that manifest's cut rely on them).
   * Returns how many packs it let go of.
   */
  async settleUploads(hold: string, keep: readonly string[] = []): Promise<number> {
    return this.db.tx(async (tx) => {
      const set = (await tx.all<{ set_id: string }>(`SELECT set_id FROM gc_manifests WHERE key = $1`, [hold]))[0]?.set_id;
      if (set === undefined) return 0;
      const packs = (keep.length === 0
        ? await tx.all<{ pack: string }>(`DELETE FROM gc_set_packs WHERE set_id = $1 RETURNING pack`, [set])
        : await tx.all<{ pack: string }>(`DELETE FROM gc_set_packs WHERE set_id = $1 AND pack NOT IN (SELECT v FROM ${tx.rows(2)}) RETURNING pack`, [set, tx.list(keep)])
      ).map((r) => r.pack);
      await this.decrement(tx, packs);
      return packs.length;
    });
  }

  /** The volume left the host (removed, purged): let go of uploads key `hold` and what it holds. Returns how many packs it held. */
  async releaseUploads(hold: string): Promise<number> {
    return this.db.tx(async (tx) => {
      const removed = await tx.all<{ set_id: string }>(`DELETE FROM gc_manifests WHERE key = $1 RETURNING set_id`, [hold]);
      if (removed.length === 0) return 0;
      const [{ n }] = await tx.all<{ n: number }>(`SELECT count(*) AS n FROM gc_set_packs WHERE set_id = $1`, [removed[0].set_id]);
      await this.letGoSet(tx, removed[0].set_id);
      return Number(n);
    });
  }

  /** The volumes whose uploads host `hostId` holds packs for. */
  async heldUploads(hostId: string): Promise<string[]> {
    const prefix = `${UPLOADS_PREFIX}${hostId}/volumes/`;
    const rows = await this.db.tx((tx) => tx.all<{ key: string }>(`SELECT key FROM gc_manifests WHERE key LIKE $1 ESCAPE '!'`, [`${likeLiteral(prefix)}%/uploads`]));
    return rows.map((r) => r.key.slice(prefix.length, -'/uploads'.length));
  }

  /** Let go of every host's uploads of `volume` (it is purged: its content is thrown away). Returns how many packs they held. */
  async releaseUploadsOfVolume(volume: string): Promise<number> {
    const rows = await this.db.tx((tx) =>
      tx.all<{ key: string }>(`SELECT key FROM gc_manifests WHERE key LIKE $1 ESCAPE '!'`, [`${likeLiteral(UPLOADS_PREFIX)}%${likeLiteral(`/volumes/${volume}/uploads`)}`]),
    );
    let released = 0;
    // A host id has no '/' (config: host.id), so only that segment may stand for the host.
    const suffix = `/volumes/${volume}/uploads`;
    for (const { key } of rows) {
      if (key.slice(UPLOADS_PREFIX.length, -suffix.length).includes('/')) continue;
      released += await this.releaseUploads(key);
    }
    return released;
  }

  /** +1 on every 'live' pack of `ids`; returns the ids that were not (deleting, or no row). */
  private async increment(tx: SqlTx, ids: readonly string[]): Promise<string[]> {
    if (ids.length === 0) return [];
    const n = await tx.run(`UPDATE gc_packs SET refs = refs + 1, zero_since = NULL WHERE state = 'live' AND id IN (SELECT v FROM ${tx.rows(1)})`, [tx.list(ids)]);
    if (n === ids.length) return [];
    // Some were refused (the caller rolls the increments back): which.
    const live = await tx.all<{ id: string }>(`SELECT id FROM gc_packs WHERE state = 'live' AND id IN (SELECT v FROM ${tx.rows(1)})`, [tx.list(ids)]);
    const done = new Set(live.map((r) => r.id));
    return ids.filter((id) => !done.has(id));
  }

  /** −1 on every pack of `ids`; one that reaches 0 is unreferenced from now. */
  private async decrement(tx: SqlTx, ids: readonly string[]): Promise<void> {
    if (ids.length === 0) return;
    await tx.run(
      `UPDATE gc_packs SET refs = refs - 1, zero_since = CASE WHEN refs = 1 THEN $1 ELSE zero_since END
       WHERE refs > 0 AND id IN (SELECT v FROM ${tx.rows(2)})`,
      [this.now(), tx.list(ids)],
    );
  }

  /** A live row (refcount 0, unreferenced since now) for each pack of `ids` that has none. */
  private async insertLive(tx: SqlTx, ids: readonly string[]): Promise<void> {
    if (ids.length === 0) return;
    // WHERE true: SQLite's parser needs it between INSERT … SELECT and ON CONFLICT.
    await tx.run(
      `INSERT INTO gc_packs (id, refs, state, zero_since) SELECT v, 0, 'live', CAST($1 AS BIGINT) FROM ${tx.rows(2)} WHERE true ON CONFLICT (id) DO NOTHING`,
      [this.now(), tx.list(ids)],
    );
  }

  /**
   * Packs of `ids` with no row that are in the store get a live row (a store written
   * before GC was on, a database rebuilt, or another host's embedded database counted
   * them: a promotion or wake on this host meets every pack of the volume this way); the
   * rest are gone. The HEADs go ADOPT_CONCURRENCY at a time and the rows in one
   * transaction, not a commit per pack (which made a promotion of 1 GiB wait seconds).
   */
  private async adoptOrGone(key: string, ids: string[]): Promise<string[]> {
    const rows = await this.db.tx((tx) => tx.all<{ id: string; state: string }>(`SELECT id, state FROM gc_packs WHERE id IN (SELECT v FROM ${tx.rows(1)})`, [tx.list(ids)]));
    const state = new Map(rows.map((r) => [r.id, r.state]));
    const gone = ids.filter((id) => state.get(id) === 'deleting');
    const unknown = ids.filter((id) => !state.has(id));
    const adopted: string[] = [];
    await eachLimit(unknown, ADOPT_CONCURRENCY, async (id) => {
      if ((await this.options.store.head(`packs/${id.slice(0, 2)}/${id}`)) === undefined) gone.push(id);
      else adopted.push(id);
    });
    if (adopted.length > 0) {
      await this.db.tx((tx) => this.insertLive(tx, adopted));
      this.log.info('packs in the store had no refcount row; adopted them', { key, packs: adopted.length, first: adopted[0] });
    }
    return gone;
  }

  // ---- pack sets ----------------------------------------------------------------------

  /** Lock `key`'s row (an UPDATE of it, so that a concurrent begin or fork of the key waits) and read it. */
  private async lockKey(tx: SqlTx, key: string): Promise<{ etag: string; set: string } | undefined> {
    const row = (await tx.all<{ etag: string; set_id: string }>(`UPDATE gc_manifests SET etag = etag WHERE key = $1 RETURNING etag, set_id`, [key]))[0];
    return row === undefined ? undefined : { etag: row.etag, set: row.set_id };
  }

  /** The packs of set `id`. */
  private async setPacks(tx: SqlTx, id: string): Promise<Set<string>> {
    return new Set((await tx.all<{ pack: string }>(`SELECT pack FROM gc_set_packs WHERE set_id = $1`, [id])).map((r) => r.pack));
  }

  /** One more holder (a key's row or an intent) of set `id`, which exists. */
  private async holdSet(tx: SqlTx, id: string): Promise<void> {
    if ((await tx.run(`UPDATE gc_sets SET refs = refs + 1 WHERE id = $1`, [id])) === 0) {
      throw new Error(`gc database ${this.db.description}: pack set ${id} has no row`);
    }
  }

  /** Whether a write of `key` is unresolved. */
  private async writePending(tx: SqlTx, key: string): Promise<boolean> {
    return (await tx.all(`SELECT id FROM gc_intents WHERE key = $1`, [key])).length > 0;
  }

  /**
   * Whether an unresolved write of `key` keeps a write with `condition` from beginning: any
   * but a create, or one with the same If-Match etag (see the top of this file).
   */
  private async writeBlocking(tx: SqlTx, key: string, condition: PutCondition | undefined): Promise<boolean> {
    const rows = await tx.all<{ put_condition: string | null }>(`SELECT put_condition FROM gc_intents WHERE key = $1`, [key]);
    return rows.some((r) => r.put_condition !== IF_NONE_MATCH && (condition === undefined || condition === IF_NONE_MATCH || r.put_condition !== condition));
  }

  /** A new set with no packs yet, held once (by the intent or row about to name it). */
  private async newSet(tx: SqlTx): Promise<string> {
    const id = crypto.randomUUID();
    await tx.run(`INSERT INTO gc_sets (id, refs) VALUES ($1, 1)`, [id]);
    return id;
  }

  /** One holder of set `id` fewer; the last one releases it: its packs −1, its rows gone. */
  private async letGoSet(tx: SqlTx, id: string): Promise<void> {
    const rows = await tx.all<{ refs: number }>(`UPDATE gc_sets SET refs = refs - 1 WHERE id = $1 RETURNING refs`, [id]);
    if (rows.length > 0 && Number(rows[0].refs) > 0) return;
    await this.releaseSet(tx, id);
  }

  private async releaseSet(tx: SqlTx, id: string): Promise<void> {
    const packs = (await tx.all<{ pack: string }>(`DELETE FROM gc_set_packs WHERE set_id = $1 RETURNING pack`, [id])).map((r) => r.pack);
    await tx.run(`DELETE FROM gc_sets WHERE id = $1`, [id]);
    await this.decrement(tx, packs);
  }

  /**
   * The set a write of `key` (whose row `row` is locked) changes, and the packs counted in
   * it: the key's own set while nothing else holds it (held by the row alone); else a new
   * one, empty, held once by the write (every pack of the write is then added to it).
   */
  private async setToWrite(tx: SqlTx, row: { etag: string; set: string } | undefined, known?: CountedManifest): Promise<{ set: string; counted: ReadonlySet<string>; fresh: boolean }> {
    if (row !== undefined) {
      const holders = Number((await tx.all<{ refs: number }>(`SELECT refs FROM gc_sets WHERE id = $1`, [row.set]))[0]?.refs ?? 0);
      if (holders === 1) {
        return { set: row.set, counted: known !== undefined && known.etag === row.etag ? known.packs : await this.setPacks(tx, row.set), fresh: false };
      }
    }
    return { set: await this.newSet(tx), counted: EMPTY, fresh: true };
  }

  // ---- manifest writes ----------------------------------------------------------------

  /**
   * Step 1 of a manifest write of `key` naming `packs`: increment what it adds, record
   * the intent. `known` is the counted set the caller holds for the key (skips reading
   * it back when the etag still matches). `share`: `packs` are exactly the packs of the
   * object with `etag` at `key` (a lazy fork copies that object; a consistent fork or
   * checkpoint uploaded nothing new): when that object is the one counted for its key and
   * no write of it is in flight, the new key holds the same set and no pack is counted
   * again. `condition`: what the PUT will be conditional on (it must carry exactly that);
   * an unresolved earlier write of the key lets this one begin if it cannot land on the
   * same object (see the top of this file). PacksGoneError names packs that are being
   * deleted; WritePendingError says another write of the key may still land.
   */
  async begin(key: string, packs: ReadonlySet<string>, hash: string, known?: CountedManifest, share?: { key: string; etag: string }, condition?: PutCondition): Promise<ManifestWrite> {
    type Outcome = { write: ManifestWrite } | { pending: true } | { missing: string[] };
    for (let attempt = 0; ; attempt++) {
      // Read outside the transaction (it may ask the store), for each attempt: the PUT follows it.
      const created = this.options.storeTime === undefined ? this.now() : Math.ceil((await this.options.storeTime()).latest);
      const outcome: Outcome = await this.db.tx<Outcome>(async (tx) => {
        // The row first: two begins of the key take turns from here on.
        const row = await this.lockKey(tx, key);
        if (await this.writeBlocking(tx, key, condition)) return { pending: true as const };
        const record = async (write: ManifestWrite) => {
          await tx.run(
            `INSERT INTO gc_intents (id, key, set_id, body_hash, host, created, added, dropped, put_condition) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)`,
            [write.id, key, write.set, hash, this.options.hostId, created, write.added.join(' '), write.dropped.join(' '), condition ?? null],
          );
          return { write };
        };
        if (row === undefined && share !== undefined && share.key !== key) {
          const source = await this.lockKey(tx, share.key);
          if (source !== undefined && source.etag === share.etag && !(await this.writePending(tx, share.key))) {
            await this.holdSet(tx, source.set);
            return record({ id: crypto.randomUUID(), key, condition, set: source.set, packs, added: [], dropped: [] });
          }
        }
        // A create counts its packs on a set of its own: its commit then does not depend on
        // the key's counted packs, which a write passing its intent may change meanwhile.
        const { set, counted } = condition === IF_NONE_MATCH ? { set: await this.newSet(tx), counted: EMPTY } : await this.setToWrite(tx, row, known);
        const added = [...packs].filter((p) => !counted.has(p)).sort();
        const dropped = [...counted].filter((p) => !packs.has(p)).sort();
        const missing = await this.increment(tx, added);
        // Throwing rolls the increments and the hold back.
        if (missing.length > 0) throw new MissingPacks(missing);
        return record({ id: crypto.randomUUID(), key, condition, set, packs, added, dropped });
      }).catch((err): Outcome => {
        if (err instanceof MissingPacks) return { missing: err.packs };
        throw err;
      });
      if ('write' in outcome) return outcome.write;
      if (attempt >= 4) {
        throw 'pending' in outcome
          ? new WritePendingError(`${key}: an earlier write of it is unresolved (its PUT may still land); try again in ${Math.ceil(this.settleMs / 1000)} s`)
          : new PacksGoneError(key, outcome.missing);
      }
      if ('pending' in outcome) {
        const { pending } = await this.resolveIntents({ key });
        if (pending > 0) await new Promise((resolve) => setTimeout(resolve, 100 * (attempt + 1)));
      } else {
        const gone = await this.adoptOrGone(key, outcome.missing);
        if (gone.length > 0) throw new PacksGoneError(key, gone);
      }
    }
  }

  /** Step 3 after the PUT landed with `etag`: the key's counted packs are now `write.packs`. */
  async commit(write: ManifestWrite, etag: string): Promise<CountedManifest> {
    const superseded = await this.db.tx(async (tx) => {
      // Already resolved by someone who read the store and found this body: done.
      if ((await tx.run(`DELETE FROM gc_intents WHERE id = $1`, [write.id])) === 0) return 0;
      await this.applyCommit(tx, write.key, write.set, etag, write.added, write.dropped);
      return this.revertSuperseded(tx, write.key, write.condition);
    });
    if (superseded > 0) this.log.info('earlier manifest writes with the same condition can no longer land; increments reverted', { key: write.key, writes: superseded });
    return { etag, packs: write.packs };
  }

  /**
   * A write of `key` conditional on `condition` landed (and is committed): the other
   * unresolved writes of the key with that If-Match etag can never land now (the etag is
   * gone for good): revert them. Creates wait for the settle time (see the top of this
   * file). Returns how many were reverted.
   */
  private async revertSuperseded(tx: SqlTx, key: string, condition: PutCondition | undefined): Promise<number> {
    if (condition === undefined || condition === IF_NONE_MATCH) return 0;
    const rows = await tx.all<{ set_id: string; added: string }>(`DELETE FROM gc_intents WHERE key = $1 AND put_condition = $2 RETURNING set_id, added`, [key, condition]);
    for (const intent of rows) await this.revert(tx, key, intent.set_id, words(intent.added));
    return rows.length;
  }

  /**
   * `key` now counts set `set` as of `etag`, with `added` and `dropped` applied to the
   * set's rows. A write to a set other than the row's held it; that hold passes to the
   * row, and the set the row named before is let go.
   */
  private async applyCommit(tx: SqlTx, key: string, set: string, etag: string, added: readonly string[], dropped: readonly string[]): Promise<void> {
    const before = (await tx.all<{ set_id: string }>(`SELECT set_id FROM gc_manifests WHERE key = $1`, [key]))[0]?.set_id;
    await tx.run(`INSERT INTO gc_manifests (key, etag, set_id) VALUES ($1, $2, $3) ON CONFLICT (key) DO UPDATE SET etag = excluded.etag, set_id = excluded.set_id`, [key, etag, set]);
    // WHERE true: SQLite's parser needs it between INSERT … SELECT and ON CONFLICT.
    if (added.length > 0) {
      await tx.run(`INSERT INTO gc_set_packs (set_id, pack) SELECT CAST($1 AS TEXT), v FROM ${tx.rows(2)} WHERE true ON CONFLICT (set_id, pack) DO NOTHING`, [set, tx.list(added)]);
    }
    if (dropped.length > 0) await tx.run(`DELETE FROM gc_set_packs WHERE set_id = $1 AND pack IN (SELECT v FROM ${tx.rows(2)})`, [set, tx.list(dropped)]);
    await this.decrement(tx, dropped);
    if (before !== undefined && before !== set) await this.letGoSet(tx, before);
  }

  /** The PUT definitely did not land: revert the increments and the hold. */
  async abort(write: ManifestWrite): Promise<void> {
    await this.db.tx(async (tx) => {
      if ((await tx.run(`DELETE FROM gc_intents WHERE id = $1`, [write.id])) === 0) return;
      await this.revert(tx, write.key, write.set, write.added);
    });
  }

  /** Undo begin's increments, and its hold of `set` unless that is the key's own set (changed in place, held by the row). */
  private async revert(tx: SqlTx, key: string, set: string, added: readonly string[]): Promise<void> {
    await this.decrement(tx, added);
    const own = (await tx.all<{ set_id: string }>(`SELECT set_id FROM gc_manifests WHERE key = $1`, [key]))[0]?.set_id;
    if (own !== set) await this.letGoSet(tx, set);
  }

  /**
   * Resolve unfinished writes (all, or those of `key` / `host`) by reading their key in
   * the store: our body is there → commit; it is not and the PUT can no longer land (the
   * key no longer has the etag it was conditional on, or the settle time passed) →
   * revert; otherwise leave it pending. `settleMs` overrides the settle time: 0 at
   * start-up for this host's own writes to a file:// store, which died with the process.
   */
  async resolveIntents(filter: { key?: string; host?: string; settleMs?: number } = {}): Promise<{ committed: number; reverted: number; pending: number }> {
    const settleMs = filter.settleMs ?? this.settleMs;
    const rows = await this.db.tx((tx) =>
      tx.all<{ id: string; key: string; set_id: string; body_hash: string; created: number; added: string; dropped: string; host: string; put_condition: string | null }>(
        `SELECT id, key, set_id, body_hash, host, created, added, dropped, put_condition FROM gc_intents`,
      ),
    );
    const result = { committed: 0, reverted: 0, pending: 0 };
    // Read once, before the intents: the store's time only grows meanwhile, so this errs towards waiting.
    // A settle time of 0 (the writer is known dead) needs no clock.
    const now = rows.length === 0 || settleMs === 0 || this.options.storeTime === undefined ? this.now() : (await this.options.storeTime()).earliest;
    for (const intent of rows) {
      if (filter.key !== undefined && intent.key !== filter.key) continue;
      if (filter.host !== undefined && intent.host !== filter.host) continue;
      const object = await this.options.store.get(intent.key);
      const condition = intent.put_condition ?? undefined;
      if (object !== undefined && bodyHash(object.body) === intent.body_hash) {
        const superseded = await this.db.tx(async (tx) => {
          if ((await tx.run(`DELETE FROM gc_intents WHERE id = $1`, [intent.id])) === 0) return -1;
          await this.applyCommit(tx, intent.key, intent.set_id, object.etag, words(intent.added), words(intent.dropped));
          return this.revertSuperseded(tx, intent.key, condition);
        });
        if (superseded < 0) continue; // resolved meanwhile
        result.committed++;
        result.reverted += superseded;
        this.log.info('resolved an unfinished manifest write: it landed', { key: intent.key, host: intent.host, superseded });
      } else if (
        (condition !== undefined && condition !== IF_NONE_MATCH && object?.etag !== condition) ||
        settleMs === 0 || now - Number(intent.created) >= settleMs
      ) {
        const reverted = await this.db.tx(async (tx) => {
          if ((await tx.run(`DELETE FROM gc_intents WHERE id = $1`, [intent.id])) === 0) return false;
          await this.revert(tx, intent.key, intent.set_id, words(intent.added));
          return true;
        });
        if (!reverted) continue;
        result.reverted++;
        this.log.info('resolved an unfinished manifest write: it did not land; increments reverted', {
          key: intent.key, host: intent.host, why: object?.etag !== condition && condition !== undefined && condition !== IF_NONE_MATCH ? 'the etag it was conditional on is gone' : 'settle time passed',
        });
      } else {
        result.pending++;
      }
    }
    return result;
  }

  /** The packs counted for `key`, if any. */
  async counted(key: string): Promise<CountedManifest | undefined> {
    return this.db.tx(async (tx) => {
      const row = (await tx.all<{ etag: string; set_id: string }>(`SELECT etag, set_id FROM gc_manifests WHERE key = $1`, [key]))[0];
      if (row === undefined) return undefined;
      return { etag: row.etag, packs: await this.setPacks(tx, row.set_id) };
    });
  }

  /**
   * The object at `key` was deleted from the store: drop what it counted. Call after the
   * delete (a crash between the two over-counts). With `etag`, only if that version is
   * what is counted. Returns the packs it counted (released unless another key shares
   * its set); WritePendingError while a write of the key is unresolved.
   */
  async removeManifest(key: string, etag?: string): Promise<number> {
    return this.db.tx(async (tx) => {
      if (await this.writePending(tx, key)) {
        throw new WritePendingError(`${key}: a write of it is in progress; its refcounts are left for reconciliation`);
      }
      const removed = etag === undefined
        ? await tx.all<{ set_id: string }>(`DELETE FROM gc_manifests WHERE key = $1 RETURNING set_id`, [key])
        : await tx.all<{ set_id: string }>(`DELETE FROM gc_manifests WHERE key = $1 AND etag = $2 RETURNING set_id`, [key, etag]);
      if (removed.length === 0) return 0;
      const set = removed[0].set_id;
      const [{ n }] = await tx.all<{ n: number }>(`SELECT count(*) AS n FROM gc_set_packs WHERE set_id = $1`, [set]);
      await this.letGoSet(tx, set);
      return Number(n);
    });
  }

  // ---- deletion ---------------------------------------------------------------------

  /** Whether a cycle with `cutoff` has anything to delete (or to finish deleting). */
  async anyDeletable(cutoff: number): Promise<boolean> {
    const rows = await this.db.tx((tx) =>
      tx.all(`SELECT id FROM gc_packs WHERE state = 'deleting' OR (state = 'live' AND refs = 0 AND zero_since <= $1) LIMIT 1`, [cutoff]),
    );
    return rows.length > 0;
  }

  /** Packs at refcount 0 since `cutoff` or earlier, oldest first (what a cycle would delete). */
  async deletable(cutoff: number, limit: number): Promise<string[]> {
    const rows = await this.db.tx((tx) =>
      tx.all<{ id: string }>(
        `SELECT id FROM gc_packs WHERE state = 'live' AND refs = 0 AND zero_since <= $1 ORDER BY zero_since LIMIT $2`,
        [cutoff, limit],
      ),
    );
    return rows.map((r) => r.id);
  }

  /**
   * Mark up to `limit` deletable packs 'deleting' (from now on an increment refuses
   * them) and return them with any left 'deleting' by an interrupted cycle. The
   * condition is repeated outside the subquery: PostgreSQL re-checks it on the row
   * after waiting for a writer that held it.
   */
  async claimDeletable(cutoff: number, limit: number): Promise<string[]> {
    return this.db.tx(async (tx) => {
      const leftover = await tx.all<{ id: string }>(`SELECT id FROM gc_packs WHERE state = 'deleting' LIMIT $1`, [limit]);
      const room = limit - leftover.length;
      const marked = room <= 0 ? [] : await tx.all<{ id: string }>(
        `UPDATE gc_packs SET state = 'deleting'
         WHERE state = 'live' AND refs = 0 AND zero_since <= $1
           AND id IN (SELECT id FROM gc_packs WHERE state = 'live' AND refs = 0 AND zero_since <= $1 ORDER BY zero_since LIMIT $2)
         RETURNING id`,
        [cutoff, room],
      );
      return [...leftover, ...marked].map((r) => r.id);
    });
  }

  /** The packs' objects are deleted: forget them. */
  async forgetDeleted(ids: readonly string[]): Promise<void> {
    if (ids.length === 0) return;
    await this.db.tx((tx) => tx.run(`DELETE FROM gc_packs WHERE state = 'deleting' AND id IN (SELECT v FROM ${tx.rows(1)})`, [tx.list(ids)]));
  }

  // ---- reconciliation ------------------------------------------------------------------

  /** Every counted manifest and checkpoint key and its etag (not the uploads keys, which no store object backs). */
  async countedKeys(): Promise<Map<string, string>> {
    const rows = await this.db.tx((tx) => tx.all<{ key: string; etag: string }>(`SELECT key, etag FROM gc_manifests WHERE key NOT LIKE $1`, [`${UPLOADS_PREFIX}%`]));
    return new Map(rows.map((r) => [r.key, r.etag]));
  }

  /** Keys with an unresolved write. */
  async pendingKeys(): Promise<Set<string>> {
    const rows = await this.db.tx((tx) => tx.all<{ key: string }>(`SELECT key FROM gc_intents`));
    return new Set(rows.map((r) => r.key));
  }

  /** Every pack row. */
  async packRows(): Promise<Map<string, { refs: number; state: string; zeroSince: number | null }>> {
    const rows = await this.db.tx((tx) => tx.all<{ id: string; refs: number; state: string; zero_since: number | null }>(`SELECT id, refs, state, zero_since FROM gc_packs`));
    return new Map(rows.map((r) => [r.id, { refs: Number(r.refs), state: r.state, zeroSince: r.zero_since === null ? null : Number(r.zero_since) }]));
  }

  /** Give packs in the store without a row one (refcount 0, unreferenced since `since`). Returns how many were added. */
  async adoptPacks(packs: ReadonlyArray<{ id: string; since: number }>): Promise<number> {
    return this.db.tx(async (tx) => {
      let n = 0;
      for (const p of packs) n += await tx.run(`INSERT INTO gc_packs (id, refs, state, zero_since) VALUES ($1, 0, 'live', $2) ON CONFLICT (id) DO NOTHING`, [p.id, p.since]);
      return n;
    });
  }

  /**
   * Make `key`'s counted packs exactly `packs` of the object with `etag`, if what is
   * counted is still the version `expected` (undefined: nothing counted) and no write
   * of the key is pending. Returns the packs added and dropped, or undefined if skipped.
   */
  async setCounted(key: string, expected: string | undefined, etag: string, packs: ReadonlySet<string>): Promise<{ added: string[]; dropped: string[] } | undefined> {
    return this.db.tx(async (tx) => {
      if (await this.writePending(tx, key)) return undefined;
      const row = await this.lockKey(tx, key);
      if (row?.etag !== expected) return undefined;
      const counted = row === undefined ? EMPTY : await this.setPacks(tx, row.set);
      const added = [...packs].filter((p) => !counted.has(p)).sort();
      const dropped = [...counted].filter((p) => !packs.has(p)).sort();
      if (row !== undefined && row.etag === etag && added.length === 0 && dropped.length === 0) return { added, dropped };
      // The key's own set changes in place; a shared one is left to its other holders.
      const { set, fresh } = await this.setToWrite(tx, row, row && { etag: row.etag, packs: counted });
      const add = fresh ? [...packs].sort() : added;
      const drop = fresh ? [] : dropped;
      await this.insertLive(tx, add);
      const refused = await this.increment(tx, add);
      if (refused.length > 0) {
        // A manifest in the store names a pack GC is deleting: invariant 2 is already broken.
        this.log.error('a manifest names packs that are being deleted; `updraft scrub` reports what is lost', { key, packs: refused.join(' ') });
      }
      await this.applyCommit(tx, key, set, etag, add, drop);
      return { added, dropped };
    });
  }

  /**
   * Sets whose holder count differs from the keys and intents naming them get the true
   * count, under their row lock; one held by nothing is released. Returns how many were
   * corrected.
   */
  async fixSetHolders(): Promise<number> {
    const drifted = await this.db.tx((tx) =>
      tx.all<{ id: string }>(
        `SELECT s.id FROM gc_sets s
         LEFT JOIN (SELECT set_id, count(*) AS n FROM gc_manifests GROUP BY set_id) m ON m.set_id = s.id
         LEFT JOIN (SELECT set_id, count(*) AS n FROM gc_intents i WHERE ${HOLDING_INTENT} GROUP BY set_id) h ON h.set_id = s.id
         WHERE s.refs <> COALESCE(m.n, 0) + COALESCE(h.n, 0)`,
      ),
    );
    let fixed = 0;
    for (const { id } of drifted) {
      fixed += await this.db.tx(async (tx) => {
        const locked = await tx.all<{ refs: number }>(`UPDATE gc_sets SET refs = refs WHERE id = $1 RETURNING refs`, [id]);
        if (locked.length === 0) return 0;
        const [{ n }] = await tx.all<{ n: number }>(
          `SELECT (SELECT count(*) FROM gc_manifests WHERE set_id = $1) + (SELECT count(*) FROM gc_intents i WHERE set_id = $1 AND ${HOLDING_INTENT}) AS n`,
          [id],
        );
        // Counted again under the lock: a write that moved meanwhile may have set it right.
        if (Number(n) === Number(locked[0].refs)) return 0;
        if (Number(n) === 0) await this.releaseSet(tx, id);
        else await tx.run(`UPDATE gc_sets SET refs = $2 WHERE id = $1`, [id, Number(n)]);
        return 1;
      });
    }
    return fixed;
  }

  /** Packs whose refcount differs from the counted sets plus pending intents naming them. */
  async refcountDrift(): Promise<Array<{ id: string; refs: number; expected: number }>> {
    return this.db.tx(async (tx) => {
      const intents = await tx.all<{ added: string }>(`SELECT added FROM gc_intents`);
      const held = new Map<string, number>();
      for (const i of intents) for (const p of words(i.added)) held.set(p, (held.get(p) ?? 0) + 1);
      const rows = await tx.all<{ id: string; refs: number; counted: number }>(
        `SELECT p.id, p.refs, COALESCE(c.n, 0) AS counted FROM gc_packs p
         LEFT JOIN (SELECT pack, count(*) AS n FROM gc_set_packs GROUP BY pack) c ON c.pack = p.id
         WHERE p.state = 'live'`,
      );
      return rows
        .map((r) => ({ id: r.id, refs: Number(r.refs), expected: Number(r.counted) + (held.get(r.id) ?? 0) }))
        .filter((r) => r.refs !== r.expected);
    });
  }

  /**
   * Set a pack's refcount to what is counted for it, under its row lock: the count is
   * one statement (one snapshot) taken after the lock, so a concurrent write of the pack
   * is either wholly in it or waits. Returns the refcount before and after.
   */
  async fixRefcount(id: string): Promise<{ before: number; after: number } | undefined> {
    return this.db.tx(async (tx) => {
      const locked = await tx.all<{ refs: number }>(`UPDATE gc_packs SET refs = refs WHERE id = $1 AND state = 'live' RETURNING refs`, [id]);
      if (locked.length === 0) return undefined;
      const [{ n }] = await tx.all<{ n: number }>(
        `SELECT (SELECT count(*) FROM gc_set_packs WHERE pack = $1) + (SELECT count(*) FROM gc_intents WHERE ' ' || added || ' ' LIKE $2) AS n`,
        [id, `% ${id} %`],
      );
      const before = Number(locked[0].refs);
      const after = Number(n);
      if (before !== after) {
        await tx.run(
          `UPDATE gc_packs SET refs = $2, zero_since = CASE WHEN $2 = 0 THEN COALESCE(zero_since, $3) ELSE NULL END WHERE id = $1`,
          [id, after, this.now()],
        );
      }
      return { before, after };
    });
  }

  /** Packs with a live row (referenced, or unreferenced within the grace period): what the store holds for GC. */
  async livePacks(): Promise<number> {
    const rows = await this.db.tx((tx) => tx.all<{ n: number | string }>(`SELECT count(*) AS n FROM gc_packs WHERE state = 'live'`));
    return Number(rows[0]?.n ?? 0);
  }

  /** A gc_meta value. */
  async meta(name: string): Promise<string | undefined> {
    const rows = await this.db.tx((tx) => tx.all<{ value: string }>(`SELECT value FROM gc_meta WHERE name = $1`, [name]));
    return rows[0]?.value;
  }

  /** Set a gc_meta value if it is still `expected` (undefined: absent); false if someone else changed it. */
  async setMeta(name: string, expected: string | undefined, value: string): Promise<boolean> {
    return this.db.tx(async (tx) => {
      const n = expected === undefined
        ? await tx.run(`INSERT INTO gc_meta (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING`, [name, value])
        : await tx.run(`UPDATE gc_meta SET value = $3 WHERE name = $1 AND value = $2`, [name, expected, value]);
      return n === 1;
    });
  }
}

/** Inside begin's transaction: packs the increment refused (rolls the transaction back). */
class MissingPacks extends Error {
  constructor(readonly packs: string[]) {
    super(`${packs.length} packs refused the increment`);
  }
}
