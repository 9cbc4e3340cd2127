// Building a Manifest from a volume's chunks (the layout: store/manifest.ts).
import { HASH_BYTES } from '../crypto/hash.js';
import { blockKey, type BlockKey } from '../blocks/cache.js';
import { blockProblem, checkedMeta, chunkCountOf, ZERO_ALLOCATED_BLOCK, zeroNameOf, type Manifest, type ManifestBlock, type ManifestMeta } from './manifest.js';
import { PACK_ID } from './pack.js';
import type { PackLocation } from './pack-index.js';

/** Hashes per allocation of the builder's copies. */
const HASH_SLAB = 4096;

/**
 * Collects a volume's chunks into a Manifest: blocks deduplicated by hash, chunks sorted,
 * blocks and packs numbered in order of first use (so a sequentially written volume
 * gives runs of the same pack and rising offsets, which compress well).
 */
export class ManifestBuilder {
  private readonly chunkBlock = new Map<number, number>();
  private readonly blockIndex = new Map<BlockKey, number>();
  private readonly blocks: ManifestBlock[] = [];
  private readonly chunkCount: number;
  /** Copies of the hashes, HASH_SLAB at a time: one allocation per 4096 blocks. */
  private hashSlab = Buffer.alloc(0);
  private hashSlabUsed = 0;
  private lastPack = '';

  constructor(private readonly meta: ManifestMeta) {
    checkedMeta('ManifestBuilder', meta);
    // Chunk indices are u32 in the format.
    this.chunkCount = Math.min(chunkCountOf(meta), 0xffffffff);
  }

  /**
   * Map `chunk` to a block. ZERO_HASH makes the chunk a hole (absent); ZERO_ALLOCATED_HASH
   * or 'zero-allocated' maps it to zeros, allocated; any other hash needs its pack
   * location the first time the builder sees it. Setting a chunk again replaces it.
   */
  setChunk(chunk: number, hash: Buffer | 'zero-allocated', location?: PackLocation): void {
    if (!Number.isInteger(chunk) || chunk < 0 || chunk >= this.chunkCount) {
      throw new Error(`ManifestBuilder ${this.meta.name}: chunk ${chunk} is outside the volume (${this.chunkCount} chunks)`);
    }
    const zero = hash === 'zero-allocated' ? 2 : zeroNameOf(hash);
    if (zero === 2) {
      this.chunkBlock.set(chunk, ZERO_ALLOCATED_BLOCK);
      return;
    }
    if (zero === 1) {
      this.chunkBlock.delete(chunk);
      return;
    }
    const name = hash as Buffer;
    if (name.length !== HASH_BYTES) throw new Error(`ManifestBuilder ${this.meta.name}: chunk ${chunk}: a ${name.length}-byte hash`);
    const key = blockKey(name);
    let index = this.blockIndex.get(key);
    if (index === undefined) {
      if (!location) throw new Error(`ManifestBuilder ${this.meta.name}: chunk ${chunk}: block ${name.toString('hex')} has no pack location`);
      const block: ManifestBlock = {
        hash: this.copyHash(name),
        pack: location.pack,
        offset: location.offset,
        length: location.length,
        rawLength: location.rawLength,
        codec: location.codec,
      };
      const problem = blockProblem(block, this.meta.blockSize, undefined);
      if (problem) throw new Error(`ManifestBuilder ${this.meta.name}: chunk ${chunk}: block ${name.toString('hex')} ${problem}`);
      if (location.pack !== this.lastPack) {
        if (!PACK_ID.test(location.pack)) {
          throw new Error(`ManifestBuilder ${this.meta.name}: block ${name.toString('hex')} names pack ${JSON.stringify(location.pack)}`);
        }
        this.lastPack = location.pack;
      }
      index = this.blocks.length;
      this.blocks.push(block);
      this.blockIndex.set(key, index);
    }
    this.chunkBlock.set(chunk, index);
  }

  private copyHash(hash: Buffer): Buffer {
    if (this.hashSlabUsed === this.hashSlab.length) {
      this.hashSlab = Buffer.allocUnsafe(HASH_SLAB * HASH_BYTES);
      this.hashSlabUsed = 0;
    }
    const at = this.hashSlabUsed;
    for (let b = 0; b < HASH_BYTES; b++) this.hashSlab[at + b] = hash[b];
    this.hashSlabUsed += HASH_BYTES;
    return this.hashSlab.subarray(at, at + HASH_BYTES);
  }

  /** The manifest of the chunks set so far. Blocks no chunk names any more are left out. */
  build(): Manifest {
    const chunks = Uint32Array.from(this.chunkBlock.keys()).sort();
    const chunkBlocks = new Uint32Array(chunks.length);
    const renumbered = new Int32Array(this.blocks.length).fill(-1);
    const blocks: ManifestBlock[] = [];
    for (let i = 0; i < chunks.length; i++) {
      const old = this.chunkBlock.get(chunks[i])!;
      if (old === ZERO_ALLOCATED_BLOCK) {
        chunkBlocks[i] = ZERO_ALLOCATED_BLOCK;
        continue;
      }
      if (renumbered[old] < 0) {
        renumbered[old] = blocks.length;
        blocks.push(this.blocks[old]);
      }
      chunkBlocks[i] = renumbered[old];
    }
    return { meta: structuredClone(this.meta), chunks, chunkBlocks, blocks };
  }
}
