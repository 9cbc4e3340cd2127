// The refcount rows reconciliation reads and corrects (gc/collector.ts): each key's counted
// packs made to match its object, set holder counts and pack refcounts set to what is
// counted, packs in the store without a row adopted, and when it last ran (gc_meta).
import type { Logger } from '../log.js';
import { HOLDING_INTENT, packDelta, words, EMPTY, type PackSets } from './pack-sets.js';
import { UPLOADS_PREFIX } from './uploads.js';

export class ReconciliationQueries {
  constructor(
    private readonly sets: PackSets,
    private readonly log: Logger,
  ) {}

  /** Every counted manifest and checkpoint key and its etag (not the uploads keys, which no store object backs). */
  async countedKeys(): Promise<Map<string, string>> {
    const rows = await this.sets.db.tx((tx) => tx.all<{ key: string; etag: string }>(`SELECT key, etag FROM gc_manifests WHERE key NOT LIKE $1`, [`${UPLOADS_PREFIX}%`]));
    return new Map(rows.map((r) => [r.key, r.etag]));
  }

  /** Keys with an unresolved write. */
  async pendingKeys(): Promise<Set<string>> {
    const rows = await this.sets.db.tx((tx) => tx.all<{ key: string }>(`SELECT key FROM gc_intents`));
    return new Set(rows.map((r) => r.key));
  }

  /** Every pack row. */
  async packRows(): Promise<Map<string, { refs: number; state: string; zeroSince: number | null }>> {
    const rows = await this.sets.db.tx((tx) => tx.all<{ id: string; refs: number; state: string; zero_since: number | null }>(`SELECT id, refs, state, zero_since FROM gc_packs`));
    return new Map(rows.map((r) => [r.id, { refs: Number(r.refs), state: r.state, zeroSince: r.zero_since === null ? null : Number(r.zero_since) }]));
  }

  /** Give packs in the store without a row one (refcount 0, unreferenced since `since`). Returns how many were added. */
  async adoptPacks(packs: ReadonlyArray<{ id: string; since: number }>): Promise<number> {
    return this.sets.db.tx(async (tx) => {
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
    const { sets } = this;
    return sets.db.tx(async (tx) => {
      if (await sets.writePending(tx, key)) return undefined;
      const row = await sets.lockKey(tx, key);
      if (row?.etag !== expected) return undefined;
      const counted = row === undefined ? EMPTY : await sets.setPacks(tx, row.set);
      const { added, dropped } = packDelta(counted, packs);
      if (row !== undefined && row.etag === etag && added.length === 0 && dropped.length === 0) return { added, dropped };
      // The key's own set changes in place; a shared one is left to its other holders.
      const { set, fresh } = await sets.setToWrite(tx, row, row && { etag: row.etag, packs: counted });
      const add = fresh ? [...packs].sort() : added;
      const drop = fresh ? [] : dropped;
      await sets.insertLive(tx, add);
      const refused = await sets.increment(tx, add);
      if (refused.length > 0) {
        // A manifest in the store names a pack GC is deleting: invariant 2 is already broken.
        this.log.error('a manifest names packs that are being deleted; `updraft scrub` reports what is lost', { key, packs: refused.join(' ') });
      }
      await sets.applyCommit(tx, key, set, etag, add, drop);
      return { added, dropped };
    });
  }

  /**
   * Sets whose holder count differs from the keys and intents naming them get the true
   * count, under their row lock; one held by nothing is released. Returns how many were
   * corrected.
   */
  async fixSetHolders(): Promise<number> {
    const { sets } = this;
    const drifted = await sets.db.tx((tx) =>
      tx.all<{ id: string }>(
        `SELECT s.id FROM gc_sets s
         LEFT JOIN (SELECT set_id, count(*) AS n FROM gc_manifests GROUP BY set_id) m ON m.set_id = s.id
         LEFT JOIN (SELECT set_id, count(*) AS n FROM gc_intents i WHERE ${HOLDING_INTENT} GROUP BY set_id) h ON h.set_id = s.id
         WHERE s.refs <> COALESCE(m.n, 0) + COALESCE(h.n, 0)`,
      ),
    );
    let fixed = 0;
    for (const { id } of drifted) {
      fixed += await sets.db.tx(async (tx) => {
        const locked = await tx.all<{ refs: number }>(`UPDATE gc_sets SET refs = refs WHERE id = $1 RETURNING refs`, [id]);
        if (locked.length === 0) return 0;
        const [{ n }] = await tx.all<{ n: number }>(
          `SELECT (SELECT count(*) FROM gc_manifests WHERE set_id = $1) + (SELECT count(*) FROM gc_intents i WHERE set_id = $1 AND ${HOLDING_INTENT}) AS n`,
          [id],
        );
        // Counted again under the lock: a write that moved meanwhile may have set it right.
        if (Number(n) === Number(locked[0].refs)) return 0;
        if (Number(n) === 0) await sets.releaseSet(tx, id);
        else await tx.run(`UPDATE gc_sets SET refs = $2 WHERE id = $1`, [id, Number(n)]);
        return 1;
      });
    }
    return fixed;
  }

  /** Packs whose refcount differs from the counted sets plus pending intents naming them. */
  async refcountDrift(): Promise<Array<{ id: string; refs: number; expected: number }>> {
    return this.sets.db.tx(async (tx) => {
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
    return this.sets.db.tx(async (tx) => {
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
          [id, after, this.sets.now()],
        );
      }
      return { before, after };
    });
  }

  /** A gc_meta value. */
  async meta(name: string): Promise<string | undefined> {
    const rows = await this.sets.db.tx((tx) => tx.all<{ value: string }>(`SELECT value FROM gc_meta WHERE name = $1`, [name]));
    return rows[0]?.value;
  }

  /** Set a gc_meta value if it is still `expected` (undefined: absent); false if someone else changed it. */
  async setMeta(name: string, expected: string | undefined, value: string): Promise<boolean> {
    return this.sets.db.tx(async (tx) => {
      const n = expected === undefined
        ? await tx.run(`INSERT INTO gc_meta (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING`, [name, value])
        : await tx.run(`UPDATE gc_meta SET value = $3 WHERE name = $1 AND value = $2`, [name, expected, value]);
      return n === 1;
    });
  }
}
