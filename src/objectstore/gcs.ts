// The gs:// backend: one Google Cloud Storage bucket, every key under an optional prefix,
// through Google's Node.js client (@google-cloud/storage). The client's own retries are
// off: retries belong to withRetries (retry.ts), as for every backend.
//
// The etag of an object is its generation (a decimal number GCS assigns on every write of
// the key): conditional puts are `ifGenerationMatch=0` (create only) and
// `ifGenerationMatch=G` (replace only generation G), the two conditions GCS enforces
// atomically. lastModified is the object's `updated` time, which the store clock reads.
//
// The client library is loaded on the first request, so a daemon on another store never
// pays for loading it.
//
// Aborts: a download stops at once (its stream is destroyed, and its socket with it). The
// client's transport cannot abort a request in flight, so an abandoned upload or metadata
// request fails here at once but runs on until it answers or the client's own timeout
// (request_timeout_s, the same bound) ends it; at most that long, its body stays held.

import { readFile } from 'node:fs/promises';
import type { File, FileMetadata, Storage } from '@google-cloud/storage';
import { errorMessage } from '../log.js';
import { abortError, checkEndpoint, readStream, startAttempt, untilAborted, type Attempt } from './cloud.js';
import { checkKey, checkPrefix, checkPutOptions, checkRange, keyProblem, storeError } from './keys.js';
import {
  conditionNoLongerHolds,
  ObjectStoreError, type ListOptions, type ObjectInfo, type ObjectStore, type ObjectStoreErrorCode, type PutOptions, type RequestOptions, type StoredObject,
} from './types.js';

export interface GcsOptions {
  /** A service account's JSON key file. Without it: the client's default chain (GOOGLE_APPLICATION_CREDENTIALS, gcloud, metadata server). */
  serviceAccountKey?: string;
  /** Another server, e.g. an emulator at `http://127.0.0.1:4443`; default Google's. Requests to it carry no credentials unless a key is given. */
  endpoint?: string;
  /** Allow a plain http:// endpoint (emulators; never across a network you do not own). Default false. */
  allowHttp?: boolean;
  /** An attempt fails 'Unavailable' when nothing moves for this long ([storage] request_timeout_s). Default 10000. */
  requestTimeoutMs?: number;
}

/** Objects per page of a listing (the JSON API's maximum). */
const LIST_PAGE = 1000;

/** How a client error reads to us: a store error code, or the answers that are not errors. */
type Classified = ObjectStoreErrorCode | 'NotFound' | 'RangeNotSatisfiable';

interface ClientError {
  name?: string;
  code?: number | string;
  message?: string;
  response?: { status?: number };
}

/** OAuth errors of the token endpoint (an HTTP 400 or 401 of its own), e.g. a revoked or deleted service account key. */
const TOKEN_REFUSED = /\b(invalid_grant|invalid_client|unauthorized_client)\b/;
/** google-auth-library's messages when it finds no credentials to use (no HTTP answer at all). */
const NO_CREDENTIALS = /Could not load the default credentials|Could not refresh access token|Unable to detect a Project Id/i;

function statusOf(err: unknown): number | undefined {
  const e = (err ?? {}) as ClientError;
  if (typeof e.code === 'number') return e.code;
  return e.response?.status;
}

function classify(err: unknown): Classified {
  const e = (err ?? {}) as ClientError;
  const status = statusOf(err);
  if (e.name === 'AbortError') return 'Unavailable';
  if (status === 404) return 'NotFound';
  if (status === 412) return 'PreconditionFailed';
  if (status === 416) return 'RangeNotSatisfiable';
  if (status === 401 || status === 403) return 'AccessDenied';
  if ((status === undefined || status === 400) && TOKEN_REFUSED.test(e.message ?? '')) return 'AccessDenied';
  if (status === undefined && NO_CREDENTIALS.test(e.message ?? '')) return 'AccessDenied';
  if (status === 408 || status === 429 || (status !== undefined && status >= 500)) return 'Unavailable';
  // No HTTP answer: refused, reset, DNS, a timeout of the client's own.
  if (status === undefined) return 'Unavailable';
  return 'Invalid';
}

/** A 404 about the bucket rather than the object ("The specified bucket does not exist."). */
function bucketMissing(err: unknown): boolean {
  return /bucket/i.test(((err ?? {}) as ClientError).message ?? '') && !/no such object/i.test(((err ?? {}) as ClientError).message ?? '');
}

function describe(err: unknown): string {
  const status = statusOf(err);
  const text = errorMessage(err).split('\n')[0];
  return status === undefined ? text : `HTTP ${status}: ${text}`;
}

/** A store in a GCS bucket under a key prefix (`gs://bucket/prefix`). */
export class GcsObjectStore implements ObjectStore {
  readonly description: string;
  readonly bucket: string;
  /** Prepended to every key: '' or ends with '/'. */
  readonly prefix: string;
  private readonly requestTimeoutMs: number;
  private client: Promise<Storage> | undefined;
  /** A listing of the bucket answered: from now on a 404 of an object means the object is missing. */
  private bucketSeen = false;

  constructor(
    bucket: string,
    prefix: string,
    private readonly options: GcsOptions = {},
  ) {
    const trimmed = prefix.replace(/^\/+|\/+$/g, '');
    this.bucket = bucket;
    this.prefix = trimmed === '' ? '' : `${trimmed}/`;
    this.description = `gs://${bucket}${trimmed === '' ? '' : `/${trimmed}`}`;
    const invalid = (why: string) => new ObjectStoreError('Invalid', `object store ${this.description}: ${why}`);
    if (!/^[a-z0-9][a-z0-9._-]{1,221}[a-z0-9]$/.test(bucket)) throw invalid(`bad bucket name ${JSON.stringify(bucket)}`);
    const prefixProblem = trimmed === '' ? undefined : keyProblem(trimmed);
    if (prefixProblem) throw invalid(`bad key prefix ${JSON.stringify(prefix)}: ${prefixProblem}`);
    if (options.endpoint !== undefined) checkEndpoint(options.endpoint, options.allowHttp ?? false, invalid);
    this.requestTimeoutMs = options.requestTimeoutMs ?? 10_000;
    if (!Number.isFinite(this.requestTimeoutMs) || this.requestTimeoutMs <= 0) {
      throw invalid(`requestTimeoutMs must be a number of milliseconds > 0, not ${this.requestTimeoutMs}`);
    }
  }

  /** The client, made on first use. */
  private storage(): Promise<Storage> {
    this.client ??= this.connect().catch((err: unknown) => {
      this.client = undefined;
      throw err;
    });
    return this.client;
  }

  private async connect(): Promise<Storage> {
    const credentials = this.options.serviceAccountKey === undefined ? undefined : await this.serviceAccount(this.options.serviceAccountKey);
    const { Storage } = await import('@google-cloud/storage');
    return new Storage({
      apiEndpoint: this.options.endpoint?.replace(/\/+$/, ''),
      credentials,
      projectId: credentials?.project_id,
      // With a key, an endpoint other than Google's still gets a bearer token (a private gateway).
      useAuthWithCustomEndpoint: credentials !== undefined,
      retryOptions: { autoRetry: false, maxRetries: 0 },
      timeout: this.requestTimeoutMs,
    });
  }

  /** The service account key file, read and checked: a key that cannot work fails 'AccessDenied' naming the file, never as an unreachable store. */
  private async serviceAccount(file: string): Promise<{ client_email: string; private_key: string; project_id?: string }> {
    const refuse = (why: string, cause?: unknown) =>
      new ObjectStoreError('AccessDenied', `object store ${this.description}: service account key ${file}: ${why}`, cause === undefined ? undefined : { cause });
    let text: string;
    try {
      text = await readFile(file, 'utf8');
    } catch (err) {
      throw refuse(`cannot read it: ${errorMessage(err)}`, err);
    }
    let key: { type?: unknown; client_email?: unknown; private_key?: unknown; project_id?: unknown };
    try {
      key = JSON.parse(text) as typeof key;
    } catch (err) {
      throw refuse('not JSON', err);
    }
    if (key === null || typeof key !== 'object' || key.type !== 'service_account') throw refuse('not a service account key (its "type" is not "service_account")');
    if (typeof key.client_email !== 'string' || key.client_email === '') throw refuse('no client_email');
    if (typeof key.private_key !== 'string' || !key.private_key.includes('PRIVATE KEY')) throw refuse('no private_key in PEM form');
    return { client_email: key.client_email, private_key: key.private_key, project_id: typeof key.project_id === 'string' ? key.project_id : undefined };
  }

  /**
   * Whether a failed request's 404 means the object is missing (rather than the bucket).
   * GCS says "The specified bucket does not exist." when it is the bucket; an emulator may
   * not, so the first 404 this store meets is settled by a one-object listing, which 404s
   * only without the bucket (and needs no permission beyond storage.objects.list).
   */
  private async objectMissing(op: string, key: string, err: unknown, attempt: Attempt): Promise<boolean> {
    if (classify(err) !== 'NotFound' || bucketMissing(err)) return false;
    if (this.bucketSeen) return true;
    try {
      await untilAborted(attempt, (await this.storage()).bucket(this.bucket).getFiles({ prefix: this.prefix, autoPaginate: false, maxResults: 1 }));
    } catch (listErr) {
      if (classify(listErr) === 'NotFound') return false;
      throw this.error(op, key, listErr, attempt);
    }
    this.bucketSeen = true;
    return true;
  }

  private async file(key: string): Promise<File> {
    return (await this.storage()).bucket(this.bucket).file(this.prefix + key);
  }

  /** The whole object with the generation it was read at, or undefined when the key does not exist. */
  async get(key: string, options?: RequestOptions): Promise<StoredObject | undefined> {
    checkKey('get', key, this.description);
    const read = await this.read('get', key, undefined, options);
    if (read === undefined) return undefined;
    const { body, headers } = read;
    const generation = headers['x-goog-generation'];
    if (typeof generation !== 'string' || generation === '') {
      throw storeError('Invalid', 'get', key, this.description, 'the download answered without an x-goog-generation header');
    }
    const lastModified = typeof headers['last-modified'] === 'string' ? new Date(headers['last-modified']) : new Date(0);
    return { key, size: body.length, etag: generation, lastModified, body };
  }

  /** Bytes [offset, offset + length) by a ranged download; 416 (past the end) reads as empty; undefined when the key does not exist. */
  async getRange(key: string, offset: number, length: number, options?: RequestOptions): Promise<Buffer | undefined> {
    checkKey('get_range', key, this.description);
    checkRange(key, offset, length, this.description);
    if (length === 0) return (await this.head(key, options)) ? Buffer.alloc(0) : undefined;
    const read = await this.read('get_range', key, { start: offset, end: offset + length - 1 }, options);
    if (read === undefined) return undefined;
    // A server that ignores Range sends the whole object with 200.
    if (read.status === 200 && read.body.length > length) return read.body.subarray(offset, offset + length);
    return read.body;
  }

  /** One download: the body and the answer's headers, or undefined on 404 (an object's). */
  private async read(
    op: 'get' | 'get_range',
    key: string,
    range: { start: number; end: number } | undefined,
    options: RequestOptions | undefined,
  ): Promise<{ body: Buffer; headers: Record<string, unknown>; status: number } | undefined> {
    const attempt = startAttempt(options?.signal, this.requestTimeoutMs);
    try {
      // The client asks for gzip; an answer GCS compressed for the transfer is unpacked (and its length is the compressed one).
      const stream = (await this.file(key)).createReadStream({ validation: false, decompress: true, ...range });
      let headers: Record<string, unknown> = {};
      let status = 0;
      stream.once('response', (res: { headers?: Record<string, unknown>; statusCode?: number; status?: number }) => {
        attempt.touch();
        headers = res.headers ?? {};
        status = res.statusCode ?? res.status ?? 0;
      });
      const declared = () =>
        typeof headers['content-length'] === 'string' && [undefined, 'identity'].includes(headers['content-encoding'] as string | undefined) ? Number(headers['content-length']) : undefined;
      const body = await readStream(stream, undefined, attempt);
      const expected = declared();
      if (expected !== undefined && Number.isSafeInteger(expected) && body.length !== expected) {
        throw storeError('Unavailable', op, key, this.description, `truncated body: ${body.length} of ${expected} bytes`);
      }
      return { body, headers, status };
    } catch (err) {
      const what = classify(err);
      if (await this.objectMissing(op, key, err, attempt)) return undefined;
      if (what === 'RangeNotSatisfiable') return { body: Buffer.alloc(0), headers: {}, status: 416 };
      throw this.error(op, key, err, attempt);
    } finally {
      attempt.done();
    }
  }

  /** A multipart upload with ifGenerationMatch (0: create only; G: replace generation G only); returns the new generation. */
  async put(key: string, body: Buffer, options?: PutOptions): Promise<string> {
    checkKey('put', key, this.description);
    checkPutOptions(key, options, this.description);
    if (!((body as unknown) instanceof Uint8Array)) throw storeError('Invalid', 'put', key, this.description, 'body must be a Buffer');
    let ifGenerationMatch: number | undefined;
    if (options?.ifNoneMatch) ifGenerationMatch = 0;
    else if (options?.ifMatch !== undefined) {
      // An etag that is not a generation can match no object here.
      if (!/^[1-9][0-9]*$/.test(options.ifMatch)) {
        throw storeError('PreconditionFailed', 'put', key, this.description, `precondition failed: If-Match ${options.ifMatch} is not a generation of this store`);
      }
      ifGenerationMatch = Number(options.ifMatch);
    }
    const condition = options?.ifNoneMatch
      ? 'the key exists (If-None-Match: *, sent as ifGenerationMatch=0)'
      : `If-Match ${options?.ifMatch} is not the current object's generation (ifGenerationMatch)`;
    const attempt = startAttempt(options?.signal, this.requestTimeoutMs);
    let generation: unknown;
    try {
      const file = await this.file(key);
      await new Promise<void>((resolve, reject) => {
        const stream = file.createWriteStream({
          resumable: false,
          validation: false,
          contentType: 'application/octet-stream',
          preconditionOpts: ifGenerationMatch === undefined ? undefined : { ifGenerationMatch },
        });
        const abort = () => stream.destroy(abortError(attempt));
        attempt.signal.addEventListener('abort', abort, { once: true });
        const settle = (err?: unknown) => {
          attempt.signal.removeEventListener('abort', abort);
          if (err) reject(err);
          else resolve();
        };
        stream.once('error', settle);
        stream.once('finish', () => settle());
        if (attempt.signal.aborted) abort();
        else stream.end(body);
      });
      generation = (file.metadata as FileMetadata | undefined)?.generation;
    } catch (err) {
      const what = classify(err);
      if (what === 'PreconditionFailed' || (ifGenerationMatch !== undefined && (await this.objectMissing('put', key, err, attempt)))) {
        throw storeError('PreconditionFailed', 'put', key, this.description, `precondition failed: ${condition}: ${describe(err)}`, err);
      }
      if (what === 'Unavailable' && ifGenerationMatch !== undefined && (await this.conditionFails(key, options!))) {
        throw storeError('PreconditionFailed', 'put', key, this.description, `precondition failed: ${condition} (read by a metadata request after the put failed: ${describe(err)})`, err);
      }
      throw this.error('put', key, err, attempt);
    } finally {
      attempt.done();
    }
    if (generation === undefined || generation === null || String(generation) === '') {
      throw storeError('Invalid', 'put', key, this.description, 'the upload answered without the object\'s generation');
    }
    return String(generation);
  }

  /**
   * Whether a conditional put that failed without an answer could no longer succeed, read
   * by a metadata request: the key is there (create only) or holds another generation. The
   * caller then reads the key back to learn whether the object there is its own. Like
   * s3.ts conditionFails.
   */
  private conditionFails(key: string, options: PutOptions): Promise<boolean> {
    return conditionNoLongerHolds(this, key, options);
  }

  /** Size, generation and update time of the object (its metadata), or undefined when the key does not exist. */
  async head(key: string, options?: RequestOptions): Promise<ObjectInfo | undefined> {
    checkKey('head', key, this.description);
    const attempt = startAttempt(options?.signal, this.requestTimeoutMs);
    try {
      const [metadata] = await untilAborted(attempt, (await this.file(key)).getMetadata());
      return this.info(key, metadata);
    } catch (err) {
      if (await this.objectMissing('head', key, err, attempt)) return undefined;
      throw this.error('head', key, err, attempt);
    } finally {
      attempt.done();
    }
  }

  /** Every object under prefix in key order, by pages of up to 1000 objects. */
  async list(prefix: string, options?: ListOptions): Promise<ObjectInfo[]> {
    checkPrefix(prefix, this.description);
    const found: ObjectInfo[] = [];
    let pageToken: string | undefined;
    const where = `prefix ${JSON.stringify(prefix)}`;
    do {
      const attempt = startAttempt(options?.signal, this.requestTimeoutMs);
      try {
        const [files, next] = await untilAborted(
          attempt,
          (await this.storage()).bucket(this.bucket).getFiles({ prefix: this.prefix + prefix, autoPaginate: false, maxResults: LIST_PAGE, pageToken }),
        );
        this.bucketSeen = true;
        for (const file of files) {
          if (!file.name.startsWith(this.prefix)) continue;
          found.push(this.info(file.name.slice(this.prefix.length), file.metadata));
        }
        options?.onPage?.();
        pageToken = (next as { pageToken?: string } | null | undefined)?.pageToken || undefined;
      } catch (err) {
        throw this.error('list', where, err, attempt);
      } finally {
        attempt.done();
      }
    } while (pageToken !== undefined);
    // GCS lists in UTF-8 byte order already; sort so that the interface's order never depends on a server.
    return found.sort((a, b) => Buffer.compare(Buffer.from(a.key), Buffer.from(b.key)));
  }

  /** Deletes the object; a missing key is not an error. */
  async delete(key: string, options?: RequestOptions): Promise<void> {
    checkKey('delete', key, this.description);
    const attempt = startAttempt(options?.signal, this.requestTimeoutMs);
    try {
      await untilAborted(attempt, (await this.file(key)).delete());
    } catch (err) {
      if (await this.objectMissing('delete', key, err, attempt)) return;
      throw this.error('delete', key, err, attempt);
    } finally {
      attempt.done();
    }
  }

  /** The client keeps no sockets of its own to close; nothing is pending once every request settled. */
  async close(): Promise<void> {}

  private info(key: string, metadata: FileMetadata): ObjectInfo {
    const generation = metadata.generation;
    if (generation === undefined || generation === null) {
      throw storeError('Invalid', 'head', key, this.description, 'the object metadata has no generation');
    }
    return {
      key,
      size: Number(metadata.size ?? 0),
      etag: String(generation),
      lastModified: new Date(metadata.updated ?? 0),
    };
  }

  /** The ObjectStoreError for a failed request; callers first take out the answers that are not errors. */
  private error(op: string, key: string, err: unknown, attempt: Attempt): ObjectStoreError {
    if (err instanceof ObjectStoreError) return err;
    const what = classify(err);
    // Left over, a 404 is about the bucket (a listing of a bucket that is not there, or a "bucket" message).
    const code: ObjectStoreErrorCode = what === 'NotFound' ? 'NoSuchBucket' : what === 'RangeNotSatisfiable' ? 'Invalid' : what;
    let detail = attempt.signal.aborted ? `${abortError(attempt).message}: ${describe(err)}` : describe(err);
    if (code === 'NoSuchBucket') detail = `bucket ${this.bucket} does not exist: ${detail}`;
    else if (code === 'AccessDenied') detail = `access denied: ${detail}`;
    return storeError(code, op, key, this.description, detail, err);
  }
}
