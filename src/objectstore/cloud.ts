// What the gs:// and az:// backends share. One attempt of a request, bounded as s3:// bounds
// its sockets: it fails once the caller's signal aborts, when no answer comes within
// `[storage] request_timeout_s` of its start (a put's body sent included), or when a body
// being read stays silent that long.

import { collectBody } from './body.js';
import type { ObjectStoreError } from './types.js';

/** The signal one attempt runs under, and what keeps it alive. */
export interface Attempt {
  /** Aborts when the caller gives up or the attempt has waited the timeout for an answer or for body bytes. */
  readonly signal: AbortSignal;
  /** An answer or a chunk of a body arrived: the timeout starts again. */
  touch(): void;
  /** Why the signal aborted, for the error message: "timed out after N ms idle" or "aborted by the caller". */
  reason(): string;
  /** Stops the timer; call once the attempt settled. */
  done(): void;
}

export function startAttempt(caller: AbortSignal | undefined, idleTimeoutMs: number): Attempt {
  const controller = new AbortController();
  let timedOut = false;
  const expire = () => {
    timedOut = true;
    controller.abort();
  };
  let timer = setTimeout(expire, idleTimeoutMs);
  const onCaller = () => controller.abort();
  if (caller?.aborted) controller.abort();
  else caller?.addEventListener('abort', onCaller, { once: true });
  return {
    signal: controller.signal,
    touch() {
      if (controller.signal.aborted) return;
      clearTimeout(timer);
      timer = setTimeout(expire, idleTimeoutMs);
    },
    reason: () => (timedOut ? `no answer or progress within the request timeout of ${idleTimeoutMs} ms` : 'aborted by the caller'),
    done() {
      clearTimeout(timer);
      caller?.removeEventListener('abort', onCaller);
    },
  };
}

/** The error a request fails with once its attempt's signal aborted: named AbortError, so backends classify it 'Unavailable'. */
export function abortError(attempt: Attempt): Error {
  return Object.assign(new Error(`the request was stopped: ${attempt.reason()}`), { name: 'AbortError' });
}

/**
 * `promise`, or a rejection with abortError as soon as the attempt's signal aborts (for
 * requests without a body whose client cannot be stopped: the answer is ignored).
 */
export function untilAborted<T>(attempt: Attempt, promise: Promise<T>): Promise<T> {
  if (attempt.signal.aborted) {
    promise.catch(() => {});
    return Promise.reject(abortError(attempt));
  }
  return new Promise<T>((resolve, reject) => {
    const onAbort = () => reject(abortError(attempt));
    attempt.signal.addEventListener('abort', onAbort, { once: true });
    promise.then(
      (value) => {
        attempt.signal.removeEventListener('abort', onAbort);
        resolve(value);
      },
      (err: unknown) => {
        attempt.signal.removeEventListener('abort', onAbort);
        reject(err);
      },
    );
  });
}

/**
 * The bytes of a readable body, into one Buffer when `length` is known (no chunk list);
 * each chunk touches the attempt, and its abort destroys the stream. A body longer than
 * `length` is an error; a shorter one comes back short (the caller checks it).
 */
export async function readStream(body: NodeJS.ReadableStream & { destroy(err?: Error): void }, length: number | undefined, attempt: Attempt): Promise<Buffer> {
  const abort = () => body.destroy(abortError(attempt));
  if (attempt.signal.aborted) abort();
  attempt.signal.addEventListener('abort', abort, { once: true });
  try {
    return await collectBody(body, length, undefined, () => attempt.touch());
  } finally {
    attempt.signal.removeEventListener('abort', abort);
  }
}

/** Throws `invalid(...)` unless `endpoint` is an http(s) URL, plain http only when allowed.  */
export function checkEndpoint(endpoint: string, allowHttp: boolean, invalid: (why: string) => ObjectStoreError): void {
  let url: URL;
  try {
    url = new URL(endpoint);
  } catch {
    throw invalid(`endpoint ${JSON.stringify(endpoint)} is not a URL`);
  }
  if (url.protocol !== 'http:' && url.protocol !== 'https:') throw invalid(`endpoint ${endpoint} must be http:// or https://`);
  if (url.protocol === 'http:' && !allowHttp) {
    throw invalid(`endpoint ${endpoint} is plain http; set allowHttp to use it (credentials and data would cross the network unencrypted)`);
  }
}
