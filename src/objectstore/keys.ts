// Key rules shared by every backend, so that a key one store accepts every store accepts
// (a volume must be able to move from file:// to s3:// and back), and the wording of the
// errors every backend throws: the operation, the key, the store.

import { ObjectStoreError, type ObjectStoreErrorCode } from './types.js';

/** S3's limit on a whole key, in UTF-8 bytes. */
export const MAX_KEY_BYTES = 1024;
/** Limit on one `/`-separated segment, in UTF-8 bytes: a file name (255 bytes) less room for the file backend's temp and lock names. */
export const MAX_SEGMENT_BYTES = 200;
/** Segments starting with this are reserved: the file backend names its temp and lock files so. */
export const RESERVED_SEGMENT_PREFIX = '.~';

// C0 and C1 controls and DEL; also lone surrogates, which have no UTF-8 encoding.
const UNPRINTABLE = /[\u0000-\u001f\u007f-\u009f]|[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]/;

/** Why `key` is not a valid object key, or undefined when it is. */
export function keyProblem(key: string): string | undefined {
  if (typeof key !== 'string') return 'not a string';
  if (key === '') return 'empty';
  if (UNPRINTABLE.test(key)) return 'control character or unpaired surrogate';
  if (Buffer.byteLength(key) > MAX_KEY_BYTES) return `longer than ${MAX_KEY_BYTES} bytes`;
  if (key.startsWith('/')) return 'leading "/"';
  for (const segment of key.split('/')) {
    const problem = segmentProblem(segment);
    if (problem) return problem;
  }
  return undefined;
}

function segmentProblem(segment: string): string | undefined {
  if (segment === '') return 'empty segment (a "//" or a trailing "/")';
  if (segment === '.' || segment === '..') return `"${segment}" segment`;
  if (segment.startsWith(RESERVED_SEGMENT_PREFIX)) return `segment starts with "${RESERVED_SEGMENT_PREFIX}" (reserved)`;
  if (Buffer.byteLength(segment) > MAX_SEGMENT_BYTES) return `segment longer than ${MAX_SEGMENT_BYTES} bytes`;
  return undefined;
}

/** Why `prefix` cannot be a list prefix, or undefined. Like a key, but '' is allowed, and so are a trailing '/' and a partial last segment. */
export function prefixProblem(prefix: string): string | undefined {
  if (typeof prefix !== 'string') return 'not a string';
  if (prefix === '') return undefined;
  if (UNPRINTABLE.test(prefix)) return 'control character or unpaired surrogate';
  if (Buffer.byteLength(prefix) > MAX_KEY_BYTES) return `longer than ${MAX_KEY_BYTES} bytes`;
  if (prefix.startsWith('/')) return 'leading "/"';
  const segments = prefix.split('/');
  // Every segment but the last is whole; the last may be empty or the start of a segment.
  for (let i = 0; i < segments.length - 1; i++) {
    const problem = segmentProblem(segments[i]);
    if (problem) return problem;
  }
  return undefined;
}

/** Throws ObjectStoreError 'Invalid' naming the operation and the key unless `key` is valid. */
export function checkKey(op: string, key: string, store: string): void {
  const problem = keyProblem(key);
  if (problem) throw new ObjectStoreError('Invalid', `${op} ${JSON.stringify(key)} on ${store}: invalid key: ${problem}`);
}

/** Throws ObjectStoreError 'Invalid' unless `prefix` is a valid list prefix. */
export function checkPrefix(prefix: string, store: string): void {
  const problem = prefixProblem(prefix);
  if (problem) throw new ObjectStoreError('Invalid', `list prefix ${JSON.stringify(prefix)} on ${store}: invalid: ${problem}`);
}

/** Throws ObjectStoreError 'Invalid' unless offset and length are whole numbers >= 0. */
export function checkRange(key: string, offset: number, length: number, store: string): void {
  if (!Number.isSafeInteger(offset) || offset < 0 || !Number.isSafeInteger(length) || length < 0) {
    throw new ObjectStoreError('Invalid', `get_range ${key} on ${store}: offset ${offset} and length ${length} must be whole numbers >= 0`);
  }
}

/** Throws ObjectStoreError 'Invalid' unless the put options are one known condition at most. */
export function checkPutOptions(key: string, options: { ifNoneMatch?: string; ifMatch?: string } | undefined, store: string): void {
  if (!options) return;
  if (options.ifNoneMatch !== undefined && options.ifNoneMatch !== '*') {
    throw new ObjectStoreError('Invalid', `put ${key} on ${store}: ifNoneMatch must be "*", not ${JSON.stringify(options.ifNoneMatch)}`);
  }
  if (options.ifMatch !== undefined && (typeof options.ifMatch !== 'string' || options.ifMatch === '')) {
    throw new ObjectStoreError('Invalid', `put ${key} on ${store}: ifMatch must be a non-empty etag`);
  }
  if (options.ifNoneMatch !== undefined && options.ifMatch !== undefined) {
    throw new ObjectStoreError('Invalid', `put ${key} on ${store}: ifNoneMatch and ifMatch together can never both hold`);
  }
}

/** An ObjectStoreError whose message reads `OP KEY on STORE: DETAIL`. */
export function storeError(code: ObjectStoreErrorCode, op: string, key: string, store: string, detail: string, cause?: unknown): ObjectStoreError {
  return new ObjectStoreError(code, `${op} ${key} on ${store}: ${detail}`, cause === undefined ? undefined : { cause });
}
