// Manifest-level operations on the store that need no volume and no daemon (DESIGN.md:
// Fork, lazy; checkpoints): a fork is a copy of a manifest under another name, a
// checkpoint an immutable manifest beside the volume's. No block is ever copied.
import { blockKey, type BlockKey } from '../blocks/cache.js';
import type { Compression } from '../crypto/compress.js';
import { packsOf, putCounted, WritePendingError, type PackRefcounts } from '../gc/refcounts.js';
import { isPreconditionFailed, type ObjectStore } from '../objectstore/types.js';
import { ZERO_ALLOCATED_KEY } from '../volume/blockmap.js';
import { checkpointKey, decodeManifest, encodeManifest, leaseKey, manifestKey, ZERO_ALLOCATED_BLOCK, type Manifest } from './manifest.js';
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

/** Pack location of every block a manifest names. */
export function manifestLocations(manifest: Manifest): Array<[BlockKey, PackLocation]> {
  return manifest.blocks.map((b) => [blockKey(b.hash), { pack: b.pack, offset: b.offset, length: b.length, rawLength: b.rawLength, codec: b.codec }]);
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

/** Read and decode a volume's manifest or checkpoint; MissingError when absent. */
export async function readManifest(store: ObjectStore, volume: string, checkpoint?: string): Promise<{ manifest: Manifest; etag: string }> {
  const key = sourceKey(volume, checkpoint);
  const object = await store.get(key);
  if (object === undefined) {
    throw new MissingError(
      checkpoint === undefined
        ? `volume ${volume} has no manifest in the store ${store.description} (it was never drained)`
        : `volume ${volume} has no checkpoint ${checkpoint} in the store ${store.description}`,
    );
  }
  return { manifest: decodeManifest(key, object.body), etag: object.etag };
}

/**
 * Write `manifest` at `key` (a new volume or checkpoint), only if the key does not exist
 * yet, with its packs counted when GC is on.
 */
export async function createManifest(
  store: ObjectStore,
  key: string,
  manifest: Manifest,
  compression: Compression,
  refcounts?: PackRefcounts,
): Promise<string> {
  const body = encodeManifest(manifest, compression);
  return (await putCounted(refcounts, key, packsOf(manifest.blocks), body, () => createObject(store, key, body))).etag;
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
 * without asking the source's host. Returns the sequence the target starts from.
 */
export async function lazyFork(
  store: ObjectStore,
  source: string,
  target: string,
  compression: Compression,
  checkpoint?: string,
  refcounts?: PackRefcounts,
): Promise<{ sequence: number; etag: string }> {
  const { manifest } = await readManifest(store, source, checkpoint);
  const sequence = manifest.meta.sequence;
  manifest.meta = {
    ...manifest.meta, name: target, generation: 0, host: manifest.meta.host, created: new Date().toISOString(),
    parent: { name: source, sequence },
  };
  const etag = await createManifest(store, manifestKey(target), manifest, compression, refcounts);
  return { sequence, etag };
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

/** A volume's boot hot set: the chunks its guest read first after attaching. */
export interface BootSet {
  format: 1;
  volume: string;
  blockSize: number;
  seconds: number;
  chunks: number[];
}

export function bootSetKey(volume: string): string {
  return `volumes/${volume}/bootset`;
}

export async function writeBootSet(store: ObjectStore, set: BootSet): Promise<void> {
  await store.put(bootSetKey(set.volume), Buffer.from(JSON.stringify(set) + '\n'));
}

/** The boot hot set of a volume, or of the nearest ancestor that has one (forks share their parent's). */
export async function readBootSet(store: ObjectStore, manifest: Manifest): Promise<BootSet | undefined> {
  const names = [manifest.meta.name, ...(manifest.meta.parent ? [manifest.meta.parent.name] : [])];
  for (const name of names) {
    const key = bootSetKey(name);
    const object = await store.get(key);
    if (object === undefined) continue;
    let set: BootSet;
    try {
      set = JSON.parse(object.body.toString('utf8')) as BootSet;
    } catch (err) {
      throw new Error(`boot set ${key} is not JSON: ${(err as Error).message}`);
    }
    if (set.format !== 1 || !Array.isArray(set.chunks) || !set.chunks.every((c) => Number.isSafeInteger(c) && c >= 0)) {
      throw new Error(`boot set ${key} is not a format 1 boot set`);
    }
    if (set.blockSize !== manifest.meta.blockSize) return undefined;
    return set;
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
  return { found: found || checkpoints.length > 0, checkpoints: checkpoints.length, packsReleased };
}
