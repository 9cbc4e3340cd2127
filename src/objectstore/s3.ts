// The s3:// backend: one bucket, every key under an optional prefix, through the AWS SDK
// v3. The SDK makes one attempt per request (maxAttempts 1): retries belong to
// withRetries (retry.ts), so they are the same for every backend and can be tested with
// the fault wrapper. Works with AWS S3 and S3-compatible servers (MinIO) that support
// conditional writes (If-None-Match / If-Match on PutObject).

import { collectBody } from './body.js';
import http from 'node:http';
import https from 'node:https';
import { Readable } from 'node:stream';
import {
  DeleteObjectCommand,
  GetObjectCommand,
  HeadObjectCommand,
  ListObjectsV2Command,
  PutObjectCommand,
  S3Client,
  type GetObjectCommandOutput,
} from '@aws-sdk/client-s3';
import { NodeHttpHandler } from '@smithy/node-http-handler';
import { errorMessage, type Logger } from '../log.js';
import { checkKey, checkPrefix, checkPutOptions, checkRange, keyProblem, storeError } from './keys.js';
import { S3FastGet } from './s3-get.js';
import {
  conditionNoLongerHolds,
  ObjectStoreError, type GetOptions, type ListOptions, type ObjectInfo, type ObjectStore, type ObjectStoreErrorCode, type PutOptions, type RequestOptions, type StoredObject,
} from './types.js';

export interface S3Options {
  /** With secretAccessKey: static credentials. Without both: the SDK's default chain (env, profile, IMDS...). */
  accessKeyId?: string;
  secretAccessKey?: string;
  /** An S3-compatible server, e.g. `http://127.0.0.1:9000`; default AWS for the region. */
  endpoint?: string;
  /** Default: AWS_REGION, else AWS_DEFAULT_REGION, else us-east-1. */
  region?: string;
  /** Allow a plain http:// endpoint (test servers; never across a network you do not own). Default false. */
  allowHttp?: boolean;
  /** Address buckets as endpoint/bucket rather than bucket.endpoint. Default: true when an endpoint is given. */
  forcePathStyle?: boolean;
  /**
   * A request fails 'Unavailable' if no response comes this long after it starts (waiting
   * for a pooled socket included), or its socket is idle this long ([storage]
   * request_timeout_s). Default 10000.
   */
  requestTimeoutMs?: number;
  /** A request fails 'Unavailable' if its TCP (and TLS) connection is not up within this. Default 5000, at most requestTimeoutMs. */
  connectTimeoutMs?: number;
}

/** Most sockets open to the endpoint at once; further requests queue in the agent. */
export const S3_MAX_SOCKETS = 64;

/** S3 error names that mean "try again later" whatever their HTTP status (RequestTimeout is a 400). */
const RETRYABLE_NAMES = new Set([
  'SlowDown',
  'RequestTimeout',
  'RequestTimeoutException',
  'Throttling',
  'ThrottlingException',
  'TooManyRequestsException',
  'ServiceUnavailable',
  'InternalError',
  'OperationAborted',
  'TimeoutError',
  // The caller's signal aborted the request (the retry wrapper's deadline).
  'AbortError',
]);
const ACCESS_NAMES = new Set([
  'AccessDenied',
  'InvalidAccessKeyId',
  'SignatureDoesNotMatch',
  'ExpiredToken',
  'InvalidToken',
  'TokenRefreshRequired',
  'CredentialsProviderError',
]);

/** How an SDK error reads to us: a store error code, or the two answers that are not errors. */
type Classified = ObjectStoreErrorCode | 'NotFound' | 'RangeNotSatisfiable';

interface SdkError {
  name?: string;
  code?: string;
  message?: string;
  errors?: unknown[];
  $metadata?: { httpStatusCode?: number; requestId?: string };
}

function classify(err: unknown): Classified {
  const e = (err ?? {}) as SdkError;
  const name = e.name ?? '';
  const status = e.$metadata?.httpStatusCode;
  if (name === 'NoSuchBucket') return 'NoSuchBucket';
  // HEAD answers have no body, so a 404 there is 'NotFound' whether the key or the bucket is missing.
  if (name === 'NoSuchKey' || name === 'NotFound' || status === 404) return 'NotFound';
  if (name === 'PreconditionFailed' || status === 412) return 'PreconditionFailed';
  // S3 answers 409 when a conditional write races another write of the same key: it lost.
  if (name === 'ConditionalRequestConflict') return 'PreconditionFailed';
  if (name === 'InvalidRange' || status === 416) return 'RangeNotSatisfiable';
  if (ACCESS_NAMES.has(name) || status === 403) return 'AccessDenied';
  if (RETRYABLE_NAMES.has(name) || status === 429 || status === 409 || (status !== undefined && status >= 500)) return 'Unavailable';
  // No HTTP answer at all: refused, reset, timed out, DNS... the network may come back.
  if (status === undefined) return 'Unavailable';
  return 'Invalid';
}

/** The error's name, HTTP status and message, with the inner errors of an AggregateError (Node's happy-eyeballs connect). */
function describe(err: unknown): string {
  const e = (err ?? {}) as SdkError;
  const status = e.$metadata?.httpStatusCode;
  let text = errorMessage(err);
  if (Array.isArray(e.errors) && e.errors.length > 0) text = e.errors.map(errorMessage).join('; ');
  // A HEAD answer has no body, so the SDK can only say "Unknown"/"UnknownError".
  if (text === 'UnknownError') text = 'no error details (HEAD answers carry no body)';
  const label = [e.name && e.name !== 'Error' && e.name !== 'Unknown' ? e.name : undefined, e.code && e.code !== e.name ? e.code : undefined, status ? `HTTP ${status}` : undefined]
    .filter(Boolean)
    .join(' ');
  return label ? `${label}: ${text || '(no message)'}` : text;
}

/**
 * The bytes of a response body, read from the socket stream into one Buffer of
 * Content-Length bytes (`into`'s, or a new one: no chunk list, no second copy); without
 * a length, chunks and one concat. A body shorter than `length` comes back short (checkLength refuses it), one
 * longer is an error. The SDK's transformToByteArray collected chunks and concatenated
 * them in JavaScript: 1.1 s of CPU per GiB of cold reads.
 */
async function readBody(
  body: GetObjectCommandOutput['Body'],
  length: number | undefined,
  signal: AbortSignal | undefined,
  into?: (length: number) => Buffer,
): Promise<Buffer> {
  if (!body) return Buffer.alloc(0);
  if (body instanceof Readable && signal) {
    // The caller gave up mid-body: stop reading from the socket.
    const abort = () => body.destroy(Object.assign(new Error('the request was aborted while its body was read'), { name: 'AbortError' }));
    if (signal.aborted) abort();
    else {
      signal.addEventListener('abort', abort, { once: true });
      body.once('close', () => signal.removeEventListener('abort', abort));
    }
  }
  if (!(body instanceof Readable)) {
    const bytes = await body.transformToByteArray();
    return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  }
  if (length === undefined) return collectBody(body, undefined);
  const out = into?.(length);
  if (out !== undefined && out.length !== length) throw new Error(`a ${out.length}-byte buffer for a body of ${length} bytes`);
  return collectBody(body, length, out);
}

/** A store in an S3 bucket under a key prefix (`s3://bucket/prefix`). */
export class S3ObjectStore implements ObjectStore {
  readonly description: string;
  readonly bucket: string;
  /** Prepended to every key: '' or ends with '/'. */
  readonly prefix: string;
  private readonly client: S3Client;
  /** Whole-object GETs over plain http:// with static credentials (s3-get.ts); undefined otherwise. */
  private readonly fastGet: S3FastGet | undefined;

  constructor(bucket: string, prefix: string, options: S3Options = {}, log?: Logger) {
    const trimmed = prefix.replace(/^\/+|\/+$/g, '');
    this.bucket = bucket;
    this.prefix = trimmed === '' ? '' : `${trimmed}/`;
    this.description = `s3://${bucket}${trimmed === '' ? '' : `/${trimmed}`}`;
    const invalid = (why: string) => new ObjectStoreError('Invalid', `object store ${this.description}: ${why}`);
    if (!/^[A-Za-z0-9._-]{1,255}$/.test(bucket)) throw invalid(`bad bucket name ${JSON.stringify(bucket)}`);
    const prefixProblem = trimmed === '' ? undefined : keyProblem(trimmed);
    if (prefixProblem) throw invalid(`bad key prefix ${JSON.stringify(prefix)}: ${prefixProblem}`);

    if (options.endpoint !== undefined) {
      let url: URL;
      try {
        url = new URL(options.endpoint);
      } catch {
        throw invalid(`endpoint ${JSON.stringify(options.endpoint)} is not a URL`);
      }
      if (url.protocol === 'http:' && !options.allowHttp) {
        throw invalid(`endpoint ${options.endpoint} is plain http; set allowHttp to use it (credentials and data would cross the network unencrypted)`);
      }
      if (url.protocol !== 'http:' && url.protocol !== 'https:') throw invalid(`endpoint ${options.endpoint} must be http:// or https://`);
    }
    if ((options.accessKeyId === undefined) !== (options.secretAccessKey === undefined)) {
      throw invalid('accessKeyId and secretAccessKey must be given together (or neither, for the default credential chain)');
    }
    const requestTimeout = options.requestTimeoutMs ?? 10_000;
    const connectionTimeout = options.connectTimeoutMs ?? Math.min(5_000, requestTimeout);
    for (const [name, value] of [['requestTimeoutMs', requestTimeout], ['connectTimeoutMs', connectionTimeout]] as const) {
      if (!Number.isFinite(value) || value <= 0) throw invalid(`${name} must be a number of milliseconds > 0, not ${value}`);
    }

    const region = options.region ?? process.env.AWS_REGION ?? process.env.AWS_DEFAULT_REGION ?? 'us-east-1';
    const endpoint = options.endpoint === undefined ? undefined : new URL(options.endpoint);
    if (
      endpoint?.protocol === 'http:' && (endpoint.pathname === '/' || endpoint.pathname === '') && (options.forcePathStyle ?? true) &&
      options.accessKeyId !== undefined && options.secretAccessKey !== undefined
    ) {
      this.fastGet = new S3FastGet({
        host: endpoint.hostname.replace(/^\[|\]$/g, ''),
        port: endpoint.port === '' ? 80 : Number(endpoint.port),
        pathPrefix: `/${bucket}/`,
        region,
        accessKeyId: options.accessKeyId,
        secretAccessKey: options.secretAccessKey,
        requestTimeoutMs: requestTimeout,
        connectTimeoutMs: connectionTimeout,
        maxSockets: S3_MAX_SOCKETS,
      });
    }
    const agentOptions = { keepAlive: true, maxSockets: S3_MAX_SOCKETS };
    const handlerLog = log?.child('s3');
    this.client = new S3Client({
      region,
      endpoint: options.endpoint,
      forcePathStyle: options.forcePathStyle ?? options.endpoint !== undefined,
      credentials:
        options.accessKeyId !== undefined && options.secretAccessKey !== undefined
          ? { accessKeyId: options.accessKeyId, secretAccessKey: options.secretAccessKey }
          : undefined,
      maxAttempts: 1,
      // Packs and manifests carry their own BLAKE3 checks; the SDK's default CRC32 of
      // every body (computed in JavaScript) cost more CPU than the rest of an upload.
      requestChecksumCalculation: 'WHEN_REQUIRED',
      responseChecksumValidation: 'WHEN_REQUIRED',
      requestHandler: new NodeHttpHandler({
        connectionTimeout,
        requestTimeout,
        throwOnRequestTimeout: true,
        socketTimeout: requestTimeout,
        httpAgent: new http.Agent(agentOptions),
        httpsAgent: new https.Agent(agentOptions),
        logger: handlerLog
          ? {
              debug: (...content: unknown[]) => handlerLog.debug(content.map(String).join(' ')),
              info: (...content: unknown[]) => handlerLog.info(content.map(String).join(' ')),
              warn: (...content: unknown[]) => handlerLog.warn(content.map(String).join(' ')),
              error: (...content: unknown[]) => handlerLog.error(content.map(String).join(' ')),
            }
          : undefined,
      }),
    });
  }

  /** The whole object (GetObject), or undefined on 404 NoSuchKey; NoSuchBucket throws. */
  async get(key: string, options?: GetOptions): Promise<StoredObject | undefined> {
    checkKey('get', key, this.description);
    const signal = options?.signal;
    if (this.fastGet?.handles(this.prefix + key)) {
      let found;
      try {
        found = await this.fastGet.get(this.prefix + key, options?.into, signal);
      } catch (err) {
        // No answer, or a broken one: the network may come back (the caller's retries decide).
        throw storeError('Unavailable', 'get', key, this.description, describe(err), err);
      }
      if (found !== 'sdk') return { key, size: found.body.length, etag: found.etag, lastModified: found.lastModified, body: found.body };
    }
    try {
      const res = await this.client.send(new GetObjectCommand({ Bucket: this.bucket, Key: this.prefix + key }), { abortSignal: signal });
      const body = await readBody(res.Body, res.ContentLength, signal, options?.into);
      this.checkLength('get', key, body, res.ContentLength);
      return { key, size: body.length, etag: res.ETag ?? '', lastModified: res.LastModified ?? new Date(0), body };
    } catch (err) {
      if (classify(err) === 'NotFound') return undefined;
      throw this.error('get', key, err);
    }
  }

  /** Bytes [offset, offset + length) by a Range GET, clipped to the end (416 past the end reads as empty); undefined on 404. */
  async getRange(key: string, offset: number, length: number, options?: RequestOptions): Promise<Buffer | undefined> {
    checkKey('get_range', key, this.description);
    checkRange(key, offset, length, this.description);
    // "bytes=a-(a-1)" is not a range; an empty read only needs to know the key exists.
    if (length === 0) return (await this.head(key, options)) ? Buffer.alloc(0) : undefined;
    const signal = options?.signal;
    try {
      const res = await this.client.send(
        new GetObjectCommand({ Bucket: this.bucket, Key: this.prefix + key, Range: `bytes=${offset}-${offset + length - 1}` }),
        { abortSignal: signal },
      );
      const body = await readBody(res.Body, res.ContentLength, signal);
      this.checkLength('get_range', key, body, res.ContentLength);
      // A server that ignores Range sends the whole object with 200.
      if (res.$metadata.httpStatusCode === 200 && res.ContentRange === undefined) return body.subarray(offset, offset + length);
      return body;
    } catch (err) {
      const what = classify(err);
      if (what === 'NotFound') return undefined;
      if (what === 'RangeNotSatisfiable') return Buffer.alloc(0);
      throw this.error('get_range', key, err);
    }
  }

  /**
   * PutObject with If-None-Match / If-Match; returns the new ETag. S3's ETag is the MD5 of
   * the body (for a single-part put), so putting identical bytes again gives the same etag.
   */
  async put(key: string, body: Buffer, options?: PutOptions): Promise<string> {
    checkKey('put', key, this.description);
    checkPutOptions(key, options, this.description);
    if (!((body as unknown) instanceof Uint8Array)) throw storeError('Invalid', 'put', key, this.description, 'body must be a Buffer');
    const command = new PutObjectCommand({
      Bucket: this.bucket,
      Key: this.prefix + key,
      Body: body,
      ContentLength: body.length,
      IfNoneMatch: options?.ifNoneMatch,
      IfMatch: options?.ifMatch,
    });
    if (options?.selfVerifying) {
      // SigV4 signs a preset x-amz-content-sha256 instead of hashing the body: the SHA-256
      // of every pack PUT cost 1.1 s of CPU per GiB drained.
      command.middlewareStack.add(
        (next) => (args) => {
          (args.request as { headers: Record<string, string> }).headers['x-amz-content-sha256'] = 'UNSIGNED-PAYLOAD';
          return next(args);
        },
        { step: 'build', name: 'updraftUnsignedPayload' },
      );
    }
    const condition = options?.ifNoneMatch ? 'the key exists (If-None-Match: *)' : `If-Match ${options?.ifMatch} does not match the current object`;
    const signal = options?.signal;
    try {
      const res = await this.client.send(command, { abortSignal: signal });
      if (res.ETag) return res.ETag;
    } catch (err) {
      const what = classify(err);
      if (what === 'PreconditionFailed' || (what === 'NotFound' && options?.ifMatch !== undefined)) {
        throw storeError('PreconditionFailed', 'put', key, this.description, `precondition failed: ${condition}: ${describe(err)}`, err);
      }
      if (what === 'Unavailable' && (options?.ifNoneMatch !== undefined || options?.ifMatch !== undefined) && (await this.conditionFails(key, options))) {
        throw storeError('PreconditionFailed', 'put', key, this.description, `precondition failed: ${condition} (read by a HEAD after the put failed: ${describe(err)})`, err);
      }
      throw this.error('put', key, err);
    }
    // Some S3-compatible servers leave ETag out of the PutObject answer.
    const info = await this.head(key, { signal });
    if (!info) throw storeError('Unavailable', 'put', key, this.description, 'the put answered without an ETag and the key is gone');
    return info.etag;
  }

  /**
   * Whether a conditional put that failed without an answer could no longer succeed, by a
   * HEAD of the key. A server that refuses a large body's precondition answers 412 and
   * closes the connection while the body is still being sent: the client then sees a reset
   * (MinIO does this to a 3 MiB If-None-Match put now and then), not the 412. When the key
   * is there (If-None-Match) or holds another etag (If-Match), trying again can only fail
   * the same way, so the put fails 'PreconditionFailed' as a retried one would (the caller
   * reads the key back to learn whether the object there is its own). When the HEAD fails
   * too, the caller gave up, or the condition still holds, the put stays 'Unavailable'.
   */
  private conditionFails(key: string, options: PutOptions): Promise<boolean> {
    return conditionNoLongerHolds(this, key, options);
  }

  /** Size, ETag and Last-Modified (HeadObject), or undefined on 404 (the bucket's absence reads the same: HEAD has no error body). */
  async head(key: string, options?: RequestOptions): Promise<ObjectInfo | undefined> {
    checkKey('head', key, this.description);
    try {
      const res = await this.client.send(new HeadObjectCommand({ Bucket: this.bucket, Key: this.prefix + key }), { abortSignal: options?.signal });
      return { key, size: res.ContentLength ?? 0, etag: res.ETag ?? '', lastModified: res.LastModified ?? new Date(0) };
    } catch (err) {
      if (classify(err) === 'NotFound') return undefined;
      throw this.error('head', key, err);
    }
  }

  /** Every object under prefix in key order, by ListObjectsV2 pages of up to 1000 keys. */
  async list(prefix: string, options?: ListOptions): Promise<ObjectInfo[]> {
    checkPrefix(prefix, this.description);
    const found: ObjectInfo[] = [];
    let token: string | undefined;
    try {
      do {
        const res = await this.client.send(
          new ListObjectsV2Command({ Bucket: this.bucket, Prefix: this.prefix + prefix, ContinuationToken: token }),
          { abortSignal: options?.signal },
        );
        for (const item of res.Contents ?? []) {
          if (item.Key === undefined || !item.Key.startsWith(this.prefix)) continue;
          found.push({
            key: item.Key.slice(this.prefix.length),
            size: item.Size ?? 0,
            etag: item.ETag ?? '',
            lastModified: item.LastModified ?? new Date(0),
          });
        }
        options?.onPage?.();
        token = res.IsTruncated ? res.NextContinuationToken : undefined;
      } while (token !== undefined);
    } catch (err) {
      throw this.error('list', `prefix ${JSON.stringify(prefix)}`, err);
    }
    return found;
  }

  /** DeleteObject; S3 answers 204 for a missing key too. */
  async delete(key: string, options?: RequestOptions): Promise<void> {
    checkKey('delete', key, this.description);
    try {
      await this.client.send(new DeleteObjectCommand({ Bucket: this.bucket, Key: this.prefix + key }), { abortSignal: options?.signal });
    } catch (err) {
      if (classify(err) === 'NotFound') return;
      throw this.error('delete', key, err);
    }
  }

  /** Closes the pooled sockets. */
  async close(): Promise<void> {
    this.fastGet?.close();
    this.client.destroy();
  }

  /** A body shorter than Content-Length means the connection broke mid-body; never hand out a part. */
  private checkLength(op: string, key: string, body: Buffer, expected: number | undefined): void {
    if (expected !== undefined && body.length !== expected) {
      throw storeError('Unavailable', op, key, this.description, `truncated body: ${body.length} of ${expected} bytes`);
    }
  }

  /** The ObjectStoreError for a failed request. Callers first take out the answers that are not errors (a missing key, an empty range). */
  private error(op: string, key: string, err: unknown): ObjectStoreError {
    if (err instanceof ObjectStoreError) return err;
    const what = classify(err);
    // Left over, a 404 is about the bucket (or an endpoint path that is not S3).
    const code: ObjectStoreErrorCode = what === 'NotFound' ? 'NoSuchBucket' : what === 'RangeNotSatisfiable' ? 'Invalid' : what;
    let detail = describe(err);
    if (code === 'NoSuchBucket') detail = `bucket ${this.bucket} does not exist: ${detail}`;
    else if (code === 'AccessDenied') detail = `access denied: ${detail}`;
    return storeError(code, op, key, this.description, detail, err);
  }
}
