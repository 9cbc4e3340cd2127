// Manifest-level operations on the store that need no volume and no daemon (DESIGN.md:
// Fork, lazy; checkpoints): a fork is a copy of a manifest under another name, a
// checkpoint an immutable manifest beside the volume's. No block is ever copied.
import { blockKey, type BlockKey } from '../blocks/cache.js';
import type { StoreCipher } from '../crypto/cipher.js';
import type { Compression } from '../crypto/compress.js';
import { HASH_BYTES, ZERO_ALLOCATED_HASH } from '../crypto/hash.js';
import { IF_NONE_MATCH, putCountedThen, WritePendingError, type PackRefcounts } from './counted.js';
import { isPreconditionFailed, type ObjectStore } from '../objectstore/types.js';
import { BlockMap, ZERO_ALLOCATED_KEY } from '../volume/blockmap.js';
import { decodeBootSet, encodeBootSet } from './boot-set.js';
import { checkpointKey, leaseKey, manifestKey, ZERO_ALLOCATED_BLOCK, type Manifest, type ManifestBlock, type ManifestMeta } from './manifest.js';
import { bodyMeta, bodyPacks, relabelManifest } from './manifest-body.js';
import { decodeManifest, decodeManifestBody } from './manifest-decode.js';
import { sealManifest, storedTables, type StoredTables } from './manifest-seal.js';
import type { EncodedPack } from './pack.js';
import type { PackIndex, PackLocation } from './pack-index.js';

/** The target already exists (a manifest under its name). */
export class ExistsError extends Error {
  override name = 'ExistsError';
}

/** The source (manifest or checkpoint) is not in the store. */
export class MissingError extends Error {
  override name = 'MissingError';
}

/** chunk → block key of every mapped chunk of a manifest. */
export function* manifestChunks(manifest: Manifest): Generator<[number, BlockKey]> {
  for (let i = 0; i < manifest.chunks.length; i++) {
    const block = manifest.chunkBlocks[i];
    yield [manifest.chunks[i], block === ZERO_ALLOCATED_BLOCK ? ZERO_ALLOCATED_KEY : blockKey(manifest.blocks[block].hash)];
  }
}

/**
 * A manifest's block map, filled from the block names' bytes: no key string or tuple per
 * chunk, so waking a fork of a volume with 8 GiB written costs one 16-byte copy per chunk.
 */
export function manifestBlockMap(manifest: Manifest): BlockMap {
  const map = new BlockMap();
  const { chunks, chunkBlocks, blocks } = manifest;
  for (let i = 0; i < chunks.length; i++) {
    const block = chunkBlocks[i];
    if (block === ZERO_ALLOCATED_BLOCK) map.fillBytes(chunks[i], ZERO_ALLOCATED_HASH, 0);
    else map.fillBytes(chunks[i], blocks[block].hash, 0);
  }
  return map;
}

/**
 * The manifest of a volume's chunks (ascending, each once, as a snapshot lists them),
 * with each block's pack location from `locate`. The inverse of manifestChunks. One Map
 * insert per distinct block and nothing per chunk but two array stores: a fork of a
 * volume with 8 GiB written builds 65,536 chunks. manifestBody validates the result.
 */
export function manifestOfChunks(
  meta: ManifestMeta,
  chunks: ReadonlyArray<readonly [number, BlockKey]>,
  locate: (key: BlockKey, chunk: number) => PackLocation,
): Manifest {
  const chunkIndices = new Uint32Array(chunks.length);
  const chunkBlocks = new Uint32Array(chunks.length);
  const blocks: ManifestBlock[] = [];
  const blockOf = new Map<BlockKey, number>();
  // Every hash in one buffer (a block names a slice of it): no allocation per block.
  const hashes = Buffer.allocUnsafe(chunks.length * HASH_BYTES);
  for (let i = 0; i < chunks.length; i++) {
    const [chunk, key] = chunks[i];
    chunkIndices[i] = chunk;
    if (key === ZERO_ALLOCATED_KEY) {
      chunkBlocks[i] = ZERO_ALLOCATED_BLOCK;
      continue;
    }
    let block = blockOf.get(key);
    if (block === undefined) {
      const { pack, offset, length, rawLength, codec } = locate(key, chunk);
      block = blocks.length;
      const at = block * HASH_BYTES;
      hashes.write(key, at, HASH_BYTES, 'latin1');
      blocks.push({ hash: hashes.subarray(at, at + HASH_BYTES), pack, offset, length, rawLength, codec });
      blockOf.set(key, block);
    }
    chunkBlocks[i] = block;
  }
  return { meta, chunks: chunkIndices, chunkBlocks, blocks };
}

/** Pack location of every block a manifest names. */
export function* manifestLocations(manifest: Manifest): Generator<[BlockKey, PackLocation]> {
  for (const b of manifest.blocks) yield [blockKey(b.hash), { pack: b.pack, offset: b.offset, length: b.length, rawLength: b.rawLength, codec: b.codec }];
}

/** Pack location of every block of a pack just encoded. */
export function packLocations(pack: EncodedPack): Array<[BlockKey, PackLocation]> {
  return pack.entries.map((e) => [blockKey(e.hash), { pack: pack.id, offset: e.offset, length: e.length, rawLength: e.rawLength, codec: e.codec }]);
}

/**
 * Record where a manifest's blocks are in the host pack index, durably: a local journal
 * about to name these blocks must be able to find them after a crash.
 */
export async function indexManifest(index: PackIndex, manifest: Manifest): Promise<void> {
  index.add(manifestLocations(manifest));
  await index.sync();
}

/** The manifest a fork or checkpoint is read from: the volume's, or one of its checkpoints. */
export function sourceKey(volume: string, checkpoint?: string): string {
  return checkpoint === undefined ? manifestKey(volume) : checkpointKey(volume, checkpoint);
}

function missingSource(store: ObjectStore, volume: string, checkpoint: string | undefined): MissingError {
  return new MissingError(
    checkpoint === undefined
      ? `volume ${volume} has no manifest in the store ${store.description} (it was never drained)`
      : `volume ${volume} has no checkpoint ${checkpoint} in the store ${store.description}`,
  );
}

/** Read and decode a volume's manifest or checkpoint; MissingError when absent. */
export async function readManifest(store: ObjectStore, cipher: StoreCipher, volume: string, checkpoint?: string): Promise<{ manifest: Manifest; etag: string }> {
  const key = sourceKey(volume, checkpoint);
  const object = await store.get(key);
  if (object === undefined) throw missingSource(store, volume, checkpoint);
  return { manifest: decodeManifest(key, object.body, cipher), etag: object.etag };
}

/** Put `body` at `key` only if the key does not exist yet; ExistsError if it does. */
export async function createObject(store: ObjectStore, key: string, body: Buffer): Promise<string> {
  try {
    return await store.put(key, body, { ifNoneMatch: '*' });
  } catch (err) {
    if (!isPreconditionFailed(err)) throw err;
    // A retried put whose first attempt landed: the object is what was sent.
    const current = await store.get(key);
    if (current !== undefined && current.body.equals(body)) return current.etag;
    throw new ExistsError(`${key} already exists in the store`);
  }
}

/**
 * Lazy fork: copy the source's last manifest (or a checkpoint) in the store to `target`,
 * without asking the source's host. Returns the sequence the target starts from, and
 * `commit`, the refcount commit of the target's packs, which the caller must run (see
 * putCountedThen: a host runs it beside the target's lease PUT).
 */
export async function lazyFork(
  store: ObjectStore,
  source: string,
  target: string,
  compression: Compression,
  cipher: StoreCipher,
  checkpoint?: string,
  refcounts?: PackRefcounts,
  known?: (etag: string) => { raw: Buffer; tables?: StoredTables } | undefined,
  /**
   * Called with the target's content just before its manifest is written, so that the
   * caller can set up its copy of the target while the PUT is in flight (`manifest` is
   * undefined when `known` had the body).
   */
  beside?: (target: { meta: ManifestMeta; manifest?: Manifest }) => void,
): Promise<{ sequence: number; etag: string; meta: ManifestMeta; raw: Buffer; tables?: StoredTables; manifest?: Manifest; sourceEtag: string; commit: () => Promise<unknown> }> {
  const from = sourceKey(source, checkpoint);
  // The body of this very manifest, when this host has it opened already (`known`, with
  // its compressed tables: a HEAD finds out, no 1.4 MB GET for 65,536 chunks), or decoded.
  let held: { raw: Buffer; tables?: StoredTables; etag: string } | undefined;
  if (known !== undefined) {
    const info = await store.head(from);
    if (info === undefined) throw missingSource(store, source, checkpoint);
    const body = known(info.etag);
    if (body !== undefined) held = { ...body, etag: info.etag };
  }
  let manifest: Manifest | undefined;
  if (held === undefined) {
    const object = await store.get(from);
    if (object === undefined) throw missingSource(store, source, checkpoint);
    const decoded = decodeManifestBody(from, object.body, cipher);
    manifest = decoded.manifest;
    held = { raw: decoded.raw, tables: storedTables(decoded, compression), etag: object.etag };
  }
  const body = held.raw;
  const sourceMeta = bodyMeta(body);
  const sequence = sourceMeta.sequence;
  const meta: ManifestMeta = {
    ...sourceMeta, name: target, generation: 0, host: sourceMeta.host, created: new Date().toISOString(), parent: { name: source, sequence },
  };
  const key = manifestKey(target);
  const raw = relabelManifest(body, meta);
  const { body: sealed, tables } = sealManifest(key, raw, compression, cipher, held.tables);
  if (manifest !== undefined) manifest.meta = meta;
  beside?.({ meta, manifest });
  // The target's packs are the copied object's: counted as one more holder of its pack set.
  const { etag, commit } = await putCountedThen(refcounts, key, bodyPacks(raw), sealed, IF_NONE_MATCH, () => createObject(store, key, sealed), undefined, { key: from, etag: held.etag });
  return { sequence, etag, meta, raw, tables, manifest, sourceEtag: held.etag, commit };
}

export interface CheckpointInfo {
  name: string;
  size: number;
  created: string;
}

/** A volume's checkpoints, by name. */
export async function listCheckpoints(store: ObjectStore, volume: string): Promise<CheckpointInfo[]> {
  const prefix = `${checkpointKey(volume, 'x').slice(0, -1)}`;
  const objects = await store.list(prefix);
  return objects
    .map((o) => ({ name: o.key.slice(prefix.length), size: o.size, created: o.lastModified.toISOString() }))
    .filter((c) => c.name !== '' && !c.name.includes('/'));
}

/** Delete a checkpoint, then release its refcounts (a crash between the two only over-counts). */
export async function deleteCheckpoint(store: ObjectStore, volume: string, checkpoint: string, refcounts?: PackRefcounts): Promise<boolean> {
  const key = checkpointKey(volume, checkpoint);
  if ((await store.head(key)) === undefined) return false;
  await store.delete(key);
  await releaseManifest(refcounts, key);
  return true;
}

/** After deleting the object at `key`: drop its refcounts, unless a write of it is pending (reconciliation then does). */
export async function releaseManifest(refcounts: PackRefcounts | undefined, key: string): Promise<number> {
  if (refcounts === undefined) return 0;
  try {
    return await refcounts.removeManifest(key);
  } catch (err) {
    if (!(err instanceof WritePendingError)) throw err;
    refcounts.log.warn('deleted while a write of it was pending; reconciliation releases its refcounts', { key });
    return 0;
  }
}

/**
 * A volume's boot hot set: the chunks its guest read first after attaching. A set with
 * `recording` and no chunks is a request (`updraft bless --boot-record`): the first host
 * that wakes the volume, or a fork of it, records its first boot and replaces the request.
 */
export interface BootSet {
  format: 1;
  volume: string;
  blockSize: number;
  seconds: number;
  chunks: number[];
  recording?: true;
}

/** Longest boot recording window: a boot hot set is the first minutes of a boot, not a workload. */
export const MAX_BOOT_RECORD_SECONDS = 600;

export function bootSetKey(volume: string): string {
  return `volumes/${volume}/bootset`;
}

/** Store a boot set; with `replacing`, only over that ETag (one host answers a recording request). */
export async function writeBootSet(store: ObjectStore, set: BootSet, cipher: StoreCipher, replacing?: string): Promise<void> {
  const key = bootSetKey(set.volume);
  await store.put(key, encodeBootSet(key, set, cipher), replacing === undefined ? {} : { ifMatch: replacing });
}

/**
 * The boot hot set of a volume, or of the nearest ancestor that has one (forks share their
 * parent's), with its ETag.
 */
export async function readBootSet(store: ObjectStore, meta: ManifestMeta, cipher: StoreCipher): Promise<{ set: BootSet; etag: string } | undefined> {
  const names = [meta.name, ...(meta.parent ? [meta.parent.name] : [])];
  for (const name of names) {
    const key = bootSetKey(name);
    const object = await store.get(key);
    if (object === undefined) continue;
    const set = decodeBootSet(key, object.body, cipher) as BootSet;
    const valid =
      set.format === 1 && set.volume === name && Number.isFinite(set.seconds) && set.seconds > 0 &&
      Array.isArray(set.chunks) && set.chunks.every((c) => Number.isSafeInteger(c) && c >= 0) &&
      (set.recording === undefined || set.recording === true);
    if (!valid) throw new Error(`boot set ${key} is not a format 1 boot set of volume ${name}`);
    if (set.blockSize !== meta.blockSize) return undefined;
    return { set, etag: object.etag };
  }
  return undefined;
}

/**
 * Remove a volume from the store (`DELETE …?purge=true`, `updraft delete`): its
 * checkpoints and manifest, each object deleted before its refcounts are released (a
 * crash between the two over-counts, which reconciliation repairs), then its lease and
 * boot hot set. `found` is false when the store had neither manifest nor checkpoint.
 */
export async function purgeVolume(
  store: ObjectStore,
  volume: string,
  refcounts?: PackRefcounts,
): Promise<{ found: boolean; checkpoints: number; packsReleased: number }> {
  let packsReleased = 0;
  const checkpoints = await listCheckpoints(store, volume);
  for (const checkpoint of checkpoints) {
    const key = checkpointKey(volume, checkpoint.name);
    await store.delete(key);
    packsReleased += await releaseManifest(refcounts, key);
  }
  const key = manifestKey(volume);
  const found = (await store.head(key)) !== undefined;
  if (found) await store.delete(key);
  // Also when the object was already gone: a purge interrupted after the delete.
  packsReleased += await releaseManifest(refcounts, key);
  await store.delete(leaseKey(volume));
  await store.delete(bootSetKey(volume));
  // What any host's uploads of the volume held for a manifest to come: none will.
  if (refcounts !== undefined) packsReleased += await refcounts.releaseUploadsOfVolume(volume);
  return { found: found || checkpoints.length > 0, checkpoints: checkpoints.length, packsReleased };
}
