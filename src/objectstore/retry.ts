// Retries for every backend alike: the S3 client makes one attempt per request, and this
// wrapper decides what is retried, how often and how long it waits, so that the fault
// wrapper can prove it. It also bounds each request as a whole: retries never compound
// past its deadline, and an attempt still running at the deadline is aborted.

import type { Logger } from '../log.js';
import {
  ObjectStoreError, type GetOptions, type ListOptions, type ObjectInfo, type ObjectStore, type PutOptions, type RequestKind, type RequestOptions, type StoredObject,
} from './types.js';

export interface RetryOptions {
  /** Tries per request, the first included (default 5). */
  attempts?: number;
  /** The wait before retry n is uniform in [0, min(maxDelayMs, baseDelayMs * 2^(n-1))) ("full jitter"). Default 50. */
  baseDelayMs?: number;
  /** Default 2000. */
  maxDelayMs?: number;
  /**
   * A request, its retries and the waits between them included, fails 'Unavailable' once
   * this long has passed ([storage] request_deadline_s); for a listing, this long without
   * a page. No retry starts that its wait would carry past it; the attempt still running
   * then is aborted (its signal). Default 25000.
   */
  deadlineMs?: number;
  /** Each retry is logged here at warn. */
  log?: Logger;
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** What the caller of a request gets once it gave up: the last error, with how and when. */
function gaveUp(err: ObjectStoreError, why: string): ObjectStoreError {
  return new ObjectStoreError('Unavailable', `${err.message} (${why})`, { cause: err });
}

/** A store that retries 'Unavailable' failures of the store below it. */
export class RetryingObjectStore implements ObjectStore {
  readonly description: string;
  private readonly attempts: number;
  private readonly baseDelayMs: number;
  private readonly maxDelayMs: number;
  readonly deadlineMs: number;
  private readonly log: Logger | undefined;

  constructor(
    private readonly inner: ObjectStore,
    options: RetryOptions = {},
  ) {
    this.description = inner.description;
    this.attempts = options.attempts ?? 5;
    this.baseDelayMs = options.baseDelayMs ?? 50;
    this.maxDelayMs = options.maxDelayMs ?? 2000;
    this.deadlineMs = options.deadlineMs ?? 25_000;
    this.log = options.log;
    if (!Number.isSafeInteger(this.attempts) || this.attempts < 1) {
      throw new ObjectStoreError('Invalid', `retry options: attempts must be a whole number >= 1, not ${this.attempts}`);
    }
    if (!(this.baseDelayMs >= 0) || !(this.maxDelayMs >= 0)) {
      throw new ObjectStoreError('Invalid', `retry options: delays must be >= 0 ms (baseDelayMs ${this.baseDelayMs}, maxDelayMs ${this.maxDelayMs})`);
    }
    if (!(this.deadlineMs > 0 && Number.isFinite(this.deadlineMs))) {
      throw new ObjectStoreError('Invalid', `retry options: deadlineMs must be a number of milliseconds > 0, not ${this.deadlineMs}`);
    }
  }

  /** inner.get, retried while it fails 'Unavailable'. */
  get(key: string, options?: GetOptions): Promise<StoredObject | undefined> {
    return this.retry('get', key, options, (signal) => this.inner.get(key, { ...options, signal }));
  }

  /** inner.getRange, retried while it fails 'Unavailable'. */
  getRange(key: string, offset: number, length: number, options?: RequestOptions): Promise<Buffer | undefined> {
    return this.retry('get_range', key, options, (signal) => this.inner.getRange(key, offset, length, { signal }));
  }

  /** inner.put, retried while it fails 'Unavailable'; a conditional put whose lost response hid a success then fails 'PreconditionFailed' (see withRetries). */
  put(key: string, body: Buffer, options?: PutOptions): Promise<string> {
    return this.retry('put', key, options, (signal) => this.inner.put(key, body, { ...options, signal }));
  }

  /** inner.head, retried while it fails 'Unavailable'. */
  head(key: string, options?: RequestOptions): Promise<ObjectInfo | undefined> {
    return this.retry('head', key, options, (signal) => this.inner.head(key, { signal }));
  }

  /** inner.list, retried while it fails 'Unavailable' (from the first page again); each page that arrives starts the deadline again. */
  list(prefix: string, options?: ListOptions): Promise<ObjectInfo[]> {
    return this.retry('list', `prefix ${JSON.stringify(prefix)}`, options, (signal, progress) =>
      this.inner.list(prefix, {
        signal,
        onPage: () => {
          progress();
          options?.onPage?.();
        },
      }),
    );
  }

  /** inner.delete, retried while it fails 'Unavailable' (deleting twice is harmless). */
  delete(key: string, options?: RequestOptions): Promise<void> {
    return this.retry('delete', key, options, (signal) => this.inner.delete(key, { signal }));
  }

  /** Closes the inner store. */
  close(): Promise<void> {
    return this.inner.close();
  }

  /**
   * Runs `request` until it succeeds, fails with an error trying again cannot change, runs
   * out of attempts, or reaches the deadline. Every attempt gets the signal that aborts at
   * the deadline (or when the caller's does); the request settles only after its attempt
   * has. `progress` (a listing's pages) starts the deadline again.
   */
  private async retry<T>(
    op: RequestKind,
    key: string,
    options: RequestOptions | undefined,
    request: (signal: AbortSignal, progress: () => void) => Promise<T>,
  ): Promise<T> {
    const started = performance.now();
    let since = started;
    const deadline = new AbortController();
    let timer = setTimeout(() => deadline.abort(), this.deadlineMs);
    const progress = () => {
      if (deadline.signal.aborted) return;
      since = performance.now();
      clearTimeout(timer);
      timer = setTimeout(() => deadline.abort(), this.deadlineMs);
    };
    const signal = options?.signal ? AbortSignal.any([options.signal, deadline.signal]) : deadline.signal;
    const seconds = () => ((performance.now() - started) / 1000).toFixed(1);
    try {
      for (let attempt = 1; ; attempt++) {
        try {
          return await request(signal, progress);
        } catch (err) {
          if (!(err instanceof ObjectStoreError) || err.code !== 'Unavailable') throw err;
          const attempts = `${attempt} attempt${attempt === 1 ? '' : 's'}`;
          if (deadline.signal.aborted) throw gaveUp(err, `no answer within the request deadline of ${this.deadlineMs / 1000} s; ${attempts}`);
          if (options?.signal?.aborted) throw gaveUp(err, `abandoned by the caller after ${attempts} in ${seconds()} s`);
          if (attempt >= this.attempts) throw gaveUp(err, `after ${attempts} in ${seconds()} s`);
          const delayMs = Math.random() * Math.min(this.maxDelayMs, this.baseDelayMs * 2 ** (attempt - 1));
          if (performance.now() - since + delayMs >= this.deadlineMs) {
            throw gaveUp(err, `no retry within the request deadline of ${this.deadlineMs / 1000} s; ${attempts}`);
          }
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
    } finally {
      clearTimeout(timer);
    }
  }
}

/**
 * Wraps store so that requests failing 'Unavailable' are tried again, up to `attempts`
 * times with exponential backoff and full jitter; after the last, the last error is thrown
 * with "(after N attempts in S s)" added. PreconditionFailed, AccessDenied, NoSuchBucket and
 * Invalid are thrown at once: trying again cannot change them. Whatever the store does, a
 * request fails 'Unavailable' by `deadlineMs` (with a backend that stops when its signal
 * aborts: s3:// does, file:// finishes the disk operation it is in first).
 *
 * Conditional puts: when an attempt was stored but its response was lost, the next
 * attempt meets its own object and fails 'PreconditionFailed' (If-None-Match: the key now
 * exists; If-Match: the etag moved on). The caller must then read the key back to learn
 * whether the object there is its own, e.g. by comparing the body or an id inside it.
 */
export function withRetries(store: ObjectStore, options: RetryOptions = {}): RetryingObjectStore {
  return new RetryingObjectStore(store, options);
}
