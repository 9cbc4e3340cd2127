// Upload (DESIGN.md: Paths, Snapshot): the blocks of a snapshot that no pack holds yet
// (the host pack index says which) go up `blocks_per_pack` to a pack. A block is added
// to the pack index only once its pack is in the store, so a manifest built from the
// index never names a missing pack (invariant 2). Two volumes uploading the same block
// at once share one upload.
//
// With GC on, every upload is on behalf of a volume's uploads key (gc/uploads.ts:
// uploadsKey): each pack joins that key's set in the transaction that registers it,
// before its PUT, so by the time the cache may evict its blocks (markInStore) GC will
// not delete it until a manifest names it or the volume leaves the host (invariant 6).
// Other volumes that sealed the same blocks while no pack held them (BlockCache.sealersOf)
// get the pack held in their uploads sets too, before the blocks count as stored.
import { injected } from '../faults/injected.js';
import { keyBytes, keyHex, type BlockCache, type BlockKey } from '../blocks/cache.js';
import type { StoreCipher } from '../crypto/cipher.js';
import type { Compression } from '../crypto/compress.js';
import type { PackRefcounts } from './counted.js';
import { errorMessage, type Logger } from '../log.js';
import type { ObjectStore } from '../objectstore/types.js';
import { ZERO_ALLOCATED_KEY } from '../volume/blockmap.js';
import { packLocations } from './catalog.js';
import { encodePack, PACK_ENTRY_BYTES, PACK_HEADER_BYTES, type PackBlock } from './pack.js';
import type { PackIndex } from './pack-index.js';

/** Packs in flight at once per upload. */
const UPLOAD_CONCURRENCY = 8;
/** Idle pack body buffers kept for reuse: a drain's packs in flight, once over. */
const MAX_IDLE_BODIES = 2 * UPLOAD_CONCURRENCY;

export interface UploadResult {
  packs: number;
  blocks: number;
  /** Bytes of pack objects put. */
  bytes: number;
}

export class PackUploader {
  private readonly uploading = new Map<BlockKey, Promise<void>>();
  /**
   * Pack body buffers whose PUT is over, for the next packs: a fresh 3 MB buffer per pack
   * is memory the kernel maps and faults in anew, and garbage the collector chases (a GiB
   * of it per GiB drained).
   */
  private readonly idleBodies: Buffer[] = [];

  constructor(
    private readonly store: ObjectStore,
    private readonly index: PackIndex,
    private readonly cache: BlockCache,
    private readonly compression: Compression,
    private readonly cipher: StoreCipher,
    private readonly blocksPerPack: number,
    private readonly log: Logger,
    /** With GC on: every pack gets a refcount row before its PUT, held by the uploads key it is uploaded for. */
    private readonly refcounts?: PackRefcounts,
  ) {}

  /**
   * Upload every block of `keys` that no pack holds yet, into packs held by uploads key
   * `hold`; returns what this call put. `holdFound`: the packs that already held some of
   * `keys` are held by `hold` too (the caller counts those blocks as stored from now on);
   * a pack GC is deleting meanwhile is forgotten and its blocks uploaded again.
   */
  async upload(keys: Iterable<BlockKey>, hold: string, opts: { holdFound?: boolean } = {}): Promise<UploadResult> {
    const list = [...keys];
    const result = await this.uploadMissing(list, hold);
    if (!opts.holdFound || this.refcounts === undefined) return result;
    for (let attempt = 1; ; attempt++) {
      const packs = new Set<string>();
      for (const key of list) {
        const location = key === ZERO_ALLOCATED_KEY ? undefined : this.index.get(key);
        if (location !== undefined) packs.add(location.pack);
      }
      const gone = await this.refcounts.holdUploads(hold, [...packs]);
      if (gone.length === 0) return result;
      if (attempt >= 3) throw new Error(`${hold}: ${gone.length} pack(s) holding its blocks keep being deleted by GC (${gone.slice(0, 3).join(', ')})`);
      this.log.warn('packs holding uploaded blocks are being deleted by GC; uploading their blocks again', { hold, packs: gone.length });
      for (const pack of gone) this.index.removePack(pack);
      const more = await this.uploadMissing(list, hold);
      result.packs += more.packs;
      result.blocks += more.blocks;
      result.bytes += more.bytes;
    }
  }

  private async uploadMissing(keys: readonly BlockKey[], hold: string): Promise<UploadResult> {
    const result: UploadResult = { packs: 0, blocks: 0, bytes: 0 };
    const stored: BlockKey[] = [];
    try {
      await this.uploadRounds(keys, result, hold, stored);
    } finally {
      await this.markStored(stored);
    }
    return result;
  }

  private async uploadRounds(keys: readonly BlockKey[], result: UploadResult, hold: string, stored: BlockKey[]): Promise<void> {
    let wanted: Iterable<BlockKey> = keys;
    // A second round uploads what another call was uploading and failed to (an early
    // upload of a block that has since left the cache, say); by then it is ours to do.
    for (let round = 0; round < 2; round++) {
      const todo: BlockKey[] = [];
      const others: Promise<void>[] = [];
      const seen = new Set<BlockKey>();
      for (const key of wanted) {
        if (key === ZERO_ALLOCATED_KEY || seen.has(key) || this.index.has(key)) continue;
        seen.add(key);
        const pending = this.uploading.get(key);
        if (pending !== undefined) others.push(pending);
        else todo.push(key);
      }
      const groups: BlockKey[][] = [];
      for (let i = 0; i < todo.length; i += this.blocksPerPack) groups.push(todo.slice(i, i + this.blocksPerPack));
      let next = 0;
      const worker = async () => {
        while (next < groups.length) await this.startPack(groups[next++], result, hold, stored);
      };
      await Promise.all(Array.from({ length: Math.min(UPLOAD_CONCURRENCY, groups.length) }, worker));
      const settled = await Promise.allSettled(others);
      if (settled.every((s) => s.status === 'fulfilled')) break;
      wanted = seen;
      if (round === 1) throw (settled.find((s) => s.status === 'rejected') as PromiseRejectedResult).reason;
    }
  }

  /**
   * Make the pack index durable, then let the cache evict the uploaded blocks: a block
   * leaves the cache only once this host finds its pack again after a power cut.
   */
  private async markStored(keys: BlockKey[]): Promise<void> {
    // Also with nothing new: a caller counting on blocks the index already names needs them durable (a sync that failed is redone).
    await this.index.sync();
    if (keys.length > 0) this.cache.markInStore(keys);
  }

  /**
   * Uploads blocks as they are named, a pack at a time, while the caller is still naming
   * them: a drain uploads what its snapshot has sealed while the snapshot seals the rest.
   * add() takes a block key; finish() stops (a partial pack is left to the caller's
   * upload() of the whole snapshot, which also redoes anything that failed here) and
   * returns what was put. upload() of the same keys waits for packs still in flight.
   */
  early(hold: string): { add(key: BlockKey): void; finish(): Promise<UploadResult> } {
    const result: UploadResult = { packs: 0, blocks: 0, bytes: 0 };
    const stored: BlockKey[] = [];
    const inFlight = new Set<Promise<void>>();
    const queued: BlockKey[][] = [];
    const added = new Set<BlockKey>();
    let group: BlockKey[] = [];
    let finished = false;
    const startNext = () => {
      while (!finished && inFlight.size < UPLOAD_CONCURRENCY && queued.length > 0) {
        const work = this.startPack(queued.shift()!, result, hold, stored).catch((err) => {
          this.log.debug('early pack upload failed; the drain uploads its blocks again', { error: errorMessage(err) });
        });
        inFlight.add(work);
        void work.finally(() => {
          inFlight.delete(work);
          startNext();
        });
      }
    };
    return {
      add: (key) => {
        if (finished || key === ZERO_ALLOCATED_KEY || added.has(key) || this.index.has(key) || this.uploading.has(key)) return;
        added.add(key);
        group.push(key);
        if (group.length < this.blocksPerPack) return;
        queued.push(group);
        group = [];
        startNext();
      },
      finish: async () => {
        finished = true;
        while (inFlight.size > 0) await Promise.all(inFlight);
        await this.markStored(stored);
        return result;
      },
    };
  }

  /** Bytes of the largest pack of blocksPerPack raw blocks: every body buffer is that big, so any can serve. */
  private bodyBytes(): number {
    return PACK_HEADER_BYTES + this.blocksPerPack * (PACK_ENTRY_BYTES + this.cache.blockSize + 2 * this.cipher.overhead) + this.cipher.overhead;
  }

  /** Encode and upload one pack of `group`; upload() of any of its keys waits for it meanwhile. */
  private async startPack(group: BlockKey[], result: UploadResult, hold: string, stored: BlockKey[]): Promise<void> {
    const work = this.uploadPack(group, result, hold, stored);
    for (const key of group) this.uploading.set(key, work);
    try {
      await work;
    } finally {
      for (const key of group) if (this.uploading.get(key) === work) this.uploading.delete(key);
    }
  }

  private async uploadPack(group: BlockKey[], result: UploadResult, hold: string, stored: BlockKey[]): Promise<void> {
    // Blocks in memory are taken in place, with nothing awaited between taking them and
    // encoding (a memory tier slot may take another block once this yields); the others
    // are read (copied) first. One that left memory meanwhile is read in the next round.
    const read = new Map<BlockKey, Buffer>();
    let blocks: PackBlock[] | undefined;
    while (blocks === undefined) {
      const taken: PackBlock[] = [];
      const missing: BlockKey[] = [];
      for (const key of group) {
        const data = read.get(key) ?? this.cache.blockInMemory(key);
        if (data === undefined) missing.push(key);
        else taken.push({ hash: keyBytes(key), data });
      }
      if (missing.length === 0) blocks = taken;
      for (const key of missing) {
        const data = await this.cache.readBlock(key);
        if (data === undefined) {
          throw new Error(`block ${keyHex(key)} is neither in the store nor on this host; it cannot be uploaded`);
        }
        read.set(key, data);
      }
    }
    // On the event loop: encoding on the pack thread measured slower for encrypted drains
    // on 2 cores (the copy to the thread, and the thread competing with sealing and MinIO).
    let buffer: Buffer | undefined;
    const pack = encodePack(blocks, this.compression, this.cipher, (bytes) => {
      const i = this.idleBodies.findIndex((b) => b.length >= bytes);
      buffer = i >= 0 ? this.idleBodies.splice(i, 1)[0] : Buffer.allocUnsafeSlow(Math.max(bytes, this.bodyBytes()));
      return buffer.subarray(0, bytes);
    });
    // Other volumes that sealed these blocks while no pack held them rely on this pack too: it is held for each.
    const holds = new Set([hold]);
    const sealers = () => {
      const more: string[] = [];
      for (const key of group) {
        for (const sealer of this.cache.sealersOf(key)) {
          if (sealer.left || holds.has(sealer.hold)) continue;
          holds.add(sealer.hold);
          sealer.holding(pack.id);
          more.push(sealer.hold);
        }
      }
      return more;
    };
    try {
      await Promise.all([hold, ...sealers()].map((h) => this.refcounts?.registerPack(pack.id, injected.has('gc-unheld-uploads') ? undefined : h)));
      if (injected.has('manifest-before-packs')) void this.store.put(pack.key, Buffer.from(pack.body), { selfVerifying: true }).catch(() => undefined);
      else await this.store.put(pack.key, pack.body, { selfVerifying: true });
    } finally {
      // The store is done with the body once put() settles (a retried attempt included).
      if (buffer !== undefined && this.idleBodies.length < MAX_IDLE_BODIES) this.idleBodies.push(buffer);
    }
    // Seals meanwhile: held too before the blocks count as stored (the pack has its row now).
    for (let more = sealers(); more.length > 0 && this.refcounts !== undefined; more = sealers()) {
      await Promise.all(more.map((h) => this.refcounts!.registerPack(pack.id, h)));
    }
    this.index.add(packLocations(pack));
    // The cache may evict them once the index is durable (markStored): the pack is in the store and held (registerPack).
    stored.push(...group);
    result.packs++;
    result.blocks += group.length;
    result.bytes += pack.body.length;
    this.log.debug('uploaded pack', { key: pack.key, blocks: group.length, bytes: pack.body.length });
  }
}
