// A manifest of a volume's snapshot laid out (DESIGN.md: Snapshot; invariant 2): the blocks
// no pack holds go up first, and the body is the last manifest's tables with the changed
// chunks patched in when few enough changed, or a full layout.
import { keyHex, type BlockKey } from '../blocks/cache.js';
import { manifestOfChunks } from '../store/catalog.js';
import type { ManifestMeta } from '../store/manifest.js';
import { bodyCounts, manifestBody } from '../store/manifest-body.js';
import { patchManifestBody } from '../store/manifest-patch.js';
import type { StoredTables } from '../store/manifest-seal.js';
import type { UploadResult } from '../store/upload.js';
import type { BlockMap } from '../volume/blockmap.js';
import type { Volume, VolumeSnapshot } from '../volume/volume.js';
import type { StoreContext, StoreState } from './store-state.js';
import type { UploadsSet } from './uploads-set.js';

/** A block the manifest would name is in no pack the pack index knows (GC removed it). */
class LocationGoneError extends Error {
  override name = 'LocationGoneError';
}

/**
 * Whether an incremental manifest is worth it: the changes, and the blocks earlier patches
 * left in the block table that no chunk may name any more, stay under a quarter of the
 * base's blocks (or MIN_PATCHED_BLOCKS); past that a full layout drops the leftovers.
 */
function worthPatching(base: { raw: Buffer; appended: number }, changes: number): boolean {
  return base.appended + changes <= Math.max(MIN_PATCHED_BLOCKS, bodyCounts(base.raw).blocks / 4);
}
const MIN_PATCHED_BLOCKS = 4096;

/** The volume's last manifest this host wrote or loaded: the base of incremental manifests. */
export interface ManifestBase {
  map: BlockMap;
  raw: Buffer;
  tables?: StoredTables;
  /** Blocks earlier patches appended to the block table since its last full layout. */
  appended: number;
  etag: string | undefined;
}

/** What a capture needs of the volume's StoreLink. */
export interface CaptureSource {
  readonly name: string;
  readonly volume: Volume;
  readonly ctx: StoreContext;
  readonly state: StoreState;
  readonly uploadsSet: UploadsSet;
  base: ManifestBase | undefined;
  noteUpload(sequence: number, ms: number): void;
}

/** The name a captured manifest is written under (the volume itself, a fork or a checkpoint). */
export interface ManifestIdentity {
  name: string;
  generation: number;
  sequence: number;
  parent?: { name: string; sequence: number };
}

export type CapturedManifest = Awaited<ReturnType<typeof captureManifest>>;

/**
 * Snapshot at the current sequence, upload the blocks no pack holds (the local journal
 * flushed meanwhile) and lay out a manifest body of it. `identity` names the manifest
 * (the volume itself, a fork or a checkpoint) once the blocks are up. The caller writes
 * the manifest, then calls stored() if it reached the store, and release() in any case.
 *
 * With a base (the volume's last manifest this host wrote or loaded) and few enough
 * changes since, the body is incremental: the base's tables with the changed chunks
 * patched in, so the work follows the chunks changed, not the chunks mapped.
 */
export async function captureManifest(link: CaptureSource, identity: (snapshot: VolumeSnapshot) => Promise<ManifestIdentity>) {
  const started = performance.now();
  const base = link.base;
  // Blocks the snapshot seals go up while it seals the rest; upload() below then puts
  // only what is left (and waits for packs still in flight), so the manifest still
  // names only blocks in uploaded packs (invariant 2).
  link.uploadsSet.holdsUploads = true;
  const early = link.ctx.uploader.early(link.uploadsSet.uploads);
  let snapshot: VolumeSnapshot;
  try {
    snapshot = await link.volume.snapshot({ base: base?.map, onSealed: (key) => early.add(key) });
  } catch (err) {
    await early.finish();
    throw err;
  }
  // The cut: blocks sealed before it are in this snapshot, so a manifest of it names them.
  link.uploadsSet.cut();
  const snapshotMs = performance.now() - started;
  let stored = false;
  try {
    let patch = base !== undefined && snapshot.changes !== undefined && worthPatching(base, snapshot.changes.length);
    const keysToUpload = () => (patch ? snapshot.changes!.map(([, key]) => key).filter((key) => key !== undefined) : snapshot.chunks.map(([, key]) => key));
    // The local journal must not fall behind what the store is told: flush it (disk)
    // while the blocks go up (CPU and network), and both before the manifest.
    const [earlyUploaded, uploaded] = await Promise.all([early.finish(), link.ctx.uploader.upload(keysToUpload(), link.uploadsSet.uploads), link.volume.flush()]);
    const count = (more: UploadResult) => {
      uploaded.packs += more.packs;
      uploaded.blocks += more.blocks;
      uploaded.bytes += more.bytes;
    };
    count(earlyUploaded);
    const uploadMs = performance.now() - started - snapshotMs;
    link.noteUpload(snapshot.sequence, uploadMs);
    const id = await identity(snapshot);
    const meta: ManifestMeta = {
      format: 1, name: id.name, size: snapshot.size, blockSize: snapshot.blockSize, sequence: id.sequence,
      generation: id.generation, host: link.ctx.hostId, created: new Date().toISOString(), ...(id.parent ? { parent: id.parent } : {}),
      flushMode: link.state.flushMode,
    };
    const locate = (key: BlockKey, chunk: number) => {
      const location = link.ctx.packIndex.get(key);
      // Invariant 2: the upload above put every block the manifest names into a pack.
      if (location === undefined) throw new LocationGoneError(`volume ${link.name}: block ${keyHex(key)} of chunk ${chunk} is in no pack after the upload`);
      return location;
    };
    const build = (): { raw: Buffer; appended: number } =>
      patch
        ? patchManifestBody(base!.raw, meta, snapshot.changes!, locate, link.ctx.cipher.overhead)
        : { raw: manifestBody(manifestOfChunks(meta, snapshot.chunks, locate), link.ctx.cipher.overhead), appended: 0 };
    let built: { raw: Buffer; appended: number };
    for (let attempt = 1; ; attempt++) {
      try {
        built = build();
        break;
      } catch (err) {
        // GC took a pack the upload deduplicated against out of the pack index meanwhile
        // (it is being deleted): upload what no pack holds now, and lay out again.
        if (!(err instanceof LocationGoneError) || attempt >= 3) throw err;
        link.ctx.log.warn('a block left the pack index during the drain (GC deleted its pack); uploading it again', { volume: link.name, error: err.message });
        count(await link.ctx.uploader.upload(keysToUpload(), link.uploadsSet.uploads));
      }
    }
    const captured = {
      meta, raw: built.raw, tables: undefined as StoredTables | undefined, lend: base?.tables, appended: (patch ? base!.appended : 0) + built.appended, incremental: patch,
      map: snapshot.map, sequence: snapshot.sequence, changes: snapshot.changes?.length, uploaded, started, snapshotMs, uploadMs,
      stored: () => {
        stored = true;
      },
      release: () => snapshot.release(stored),
      /**
       * GC deleted these packs after the upload relied on them (the pack index still
       * named them): forget them, upload their blocks again, lay out the whole manifest
       * anew (the base may name the deleted packs too).
       */
      rebuild: async (gone: readonly string[]) => {
        for (const pack of gone) link.ctx.packIndex.removePack(pack);
        link.base = undefined;
        patch = false;
        count(await link.ctx.uploader.upload(keysToUpload(), link.uploadsSet.uploads));
        const rebuilt = build();
        captured.raw = rebuilt.raw;
        captured.appended = 0;
        captured.incremental = false;
      },
    };
    return captured;
  } catch (err) {
    snapshot.release(false);
    throw err;
  }
}
