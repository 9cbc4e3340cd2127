// Manifest writes under refcounts (gc/refcounts.ts; store/counted.ts performs them).
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
import type { Logger } from '../log.js';
import type { StoreTime } from '../objectstore/clock.js';
import type { ObjectStore } from '../objectstore/types.js';
import {
  bodyHash, IF_NONE_MATCH, PacksGoneError, WritePendingError,
  type CountedManifest, type ManifestWrite, type PutCondition,
} from '../store/counted.js';
import { EMPTY, packDelta, words, type PackSets } from './pack-sets.js';
import type { SqlTx } from './sql.js';

/** What manifest writes' intents are recorded and resolved with. */
export interface IntentOptions {
  /** This host, recorded in intents. */
  hostId: string;
  /** The store manifests live in: intents are resolved by reading it. */
  store: ObjectStore;
  /** How long after an intent its PUT can no longer land (request timeout × attempts); 0 for file://. */
  settleMs: number;
  log: Logger;
  /**
   * The store's clock (objectstore/clock.ts), which intents' settle time is judged on: an
   * intent records the latest the store's time can be at its start, and is reverted only
   * once the earliest the store's time can be is a settle time past that, so a host whose
   * own clock is off neither ages an intent early nor holds it forever. Without it, `now`.
   */
  storeTime?: () => Promise<StoreTime>;
}

export class ManifestWrites {
  constructor(
    private readonly sets: PackSets,
    private readonly options: IntentOptions,
  ) {}

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
    const { sets } = this;
    for (let attempt = 0; ; attempt++) {
      // Read outside the transaction (it may ask the store), for each attempt: the PUT follows it.
      const created = this.options.storeTime === undefined ? sets.now() : Math.ceil((await this.options.storeTime()).latest);
      // A refused increment rolls the increments and the hold back.
      const outcome = await sets.counting(async (tx): Promise<ManifestWrite | 'pending'> => {
        // The row first: two begins of the key take turns from here on.
        const row = await sets.lockKey(tx, key);
        if (await this.writeBlocking(tx, key, condition)) return 'pending';
        const record = async (write: ManifestWrite) => {
          await tx.run(
            `INSERT INTO gc_intents (id, key, set_id, body_hash, host, created, added, dropped, put_condition) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)`,
            [write.id, key, write.set, hash, this.options.hostId, created, write.added.join(' '), write.dropped.join(' '), condition ?? null],
          );
          return write;
        };
        if (row === undefined && share !== undefined && share.key !== key) {
          const source = await sets.lockKey(tx, share.key);
          if (source !== undefined && source.etag === share.etag && !(await sets.writePending(tx, share.key))) {
            await sets.holdSet(tx, source.set);
            return record({ id: crypto.randomUUID(), key, condition, set: source.set, packs, added: [], dropped: [] });
          }
        }
        // A create counts its packs on a set of its own: its commit then does not depend on
        // the key's counted packs, which a write passing its intent may change meanwhile.
        const { set, counted } = condition === IF_NONE_MATCH ? { set: await sets.newSet(tx), counted: EMPTY } : await sets.setToWrite(tx, row, known);
        const { added, dropped } = packDelta(counted, packs);
        await sets.incrementAll(tx, added);
        return record({ id: crypto.randomUUID(), key, condition, set, packs, added, dropped });
      });
      if ('done' in outcome && outcome.done !== 'pending') return outcome.done;
      if (attempt >= 4) {
        throw 'done' in outcome
          ? new WritePendingError(`${key}: an earlier write of it is unresolved (its PUT may still land); try again in ${Math.ceil(this.options.settleMs / 1000)} s`)
          : new PacksGoneError(key, outcome.missing);
      }
      if ('done' in outcome) {
        const { pending } = await this.resolveIntents({ key });
        if (pending > 0) await new Promise((resolve) => setTimeout(resolve, 100 * (attempt + 1)));
      } else {
        const gone = await sets.adoptOrGone(key, outcome.missing);
        if (gone.length > 0) throw new PacksGoneError(key, gone);
      }
    }
  }

  /**
   * Whether an unresolved write of `key` keeps a write with `condition` from beginning: any
   * but a create, or one with the same If-Match etag (see the top of this file).
   */
  private async writeBlocking(tx: SqlTx, key: string, condition: PutCondition | undefined): Promise<boolean> {
    const rows = await tx.all<{ put_condition: string | null }>(`SELECT put_condition FROM gc_intents WHERE key = $1`, [key]);
    return rows.some((r) => r.put_condition !== IF_NONE_MATCH && (condition === undefined || condition === IF_NONE_MATCH || r.put_condition !== condition));
  }

  /** Step 3 after the PUT landed with `etag`: the key's counted packs are now `write.packs`. */
  async commit(write: ManifestWrite, etag: string): Promise<CountedManifest> {
    const superseded = await this.sets.db.tx(async (tx) => {
      // Already resolved by someone who read the store and found this body: done.
      if (!(await this.sets.takeIntent(tx, write.id))) return 0;
      await this.sets.applyCommit(tx, write.key, write.set, etag, write.added, write.dropped);
      return this.revertSuperseded(tx, write.key, write.condition);
    });
    if (superseded > 0) this.options.log.info('earlier manifest writes with the same condition can no longer land; increments reverted', { key: write.key, writes: superseded });
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

  /** The PUT definitely did not land: revert the increments and the hold. */
  async abort(write: ManifestWrite): Promise<void> {
    await this.sets.db.tx(async (tx) => {
      if (!(await this.sets.takeIntent(tx, write.id))) return;
      await this.revert(tx, write.key, write.set, write.added);
    });
  }

  /** Undo begin's increments, and its hold of `set` unless that is the key's own set (changed in place, held by the row). */
  private async revert(tx: SqlTx, key: string, set: string, added: readonly string[]): Promise<void> {
    await this.sets.decrement(tx, added);
    if ((await this.sets.keySet(tx, key)) !== set) await this.sets.letGoSet(tx, set);
  }

  /**
   * Resolve unfinished writes (all, or those of `key` / `host`) by reading their key in
   * the store: our body is there → commit; it is not and the PUT can no longer land (the
   * key no longer has the etag it was conditional on, or the settle time passed) →
   * revert; otherwise leave it pending. `settleMs` overrides the settle time: 0 at
   * start-up for this host's own writes to a file:// store, which died with the process.
   */
  async resolveIntents(filter: { key?: string; host?: string; settleMs?: number } = {}): Promise<{ committed: number; reverted: number; pending: number }> {
    const { sets, options } = this;
    const settleMs = filter.settleMs ?? options.settleMs;
    const rows = await sets.db.tx((tx) =>
      tx.all<{ id: string; key: string; set_id: string; body_hash: string; created: number; added: string; dropped: string; host: string; put_condition: string | null }>(
        `SELECT id, key, set_id, body_hash, host, created, added, dropped, put_condition FROM gc_intents`,
      ),
    );
    const result = { committed: 0, reverted: 0, pending: 0 };
    // Read once, before the intents: the store's time only grows meanwhile, so this errs towards waiting.
    // A settle time of 0 (the writer is known dead) needs no clock.
    const now = rows.length === 0 || settleMs === 0 || options.storeTime === undefined ? sets.now() : (await options.storeTime()).earliest;
    for (const intent of rows) {
      if (filter.key !== undefined && intent.key !== filter.key) continue;
      if (filter.host !== undefined && intent.host !== filter.host) continue;
      const object = await options.store.get(intent.key);
      const condition = intent.put_condition ?? undefined;
      if (object !== undefined && bodyHash(object.body) === intent.body_hash) {
        const superseded = await sets.db.tx(async (tx) => {
          if (!(await sets.takeIntent(tx, intent.id))) return -1;
          await sets.applyCommit(tx, intent.key, intent.set_id, object.etag, words(intent.added), words(intent.dropped));
          return this.revertSuperseded(tx, intent.key, condition);
        });
        if (superseded < 0) continue; // resolved meanwhile
        result.committed++;
        result.reverted += superseded;
        options.log.info('resolved an unfinished manifest write: it landed', { key: intent.key, host: intent.host, superseded });
      } else if (
        (condition !== undefined && condition !== IF_NONE_MATCH && object?.etag !== condition) ||
        settleMs === 0 || now - Number(intent.created) >= settleMs
      ) {
        const reverted = await sets.db.tx(async (tx) => {
          if (!(await sets.takeIntent(tx, intent.id))) return false;
          await this.revert(tx, intent.key, intent.set_id, words(intent.added));
          return true;
        });
        if (!reverted) continue;
        result.reverted++;
        options.log.info('resolved an unfinished manifest write: it did not land; increments reverted', {
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
    return this.sets.db.tx(async (tx) => {
      const row = (await tx.all<{ etag: string; set_id: string }>(`SELECT etag, set_id FROM gc_manifests WHERE key = $1`, [key]))[0];
      if (row === undefined) return undefined;
      return { etag: row.etag, packs: await this.sets.setPacks(tx, row.set_id) };
    });
  }

  /**
   * The object at `key` was deleted from the store: drop what it counted. Call after the
   * delete (a crash between the two over-counts). With `etag`, only if that version is
   * what is counted. Returns the packs it counted (released unless another key shares
   * its set); WritePendingError while a write of the key is unresolved.
   */
  async removeManifest(key: string, etag?: string): Promise<number> {
    return this.sets.db.tx(async (tx) => {
      if (await this.sets.writePending(tx, key)) {
        throw new WritePendingError(`${key}: a write of it is in progress; its refcounts are left for reconciliation`);
      }
      return this.sets.removeKey(tx, key, etag);
    });
  }
}
