// Request, error and byte counters for metrics (updraft_store_requests_total{kind} etc.).
// Stack it under withRetries (withRetries(withMetering(backend))) so every attempt that
// reaches the store is counted, not just every call. Requests are also counted per
// volume (its cost): those made inside onBehalfOf(volume, …) and those on its own keys
// (manifest, lease, checkpoints, boot set); the rest (cold-read pack fetches, GC) are the host's.

import { AsyncLocalStorage } from 'node:async_hooks';
import type { GetOptions, ListOptions, ObjectInfo, ObjectStore, PutOptions, RequestKind, RequestOptions, StoredObject } from './types.js';

export interface StoreCounters {
  /** Requests started, by kind. */
  requests: Record<RequestKind, number>;
  /** Requests that threw, by kind (a lost conditional put included). */
  errors: Record<RequestKind, number>;
  /** Body bytes sent by puts (every attempt, stored or not). */
  bytesUp: number;
  /** Body bytes received by get and getRange. */
  bytesDown: number;
}

export const REQUEST_KINDS: readonly RequestKind[] = ['get', 'get_range', 'put', 'head', 'list', 'delete'];

function zeroes(): Record<RequestKind, number> {
  return { get: 0, get_range: 0, put: 0, head: 0, list: 0, delete: 0 };
}

/** Volumes whose requests are counted apart; requests of any further volume count as the host's. */
export const MAX_METERED_VOLUMES = 10_000;

const requester = new AsyncLocalStorage<string>();

/** Run `work` with every store request it makes (and what it starts) counted for `volume`. */
export function onBehalfOf<T>(volume: string, work: () => Promise<T>): Promise<T> {
  return requester.run(volume, work);
}

const VOLUME_KEY = /^volumes\/(.+)\/(?:manifest|lease|bootset|checkpoints\/[^/]+)$/;

/** The volume a request is for: the caller's, else the one whose key it is. */
function volumeOf(key: string | undefined): string | undefined {
  return requester.getStore() ?? (key === undefined ? undefined : VOLUME_KEY.exec(key)?.[1]);
}

/** A store that counts the requests, errors and bytes of the store below it. */
export class MeteredObjectStore implements ObjectStore {
  readonly description: string;
  private readonly requests = zeroes();
  private readonly errors = zeroes();
  private bytesUp = 0;
  private bytesDown = 0;
  /** Requests by volume (at most MAX_METERED_VOLUMES volumes). */
  private readonly byVolume = new Map<string, Record<RequestKind, number>>();

  constructor(private readonly inner: ObjectStore) {
    this.description = inner.description;
  }

  /** A copy of the counters as they are now. */
  counters(): StoreCounters {
    return { requests: { ...this.requests }, errors: { ...this.errors }, bytesUp: this.bytesUp, bytesDown: this.bytesDown };
  }

  /** Requests made for `volume` (onBehalfOf or its own keys) since start, by kind; zeroes if none. */
  volumeRequests(volume: string): Record<RequestKind, number> {
    return { ...(this.byVolume.get(volume) ?? zeroes()) };
  }

  /** inner.get, counted; its body's bytes count as down. */
  async get(key: string, options?: GetOptions): Promise<StoredObject | undefined> {
    const object = await this.count('get', key, () => this.inner.get(key, options));
    if (object) this.bytesDown += object.body.length;
    return object;
  }

  /** inner.getRange, counted; the bytes returned count as down. */
  async getRange(key: string, offset: number, length: number, options?: RequestOptions): Promise<Buffer | undefined> {
    const bytes = await this.count('get_range', key, () => this.inner.getRange(key, offset, length, options));
    if (bytes) this.bytesDown += bytes.length;
    return bytes;
  }

  /** inner.put, counted; the body's bytes count as up whether or not it is stored. */
  put(key: string, body: Buffer, options?: PutOptions): Promise<string> {
    this.bytesUp += body.length;
    return this.count('put', key, () => this.inner.put(key, body, options));
  }

  /** inner.head, counted. */
  head(key: string, options?: RequestOptions): Promise<ObjectInfo | undefined> {
    return this.count('head', key, () => this.inner.head(key, options));
  }

  /** inner.list, counted once however many pages the backend reads. */
  list(prefix: string, options?: ListOptions): Promise<ObjectInfo[]> {
    return this.count('list', undefined, () => this.inner.list(prefix, options));
  }

  /** inner.delete, counted. */
  delete(key: string, options?: RequestOptions): Promise<void> {
    return this.count('delete', key, () => this.inner.delete(key, options));
  }

  /** Closes the inner store. */
  close(): Promise<void> {
    return this.inner.close();
  }

  private async count<T>(kind: RequestKind, key: string | undefined, request: () => Promise<T>): Promise<T> {
    this.requests[kind]++;
    const volume = volumeOf(key);
    if (volume !== undefined) {
      let counts = this.byVolume.get(volume);
      if (counts === undefined && this.byVolume.size < MAX_METERED_VOLUMES) this.byVolume.set(volume, (counts = zeroes()));
      if (counts !== undefined) counts[kind]++;
    }
    try {
      return await request();
    } catch (err) {
      this.errors[kind]++;
      throw err;
    }
  }
}

/** Wraps store with counters; read them with counters(). */
export function withMetering(store: ObjectStore): MeteredObjectStore {
  return new MeteredObjectStore(store);
}
