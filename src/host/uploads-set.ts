// The packs a volume's uploads (and its seals of blocks the store already had) hold on this
// host, under the volume's uploads key in the refcounts (invariant 6), until a manifest of
// the volume names them.
import { type BlockCache, type BlockKey, type BlockSealer } from '../blocks/cache.js';
import { errorMessage, type Logger } from '../log.js';
import type { PackRefcounts } from '../gc/refcounts.js';
import { uploadsKey } from '../gc/uploads.js';
import type { PackIndex } from '../store/pack-index.js';

/** A hold of a pack a block sealed by this volume is in (see UploadsSet.holdSealed). */
interface SealHold {
  pack: string;
  /** Committed in the volume's uploads set. */
  held: boolean;
  /** The pins of the blocks waiting for it (BlockCache.pinUntilHeld). */
  settles: Array<(held: boolean) => void>;
}

/** Seal holds remembered since a cut (one per pack); past it the next settle keeps every pack. */
const MAX_SEAL_HOLDS = 4096;

export class UploadsSet {
  /**
   * Whether the volume's uploads key may hold packs: set by every upload, and at start (a
   * previous run may have left some), cleared once a manifest names them all.
   */
  holdsUploads = true;
  /**
   * Packs this volume's seals hold (or are about to) in its uploads set since its last
   * snapshot cut: the drain of that cut keeps them held, as its manifest does not name the
   * blocks sealed after it. At most MAX_SEAL_HOLDS.
   */
  private sealHolds = new Map<string, SealHold>();
  /** Seal holds forgotten past MAX_SEAL_HOLDS since the cut: the next settle lets go of nothing. */
  private sealHoldsDropped = false;
  /** Seal holds waiting for the next transaction (at most one per pack), and whether one is scheduled or running. */
  private sealHoldQueue: SealHold[] = [];
  private sealHolding: Promise<void> | undefined;
  /** The holdUploads transaction of the seal holds running now, and a settle running (seal holds wait for it). */
  private sealBatch: Promise<unknown> | undefined;
  private settling: Promise<void> | undefined;
  /** This volume to the cache: an upload of a block it sealed while no pack held it holds the pack for it too. */
  readonly sealer: BlockSealer;

  constructor(
    private readonly volume: string,
    private readonly ctx: { hostId: string; refcounts?: PackRefcounts; cache: BlockCache; packIndex: PackIndex; log: Logger },
  ) {
    this.sealer = { hold: uploadsKey(ctx.hostId, volume), left: false, holding: (pack) => this.noteSealHold(pack, true) };
  }

  /**
   * The refcount key that holds the packs this volume's uploads on this host made (or,
   * for the dirty budget, found) until its own manifest names them (invariant 6).
   */
  get uploads(): string {
    return uploadsKey(this.ctx.hostId, this.volume);
  }

  /** A snapshot was cut: blocks sealed before it are in it, so a manifest of it names them. */
  cut(): void {
    this.sealHolds = new Map();
    this.sealHoldsDropped = false;
  }

  /**
   * A manifest of the volume naming every block it had at its snapshot is committed: what
   * its uploads held goes (the manifest holds what is still named), but for the packs
   * blocks sealed since the cut rely on. A failure only over-counts.
   */
  async settle(): Promise<void> {
    const refcounts = this.ctx.refcounts;
    if (!this.holdsUploads || refcounts === undefined || this.sealHoldsDropped) return;
    const settle = async () => {
      // The seal holds being committed go in first; those queued meanwhile wait for the settle.
      await this.sealBatch?.catch(() => undefined);
      const keep = new Set(this.sealHolds.keys());
      await refcounts.settleUploads(this.uploads, [...keep]);
      // Another volume's upload may have held a pack for this one while the settle ran: hold it again.
      const since = [...this.sealHolds.keys()].filter((pack) => !keep.has(pack));
      if (since.length > 0) await refcounts.holdUploads(this.uploads, since);
    };
    const run = settle();
    this.settling = run;
    try {
      await run;
      this.holdsUploads = false;
    } catch (err) {
      this.ctx.log.warn('cannot let go of the packs held for uploads a manifest now names; they stay held until the next drain', { volume: this.volume, key: this.uploads, error: errorMessage(err) });
    } finally {
      this.settling = undefined;
    }
  }

  /**
   * A seal put block `key` into the cache. When the store already has it (the pack index
   * names its pack: a dedup hit against another volume's, a manifest's or another host's
   * upload), nothing of this volume holds that pack yet: it joins the volume's uploads set
   * (one transaction for the holds waiting), and the block stays pinned until the hold is
   * committed. A pack being deleted cannot be held: it leaves the pack index and the block,
   * pinned, is uploaded again by the next upload. Once held, a restart keeps the hold (it is
   * in the refcount database; the volume's journal names the block) until a manifest of the
   * volume names it; a crash before that leaves the block pinned (the cache's slot table).
   *
   * Blocks a volume did not seal need no hold: a volume woken from a manifest, and a fork
   * on this host sharing its parent's cached blocks, name only blocks of a manifest that is
   * counted (the fork's own, written before it is served, or the one a lazy fork copies).
   */
  holdSealed(key: BlockKey): void {
    const location = this.ctx.packIndex.get(key);
    // In no pack: the block is pinned until an upload puts it in one, which holds it for this volume too.
    if (location === undefined) {
      this.ctx.cache.noteSealer(key, this.sealer);
      return;
    }
    let hold = this.sealHolds.get(location.pack);
    if (hold?.held) return;
    const settle = this.ctx.cache.pinUntilHeld(key, this.sealer);
    if (hold === undefined) {
      hold = this.noteSealHold(location.pack, false);
      this.sealHoldQueue.push(hold);
      this.holdsUploads = true;
      this.sealHolding ??= new Promise(setImmediate).then(() => this.commitSealHolds()).catch((err: unknown) => {
        this.ctx.log.error('seal holds failed', { volume: this.volume, key: this.uploads, error: errorMessage(err) });
      });
    }
    if (settle !== undefined) hold.settles.push(settle);
  }

  /**
   * Pack `pack` is (`held`: by an upload of a block this volume sealed while in no pack) or
   * is about to be held for a block sealed since the cut: the next settle keeps it.
   */
  private noteSealHold(pack: string, held: boolean): SealHold {
    if (this.sealHolds.size >= MAX_SEAL_HOLDS) {
      // Forget committed ones (the next settle then keeps every pack): the map stays bounded.
      for (const [p, h] of this.sealHolds) if (h.held) this.sealHolds.delete(p);
      this.sealHoldsDropped = true;
    }
    const hold: SealHold = { pack, held, settles: [] };
    this.sealHolds.set(pack, hold);
    this.holdsUploads = true;
    return hold;
  }

  /** One holdUploads transaction for the seal holds waiting; then again while more came meanwhile. */
  private async commitSealHolds(): Promise<void> {
    try {
      await this.commitSealHoldBatches();
    } finally {
      this.sealHolding = undefined;
    }
  }

  private async commitSealHoldBatches(): Promise<void> {
    while (this.sealHoldQueue.length > 0) {
      // A settle computed what it keeps: these go in after it.
      while (this.settling !== undefined) await this.settling.catch(() => undefined);
      const batch = this.sealHoldQueue;
      this.sealHoldQueue = [];
      let gone: Set<string> | undefined;
      try {
        const holding = this.ctx.refcounts!.holdUploads(this.uploads, batch.map((h) => h.pack));
        this.sealBatch = holding;
        gone = new Set(await holding);
      } catch (err) {
        this.ctx.log.warn('cannot hold the packs of blocks sealed while the store had them; the blocks stay pinned', {
          volume: this.volume, key: this.uploads, packs: batch.length, error: errorMessage(err),
        });
      }
      if (gone !== undefined && gone.size > 0) {
        this.ctx.log.warn('packs holding sealed blocks are being deleted by GC; the blocks stay pinned and are uploaded again', { volume: this.volume, packs: gone.size });
      }
      for (const hold of batch) {
        hold.held = gone !== undefined && !gone.has(hold.pack);
        if (!hold.held && this.sealHolds.get(hold.pack) === hold) this.sealHolds.delete(hold.pack);
        if (gone?.has(hold.pack)) this.ctx.packIndex.removePack(hold.pack);
        for (const settle of hold.settles) settle(hold.held);
        hold.settles = [];
      }
    }
  }

  /**
   * This link no longer speaks for the volume (it leaves the host, or a reopen replaced the
   * link): uploads of blocks it sealed hold nothing more for it, and this resolves once the
   * seal holds queued so far are committed, so that its uploads set is let go of after them.
   */
  async leave(): Promise<void> {
    this.sealer.left = true;
    while (this.sealHolding !== undefined) await this.sealHolding;
  }
}
