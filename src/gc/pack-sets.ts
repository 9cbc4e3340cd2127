// Pack sets and pack rows (gc/refcounts.ts): the steps every counting transaction is made
// of, each run inside the caller's transaction. Tables: gc/schema.ts.
//
// A key's set is its own while no other key or intent holds it: a write then changes it
// in place. A lazy fork whose source object is the one counted for the source key holds
// the source's set (one increment of gc_sets.refs) instead of counting its packs again;
// so does a consistent fork or checkpoint that names exactly the source's counted packs.
// A write of a key whose set is shared starts a new set of its own (every pack +1, once);
// the last reference to a set going releases it (its packs −1, its rows gone).
import crypto from 'node:crypto';
import type { Logger } from '../log.js';
import type { ObjectStore } from '../objectstore/types.js';
import type { CountedManifest } from '../store/counted.js';
import { packKey } from '../store/pack.js';
import { eachLimit } from './each-limit.js';
import type { SqlDatabase, SqlTx } from './sql.js';

/** SQL condition on an intent `i`: it holds its set (it is not a change of its key's own set in place). */
export const HOLDING_INTENT = `NOT EXISTS (SELECT 1 FROM gc_manifests m WHERE m.key = i.key AND m.set_id = i.set_id)`;

/** Whether two sets of packs hold the same ids. */
export function sameSet(a: ReadonlySet<string>, b: ReadonlySet<string>): boolean {
  if (a.size !== b.size) return false;
  for (const id of a) if (!b.has(id)) return false;
  return true;
}

export const EMPTY: ReadonlySet<string> = new Set();

/** A space-separated list of pack ids (an intent's added and dropped columns). */
export function words(text: string): string[] {
  return text === '' ? [] : text.split(' ');
}

/** What a key counting `counted` adds and drops when it comes to count `packs`, each sorted. */
export function packDelta(counted: ReadonlySet<string>, packs: ReadonlySet<string>): { added: string[]; dropped: string[] } {
  return {
    added: [...packs].filter((p) => !counted.has(p)).sort(),
    dropped: [...counted].filter((p) => !packs.has(p)).sort(),
  };
}

/** Inside a counting transaction: packs the increment refused (rolls the transaction back). */
class MissingPacks extends Error {
  constructor(readonly packs: string[]) {
    super(`${packs.length} packs refused the increment`);
  }
}

/** HEADs in flight at once when packs without a row are adopted. */
const ADOPT_CONCURRENCY = 16;

export class PackSets {
  constructor(
    readonly db: SqlDatabase,
    readonly now: () => number,
    /** Where packs without a row are looked for (adoptOrGone). */
    private readonly store: ObjectStore,
    private readonly log: Logger,
  ) {}

  /**
   * Run `work` in one transaction; when it increments with incrementAll and a pack is
   * refused, the transaction is rolled back and the refused packs come back instead.
   */
  async counting<T>(work: (tx: SqlTx) => Promise<T>): Promise<{ done: T } | { missing: string[] }> {
    return this.db.tx(async (tx) => ({ done: await work(tx) })).catch((err): { missing: string[] } => {
      if (err instanceof MissingPacks) return { missing: err.packs };
      throw err;
    });
  }

  // ---- keys and sets ----------------------------------------------------------------

  /** Lock `key`'s row (an UPDATE of it, so that a concurrent begin or fork of the key waits) and read it. */
  async lockKey(tx: SqlTx, key: string): Promise<{ etag: string; set: string } | undefined> {
    const row = (await tx.all<{ etag: string; set_id: string }>(`UPDATE gc_manifests SET etag = etag WHERE key = $1 RETURNING etag, set_id`, [key]))[0];
    return row === undefined ? undefined : { etag: row.etag, set: row.set_id };
  }

  /** The set `key` counts, if it has a row. */
  async keySet(tx: SqlTx, key: string): Promise<string | undefined> {
    return (await tx.all<{ set_id: string }>(`SELECT set_id FROM gc_manifests WHERE key = $1`, [key]))[0]?.set_id;
  }

  /**
   * Drop `key`'s row (with `etag`, only if that version is what it counts) and let go of
   * its set. Returns the packs it counted (released unless another key shares the set); 0
   * when it had no row.
   */
  async removeKey(tx: SqlTx, key: string, etag?: string): Promise<number> {
    const removed = etag === undefined
      ? await tx.all<{ set_id: string }>(`DELETE FROM gc_manifests WHERE key = $1 RETURNING set_id`, [key])
      : await tx.all<{ set_id: string }>(`DELETE FROM gc_manifests WHERE key = $1 AND etag = $2 RETURNING set_id`, [key, etag]);
    if (removed.length === 0) return 0;
    const set = removed[0].set_id;
    const [{ n }] = await tx.all<{ n: number }>(`SELECT count(*) AS n FROM gc_set_packs WHERE set_id = $1`, [set]);
    await this.letGoSet(tx, set);
    return Number(n);
  }

  /** The packs of set `id`. */
  async setPacks(tx: SqlTx, id: string): Promise<Set<string>> {
    return new Set((await tx.all<{ pack: string }>(`SELECT pack FROM gc_set_packs WHERE set_id = $1`, [id])).map((r) => r.pack));
  }

  /** Add `packs` to the rows of set `id`; returns those it did not hold yet (their refcounts are the caller's). */
  async addToSet(tx: SqlTx, id: string, packs: readonly string[]): Promise<string[]> {
    // WHERE true: SQLite's parser needs it between INSERT … SELECT and ON CONFLICT.
    return (await tx.all<{ pack: string }>(
      `INSERT INTO gc_set_packs (set_id, pack) SELECT CAST($1 AS TEXT), v FROM ${tx.rows(2)} WHERE true ON CONFLICT (set_id, pack) DO NOTHING RETURNING pack`,
      [id, tx.list(packs)],
    )).map((r) => r.pack);
  }

  /** One more holder (a key's row or an intent) of set `id`, which exists. */
  async holdSet(tx: SqlTx, id: string): Promise<void> {
    if ((await tx.run(`UPDATE gc_sets SET refs = refs + 1 WHERE id = $1`, [id])) === 0) {
      throw new Error(`gc database ${this.db.description}: pack set ${id} has no row`);
    }
  }

  /** A new set with no packs yet, held once (by the intent or row about to name it). */
  async newSet(tx: SqlTx): Promise<string> {
    const id = crypto.randomUUID();
    await tx.run(`INSERT INTO gc_sets (id, refs) VALUES ($1, 1)`, [id]);
    return id;
  }

  /** One holder of set `id` fewer; the last one releases it: its packs −1, its rows gone. */
  async letGoSet(tx: SqlTx, id: string): Promise<void> {
    const rows = await tx.all<{ refs: number }>(`UPDATE gc_sets SET refs = refs - 1 WHERE id = $1 RETURNING refs`, [id]);
    if (rows.length > 0 && Number(rows[0].refs) > 0) return;
    await this.releaseSet(tx, id);
  }

  /** Set `id` is held by nothing: its packs −1, its rows gone. */
  async releaseSet(tx: SqlTx, id: string): Promise<void> {
    const packs = (await tx.all<{ pack: string }>(`DELETE FROM gc_set_packs WHERE set_id = $1 RETURNING pack`, [id])).map((r) => r.pack);
    await tx.run(`DELETE FROM gc_sets WHERE id = $1`, [id]);
    await this.decrement(tx, packs);
  }

  /**
   * The set a write of `key` (whose row `row` is locked) changes, and the packs counted in
   * it: the key's own set while nothing else holds it (held by the row alone); else a new
   * one, empty, held once by the write (every pack of the write is then added to it).
   */
  async setToWrite(tx: SqlTx, row: { etag: string; set: string } | undefined, known?: CountedManifest): Promise<{ set: string; counted: ReadonlySet<string>; fresh: boolean }> {
    if (row !== undefined) {
      const holders = Number((await tx.all<{ refs: number }>(`SELECT refs FROM gc_sets WHERE id = $1`, [row.set]))[0]?.refs ?? 0);
      if (holders === 1) {
        return { set: row.set, counted: known !== undefined && known.etag === row.etag ? known.packs : await this.setPacks(tx, row.set), fresh: false };
      }
    }
    return { set: await this.newSet(tx), counted: EMPTY, fresh: true };
  }

  /**
   * `key` now counts set `set` as of `etag`, with `added` and `dropped` applied to the
   * set's rows. A write to a set other than the row's held it; that hold passes to the
   * row, and the set the row named before is let go.
   */
  async applyCommit(tx: SqlTx, key: string, set: string, etag: string, added: readonly string[], dropped: readonly string[]): Promise<void> {
    const before = await this.keySet(tx, key);
    await tx.run(`INSERT INTO gc_manifests (key, etag, set_id) VALUES ($1, $2, $3) ON CONFLICT (key) DO UPDATE SET etag = excluded.etag, set_id = excluded.set_id`, [key, etag, set]);
    if (added.length > 0) await this.addToSet(tx, set, added);
    if (dropped.length > 0) await tx.run(`DELETE FROM gc_set_packs WHERE set_id = $1 AND pack IN (SELECT v FROM ${tx.rows(2)})`, [set, tx.list(dropped)]);
    await this.decrement(tx, dropped);
    if (before !== undefined && before !== set) await this.letGoSet(tx, before);
  }

  // ---- intents ------------------------------------------------------------------------

  /** Whether a write of `key` is unresolved. */
  async writePending(tx: SqlTx, key: string): Promise<boolean> {
    return (await tx.all(`SELECT id FROM gc_intents WHERE key = $1`, [key])).length > 0;
  }

  /** Delete intent `id`; false when it was already gone (resolved by someone else). */
  async takeIntent(tx: SqlTx, id: string): Promise<boolean> {
    return (await tx.run(`DELETE FROM gc_intents WHERE id = $1`, [id])) > 0;
  }

  // ---- pack rows ----------------------------------------------------------------------

  /** +1 on every 'live' pack of `ids`; returns the ids that were not (deleting, or no row). */
  async increment(tx: SqlTx, ids: readonly string[]): Promise<string[]> {
    if (ids.length === 0) return [];
    const n = await tx.run(`UPDATE gc_packs SET refs = refs + 1, zero_since = NULL WHERE state = 'live' AND id IN (SELECT v FROM ${tx.rows(1)})`, [tx.list(ids)]);
    if (n === ids.length) return [];
    // Some were refused (the caller rolls the increments back): which.
    const live = await tx.all<{ id: string }>(`SELECT id FROM gc_packs WHERE state = 'live' AND id IN (SELECT v FROM ${tx.rows(1)})`, [tx.list(ids)]);
    const done = new Set(live.map((r) => r.id));
    return ids.filter((id) => !done.has(id));
  }

  /** +1 on every pack of `ids`, inside `counting`: a pack refused (see increment) rolls the transaction back. */
  async incrementAll(tx: SqlTx, ids: readonly string[]): Promise<void> {
    const refused = await this.increment(tx, ids);
    if (refused.length > 0) throw new MissingPacks(refused);
  }

  /** −1 on every pack of `ids`; one that reaches 0 is unreferenced from now. */
  async decrement(tx: SqlTx, ids: readonly string[]): Promise<void> {
    if (ids.length === 0) return;
    await tx.run(
      `UPDATE gc_packs SET refs = refs - 1, zero_since = CASE WHEN refs = 1 THEN $1 ELSE zero_since END
       WHERE refs > 0 AND id IN (SELECT v FROM ${tx.rows(2)})`,
      [this.now(), tx.list(ids)],
    );
  }

  /** A live row (refcount 0, unreferenced since now) for each pack of `ids` that has none. */
  async insertLive(tx: SqlTx, ids: readonly string[]): Promise<void> {
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
   * Returns the gone ones; `key` is the write that met them, for the log.
   */
  async adoptOrGone(key: string, ids: string[]): Promise<string[]> {
    const rows = await this.db.tx((tx) => tx.all<{ id: string; state: string }>(`SELECT id, state FROM gc_packs WHERE id IN (SELECT v FROM ${tx.rows(1)})`, [tx.list(ids)]));
    const state = new Map(rows.map((r) => [r.id, r.state]));
    const gone = ids.filter((id) => state.get(id) === 'deleting');
    const unknown = ids.filter((id) => !state.has(id));
    const adopted: string[] = [];
    await eachLimit(unknown, ADOPT_CONCURRENCY, async (id) => {
      if ((await this.store.head(packKey(id))) === undefined) gone.push(id);
      else adopted.push(id);
    });
    if (adopted.length > 0) {
      await this.db.tx((tx) => this.insertLive(tx, adopted));
      this.log.info('packs in the store had no refcount row; adopted them', { key, packs: adopted.length, first: adopted[0] });
    }
    return gone;
  }
}
