// A volume's flush and recovery (DESIGN.md: Flush, Wake on the same host): FLUSH makes
// every acknowledged write durable on local disk (overlay data and new blocks, then the
// journal batch that names them); a volume loaded after a crash makes what it loaded
// durable again.
import path from 'node:path';
import { keyBytes, keyHex, type BlockKey } from '../blocks/cache.js';
import { ZERO_HASH } from '../crypto/hash.js';
import { disk } from '../disk/disk.js';
import { injected } from '../faults/injected.js';
import { ZERO_ALLOCATED_KEY, type BlockMap } from './blockmap.js';
import type { ChunkRecord, LoggedExtent } from './journal.js';
import { writeAllSync } from './overlay-file.js';
import { VolumeSeals } from './seal.js';
import { SECTOR_SHIFT, sectorPresent, sectorRunEnd } from './sectors.js';
import { VolumeError } from './state.js';

const fdatasync = (...args: Parameters<typeof disk.fdatasync>) => disk.fdatasync(...args);

/** Flush and recovery of a volume. */
export abstract class VolumeFlushes extends VolumeSeals {
  /**
   * Make every acknowledged write durable on local disk: overlay data and new blocks
   * first, then the journal batch that names them and the sequence. Callers that arrive
   * while a flush is running share the next one.
   */
  flush(): Promise<void> {
    return this.queueFlush(!injected.has('flush-sequence-lazy'));
  }

  /**
   * A client's FLUSH (or FUA): every acknowledged write durable on local disk, and on a
   * durable volume also in the store (both at once). When no chunk's record changed it
   * syncs the overlay only: the sequence waits for the next full flush (see flushNow).
   */
  flushForClient(): Promise<void> {
    const durable = this.durableFlush;
    if (durable === undefined) return this.queueFlush(false);
    const sequence = this.sequence;
    return Promise.all([this.queueFlush(false), durable(sequence)]).then(() => undefined);
  }

  /** Queue a flush behind the running one; `full` (the sequence committed) wins when callers share one. */
  private queueFlush(full: boolean): Promise<void> {
    if (full) this.flushQueuedFull = true;
    if (this.flushQueued) return this.flushQueued;
    const run = this.flushTail.then(() => {
      const queuedFull = this.flushQueuedFull;
      this.flushQueued = undefined;
      this.flushQueuedFull = false;
      return this.flushNow(queuedFull);
    });
    this.flushQueued = run;
    this.flushTail = run.catch(() => undefined);
    return run;
  }

  private async flushNow(full: boolean): Promise<void> {
    if (this.failure !== undefined) throw this.failedError();
    const clean = this.journalDirty.size === 0 && this.pendingUnref.length === 0 && !this.sizeDirty && !this.recoveredUnsynced;
    if (clean && ((this.sequence === this.journalSequence && !this.logDebt) || (!full && this.writesSinceDataSync === 0))) return;
    const sizeChanged = this.sizeDirty;
    const writes = this.writesSinceDataSync;
    const logged = this.logged.take();
    // A loaded journal is written whole, as the overlay was at load: pages of it a killed
    // process failed to sync would not be written by a sync of an appended batch.
    const recovered = this.recoveredUnsynced && !injected.has('recover-without-rewrite');
    this.recoveredUnsynced = false;
    const chunks = this.journalDirty;
    const unrefs = this.pendingUnref;
    this.journalDirty = new Set();
    this.pendingUnref = [];
    this.sizeDirty = false;
    const sequence = this.sequence;
    const size = this.size;
    // Capture the state now: later writes land in the next batch.
    const live = this.journal.recordBytes * (this.map.count + this.overlay.size);
    const compact = recovered || this.journal.bytes > Math.max(4 << 20, 4 * live);
    // A compaction writes the whole state from a frozen copy (the map's pages shared
    // copy-on-write, the dirty chunks' masks copied); a commit writes the changed chunks.
    const frozen = compact ? this.frozenState() : undefined;
    const records = frozen === undefined ? [...chunks].map((c) => this.record(c)) : [];
    const named: Array<[number, BlockKey]> = [];
    for (const chunk of chunks) {
      const key = this.map.get(chunk);
      if (key !== undefined && key !== ZERO_ALLOCATED_KEY) named.push([chunk, key]);
    }
    // A failed sync is never retried (the kernel may have dropped the pages and cleared
    // the error): the volume fails instead, and FLUSH stays failed until it is reopened.
    // The replaced blocks stay held; a reopen releases them with the rest (releaseHeld).
    const failed = (reason: string) => {
      this.pendingUnref.push(...unrefs);
      return this.fail(reason);
    };
    const overlayFailed = (err: unknown) => {
      this.syncFailures.overlay++;
      return failed(`flush: fdatasync of ${path.join(this.dir, 'overlay')}: ${(err as Error).message}`);
    };
    const journalFailed = (err: unknown) => {
      this.syncFailures.journal++;
      return failed(`flush: ${(err as Error).message}`);
    };
    // Done: the writes counted when this flush began are durable, and with a journal batch its sequence.
    const synced = (how: 'overlay' | 'journal' | 'logged') => {
      this.writesSinceDataSync -= writes;
      if (how === 'overlay') {
        this.stats.overlayOnlyFlushes++;
        return;
      }
      this.journalSequence = Math.max(this.journalSequence, sequence);
      if (how === 'logged') {
        this.logDebt = true;
        this.stats.loggedFlushes++;
      } else {
        this.logDebt = false;
        this.stats.journalCommits++;
      }
    };
    const syncOverlay = () => (injected.has('flush-skip-fdatasync') ? Promise.resolve() : fdatasync(this.overlayFd));
    // No chunk's record changed (only present sectors were rewritten, or a hole trimmed),
    // and no logged write waits for the overlay's sync.
    const logDebt = this.logDebt && !injected.has('flush-log-debt-ignored');
    if (chunks.size === 0 && unrefs.length === 0 && !sizeChanged && frozen === undefined && !logDebt && !injected.has('fsync-retry-succeeds')) {
      // A client's FLUSH syncs the overlay alone: one device flush instead of two. The journal's
      // sequence may then lag the data; that is safe because every full flush (each snapshot's
      // among them) commits it, so it never falls below a manifest's, and a write that adds
      // overlay sectors after a snapshot's cut changes a record, whose commit moves it past.
      if (!full) {
        try {
          await syncOverlay();
        } catch (err) {
          throw overlayFailed(err);
        }
        return synced('overlay');
      }
      // The sequence may reach the disk before the data it counts (a sequence ahead of the
      // data only makes a drain find nothing new), so both syncs run at once.
      const [overlay, journal] = await Promise.allSettled([syncOverlay(), this.journal.commit([], sequence, size)]);
      if (overlay.status === 'rejected') throw overlayFailed(overlay.reason);
      if (journal.status === 'rejected') throw journalFailed(journal.reason);
      return synced('journal');
    }
    // A client's FLUSH covering few writes logs them in its batch: one sync, of the journal,
    // where syncing the overlay and then the journal that claims its new sectors takes two.
    if (
      !full && logged !== undefined && frozen === undefined && named.length === 0 && !injected.has('fsync-retry-succeeds') &&
      this.journal.reserveLog(records.length, logged)
    ) {
      try {
        await this.journal.commitLogged(records, logged, sequence, size);
      } catch (err) {
        throw journalFailed(err);
      }
      synced('logged');
      for (const key of unrefs) this.cache.unref(key);
      return;
    }
    // The block cache is synced only when this batch names a block put since its last sync.
    const [overlay, blocks] = await Promise.allSettled([syncOverlay(), this.cache.syncFor(named.map(([, key]) => key))]);
    if (overlay.status === 'rejected' && injected.has('fsync-retry-succeeds')) {
      for (const chunk of chunks) this.journalDirty.add(chunk);
      this.pendingUnref.push(...unrefs);
      this.sizeDirty = true;
      throw new VolumeError('EIO', `volume ${this.name}: flush: fdatasync of the overlay: ${(overlay.reason as Error).message}`);
    }
    if (overlay.status === 'rejected') throw overlayFailed(overlay.reason);
    // A failed slab sync loses only the pinned blocks it covered: this flush fails if it would name one.
    for (const [chunk, key] of named) {
      if (!this.cache.lostBlock(key)) continue;
      const why = blocks.status === 'rejected' ? (blocks.reason as Error).message : 'an earlier write or sync of the block cache failed';
      throw failed(`flush: block ${keyHex(key)} of chunk ${chunk} may be lost: ${why}`);
    }
    try {
      if (frozen !== undefined) await this.journal.rewrite(frozen.map, frozen.overlay, sequence, size, this.blockSize);
      else await this.journal.commit(records, sequence, size);
    } catch (err) {
      throw journalFailed(err);
    }
    synced('journal');
    for (const key of unrefs) this.cache.unref(key);
  }

  private record(chunk: number): ChunkRecord {
    const key = this.map.get(chunk);
    const mask = this.overlay.get(chunk);
    return {
      chunk,
      hash: key === undefined ? ZERO_HASH : keyBytes(key),
      mask: mask === undefined ? this.emptyMask : Uint8Array.from(mask),
    };
  }

  /** The state a journal rewrite writes: O(pages) for the map, O(dirty chunks) for the overlay. */
  protected frozenState(): { map: BlockMap; overlay: Array<readonly [number, Uint8Array]> } {
    const overlay: Array<readonly [number, Uint8Array]> = [];
    for (const [chunk, mask] of this.overlay) overlay.push([chunk, Uint8Array.from(mask)]);
    return { map: this.map.clone(), overlay };
  }

  // ---- recovery ---------------------------------------------------------------------

  /**
   * Lay the journal's logged writes (the BLOG batches after its last other batch) over the
   * overlay, oldest first: FLUSHes logged them instead of syncing the overlay. Only sectors
   * the loaded state holds in the overlay are written; a later seal or trim made the rest
   * stale. Synchronous: nothing writes meanwhile.
   */
  protected applyLogged(extents: readonly LoggedExtent[]): void {
    const bs = this.blockSize;
    for (const { position, data } of extents) {
      for (let at = 0; at < data.length; ) {
        const chunk = Math.floor((position + at) / bs);
        const inChunk = position + at - chunk * bs;
        const n = Math.min(data.length - at, bs - inChunk);
        const mask = this.overlay.get(chunk);
        const last = (inChunk + n) >>> SECTOR_SHIFT;
        for (let sector = inChunk >>> SECTOR_SHIFT; mask !== undefined && sector < last; ) {
          const end = Math.min(sectorRunEnd(mask, sector, this.sectorsPerChunk), last);
          if (sectorPresent(mask, sector)) {
            const from = at + (sector << SECTOR_SHIFT) - inChunk;
            const to = at + (end << SECTOR_SHIFT) - inChunk;
            try {
              writeAllSync(this.overlayFd, [data.subarray(from, to)], chunk * bs + (sector << SECTOR_SHIFT));
            } catch (err) {
              throw new Error(`volume ${this.name}: laying a logged write over the overlay ${path.join(this.dir, 'overlay')} at ${position + from}: ${(err as Error).message}`);
            }
          }
          sector = end;
        }
        at += n;
      }
    }
    if (extents.length > 0) this.logDebt = true;
  }

  /**
   * Write the loaded overlay sectors back over themselves. A killed process whose overlay
   * fdatasync failed left pages the kernel no longer writes (clean in the cache, old on the
   * disk) and a sync now succeeds without them; written again, they are dirty, and the next
   * FLUSH makes what this volume serves durable. Synchronous: nothing writes meanwhile.
   */
  protected redirtyOverlay(): void {
    const block = Buffer.allocUnsafe(this.blockSize);
    const overlayPath = path.join(this.dir, 'overlay');
    for (const [chunk, mask] of this.overlay) {
      let at = 0;
      while (at < this.sectorsPerChunk) {
        const present = sectorPresent(mask, at);
        const end = sectorRunEnd(mask, at, this.sectorsPerChunk);
        if (present) {
          const offset = at << SECTOR_SHIFT;
          const length = (end - at) << SECTOR_SHIFT;
          const position = chunk * this.blockSize + offset;
          const n = disk.readSync(this.overlayFd, block, offset, length, position);
          // Past the file's end (an extension a power cut took) the sectors read as zeros.
          block.fill(0, offset + n, offset + length);
          try {
            writeAllSync(this.overlayFd, [block.subarray(offset, offset + length)], position);
          } catch (err) {
            throw new Error(`volume ${this.name}: rewriting the loaded overlay ${overlayPath} at ${position}: ${(err as Error).message}`);
          }
        }
        at = end;
      }
    }
  }
}
