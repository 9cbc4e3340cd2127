// Pack registration and uploads keys (gc/refcounts.ts, invariant 6).
//
// Every pack gets a row before it is uploaded (refcount 0, unreferenced since then), so an
// upload no manifest ever names is collected after the grace period.
//
// Uploads no manifest names yet: the packs a volume's uploads on a host make or rely on
// (the dirty budget's, continuous mode's, a drain's before its manifest) are a set held by
// the key `host/{host}/volumes/{name}/uploads` (etag 'held'), added in the same
// transaction that registers each pack, so the cache may evict their blocks at once. The
// set is let go once the volume's own manifest naming them is committed, or when the
// volume leaves the host (removed, purged, or gone at a restart). No store object backs
// such a key: reconciliation leaves it alone, and counts its packs like any set's.
import type { SqlTx } from './sql.js';
import type { PackSets } from './pack-sets.js';

/** The key holding the packs that `volume`'s uploads on host `hostId` made or rely on, until a manifest names them. */
export function uploadsKey(hostId: string, volume: string): string {
  return `${UPLOADS_PREFIX}${hostId}/volumes/${volume}/uploads`;
}
/** What every uploads key starts with (and no manifest or checkpoint key does). */
export const UPLOADS_PREFIX = 'host/';
const UPLOADS_ETAG = 'held';

/** `text` for a LIKE pattern with ESCAPE '!'. */
function likeLiteral(text: string): string {
  return text.replace(/[!%_]/g, (c) => `!${c}`);
}

/** How long registerPack waits for a pack in deletion before it gives up (ms). */
const REGISTER_DEADLINE_MS = 60_000;

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

export class UploadHolds {
  constructor(private readonly sets: PackSets) {}

  /**
   * Give a pack about to be uploaded a row (refcount 0, unreferenced since now), so an
   * upload no manifest ever names is collected after the grace period; with `hold`, in the
   * set of that uploads key. Resolves once the row is committed (durably: SQLite's commits
   * are synced). Waits while the pack is being deleted: its PUT must come after the
   * deletion, not before.
   *
   * Group commit: packs registered in the same turn of the event loop, or while a
   * registration transaction runs, share the next transaction. A drain's uploads register
   * a pack each, and one synced SQLite commit per pack would hold the event loop for most
   * of a second per GiB (docs/benchmarks.md).
   */
  registerPack(id: string, hold?: string): Promise<void> {
    return new Promise((resolve, reject) => this.queueRegistration({ id, hold, deadline: this.sets.now() + REGISTER_DEADLINE_MS, resolve, reject }));
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
    const { db } = this.sets;
    while (this.registrations.length > 0) {
      const batch = this.registrations;
      this.registrations = [];
      let refused: PendingRegistration[];
      try {
        refused = await db.tx(async (tx) => {
          const out: PendingRegistration[] = [];
          const now = this.sets.now();
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
        if (this.sets.now() > pending.deadline) {
          pending.reject(new Error(`pack ${pending.id} has been in deletion for a minute; cannot upload it again (gc database ${db.description})`));
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
    const row = await this.sets.lockKey(tx, key);
    if (row !== undefined) return row.set;
    const set = await this.sets.newSet(tx);
    if ((await tx.run(`INSERT INTO gc_manifests (key, etag, set_id) VALUES ($1, $2, $3) ON CONFLICT (key) DO NOTHING`, [key, UPLOADS_ETAG, set])) === 1) return set;
    // Made meanwhile by another transaction (PostgreSQL waited for it): use that one.
    await tx.run(`DELETE FROM gc_sets WHERE id = $1`, [set]);
    const made = await this.sets.lockKey(tx, key);
    if (made === undefined) throw new Error(`gc database ${this.sets.db.description}: ${key}: its row vanished while it was made`);
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
      // A refused increment rolls the set's new rows and the increments back.
      const outcome = await this.sets.counting(async (tx) => {
        const added = await this.sets.addToSet(tx, await this.uploadsSet(tx, hold), packs);
        await this.sets.incrementAll(tx, added);
      });
      if ('done' in outcome) return [];
      const gone = await this.sets.adoptOrGone(hold, outcome.missing);
      if (gone.length > 0 || attempt >= 2) return gone.length > 0 ? gone : outcome.missing;
    }
  }

  /**
   * A manifest of the volume that names all it still needs is committed: let go of the
   * packs uploads key `hold` holds, keeping its set for the next uploads, and in it the
   * packs of `keep` (blocks the volume sealed after that manifest's cut rely on them).
   * Returns how many packs it let go of.
   */
  async settleUploads(hold: string, keep: readonly string[] = []): Promise<number> {
    return this.sets.db.tx(async (tx) => {
      const set = await this.sets.keySet(tx, hold);
      if (set === undefined) return 0;
      const packs = (keep.length === 0
        ? await tx.all<{ pack: string }>(`DELETE FROM gc_set_packs WHERE set_id = $1 RETURNING pack`, [set])
        : await tx.all<{ pack: string }>(`DELETE FROM gc_set_packs WHERE set_id = $1 AND pack NOT IN (SELECT v FROM ${tx.rows(2)}) RETURNING pack`, [set, tx.list(keep)])
      ).map((r) => r.pack);
      await this.sets.decrement(tx, packs);
      return packs.length;
    });
  }

  /** The volume left the host (removed, purged): let go of uploads key `hold` and what it holds. Returns how many packs it held. */
  async releaseUploads(hold: string): Promise<number> {
    return this.sets.db.tx((tx) => this.sets.removeKey(tx, hold));
  }

  /** The volumes whose uploads host `hostId` holds packs for. */
  async heldUploads(hostId: string): Promise<string[]> {
    const prefix = `${UPLOADS_PREFIX}${hostId}/volumes/`;
    const rows = await this.sets.db.tx((tx) => tx.all<{ key: string }>(`SELECT key FROM gc_manifests WHERE key LIKE $1 ESCAPE '!'`, [`${likeLiteral(prefix)}%/uploads`]));
    return rows.map((r) => r.key.slice(prefix.length, -'/uploads'.length));
  }

  /** Let go of every host's uploads of `volume` (it is purged: its content is thrown away). Returns how many packs they held. */
  async releaseUploadsOfVolume(volume: string): Promise<number> {
    const rows = await this.sets.db.tx((tx) =>
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
}
