// What the volumes on this host hold and what the store keeps for them (the dashboard's
// dedup figures and the storage part of their cost). A volume's logical bytes are its
// mapped chunks × block size; its stored bytes are the pack bytes (compressed, sealed) of
// the distinct blocks its block map names that are in a pack, as the host pack index
// knows them. Walking a block map is O(mapped chunks), so the walk is spread over calls:
// each refresh() reads at most CHUNKS_PER_REFRESH entries, and a volume is walked again
// only once its sequence or the pack index moved, and RESCAN_MS passed.
import type { BlockKey } from '../blocks/cache.js';
import { ZERO_ALLOCATED_KEY } from '../volume/blockmap.js';
import type { Volume } from '../volume/volume.js';
import type { Host } from './host.js';

export interface VolumeUsage {
  /** Mapped chunks × block size: what the guest wrote, before dedup and compression. */
  logicalBytes: number;
  /** Distinct blocks the block map names (the all-zero block aside). */
  blocks: number;
  /** Pack bytes of those blocks that are in the store. */
  storedBytes: number;
  /** Blocks that are in no pack yet (only on this host). */
  localBlocks: number;
  /** The volume's sequence when the walk began; undefined before the first walk finished. */
  sequence: number;
  /** When the walk finished, ms since the epoch. */
  at: number;
  /** Blocks in the host pack index when the walk began (an upload or a GC deletion changes what is stored). */
  indexBlocks: number;
}

/** Block map entries read per refresh(), every volume together. */
export const CHUNKS_PER_REFRESH = 131_072;
/** Distinct blocks remembered while walking one volume; past it a block is counted each time it is named (an upper bound). */
export const MAX_DISTINCT_PER_WALK = 262_144;
/** A changed volume is walked again at most this often. */
const RESCAN_MS = 2_000;
/** The pack index totals (O(blocks)) are summed again this often, or when the number of blocks changed. */
const TOTALS_MS = 30_000;

interface Walk {
  volume: Volume;
  entries: Iterator<[number, BlockKey]>;
  seen: Set<BlockKey>;
  usage: VolumeUsage;
}

export class UsageScanner {
  /** The last finished walk of each volume on the host (entries of volumes gone are dropped by refresh). */
  private readonly done = new Map<string, VolumeUsage>();
  private walk: Walk | undefined;
  private totals: { blocks: number; bytes: number; rawBytes: number; at: number } | undefined;

  constructor(private readonly host: Host) {}

  /** Walk on: finish the current volume, then start the next one that is due, within the budget. */
  refresh(now = Date.now()): void {
    const volumes = this.host.all();
    const open = new Set(volumes.map((v) => v.name));
    for (const name of this.done.keys()) if (!open.has(name)) this.done.delete(name);
    let budget = CHUNKS_PER_REFRESH;
    for (;;) {
      if (this.walk === undefined || this.host.get(this.walk.volume.name) !== this.walk.volume) {
        this.walk = this.nextWalk(volumes, now);
        if (this.walk === undefined) return;
      }
      budget = this.step(this.walk, budget);
      if (budget <= 0) return;
      this.done.set(this.walk.volume.name, { ...this.walk.usage, at: now });
      this.walk = undefined;
    }
  }

  /** The last finished walk of a volume; undefined before its first. */
  of(name: string): VolumeUsage | undefined {
    return this.done.get(name);
  }

  /** Every block in the host pack index: how many, their pack bytes and their raw bytes. */
  packIndexTotals(now = Date.now()): { blocks: number; bytes: number; rawBytes: number } {
    const index = this.host.packIndex;
    if (this.totals === undefined || this.totals.blocks !== index.size || now - this.totals.at >= TOTALS_MS) this.totals = { ...index.totals(), at: now };
    return this.totals;
  }

  private nextWalk(volumes: Volume[], now: number): Walk | undefined {
    // Never walked first, then the longest since its last walk.
    let pick: Volume | undefined;
    let pickAt = Infinity;
    for (const volume of volumes) {
      const last = this.done.get(volume.name);
      const moved = last === undefined || last.sequence !== volume.sequence || last.indexBlocks !== this.host.packIndex.size;
      if (!moved || (last !== undefined && now - last.at < RESCAN_MS)) continue;
      const at = last?.at ?? -1;
      if (at < pickAt) {
        pick = volume;
        pickAt = at;
      }
    }
    if (pick === undefined) return undefined;
    return {
      volume: pick,
      entries: pick.blockNames(),
      seen: new Set(),
      usage: {
        logicalBytes: pick.mappedChunks * pick.blockSize, blocks: 0, storedBytes: 0, localBlocks: 0, sequence: pick.sequence, at: now,
        indexBlocks: this.host.packIndex.size,
      },
    };
  }

  /** Read up to `budget` entries of the walk; the budget left (≤ 0: the walk is not finished). */
  private step(walk: Walk, budget: number): number {
    const index = this.host.packIndex;
    const usage = walk.usage;
    while (budget > 0) {
      const next = walk.entries.next();
      if (next.done) return budget;
      budget--;
      const key = next.value[1];
      if (key === ZERO_ALLOCATED_KEY || walk.seen.has(key)) continue;
      if (walk.seen.size < MAX_DISTINCT_PER_WALK) walk.seen.add(key);
      usage.blocks++;
      const location = index.get(key);
      if (location === undefined) usage.localBlocks++;
      else usage.storedBytes += location.length;
    }
    // Out of budget exactly at the end: the next call finds it done at once.
    return 0;
  }
}
