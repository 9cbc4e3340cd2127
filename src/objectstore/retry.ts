// Retries for every backend alike: the S3 client makes one attempt per request, and this
// wrapper decides what is retried, how often and how long it waits, so that the fault
// wrapper can prove it.

import type { Logger } from '../log.js';
import { ObjectStoreError, type ObjectInfo, type ObjectStore, type PutOptions, type RequestKind, type StoredObject } from './types.js';

export interface RetryOptions {
  /** Tries per request, the first included (default 5). */
  attempts?: number;
  /** The wait before retry n is uniform in [0, min(maxDelayMs, baseDelayMs * 2^(n-1))) ("full jitter"). Default 50. */
  baseDelayMs?: number;
  /** Default 2000. */
  maxDelayMs?: number;
  /** Each retry is logged here at warn. */
  log?: Logger;
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** A store that retries 'Unavailable' failures of the store below it. */
export class RetryingObjectStore implements ObjectStore {
  readonly description: string;
  private readonly attempts: number;
  private readonly baseDelayMs: number;
  private readonly maxDelayMs: number;
  private readonly log: Logger | undefined;

  constructor(
    private readonly inner: ObjectStore,
    options: RetryOptions = {},
  ) {
    this.description = inner.description;
    this.attempts = options.attempts ?? 5;
    this.baseDelayMs = options.baseDelayMs ?? 50;
    this.maxDelayMs = options.maxDelayMs ?? 2000;
    this.log = options.log;
    if (!Number.isSafeInteger(this.attempts) || this.attempts < 1) {
      throw new ObjectStoreError('Invalid', `retry options: attempts must be a whole number >= 1, not ${this.attempts}`);
    }
    if (!(this.baseDelayMs >= 0) || !(this.maxDelayMs >= 0)) {
      throw new ObjectStoreError('Invalid', `retry options: delays must be >= 0 ms (baseDelayMs ${this.baseDelayMs}, maxDelayMs ${this.maxDelayMs})`);
    }
  }

  /** inner.get, retried while it fails 'Unavailable'. */
  get(key: string): Promise<StoredObject | undefined> {
    return this.retry('get', key, () => this.inner.get(key));
  }

  /** inner.getRange, retried while it fails 'Unavailable'. */
  getRange(key: string, offset: number, length: number): Promise<Buffer | undefined> {
    return this.retry('get_range', key, () => this.inner.getRange(key, offset, length));
  }

  /** inner.put, retried while it fails 'Unavailable'; a conditional put whose lost response hid a success then fails 'PreconditionFailed' (see withRetries). */
  put(key: string, body: Buffer, options?: PutOptions): Promise<string> {
    return this.retry('put', key, () => this.inner.put(key, body, options));
  }

  /** inner.head, retried while it fails 'Unavailable'. */
  head(key: string): Promise<ObjectInfo | undefined> {
    return this.retry('head', key, () => this.inner.head(key));
  }

  /** inner.list, retried while it fails 'Unavailable' (from the first page again). */
  list(prefix: string): Promise<ObjectInfo[]> {
    return this.retry('list', `prefix ${JSON.stringify(prefix)}`, () => this.inner.list(prefix));
  }

  /** inner.delete, retried while it fails 'Unavailable' (deleting twice is harmless). */
  delete(key: string): Promise<void> {
    return this.retry('delete', key, () => this.inner.delete(key));
  }

  /** Closes the inner store. */
  close(): Promise<void> {
    return this.inner.close();
  }

  private async retry<T>(op: RequestKind, key: string, request: () => Promise<T>): Promise<T> {
    for (let attempt = 1; ; attempt++) {
      try {
        return await request();
      } catch (err) {
        if (!(err instanceof ObjectStoreError) || err.code !== 'Unavailable') throw err;
        if (attempt >= this.attempts) {
          throw new ObjectStoreError('Unavailable', `${err.message} (after ${attempt} attempt${attempt === 1 ? '' : 's'})`, { cause: err });
        }
        const delayMs = Math.random() * Math.min(this.maxDelayMs, this.baseDelayMs * 2 ** (attempt - 1));
        this.log?.warn('object store request failed; retrying', {
          op,
          key,
          attempt,
          attempts: this.attempts,
          delay_ms: Math.round(delayMs),
          error: err.message,
        });
        await sleep(delayMs);
      }
    }
  }
}

/**
 * Wraps store so that requests failing 'Unavailable' are tried again, up to `attempts`
 * times with exponential backoff and full jitter; after the last, the last error is thrown
 * with "(after N attempts)" added. PreconditionFailed, AccessDenied, NoSuchBucket and
 * Invalid are thrown at once: trying again cannot change them.
 *
 * Conditional puts: when an attempt was stored but its response was lost, the next
 * attempt meets its own object and fails 'PreconditionFailed' (If-None-Match: the key now
 * exists; If-Match: the etag moved on). The caller must then read the key back to learn
 * whether the object there is its own, e.g. by comparing the body or an id inside it.
 */
export function withRetries(store: ObjectStore, options: RetryOptions = {}): RetryingObjectStore {
  return new RetryingObjectStore(store, options);
}
