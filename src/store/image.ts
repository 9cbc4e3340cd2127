// Raw images in and out of the store, with no daemon (`updraft bless`, `updraft dump`).
//
// bless: read a file chunk by chunk, skip all-zero chunks, name the rest by the store's
// block hash (BLAKE3, keyed in an encrypted store), upload
// the blocks no pack in the store holds yet (25 to a pack), write the volume's manifest.
// What the store already holds is learnt once, pack-level, from the manifests and
// checkpoints in it, not with a request per block. The manifest is deterministic (its
// creation time is the image's mtime), so blessing the same image again uploads nothing
// and writes the same manifest.
//
// dump: write a volume (or a checkpoint) back out as a sparse raw image, one GET per pack.
import fs from 'node:fs';
import { blockKey, keyBytes, type BlockKey } from '../blocks/cache.js';
import type { StoreCipher } from '../crypto/cipher.js';
import type { Compression } from '../crypto/compress.js';
import { IF_NONE_MATCH, packsOf, PacksGoneError, putCounted, putOptionsOf, type PackRefcounts, type PutCondition } from './counted.js';
import { isAllZero } from '../crypto/hash.js';
import type { ObjectStore, PutOptions } from '../objectstore/types.js';
import { isPreconditionFailed } from '../objectstore/types.js';
import { ExistsError, manifestLocations, packLocations, readManifest } from './catalog.js';
import { leaseKey, manifestKey, ZERO_ALLOCATED_BLOCK, type Manifest } from './manifest.js';
import { sameManifest } from './manifest-body.js';
import { ManifestBuilder } from './manifest-builder.js';
import { decodeManifest } from './manifest-decode.js';
import { encodeManifest } from './manifest-seal.js';
import { decodePackIndex, encodePack, packKey, unpackBlock, verifyPackId, type PackBlock } from './pack.js';
import type { PackLocation } from './pack-index.js';

/** The host id written into manifests made by bless; such a manifest may be replaced by bless. */
export const BLESS_HOST = 'updraft-bless';

export interface ImageProgress {
  bytesRead: number;
  totalBytes: number;
  bytesUploaded: number;
  /** Chunks whose block the store (or this image) already had. */
  dedupChunks: number;
  zeroChunks: number;
}

export interface BlessResult {
  name: string;
  size: number;
  chunks: number;
  zeroChunks: number;
  newBlocks: number;
  dedupChunks: number;
  packsUploaded: number;
  bytesUploaded: number;
  /** The manifest in the store was already exactly this one. */
  unchanged: boolean;
  etag: string;
}

/** Every block the store's manifests and checkpoints name, with its pack location. */
export async function storeBlocks(store: ObjectStore, cipher: StoreCipher): Promise<Map<BlockKey, PackLocation>> {
  const known = new Map<BlockKey, PackLocation>();
  for (const object of await store.list('volumes/')) {
    if (!object.key.endsWith('/manifest') && !object.key.includes('/checkpoints/')) continue;
    const body = await store.get(object.key);
    if (body === undefined) continue;
    for (const [key, location] of manifestLocations(decodeManifest(object.key, body.body, cipher))) known.set(key, location);
  }
  return known;
}

export async function blessImage(opts: {
  store: ObjectStore;
  file: string;
  name: string;
  blockSize: number;
  compression: Compression;
  manifestCompression: Compression;
  cipher: StoreCipher;
  blocksPerPack: number;
  progress?: (p: ImageProgress) => void;
  /** Pack refcounts (GC): new packs get rows, the manifest's packs are counted. */
  refcounts?: PackRefcounts;
}): Promise<BlessResult> {
  // A pack the store's manifests named may be deleted by GC while blessing (nothing
  // names it any more): bless again without deduplicating against it.
  const gone = new Set<string>();
  for (let attempt = 1; ; attempt++) {
    try {
      return await blessOnce(opts, gone);
    } catch (err) {
      if (!(err instanceof PacksGoneError) || attempt >= 3) throw err;
      for (const pack of err.packs) gone.add(pack);
    }
  }
}

async function blessOnce(opts: Parameters<typeof blessImage>[0], gone: ReadonlySet<string>): Promise<BlessResult> {
  const { store, blockSize, cipher } = opts;
  let fd: number;
  try {
    fd = fs.openSync(opts.file, 'r');
  } catch (err) {
    throw new Error(`cannot read image ${opts.file}: ${(err as NodeJS.ErrnoException).code === 'ENOENT' ? 'no such file' : (err as Error).message}`);
  }
  try {
    const stat = fs.fstatSync(fd);
    if (!stat.isFile() && !stat.isBlockDevice()) throw new Error(`image ${opts.file} is not a file`);
    const totalBytes = stat.size;
    if (totalBytes === 0) throw new Error(`image ${opts.file} is empty`);
    const size = Math.ceil(totalBytes / 4096) * 4096;
    const known = await storeBlocks(store, cipher);
    for (const [key, location] of known) if (gone.has(location.pack)) known.delete(key);
    const progress: ImageProgress = { bytesRead: 0, totalBytes, bytesUploaded: 0, dedupChunks: 0, zeroChunks: 0 };
    const chunkKeys: Array<[number, BlockKey]> = [];
    let pending: PackBlock[] = [];
    const pendingKeys = new Set<BlockKey>();
    let packsUploaded = 0;
    let newBlocks = 0;
    const flushPack = async () => {
      if (pending.length === 0) return;
      const pack = encodePack(pending, opts.compression, cipher);
      await opts.refcounts?.registerPack(pack.id);
      await store.put(pack.key, pack.body, { selfVerifying: true });
      for (const [key, location] of packLocations(pack)) known.set(key, location);
      packsUploaded++;
      progress.bytesUploaded += pack.body.length;
      pending = [];
      pendingKeys.clear();
    };
    for (let chunk = 0, position = 0; position < totalBytes; chunk++, position += blockSize) {
      const block = Buffer.alloc(blockSize);
      let filled = 0;
      while (filled < blockSize && position + filled < totalBytes) {
        const n = fs.readSync(fd, block, filled, blockSize - filled, position + filled);
        if (n === 0) break;
        filled += n;
      }
      progress.bytesRead = Math.min(totalBytes, position + filled);
      if (isAllZero(block)) progress.zeroChunks++;
      else {
        const key = blockKey(cipher.blockHash(block));
        chunkKeys.push([chunk, key]);
        if (known.has(key) || pendingKeys.has(key)) progress.dedupChunks++;
        else {
          pending.push({ hash: keyBytes(key), data: block });
          pendingKeys.add(key);
          newBlocks++;
          if (pending.length >= opts.blocksPerPack) await flushPack();
        }
      }
      opts.progress?.(progress);
    }
    await flushPack();
    const builder = new ManifestBuilder({
      format: 1, name: opts.name, size, blockSize, sequence: 0, generation: 0, host: BLESS_HOST, created: stat.mtime.toISOString(),
    });
    for (const [chunk, key] of chunkKeys) builder.setChunk(chunk, keyBytes(key), known.get(key)!);
    const manifest = builder.build();
    const body = encodeManifest(manifestKey(opts.name), manifest, opts.manifestCompression, cipher);
    const { etag, unchanged } = await putBlessManifest(store, cipher, opts.name, manifest, body, (condition, put) =>
      putCounted(opts.refcounts, manifestKey(opts.name), packsOf(manifest.blocks), body, condition, () => put(putOptionsOf(condition))).then((r) => r.etag));
    return {
      name: opts.name, size, chunks: chunkKeys.length, zeroChunks: progress.zeroChunks, newBlocks, dedupChunks: progress.dedupChunks,
      packsUploaded, bytesUploaded: progress.bytesUploaded, unchanged, etag,
    };
  } finally {
    fs.closeSync(fd);
  }
}

/** Create the manifest, or replace one bless wrote before; a live volume of that name is refused. */
async function putBlessManifest(
  store: ObjectStore,
  cipher: StoreCipher,
  name: string,
  manifest: Manifest,
  body: Buffer,
  counted: (condition: PutCondition, put: (options: PutOptions) => Promise<string>) => Promise<string>,
): Promise<{ etag: string; unchanged: boolean }> {
  const key = manifestKey(name);
  const current = await store.get(key);
  if (current === undefined) {
    try {
      return { etag: await counted(IF_NONE_MATCH, (options) => store.put(key, body, options)), unchanged: false };
    } catch (err) {
      if (!isPreconditionFailed(err)) throw err;
      throw new ExistsError(`volume ${name} appeared in the store while blessing; not replaced`);
    }
  }
  // Compared decoded: a sealed body differs on every write (random nonces).
  const stored = decodeManifest(key, current.body, cipher);
  if (sameManifest(stored, manifest, cipher)) return { etag: current.etag, unchanged: true };
  if (stored.meta.host !== BLESS_HOST) {
    throw new ExistsError(`volume ${name} already exists in the store and was not made by bless; choose another name`);
  }
  // A daemon that ever took the volume (it holds or held its lease) may have written it since.
  if ((await store.head(leaseKey(name))) !== undefined) {
    throw new ExistsError(`volume ${name} has been opened by a daemon (it has a lease), so it is not made by bless any more; choose another name`);
  }
  return { etag: await counted(current.etag, (options) => store.put(key, body, options)), unchanged: false };
}

/** Write a volume (or a checkpoint) out as a sparse raw image of its size. */
export async function dumpImage(opts: {
  store: ObjectStore;
  cipher: StoreCipher;
  name: string;
  checkpoint?: string;
  file: string;
  progress?: (bytes: number, total: number) => void;
}): Promise<{ size: number; chunks: number; packs: number }> {
  const { manifest } = await readManifest(opts.store, opts.cipher, opts.name, opts.checkpoint);
  const { size, blockSize } = manifest.meta;
  const byPack = new Map<string, Array<[number, number]>>();
  for (let i = 0; i < manifest.chunks.length; i++) {
    const block = manifest.chunkBlocks[i];
    if (block === ZERO_ALLOCATED_BLOCK) continue;
    const pack = manifest.blocks[block].pack;
    let list = byPack.get(pack);
    if (!list) byPack.set(pack, (list = []));
    list.push([manifest.chunks[i], block]);
  }
  const fd = fs.openSync(opts.file, 'w');
  try {
    fs.ftruncateSync(fd, size);
    let written = 0;
    for (const [pack, chunks] of byPack) {
      const key = packKey(pack);
      const object = await opts.store.get(key);
      if (object === undefined) throw new Error(`pack ${key} named by volume ${opts.name} is missing from the store`);
      verifyPackId(key, object.body);
      const entries = new Map(decodePackIndex(key, object.body, opts.cipher).map((e) => [e.hash.toString('latin1'), e]));
      for (const [chunk, blockIndex] of chunks) {
        const entry = entries.get(manifest.blocks[blockIndex].hash.toString('latin1'));
        if (entry === undefined) throw new Error(`pack ${key} does not hold block ${manifest.blocks[blockIndex].hash.toString('hex')} of chunk ${chunk}`);
        const data = unpackBlock(key, object.body, entry, opts.cipher);
        const position = chunk * blockSize;
        const length = Math.min(blockSize, size - position);
        fs.writeSync(fd, data, 0, length, position);
        written += length;
        opts.progress?.(written, size);
      }
    }
    fs.fsyncSync(fd);
    return { size, chunks: manifest.chunks.length, packs: byPack.size };
  } finally {
    fs.closeSync(fd);
  }
}
