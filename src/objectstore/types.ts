/**
 * The object store interface (DESIGN.md: objectstore/). Every backend (file://, s3://)
 * and every wrapper (faults, metering) implements exactly this. Keys are `/`-separated,
 * relative to the store's root (the backend adds its own prefix).
 *
 * Errors: a missing object is `undefined` from get/getRange/head, never a throw. A failed
 * condition is an ObjectStoreError with code 'PreconditionFailed'. Everything else that
 * fails throws an ObjectStoreError whose message names the operation and the key.
 */

export interface ObjectInfo {
  key: string;
  size: number;
  /** Opaque version tag; pass it back as `ifMatch`. Changes on every put of the key. */
  etag: string;
  lastModified: Date;
}

export interface StoredObject extends ObjectInfo {
  body: Buffer;
}

/**
 * What any request may carry. `signal`: the caller gives up when it aborts; the request
 * then fails 'Unavailable' as soon as the backend can stop it (s3:// destroys its socket;
 * file:// finishes the disk operation it is in). It settles only once the backend no
 * longer reads a put's body.
 */
export interface RequestOptions {
  signal?: AbortSignal;
}

export interface GetOptions extends RequestOptions {
  /**
   * Where a body of `length` bytes goes: a buffer of exactly that length (a view of a
   * reused one, say) that the backend may read the body into. A backend may ignore it.
   */
  into?: (length: number) => Buffer;
}

export interface ListOptions extends RequestOptions {
  /** Called as each page of the listing arrives: a long listing makes progress, so its deadline starts again. */
  onPage?: () => void;
}

export interface PutOptions extends RequestOptions {
  /** Only create: fail with PreconditionFailed if the key exists (If-None-Match: *). */
  ifNoneMatch?: '*';
  /** Only replace this version: fail with PreconditionFailed if the etag differs or the key is gone. */
  ifMatch?: string;
  /**
   * The body proves itself to every reader (a pack: its key is BLAKE3 of the body, and each
   * block is checked against its name), so s3:// sends it as UNSIGNED-PAYLOAD instead of
   * signing a SHA-256 of every byte. Headers, key and length are signed as always.
   */
  selfVerifying?: boolean;
}

/** Kinds of request, as counted in metrics (updraft_store_requests_total{kind}). */
export type RequestKind = 'get' | 'get_range' | 'put' | 'head' | 'list' | 'delete';

export type ObjectStoreErrorCode =
  | 'PreconditionFailed' // a conditional put lost (someone else wrote first)
  | 'Unavailable' // network, timeout, 5xx after retries, disk error: may succeed later
  | 'AccessDenied' // credentials or permissions
  | 'NoSuchBucket' // the bucket or root folder does not exist
  | 'Invalid'; // a bad key, bad URL or bad argument: will never succeed

export class ObjectStoreError extends Error {
  constructor(
    readonly code: ObjectStoreErrorCode,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
    this.name = 'ObjectStoreError';
  }
}

export function isPreconditionFailed(err: unknown): boolean {
  return err instanceof ObjectStoreError && err.code === 'PreconditionFailed';
}

/** Whether the store could not be reached or kept failing (network, timeout, 5xx after retries): it may answer later. */
export function isUnavailable(err: unknown): err is ObjectStoreError {
  return err instanceof ObjectStoreError && err.code === 'Unavailable';
}

/**
 * An 'Unavailable' failure restated for the operation that needed the store:
 * "WHAT: the object store STORE is unreachable: DETAIL". Any other error comes back as it is.
 */
export function storeUnreachable(what: string, store: string, err: unknown): unknown {
  if (!isUnavailable(err)) return err;
  return new ObjectStoreError('Unavailable', `${what}: the object store ${store} is unreachable: ${err.message}`, { cause: err });
}

export interface ObjectStore {
  /** A short description for logs and errors, e.g. `s3://bucket/prefix` (never credentials). */
  readonly description: string;
  /** The whole object, or undefined if the key does not exist. */
  get(key: string, options?: GetOptions): Promise<StoredObject | undefined>;
  /** Bytes [offset, offset + length) (clipped to the object's end), or undefined if the key does not exist. */
  getRange(key: string, offset: number, length: number, options?: RequestOptions): Promise<Buffer | undefined>;
  /** Store body under key, atomically (readers see the old or the new object, never a part). Returns the new etag. */
  put(key: string, body: Buffer, options?: PutOptions): Promise<string>;
  /** Size and etag, or undefined if the key does not exist. */
  head(key: string, options?: RequestOptions): Promise<ObjectInfo | undefined>;
  /** Every object whose key starts with prefix, in key order (the backend pages internally). */
  list(prefix: string, options?: ListOptions): Promise<ObjectInfo[]>;
  /** Remove key. Deleting a missing key is not an error. */
  delete(key: string, options?: RequestOptions): Promise<void>;
  /** Release sockets and timers. */
  close(): Promise<void>;
}

/**
 * After a conditional put that got no answer: whether its condition can no longer hold,
 * read by a HEAD. The key is there (create only) or holds another etag (If-Match): trying
 * again can only fail the same way, so the put fails 'PreconditionFailed' as a retried one
 * would (its caller reads the key back to learn whether the object there is its own). When
 * the HEAD fails too, the caller gave up, or the condition still holds: false.
 */
export async function conditionNoLongerHolds(store: Pick<ObjectStore, 'head'>, key: string, options: PutOptions): Promise<boolean> {
  if (options.signal?.aborted) return false;
  let info: ObjectInfo | undefined;
  try {
    info = await store.head(key, { signal: options.signal });
  } catch {
    return false;
  }
  if (options.ifNoneMatch !== undefined) return info !== undefined;
  return info === undefined || info.etag !== options.ifMatch;
}
