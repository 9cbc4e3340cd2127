// A manifest write under pack refcounts (invariant 6), as store/ performs it: begin
// (count the packs it adds, record an intent), the conditional PUT, then commit, or abort
// when the PUT certainly failed. The protocol and its crash points are described at the
// top of gc/manifest-writes.ts (its tables in gc/schema.ts); gc/refcounts.ts implements
// PackRefcounts over SQL.
import { blake3 } from '@napi-rs/blake-hash';
import { crashPoint } from '../faults/crash-points.js';
import { errorMessage, type Logger } from '../log.js';
import { isPreconditionFailed, ObjectStoreError } from '../objectstore/types.js';

/** The packs counted for a manifest key, as of the object with `etag`. */
export interface CountedManifest {
  etag: string;
  packs: ReadonlySet<string>;
}

/**
 * The condition a manifest PUT carries: the etag of its If-Match, or IF_NONE_MATCH for a
 * create. An intent records it, and the PUT must carry exactly it: intents are resolved by it.
 */
export type PutCondition = string;
export const IF_NONE_MATCH: PutCondition = '*';

/** The put options that carry `condition`. */
export function putOptionsOf(condition: PutCondition): { ifMatch: string } | { ifNoneMatch: '*' } {
  return condition === IF_NONE_MATCH ? { ifNoneMatch: '*' } : { ifMatch: condition };
}

/** A manifest write between begin and commit/abort. */
export interface ManifestWrite {
  id: string;
  key: string;
  /** What its PUT is conditional on; undefined: unknown (it is resolved by the settle time only). */
  condition?: PutCondition;
  /** The pack set the key counts once the write lands (held by the intent until then). */
  set: string;
  packs: ReadonlySet<string>;
  added: string[];
  dropped: string[];
}

/** Packs a manifest would name that are being deleted or gone: upload their blocks again. */
export class PacksGoneError extends Error {
  override name = 'PacksGoneError';
  constructor(
    readonly key: string,
    readonly packs: string[],
  ) {
    super(`${key}: ${packs.length} pack(s) it would name are being deleted or gone from the store (${packs.slice(0, 3).join(', ')}${packs.length > 3 ? ', …' : ''})`);
  }
}

/** Another write of the same key has not been resolved yet (its PUT may still land). */
export class WritePendingError extends Error {
  override name = 'WritePendingError';
}

/** The 32-hex-digit BLAKE3 of a manifest body: identifies it in an intent. */
export function bodyHash(body: Buffer): string {
  return blake3(body).toString('hex', 0, 16);
}

/** Every pack a manifest's blocks are in. */
export function packsOf(blocks: ReadonlyArray<{ pack: string }>): Set<string> {
  const packs = new Set<string>();
  for (const b of blocks) packs.add(b.pack);
  return packs;
}

/** The pack refcounts as store/ uses them (gc/refcounts.ts keeps them in SQL). */
export interface PackRefcounts {
  readonly log: Logger;
  /**
   * Step 1 of a manifest write of `key` naming `packs`: increment what it adds, record the
   * intent (`hash`: bodyHash of the body). PacksGoneError names packs that are being
   * deleted; WritePendingError says another write of the key may still land.
   */
  begin(key: string, packs: ReadonlySet<string>, hash: string, known?: CountedManifest, share?: { key: string; etag: string }, condition?: PutCondition): Promise<ManifestWrite>;
  /** Step 3 after the PUT landed with `etag`: the key's counted packs are now `write.packs`. */
  commit(write: ManifestWrite, etag: string): Promise<CountedManifest>;
  /** The PUT definitely did not land: revert the increments and the hold. */
  abort(write: ManifestWrite): Promise<void>;
  /** The object at `key` was deleted from the store: drop what it counted. Returns the packs it counted. */
  removeManifest(key: string, etag?: string): Promise<number>;
  /** Give a pack about to be uploaded a row; with `hold`, in the set of that uploads key. Resolves once committed. */
  registerPack(id: string, hold?: string): Promise<void>;
  /** Add `packs` (already in the store) to the set of uploads key `hold`; returns those being deleted or gone. */
  holdUploads(hold: string, packs: readonly string[]): Promise<string[]>;
  /** Let go of every host's uploads of `volume`. Returns how many packs they held. */
  releaseUploadsOfVolume(volume: string): Promise<number>;
}

/** Errors after which a manifest PUT certainly did not land (or landed with another body). */
function definitelyNotStored(err: unknown): boolean {
  if (isPreconditionFailed(err)) return true;
  if (err instanceof ObjectStoreError) return err.code === 'Invalid' || err.code === 'AccessDenied' || err.code === 'NoSuchBucket';
  // ExistsError, FencedError: a conditional put lost to another object.
  return err instanceof Error && (err.name === 'ExistsError' || err.name === 'FencedError');
}

/**
 * Write a manifest under refcounts: begin, `put` (which returns the new etag), commit,
 * or abort when the put certainly failed. Without refcounts (GC off) just `put`. Takes
 * putCountedThen's arguments.
 */
export async function putCounted(...args: Parameters<typeof putCountedThen>): Promise<{ etag: string; counted?: CountedManifest }> {
  const { etag, commit } = await putCountedThen(...args);
  return { etag, counted: await commit() };
}

/**
 * putCounted up to the landed PUT; `commit` (step 3) is left to the caller, who runs it
 * beside its next request (a new fork's commit of thousands of pack rows beside its lease
 * PUT). Until it runs, the write is an intent like one whose host died after the PUT: a
 * write of the key meanwhile resolves it from the store.
 */
export async function putCountedThen(
  refcounts: PackRefcounts | undefined,
  key: string,
  packs: ReadonlySet<string>,
  body: Buffer,
  /** What `put` is conditional on: every PUT it sends carries exactly this (a different one is a new write). */
  condition: PutCondition,
  put: () => Promise<string>,
  known?: CountedManifest,
  /** The object whose packs are exactly `packs` (see PackRefcounts.begin). */
  share?: { key: string; etag: string },
): Promise<{ etag: string; commit: () => Promise<CountedManifest | undefined> }> {
  if (refcounts === undefined) {
    const etag = await put();
    return { etag, commit: async () => undefined };
  }
  const write = await refcounts.begin(key, packs, bodyHash(body), known, share, condition);
  await crashPoint('manifest-put');
  let etag: string;
  try {
    etag = await put();
  } catch (err) {
    if (definitelyNotStored(err)) await refcounts.abort(write);
    else refcounts.log.warn('manifest write failed and may still land; its refcounts stay until it is resolved', { key, error: errorMessage(err) });
    throw err;
  }
  return {
    etag,
    commit: async () => {
      await crashPoint('manifest-commit');
      return refcounts.commit(write, etag);
    },
  };
}
