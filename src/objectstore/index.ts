// Opening the object store named by the config's storage URL, and the start-up check that
// it answers. Host code imports the object store from here.

import { fileURLToPath } from 'node:url';
import type { Logger } from '../log.js';
import { FileObjectStore } from './file.js';
import { S3ObjectStore, type S3Options } from './s3.js';
import { GcsObjectStore, type GcsOptions } from './gcs.js';
import { AzureObjectStore, type AzureOptions } from './azure.js';
import { ObjectStoreError, type ObjectStore } from './types.js';

export * from './types.js';
export { FileObjectStore, type FileStoreOptions } from './file.js';
export { S3ObjectStore, S3_MAX_SOCKETS, type S3Options } from './s3.js';
export { GcsObjectStore, type GcsOptions } from './gcs.js';
export { AzureObjectStore, type AzureOptions } from './azure.js';
export { FaultyObjectStore, parseFaultSpec, withFaults, type FaultOptions, type InjectedFaults } from './faults.js';
export { RetryingObjectStore, withRetries, type RetryOptions } from './retry.js';
export { MeteredObjectStore, REQUEST_KINDS, withMetering, type StoreCounters } from './metered.js';
export { keyProblem, MAX_KEY_BYTES, MAX_SEGMENT_BYTES } from './keys.js';

/** The URL forms openObjectStore accepts, for error messages. */
export const STORE_URL_FORMS = ['file:///absolute/path', 's3://bucket', 's3://bucket/key/prefix', 'gs://bucket/key/prefix', 'az://container/key/prefix'] as const;

/** Credentials, endpoints and time limits of the gs:// and az:// backends ([gcs], [azure]). */
export interface CloudOptions {
  gcs?: GcsOptions;
  azure?: AzureOptions;
}

/** The object probeObjectStore reads (DESIGN.md: Formats; store/identity.ts); its absence is fine. */
export const PROBE_KEY = 'store.json';
/** store.json is a few hundred bytes; the probe reads at most this much of it. */
export const PROBE_MAX_BYTES = 64 * 1024;

/** The URL with any user:password@ replaced, for messages. */
function redact(url: string): string {
  return url.replace(/^([a-z][a-z0-9+.-]*:\/\/)[^/@]*@/i, '$1***@');
}

/**
 * The backend for `url`: `file:///abs/path` (a local folder), `s3://bucket[/prefix]` (with
 * `aws` for credentials, endpoint and timeouts), `gs://bucket[/prefix]` (with `cloud.gcs`)
 * or `az://container[/prefix]` (also `azure://`; with `cloud.azure`). Anything else throws
 * 'Invalid' naming the URL and the accepted forms. Opening makes no request; see
 * probeObjectStore.
 */
export function openObjectStore(url: string, aws: S3Options, log?: Logger, cloud: CloudOptions = {}): ObjectStore {
  const invalid = (why: string) =>
    new ObjectStoreError('Invalid', `object store URL ${JSON.stringify(redact(url))}: ${why}; use ${STORE_URL_FORMS.join(' or ')}`);
  if (/^file:/i.test(url)) {
    let root: string;
    try {
      root = fileURLToPath(url);
    } catch (err) {
      throw invalid(`not a local absolute path (${(err as Error).message})`);
    }
    return new FileObjectStore(root, { log: log?.child('file-store') });
  }
  if (/^s3:/i.test(url)) {
    const match = /^s3:\/\/([^/?#@]+)(?:\/([^?#]*))?$/i.exec(url);
    if (!match) throw invalid('expected s3://bucket or s3://bucket/prefix');
    return new S3ObjectStore(match[1], match[2] ?? '', aws, log);
  }
  if (/^gs:/i.test(url)) {
    const match = /^gs:\/\/([^/?#@]+)(?:\/([^?#]*))?$/i.exec(url);
    if (!match) throw invalid('expected gs://bucket or gs://bucket/prefix');
    return new GcsObjectStore(match[1], match[2] ?? '', cloud.gcs);
  }
  if (/^(az|azure):/i.test(url)) {
    const match = /^(?:az|azure):\/\/([^/?#@]+)(?:\/([^?#]*))?$/i.exec(url);
    if (!match) throw invalid('expected az://container or az://container/prefix');
    return new AzureObjectStore(match[1], match[2] ?? '', cloud.azure);
  }
  throw invalid('unsupported scheme');
}

/**
 * One cheap request at start-up (a range read of store.json, present or not) so that a
 * wrong endpoint, bucket or credentials fails at once with a clear message instead of at
 * the first drain. A range GET rather than a HEAD: S3 answers a HEAD without an error body,
 * so a missing bucket would read as a missing key. Returns the first PROBE_MAX_BYTES of
 * store.json, or undefined when the store has none.
 */
export async function probeObjectStore(store: ObjectStore): Promise<Buffer | undefined> {
  try {
    return await store.getRange(PROBE_KEY, 0, PROBE_MAX_BYTES);
  } catch (err) {
    if (!(err instanceof ObjectStoreError)) throw err;
    const where = `object store ${store.description}`;
    switch (err.code) {
      case 'Unavailable':
        throw new ObjectStoreError('Unavailable', `${where} is unreachable: ${err.message}`, { cause: err });
      case 'NoSuchBucket':
        throw new ObjectStoreError('NoSuchBucket', `${where}: ${missingWhat(store.description)} does not exist`, { cause: err });
      case 'AccessDenied':
        throw new ObjectStoreError('AccessDenied', `${where}: access denied (check the credentials and the bucket policy): ${err.message}`, {
          cause: err,
        });
      default:
        throw new ObjectStoreError(err.code, `${where}: ${err.message}`, { cause: err });
    }
  }
}

/** "bucket B", "container C" or "folder /path", from a store's description. */
function missingWhat(description: string): string {
  if (description.startsWith('s3://')) return `bucket ${description.slice('s3://'.length).split('/')[0]}`;
  if (description.startsWith('gs://')) return `bucket ${description.slice('gs://'.length).split('/')[0]}`;
  if (description.startsWith('az://')) return `container ${description.slice('az://'.length).split('/')[0]}`;
  if (description.startsWith('file://')) return `folder ${fileURLToPath(description)}`;
  return 'the bucket or folder';
}
