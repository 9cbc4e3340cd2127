// Sealing a volume (DESIGN.md: Seal, Snapshot at sequence N): overlay chunks become
// blocks (merged with the base block, hashed, put into the block cache, named by the block
// map) in the background without blocking writers; a snapshot cuts the volume at its
// sequence; the dirty budget seals and hands over the chunks changed longest ago.
import { blockKey, type BlockKey } from '../blocks/cache.js';
import { isAllZero } from '../crypto/hash.js';
import { ZERO_ALLOCATED_KEY, type BlockMap } from './blockmap.js';
import { readAt } from './overlay-file.js';
import { isEmpty, popcount, SECTOR_SHIFT, sectorPresent, sectorRunEnd } from './sectors.js';
import { VolumeError, type VolumeSnapshot } from './state.js';
import { VolumeWrites } from './write.js';

/** A snapshot seals in the background until at most this many chunks are dirty, then cuts. */
const SNAPSHOT_CUT_CHUNKS = 64;
const SNAPSHOT_SEAL_ROUNDS = 4;
/** Chunks one seal call reads and hashes at once: its chunk buffers in flight are at most this many blocks. */
const SEAL_CONCURRENCY = 32;

/** Seals and snapshots of a volume. */
export abstract class VolumeSeals extends VolumeWrites {
  /**
   * The dirty budget's upload: the `count` chunks changed longest ago, sealed (those
   * written meanwhile wait for a later round) with their blocks held until `release`.
   * `keys` are the blocks to upload; `stored()` says they reached the store, so the chunks
   * not changed again since are no longer dirty.
   */
  async oldestChanges(count: number): Promise<{ chunks: number; keys: BlockKey[]; stored(): void; release(): void }> {
    this.checkOpen();
    const picked: Array<[number, number]> = [];
    for (const entry of this.storeDirty) {
      if (picked.length >= count) break;
      picked.push(entry);
    }
    const unsealed = picked.map(([chunk]) => chunk).filter((chunk) => this.overlay.has(chunk));
    if (unsealed.length > 0) {
      await this.sealChunks(unsealed);
      // Chunks a background seal had already taken: wait for it too.
      await Promise.allSettled(this.sealsInFlight);
    }
    const keys: BlockKey[] = [];
    const uploaded: Array<[number, number]> = [];
    for (const entry of picked) {
      const [chunk, stamp] = entry;
      if (this.storeDirty.get(chunk) !== stamp || this.overlay.has(chunk)) continue;
      const key = this.map.get(chunk);
      if (key !== undefined && key !== ZERO_ALLOCATED_KEY) {
        if (!this.cache.ref(key)) continue;
        keys.push(key);
      }
      uploaded.push(entry);
    }
    let released = false;
    return {
      chunks: uploaded.length,
      keys,
      stored: () => {
        for (const [chunk, stamp] of uploaded) if (this.storeDirty.get(chunk) === stamp) this.storeDirty.delete(chunk);
      },
      release: () => {
        if (released) return;
        released = true;
        for (const key of keys) this.cache.unref(key);
      },
    };
  }

  // ---- seal -------------------------------------------------------------------------------

  /**
   * Seal up to `limit` overlay chunks, oldest first: merge with the base block, hash,
   * put into the block cache, point the map at it. Overlay data is read through the
   * thread pool, so sealing never stalls requests on disk. A write that lands on a
   * chunk while it is being sealed starts a fresh overlay generation: its sectors stay
   * in the overlay (and shadow the new block) when the seal commits. Returns the number
   * of chunks sealed; fewer than asked when the cache has no room.
   */
  async seal(limit: number, onSealed?: (key: BlockKey) => void): Promise<number> {
    const chunks: number[] = [];
    for (const chunk of this.overlay.keys()) {
      if (chunks.length >= limit) break;
      if (!this.sealing.has(chunk)) chunks.push(chunk);
    }
    return this.sealChunks(chunks, onSealed);
  }

  /** Seal these overlay chunks (those not in the overlay or already being sealed are skipped). */
  private async sealChunks(candidates: readonly number[], onSealed?: (key: BlockKey) => void): Promise<number> {
    if (this.closed || this.closing || this.failure !== undefined) return 0;
    const chunks: number[] = [];
    for (const chunk of candidates) {
      if (this.sealing.has(chunk) || !this.overlay.has(chunk)) continue;
      this.sealing.set(chunk, { written: new Uint8Array(this.maskBytes), invalid: false });
      chunks.push(chunk);
    }
    let next = 0;
    let sealed = 0;
    const lane = async () => {
      // One chunk buffer per lane, reused: the cache copies what it keeps.
      const scratch = Buffer.allocUnsafe(this.blockSize);
      while (next < chunks.length) {
        const chunk = chunks[next++];
        // Waiting its turn, the chunk may have been trimmed, or the volume begun to close.
        if (this.sealing.get(chunk)!.invalid || !this.overlay.has(chunk) || this.closed || this.closing || this.failure !== undefined) {
          this.sealing.delete(chunk);
          continue;
        }
        if (await this.sealChunk(chunk, scratch, onSealed)) sealed++;
      }
    };
    const work = Promise.all(Array.from({ length: Math.min(SEAL_CONCURRENCY, chunks.length) }, lane));
    this.sealsInFlight.add(work);
    await work.finally(() => this.sealsInFlight.delete(work));
    this.stats.chunksSealed += sealed;
    return sealed;
  }

  /**
   * The base block a seal of `chunk` (overlay sectors `mask`) must read and this host does
   * not hold, if any. A chunk written whole seals without its base: no store GET for it.
   */
  private absentBase(chunk: number, mask: Uint8Array): BlockKey | undefined {
    if (popcount(mask) === this.sectorsPerChunk) return undefined;
    const base = this.map.get(chunk);
    return base !== undefined && base !== ZERO_ALLOCATED_KEY && !this.cache.has(base) ? base : undefined;
  }

  private async sealChunk(chunk: number, block: Buffer, onSealed?: (key: BlockKey) => void): Promise<boolean> {
    const state = this.sealing.get(chunk)!;
    try {
      const base = this.absentBase(chunk, this.overlay.get(chunk)!);
      if (base !== undefined) await this.fetchBlocks([base]);
      if (state.invalid || this.closed) return false;
      const mask = Uint8Array.from(this.overlay.get(chunk)!);
      // The base is needed but left the cache meanwhile: a later seal tries again.
      if (this.absentBase(chunk, mask) !== undefined) return false;
      const bs = this.blockSize;
      // Absent sectors come from the base block (memory or cache pread), present ones from the overlay.
      const runs: Array<[number, number]> = [];
      let at = 0;
      while (at < this.sectorsPerChunk) {
        const present = sectorPresent(mask, at);
        const end = sectorRunEnd(mask, at, this.sectorsPerChunk);
        if (present) runs.push([at << SECTOR_SHIFT, (end - at) << SECTOR_SHIFT]);
        else this.readBase(chunk, at << SECTOR_SHIFT, (end - at) << SECTOR_SHIFT, block, at << SECTOR_SHIFT);
        at = end;
      }
      const position = chunk * bs;
      // Every read settles before a failure is thrown: the lane's next chunk reuses `block`.
      const reads = await Promise.allSettled(runs.map(([offset, length]) => readAt(this.overlayFd, block, offset, length, position + offset)));
      for (const read of reads) if (read.status === 'rejected') throw read.reason;
      if (state.invalid || this.closed) return false;
      // Bytes past the end of a volume whose size is not a multiple of the block size are zero.
      const chunkBytes = Math.min(bs, Math.max(0, this.size - position));
      if (chunkBytes < bs) block.fill(0, chunkBytes);
      let key: BlockKey | undefined;
      if (!isAllZero(block)) {
        key = blockKey(this.blockHash(block));
        const replacing = this.map.get(chunk) !== undefined;
        if (!this.cache.put(key, block, replacing)) return false;
        this.onSealedBlock?.(key);
      }
      // Commit, synchronously: sectors written since the seal began stay in the overlay.
      this.sealing.delete(chunk);
      this.overlay.drop(chunk);
      if (!isEmpty(state.written)) this.overlay.add(chunk, state.written);
      this.remap(chunk, key);
      if (key !== undefined) onSealed?.(key);
      return true;
    } catch (err) {
      this.log.error('cannot seal chunk; it stays in the overlay', { volume: this.name, chunk, error: (err as Error).message });
      return false;
    } finally {
      this.sealing.delete(chunk);
    }
  }

  // ---- snapshot -----------------------------------------------------------------------------

  /**
   * The volume at its current sequence, without pausing writers (DESIGN.md: snapshot).
   * Background seals first bring the overlay down; the cut itself seals what is left
   * synchronously, so no write can land between sealing and copying the map. The
   * snapshot holds references on its local blocks until release(). `onSealed` hears of
   * each block the snapshot's background-style seals commit, so a drain can upload them
   * while the rest is sealed (the snapshot's chunks are still the whole truth). With
   * `base` (the map of the volume's last manifest, a clone of this volume's), it also
   * lists the chunks changed since, and holds only their blocks.
   */
  async snapshot(options: { base?: BlockMap; onSealed?: (key: BlockKey) => void } = {}): Promise<VolumeSnapshot> {
    this.checkOpen();
    if (this.failure !== undefined) throw this.failedError();
    for (let round = 0; ; round++) {
      await Promise.allSettled(this.sealsInFlight);
      if (this.overlay.size > SNAPSHOT_CUT_CHUNKS && round < SNAPSHOT_SEAL_ROUNDS) {
        await this.seal(Infinity, options.onSealed);
        continue;
      }
      const bases: BlockKey[] = [];
      for (const [chunk, mask] of this.overlay) {
        const base = this.absentBase(chunk, mask);
        if (base !== undefined) bases.push(base);
      }
      if (bases.length > 0) await this.fetchBlocks(bases);
      if (this.sealAllSync()) break;
      if (round > SNAPSHOT_SEAL_ROUNDS + 3) {
        throw new VolumeError('EIO', `volume ${this.name}: snapshot: base blocks keep leaving the cache before the cut`);
      }
    }
    const map = this.map.clone();
    const changes = options.base === undefined ? undefined : map.changesSince(options.base);
    // The chunk list is made when a caller asks (a whole manifest), not for every snapshot.
    let chunks: Array<[number, BlockKey]> | undefined;
    const changed = this.storeDirty;
    this.storeDirty = new Map();
    // Blocks of chunks the base names are in the store already: only the rest need holding.
    const held: BlockKey[] = [];
    for (const [, key] of changes ?? map.entries()) if (key !== undefined && key !== ZERO_ALLOCATED_KEY && this.cache.ref(key)) held.push(key);
    let released = false;
    return {
      sequence: this.sequence,
      size: this.size,
      blockSize: this.blockSize,
      get chunks() {
        return (chunks ??= [...map.entries()]);
      },
      map,
      changes,
      release: (stored: boolean) => {
        if (released) return;
        released = true;
        for (const key of held) this.cache.unref(key);
        if (!stored) {
          // Still dirty: the older changes go back in front of those made since the cut.
          const since = this.storeDirty;
          this.storeDirty = changed;
          for (const [chunk, stamp] of since) {
            changed.delete(chunk);
            changed.set(chunk, stamp);
          }
        }
      },
    };
  }

  /**
   * Seal every overlay chunk now, synchronously. All blocks are built before any is
   * committed; returns false (committing nothing) when a base block is not local.
   */
  private sealAllSync(): boolean {
    const built: Array<[number, Buffer | undefined]> = [];
    for (const [chunk, mask] of this.overlay) {
      const block = this.chunkContentSync(chunk, mask);
      if (block === null) return false;
      built.push([chunk, block]);
    }
    for (const [chunk, block] of built) {
      let key: BlockKey | undefined;
      if (block !== undefined) {
        key = blockKey(this.blockHash(block));
        if (!this.cache.put(key, block, this.map.get(chunk) !== undefined)) {
          throw new VolumeError('ENOSPC', `volume ${this.name}: snapshot: the block cache has no room for chunk ${chunk}`);
        }
        this.onSealedBlock?.(key);
      }
      const seal = this.sealing.get(chunk);
      if (seal !== undefined) seal.invalid = true;
      this.overlay.drop(chunk);
      this.remap(chunk, key);
      this.stats.chunksSealed++;
    }
    return true;
  }

  /** A chunk's content from overlay and base; undefined for all zeros, null if the base is not local. */
  private chunkContentSync(chunk: number, mask: Uint8Array): Buffer | undefined | null {
    const bs = this.blockSize;
    const base = this.map.get(chunk);
    const baseLocal = base === undefined || base === ZERO_ALLOCATED_KEY || this.cache.has(base);
    const block = Buffer.allocUnsafe(bs);
    let at = 0;
    while (at < this.sectorsPerChunk) {
      const present = sectorPresent(mask, at);
      const end = sectorRunEnd(mask, at, this.sectorsPerChunk);
      const offset = at << SECTOR_SHIFT;
      const len = (end - at) << SECTOR_SHIFT;
      if (present) this.readOverlay(chunk, offset, len, block, offset);
      else if (!baseLocal) return null;
      else this.readBase(chunk, offset, len, block, offset);
      at = end;
    }
    const chunkBytes = Math.min(bs, Math.max(0, this.size - chunk * bs));
    if (chunkBytes < bs) block.fill(0, chunkBytes);
    return isAllZero(block) ? undefined : block;
  }
}
