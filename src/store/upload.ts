// Upload (DESIGN.md: Paths, Snapshot): the blocks of a snapshot that no pack holds yet
// (the host pack index says which) go up `blocks_per_pack` to a pack. A block is added
// to the pack index only once its pack is in the store, so a manifest built from the
// index never names a missing pack (invariant 2). Two volumes uploading the same block
// at once share one upload.
import { keyBytes, keyHex, type BlockCache, type BlockKey } from '../blocks/cache.js';
import type { StoreCipher } from '../crypto/cipher.js';
import type { Compression } from '../crypto/compress.js';
import type { PackRefcounts } from '../gc/refcounts.js';
import type { Logger } from '../log.js';
import type { ObjectStore } from '../objectstore/types.js';
import { ZERO_ALLOCATED_KEY } from '../volume/blockmap.js';
import { packLocations } from './catalog.js';
import { encodePack, type PackBlock } from './pack.js';
import type { PackIndex } from './pack-index.js';

/** Packs in flight at once per upload. */
const UPLOAD_CONCURRENCY = 8;

export interface UploadResult {
  packs: number;
  blocks: number;
  /** Bytes of pack objects put. */
  bytes: number;
}

export class PackUploader {
  private readonly uploading = new Map<BlockKey, Promise<void>>();

  constructor(
    private readonly store: ObjectStore,
    private readonly index: PackIndex,
    private readonly cache: BlockCache,
    private readonly compression: Compression,
    private readonly cipher: StoreCipher,
    private readonly blocksPerPack: number,
    private readonly log: Logger,
    /** With GC on: every pack gets a refcount row before its PUT (an upload nothing names is collected). */
    private readonly refcounts?: PackRefcounts,
  ) {}

  /** Upload every block of `keys` that no pack holds yet; returns what this call put. */
  async upload(keys: Iterable<BlockKey>): Promise<UploadResult> {
    const todo: BlockKey[] = [];
    const others: Promise<void>[] = [];
    const seen = new Set<BlockKey>();
    for (const key of keys) {
      if (key === ZERO_ALLOCATED_KEY || seen.has(key) || this.index.has(key)) continue;
      seen.add(key);
      const pending = this.uploading.get(key);
      if (pending !== undefined) others.push(pending);
      else todo.push(key);
    }
    const result: UploadResult = { packs: 0, blocks: 0, bytes: 0 };
    const groups: BlockKey[][] = [];
    for (let i = 0; i < todo.length; i += this.blocksPerPack) groups.push(todo.slice(i, i + this.blocksPerPack));
    let next = 0;
    const worker = async () => {
      while (next < groups.length) {
        const group = groups[next++];
        const work = this.uploadPack(group, result);
        for (const key of group) this.uploading.set(key, work);
        try {
          await work;
        } finally {
          for (const key of group) if (this.uploading.get(key) === work) this.uploading.delete(key);
        }
      }
    };
    await Promise.all(Array.from({ length: Math.min(UPLOAD_CONCURRENCY, groups.length) }, worker));
    await Promise.all(others);
    if (result.packs > 0) await this.index.sync();
    return result;
  }

  private async uploadPack(group: BlockKey[], result: UploadResult): Promise<void> {
    const blocks: PackBlock[] = [];
    for (const key of group) {
      const data = await this.cache.readBlock(key);
      if (data === undefined) {
        throw new Error(`block ${keyHex(key)} is neither in the store nor on this host; it cannot be uploaded`);
      }
      blocks.push({ hash: keyBytes(key), data });
    }
    const pack = encodePack(blocks, this.compression, this.cipher);
    await this.refcounts?.registerPack(pack.id);
    await this.store.put(pack.key, pack.body, { selfVerifying: true });
    this.index.add(packLocations(pack));
    this.cache.markInStore(group);
    result.packs++;
    result.blocks += group.length;
    result.bytes += pack.body.length;
    this.log.debug('uploaded pack', { key: pack.key, blocks: group.length, bytes: pack.body.length });
  }
}
