// The refcount rows the deletion worker reads and claims (gc/collector.ts): packs at
// refcount 0 past the grace period are marked 'deleting' (an increment refuses them from
// then on), their objects deleted, their rows forgotten.
import type { SqlDatabase } from './sql.js';

export class DeletionQueries {
  constructor(private readonly db: SqlDatabase) {}

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

  /** Packs with a live row (referenced, or unreferenced within the grace period): what the store holds for GC. */
  async livePacks(): Promise<number> {
    const rows = await this.db.tx((tx) => tx.all<{ n: number | string }>(`SELECT count(*) AS n FROM gc_packs WHERE state = 'live'`));
    return Number(rows[0]?.n ?? 0);
  }
}
