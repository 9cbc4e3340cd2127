// The az:// backend: one Azure Blob Storage container, every key under an optional prefix,
// through Microsoft's Node.js client (@azure/storage-blob; @azure/identity for the default
// credential chain). The client's own retries are off: retries belong to withRetries
// (retry.ts), as for every backend.
//
// Objects are block blobs written by one Put Blob each, with `If-None-Match: *` (create
// only) or `If-Match: ETAG` (replace only that version); the blob's ETag is the etag, always
// in quotes (a listing gives it bare). lastModified is the blob's Last-Modified, which the
// store clock reads.
//
// Blob names: a `\` in a blob's URL reads as `/` (Azurite does so), and Azure's naming rules
// say no path segment may end with a dot (the service may drop it). So a key's `%`, `\`
// and a `.` that ends a segment are written `%25`, `%5C` and `%2E` in the blob name (and read
// back so), every other character as it is: any key every store accepts round-trips.
//
// The client libraries are loaded on the first request, so a daemon on another store never
// pays for loading them.

import type { BlobServiceClient, ContainerClient, StoragePipelineOptions } from '@azure/storage-blob';
import { errorMessage } from '../log.js';
import { abortError, checkEndpoint, readStream, startAttempt, untilAborted, type Attempt } from './cloud.js';
import { checkKey, checkPrefix, checkPutOptions, checkRange, keyProblem, storeError } from './keys.js';
import {
  conditionNoLongerHolds,
  ObjectStoreError, type ListOptions, type ObjectInfo, type ObjectStore, type ObjectStoreErrorCode, type PutOptions, type RequestOptions, type StoredObject,
} from './types.js';

export interface AzureOptions {
  /** The storage account. Needed unless a connection string names it. */
  accountName?: string;
  /** The account's shared key (base64). With accountName: shared key auth. */
  accountKey?: string;
  /** A connection string (it names the account, key or SAS, and endpoint); instead of accountName/accountKey. */
  connectionString?: string;
  /** The blob service URL, e.g. an emulator's `http://127.0.0.1:10000/devstoreaccount1`; default `https://ACCOUNT.blob.core.windows.net`. */
  endpoint?: string;
  /** Allow a plain http:// endpoint (emulators; never across a network you do not own). Default false. */
  allowHttp?: boolean;
  /** An attempt fails 'Unavailable' when nothing moves for this long ([storage] request_timeout_s). Default 10000. */
  requestTimeoutMs?: number;
}

/** Blobs per page of a listing (the service allows 5000; 1000 as S3 and GCS page, so one test pages all three). */
const LIST_PAGE = 1000;

type Classified = ObjectStoreErrorCode | 'NotFound' | 'RangeNotSatisfiable';

interface ClientError {
  name?: string;
  code?: string;
  statusCode?: number;
  message?: string;
  errors?: unknown[];
}

const ACCESS_CODES = new Set([
  'AuthenticationFailed',
  'AuthorizationFailure',
  'AuthorizationPermissionMismatch',
  'AuthorizationSourceIPMismatch',
  'AuthorizationProtocolMismatch',
  'AuthorizationResourceTypeMismatch',
  'InsufficientAccountPermissions',
  'AccountIsDisabled',
  // @azure/identity: the default credential chain found no credentials, or the token service refused them.
  'CredentialUnavailableError',
  'AuthenticationError',
  'AggregateAuthenticationError',
  'AuthenticationRequiredError',
]);

function classify(err: unknown): Classified {
  const e = (err ?? {}) as ClientError;
  const status = e.statusCode;
  const code = e.code ?? '';
  if (e.name === 'AbortError') return 'Unavailable';
  if (code === 'ContainerNotFound' || code === 'ResourceNotFound' || code === 'AccountNotFound') return 'NoSuchBucket';
  if (status === 404) return 'NotFound';
  if (status === 412 || code === 'ConditionNotMet' || code === 'BlobAlreadyExists' || code === 'TargetConditionNotMet') return 'PreconditionFailed';
  if (status === 416 || code === 'InvalidRange') return 'RangeNotSatisfiable';
  if (ACCESS_CODES.has(code) || ACCESS_CODES.has(e.name ?? '') || status === 401 || status === 403) return 'AccessDenied';
  if (status === 408 || status === 409 || status === 429 || (status !== undefined && status >= 500)) return 'Unavailable';
  // No HTTP answer: refused, reset, DNS.
  if (status === undefined) return 'Unavailable';
  return 'Invalid';
}

function describe(err: unknown): string {
  const e = (err ?? {}) as ClientError;
  // The answer to a HEAD (Get Blob Properties) has no body to explain it.
  let text = errorMessage(err).split('\n')[0] || 'no error details (the answer to a HEAD has no body)';
  // The default credential chain's failure holds why each credential it tried failed.
  if (Array.isArray(e.errors) && e.errors.length > 0) text += ` (${e.errors.map((inner) => errorMessage(inner).split('\n')[0]).join('; ')})`;
  const label = [e.code, e.statusCode ? `HTTP ${e.statusCode}` : undefined].filter(Boolean).join(' ');
  return label ? `${label}: ${text}` : text;
}

/** The blob name of a whole key under the store's prefix: `%`, `\` and a segment's last `.` escaped. */
function blobName(key: string): string {
  return key.replace(/[%\\]|\.(?=\/|$)/g, (c) => (c === '%' ? '%25' : c === '.' ? '%2E' : '%5C'));
}

/** The key of a blob name: the inverse of blobName. */
function keyOfBlob(name: string): string {
  return name.replace(/%25|%5C|%2E/g, (c) => (c === '%25' ? '%' : c === '%2E' ? '.' : '\\'));
}

/**
 * The blob name prefix to list for a key prefix: blobName of it, except that dots ending
 * its (maybe partial) last segment are left out, since a key may go on after them with
 * other characters; the listing is then filtered by the key prefix.
 */
function listPrefix(prefix: string): string {
  return blobName(prefix.replace(/\.+$/, ''));
}

/** An ETag in quotes, as the blob's answers give it; a listing gives it bare. */
function quoted(etag: string | undefined): string {
  if (etag === undefined || etag === '') return '';
  return etag.startsWith('"') ? etag : `"${etag}"`;
}

/** A store in an Azure Blob Storage container under a key prefix (`az://container/prefix`). */
export class AzureObjectStore implements ObjectStore {
  readonly description: string;
  readonly container: string;
  /** Prepended to every key: '' or ends with '/'. */
  readonly prefix: string;
  private readonly requestTimeoutMs: number;
  private client: Promise<ContainerClient> | undefined;
  private account = '';

  constructor(
    container: string,
    prefix: string,
    private readonly options: AzureOptions = {},
  ) {
    const trimmed = prefix.replace(/^\/+|\/+$/g, '');
    this.container = container;
    this.prefix = trimmed === '' ? '' : `${trimmed}/`;
    this.description = `az://${container}${trimmed === '' ? '' : `/${trimmed}`}`;
    const invalid = (why: string) => new ObjectStoreError('Invalid', `object store ${this.description}: ${why}`);
    if (!/^[a-z0-9](?!.*--)[a-z0-9-]{1,61}[a-z0-9]$/.test(container)) throw invalid(`bad container name ${JSON.stringify(container)}`);
    const prefixProblem = trimmed === '' ? undefined : keyProblem(trimmed);
    if (prefixProblem) throw invalid(`bad key prefix ${JSON.stringify(prefix)}: ${prefixProblem}`);
    if (options.endpoint !== undefined) checkEndpoint(options.endpoint, options.allowHttp ?? false, invalid);
    if (options.connectionString !== undefined) {
      if (options.accountKey !== undefined) throw invalid('give a connection string or an account key, not both');
      const endpoint = /(?:^|;)\s*BlobEndpoint=([^;]+)/i.exec(options.connectionString)?.[1];
      const protocol = /(?:^|;)\s*DefaultEndpointsProtocol=([^;]+)/i.exec(options.connectionString)?.[1];
      if (endpoint !== undefined) checkEndpoint(endpoint, options.allowHttp ?? false, invalid);
      else if (protocol?.toLowerCase() === 'http' && !options.allowHttp) throw invalid('the connection string says DefaultEndpointsProtocol=http; set allowHttp to use it');
    } else if (options.accountName === undefined && options.endpoint === undefined) {
      throw invalid('no account: give an account name (with a key, or for the default Azure credential chain), an endpoint, or a connection string');
    } else if (options.accountKey !== undefined && options.accountName === undefined) {
      throw invalid('an account key needs its account name');
    } else if (options.accountKey === undefined && options.endpoint !== undefined && new URL(options.endpoint).protocol === 'http:') {
      throw invalid(`the default Azure credential chain sends bearer tokens, which need an https:// endpoint, not ${options.endpoint}; give an account key or a connection string`);
    }
    this.account = options.accountName ?? '';
    this.requestTimeoutMs = options.requestTimeoutMs ?? 10_000;
    if (!Number.isFinite(this.requestTimeoutMs) || this.requestTimeoutMs <= 0) {
      throw invalid(`requestTimeoutMs must be a number of milliseconds > 0, not ${this.requestTimeoutMs}`);
    }
  }

  /** The container's client, made on first use. */
  private containerClient(): Promise<ContainerClient> {
    this.client ??= this.connect().catch((err: unknown) => {
      this.client = undefined;
      throw err;
    });
    return this.client;
  }

  private async connect(): Promise<ContainerClient> {
    const blob = await import('@azure/storage-blob');
    const pipeline: StoragePipelineOptions = { retryOptions: { maxTries: 1, tryTimeoutInMs: 24 * 3_600_000 } };
    const { accountName, accountKey, connectionString, endpoint } = this.options;
    let service: BlobServiceClient;
    if (connectionString !== undefined) {
      try {
        service = blob.BlobServiceClient.fromConnectionString(connectionString, pipeline);
      } catch (err) {
        // Never quote the string: it holds the key or the SAS.
        throw new ObjectStoreError('Invalid', `object store ${this.description}: the connection string cannot be used: ${errorMessage(err)}`, { cause: err });
      }
      this.account = service.accountName;
    } else {
      const url = endpoint?.replace(/\/+$/, '') ?? `https://${accountName}.blob.core.windows.net`;
      if (accountKey !== undefined) {
        service = new blob.BlobServiceClient(url, new blob.StorageSharedKeyCredential(accountName!, accountKey), pipeline);
      } else {
        const { DefaultAzureCredential } = await import('@azure/identity');
        service = new blob.BlobServiceClient(url, new DefaultAzureCredential(), pipeline);
      }
      this.account ||= service.accountName;
    }
    return service.getContainerClient(this.container);
  }

  /** The whole blob with its ETag, or undefined when the key does not exist. */
  async get(key: string, options?: RequestOptions): Promise<StoredObject | undefined> {
    checkKey('get', key, this.description);
    const read = await this.read('get', key, 0, undefined, options);
    if (read === undefined) return undefined;
    return { key, size: read.body.length, etag: read.etag, lastModified: read.lastModified, body: read.body };
  }

  /** Bytes [offset, offset + length) by a ranged download; 416 (past the end) reads as empty; undefined when the key does not exist. */
  async getRange(key: string, offset: number, length: number, options?: RequestOptions): Promise<Buffer | undefined> {
    checkKey('get_range', key, this.description);
    checkRange(key, offset, length, this.description);
    if (length === 0) return (await this.head(key, options)) ? Buffer.alloc(0) : undefined;
    return (await this.read('get_range', key, offset, length, options))?.body;
  }

  private async read(
    op: 'get' | 'get_range',
    key: string,
    offset: number,
    count: number | undefined,
    options: RequestOptions | undefined,
  ): Promise<{ body: Buffer; etag: string; lastModified: Date } | undefined> {
    const attempt = startAttempt(options?.signal, this.requestTimeoutMs);
    try {
      const blob = (await untilAborted(attempt, this.containerClient())).getBlobClient(blobName(this.prefix + key));
      const res = await blob.download(offset, count, { abortSignal: attempt.signal, maxRetryRequests: 0 });
      attempt.touch();
      const stream = res.readableStreamBody;
      const body = stream ? await readStream(stream as NodeJS.ReadableStream & { destroy(err?: Error): void }, res.contentLength, attempt) : Buffer.alloc(0);
      if (res.contentLength !== undefined && body.length !== res.contentLength) {
        throw storeError('Unavailable', op, key, this.description, `truncated body: ${body.length} of ${res.contentLength} bytes`);
      }
      return { body, etag: quoted(res.etag), lastModified: res.lastModified ?? new Date(0) };
    } catch (err) {
      const what = classify(err);
      if (what === 'NotFound') return undefined;
      if (what === 'RangeNotSatisfiable') return { body: Buffer.alloc(0), etag: '', lastModified: new Date(0) };
      throw this.error(op, key, err, attempt);
    } finally {
      attempt.done();
    }
  }

  /** Put Blob with If-None-Match: * or If-Match: ETAG; returns the new ETag. */
  async put(key: string, body: Buffer, options?: PutOptions): Promise<string> {
    checkKey('put', key, this.description);
    checkPutOptions(key, options, this.description);
    if (!((body as unknown) instanceof Uint8Array)) throw storeError('Invalid', 'put', key, this.description, 'body must be a Buffer');
    const conditional = options?.ifNoneMatch !== undefined || options?.ifMatch !== undefined;
    const condition = options?.ifNoneMatch ? 'the key exists (If-None-Match: *)' : `If-Match ${options?.ifMatch} does not match the current blob`;
    const attempt = startAttempt(options?.signal, this.requestTimeoutMs);
    try {
      const blob = (await untilAborted(attempt, this.containerClient())).getBlockBlobClient(blobName(this.prefix + key));
      const res = await blob.upload(body, body.length, {
        abortSignal: attempt.signal,
        conditions: options?.ifNoneMatch ? { ifNoneMatch: '*' } : options?.ifMatch !== undefined ? { ifMatch: quoted(options.ifMatch) } : undefined,
      });
      if (!res.etag) throw storeError('Invalid', 'put', key, this.description, 'the upload answered without an ETag');
      return quoted(res.etag);
    } catch (err) {
      const what = classify(err);
      if (what === 'PreconditionFailed' || (what === 'NotFound' && options?.ifMatch !== undefined)) {
        throw storeError('PreconditionFailed', 'put', key, this.description, `precondition failed: ${condition}: ${describe(err)}`, err);
      }
      if (what === 'Unavailable' && conditional && (await this.conditionFails(key, options!))) {
        throw storeError('PreconditionFailed', 'put', key, this.description, `precondition failed: ${condition} (read by Get Blob Properties after the put failed: ${describe(err)})`, err);
      }
      throw this.error('put', key, err, attempt);
    } finally {
      attempt.done();
    }
  }

  /** Like s3.ts conditionFails: a conditional put that got no answer, read back by the blob's properties. */
  private conditionFails(key: string, options: PutOptions): Promise<boolean> {
    return conditionNoLongerHolds(this, key, options);
  }

  /** Size, ETag and Last-Modified (Get Blob Properties), or undefined when the key does not exist. */
  async head(key: string, options?: RequestOptions): Promise<ObjectInfo | undefined> {
    checkKey('head', key, this.description);
    const attempt = startAttempt(options?.signal, this.requestTimeoutMs);
    try {
      const blob = (await untilAborted(attempt, this.containerClient())).getBlobClient(blobName(this.prefix + key));
      const res = await blob.getProperties({ abortSignal: attempt.signal });
      return { key, size: res.contentLength ?? 0, etag: quoted(res.etag), lastModified: res.lastModified ?? new Date(0) };
    } catch (err) {
      if (classify(err) === 'NotFound') return undefined;
      throw this.error('head', key, err, attempt);
    } finally {
      attempt.done();
    }
  }

  /** Every blob under prefix in key order, by List Blobs pages of up to 1000. */
  async list(prefix: string, options?: ListOptions): Promise<ObjectInfo[]> {
    checkPrefix(prefix, this.description);
    const where = `prefix ${JSON.stringify(prefix)}`;
    const found: ObjectInfo[] = [];
    let continuationToken: string | undefined;
    do {
      const attempt = startAttempt(options?.signal, this.requestTimeoutMs);
      try {
        const container = await untilAborted(attempt, this.containerClient());
        const page = await container
          .listBlobsFlat({ prefix: listPrefix(this.prefix + prefix), abortSignal: attempt.signal })
          .byPage({ continuationToken, maxPageSize: LIST_PAGE })
          .next();
        if (page.done) break;
        for (const item of page.value.segment.blobItems) {
          const name = keyOfBlob(item.name);
          if (!name.startsWith(this.prefix + prefix)) continue;
          found.push({
            key: name.slice(this.prefix.length),
            size: item.properties.contentLength ?? 0,
            etag: quoted(item.properties.etag),
            lastModified: item.properties.lastModified ?? new Date(0),
          });
        }
        options?.onPage?.();
        continuationToken = page.value.continuationToken || undefined;
      } catch (err) {
        throw this.error('list', where, err, attempt);
      } finally {
        attempt.done();
      }
    } while (continuationToken !== undefined);
    // Azure's order is by UTF-16 code unit; the interface's is by UTF-8 byte.
    return found.sort((a, b) => Buffer.compare(Buffer.from(a.key), Buffer.from(b.key)));
  }

  /** Delete Blob; a missing key is not an error. */
  async delete(key: string, options?: RequestOptions): Promise<void> {
    checkKey('delete', key, this.description);
    const attempt = startAttempt(options?.signal, this.requestTimeoutMs);
    try {
      await (await untilAborted(attempt, this.containerClient())).getBlobClient(blobName(this.prefix + key)).delete({ abortSignal: attempt.signal });
    } catch (err) {
      if (classify(err) === 'NotFound') return;
      throw this.error('delete', key, err, attempt);
    } finally {
      attempt.done();
    }
  }

  /** The client's pipeline holds no sockets to close once every request settled. */
  async close(): Promise<void> {}

  private error(op: string, key: string, err: unknown, attempt: Attempt): ObjectStoreError {
    if (err instanceof ObjectStoreError) return err;
    const what = classify(err);
    const code: ObjectStoreErrorCode = what === 'NotFound' ? 'NoSuchBucket' : what === 'RangeNotSatisfiable' ? 'Invalid' : what;
    let detail = attempt.signal.aborted ? `${abortError(attempt).message}: ${describe(err)}` : describe(err);
    const account = this.account ? ` in storage account ${this.account}` : '';
    if (code === 'NoSuchBucket') detail = `container ${this.container} does not exist${account}: ${detail}`;
    else if (code === 'AccessDenied') {
      const how = this.options.connectionString === undefined && this.options.accountKey === undefined ? ' (by the default Azure credential chain)' : '';
      detail = `access denied to container ${this.container}${account}${how}: ${detail}`;
    }
    return storeError(code, op, key, this.description, detail, err);
  }
}
