// A fault-injecting wrapper for tests (DESIGN.md: objectstore/), in TigerBeetle's manner:
// every request draws its fate from a PRNG seeded by `seed`, a fixed number of draws per
// request whatever happens, so the same seed and the same sequence of calls replay the
// same faults. The daemon takes a spec from UPDRAFT_STORE_FAULTS (parseFaultSpec).

import {
  ObjectStoreError, type GetOptions, type ListOptions, type ObjectInfo, type ObjectStore, type PutOptions, type RequestKind, type RequestOptions, type StoredObject,
} from './types.js';

export interface FaultOptions {
  /** Seeds the schedule; read once, when the wrapper is made. */
  seed: number;
  /** Probability that a request fails 'Unavailable' (a network error) before it reaches the store. */
  errorRate?: number;
  /**
   * Probability that a request gets no answer, as from a stopped server: it neither
   * reaches the store nor settles until its signal aborts (then it fails 'Unavailable').
   * Drawn from the same number as errorRate, so errorRate + hangRate must not exceed 1.
   */
  hangRate?: number;
  /** Probability that a request fails 'Unavailable' with a simulated 503, before it reaches the store. */
  serverErrorRate?: number;
  /** Delay added to every request, in ms. */
  latencyMs?: number;
  /** Up to this much more delay, uniformly drawn, in ms. */
  latencyJitterMs?: number;
  /** Probability that a get or getRange returns a body cut short (the caller must verify). */
  truncateRate?: number;
  /** Probability that a put is stored and then fails 'Unavailable', as if its response was lost. */
  lostPutRate?: number;
}

/** Faults injected so far, by kind. */
export interface InjectedFaults {
  error: number;
  hang: number;
  serverError: number;
  truncate: number;
  lostPut: number;
}

/** The store's fate for one request, drawn before it starts. */
interface Fate {
  n: number;
  delayMs: number;
  error: boolean;
  hang: boolean;
  serverError: boolean;
  truncate: boolean;
  /** Fraction of the body kept when truncated, in [0, 1). */
  keep: number;
  lostPut: boolean;
}

const RATE_KEYS = ['errorRate', 'hangRate', 'serverErrorRate', 'truncateRate', 'lostPutRate'] as const;
const DELAY_KEYS = ['latencyMs', 'latencyJitterMs'] as const;

/** mulberry32: small, fast, and good enough to schedule faults (and seeded test runs). */
export function prng(seed: number): () => number {
  let state = (seed % 2 ** 32) ^ Math.floor(seed / 2 ** 32);
  return () => {
    state = (state + 0x6d2b79f5) | 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Resolves true after ms, or false as soon as signal aborts (at once if it has). */
function sleep(ms: number, signal: AbortSignal | undefined): Promise<boolean> {
  if (signal?.aborted) return Promise.resolve(false);
  return new Promise((resolve) => {
    const aborted = () => {
      clearTimeout(timer);
      resolve(false);
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener('abort', aborted);
      resolve(true);
    }, ms);
    signal?.addEventListener('abort', aborted, { once: true });
  });
}

/** Throws 'Invalid' unless every rate is in [0, 1], every delay >= 0 and the seed a whole number. */
function checkFaultOptions(options: FaultOptions): void {
  const bad = (why: string) => new ObjectStoreError('Invalid', `fault options: ${why}`);
  if (!Number.isSafeInteger(options.seed) || options.seed < 0) throw bad(`seed must be a whole number >= 0, not ${options.seed}`);
  for (const key of RATE_KEYS) {
    const value = options[key];
    if (value !== undefined && !(value >= 0 && value <= 1)) throw bad(`${key} must be in [0, 1], not ${value}`);
  }
  if ((options.errorRate ?? 0) + (options.hangRate ?? 0) > 1) throw bad(`errorRate + hangRate must not exceed 1, not ${options.errorRate} + ${options.hangRate}`);
  for (const key of DELAY_KEYS) {
    const value = options[key];
    if (value !== undefined && !(value >= 0 && Number.isFinite(value))) throw bad(`${key} must be >= 0 ms, not ${value}`);
  }
}

/** A store whose requests fail, slow down and lose responses on a seeded schedule. */
export class FaultyObjectStore implements ObjectStore {
  readonly description: string;
  /** The live options: change a rate at any time (e.g. `options.errorRate = 0` to heal). */
  readonly options: FaultOptions;
  /** Requests so far; the nth request takes the nth fate of the schedule. */
  requests = 0;
  readonly injected: InjectedFaults = { error: 0, hang: 0, serverError: 0, truncate: 0, lostPut: 0 };
  private readonly random: () => number;

  constructor(
    private readonly inner: ObjectStore,
    options: FaultOptions,
  ) {
    checkFaultOptions(options);
    this.options = { ...options };
    this.random = prng(options.seed);
    this.description = inner.description;
  }

  /** inner.get, after the drawn delay or fault; the body may come back cut short. */
  async get(key: string, options?: GetOptions): Promise<StoredObject | undefined> {
    const fate = await this.begin('get', key, options?.signal);
    const object = await this.inner.get(key, options);
    if (!object || !fate.truncate || object.body.length === 0) return object;
    this.injected.truncate++;
    return { ...object, body: object.body.subarray(0, Math.floor(fate.keep * object.body.length)) };
  }

  /** inner.getRange, after the drawn delay or fault; the bytes may come back cut short. */
  async getRange(key: string, offset: number, length: number, options?: RequestOptions): Promise<Buffer | undefined> {
    const fate = await this.begin('get_range', key, options?.signal);
    const bytes = await this.inner.getRange(key, offset, length, options);
    if (!bytes || !fate.truncate || bytes.length === 0) return bytes;
    this.injected.truncate++;
    return bytes.subarray(0, Math.floor(fate.keep * bytes.length));
  }

  /** inner.put, after the drawn delay or fault; a "lost" put is stored, then reported as failed. */
  async put(key: string, body: Buffer, options?: PutOptions): Promise<string> {
    const fate = await this.begin('put', key, options?.signal);
    const etag = await this.inner.put(key, body, options);
    if (!fate.lostPut) return etag;
    this.injected.lostPut++;
    throw this.fault('put', key, fate, 'the put was stored but its response was lost');
  }

  /** inner.head, after the drawn delay or fault. */
  async head(key: string, options?: RequestOptions): Promise<ObjectInfo | undefined> {
    await this.begin('head', key, options?.signal);
    return this.inner.head(key, options);
  }

  /** inner.list, after the drawn delay or fault. */
  async list(prefix: string, options?: ListOptions): Promise<ObjectInfo[]> {
    await this.begin('list', `prefix ${JSON.stringify(prefix)}`, options?.signal);
    return this.inner.list(prefix, options);
  }

  /** inner.delete, after the drawn delay or fault. */
  async delete(key: string, options?: RequestOptions): Promise<void> {
    await this.begin('delete', key, options?.signal);
    return this.inner.delete(key, options);
  }

  /** Closes the inner store; no faults here. */
  close(): Promise<void> {
    return this.inner.close();
  }

  /**
   * Draws the request's fate (synchronously, so the schedule follows call order), waits its
   * delay, throws its error if any; a hung request waits for its signal.
   */
  private async begin(op: RequestKind, key: string, signal: AbortSignal | undefined): Promise<Fate> {
    const o = this.options;
    const n = ++this.requests;
    // Always six draws, whatever the rates, so changing one rate does not shift the others' schedule.
    const failure = this.random();
    const fate: Fate = {
      n,
      error: failure < (o.errorRate ?? 0),
      hang: failure >= (o.errorRate ?? 0) && failure < (o.errorRate ?? 0) + (o.hangRate ?? 0),
      serverError: this.random() < (o.serverErrorRate ?? 0),
      delayMs: (o.latencyMs ?? 0) + this.random() * (o.latencyJitterMs ?? 0),
      truncate: this.random() < (o.truncateRate ?? 0),
      keep: this.random(),
      lostPut: this.random() < (o.lostPutRate ?? 0),
    };
    if (fate.delayMs > 0 && !(await sleep(fate.delayMs, signal))) throw this.fault(op, key, fate, 'abandoned by the caller during the injected latency');
    if (fate.hang) {
      this.injected.hang++;
      // Unanswered until the caller gives up; without a signal, never.
      await new Promise<void>((resolve) => (signal?.aborted ? resolve() : signal?.addEventListener('abort', () => resolve(), { once: true })));
      throw this.fault(op, key, fate, 'no answer (injected hang), abandoned by the caller');
    }
    if (fate.error) {
      this.injected.error++;
      throw this.fault(op, key, fate, 'connection reset');
    }
    if (fate.serverError) {
      this.injected.serverError++;
      throw this.fault(op, key, fate, 'simulated 503 SlowDown');
    }
    return fate;
  }

  private fault(op: RequestKind, key: string, fate: Fate, what: string): ObjectStoreError {
    return new ObjectStoreError('Unavailable', `${op} ${key} on ${this.description}: ${what} (injected fault, request ${fate.n}, seed ${this.options.seed})`);
  }
}

/** Wraps store with seeded, deterministic faults. Stack it under withRetries and withMetering so retries and counts see them. */
export function withFaults(store: ObjectStore, options: FaultOptions): FaultyObjectStore {
  return new FaultyObjectStore(store, options);
}

const SPEC_KEYS: Record<string, keyof FaultOptions> = {
  seed: 'seed',
  error: 'errorRate',
  hang: 'hangRate',
  server_error: 'serverErrorRate',
  latency: 'latencyMs',
  jitter: 'latencyJitterMs',
  truncate: 'truncateRate',
  lost_put: 'lostPutRate',
};

/**
 * Parses `seed=7,error=0.1,hang=0.01,server_error=0.05,latency=20,jitter=5,truncate=0.02,lost_put=0.1`
 * (any subset, any order; seed defaults to 0). Throws 'Invalid' naming the bad item.
 */
export function parseFaultSpec(spec: string): FaultOptions {
  const options: FaultOptions = { seed: 0 };
  const seen = new Set<string>();
  const bad = (item: string, why: string) =>
    new ObjectStoreError('Invalid', `fault spec ${JSON.stringify(spec)}: item ${JSON.stringify(item)}: ${why} (items: ${Object.keys(SPEC_KEYS).join(', ')})`);
  for (const raw of spec.split(',')) {
    const item = raw.trim();
    if (item === '') continue;
    const eq = item.indexOf('=');
    if (eq < 0) throw bad(item, 'expected name=value');
    const name = item.slice(0, eq).trim();
    const text = item.slice(eq + 1).trim();
    const key = SPEC_KEYS[name];
    if (key === undefined) throw bad(item, `unknown name ${JSON.stringify(name)}`);
    if (seen.has(name)) throw bad(item, `${name} given twice`);
    seen.add(name);
    const value = text === '' ? NaN : Number(text);
    if (key === 'seed') {
      if (!Number.isSafeInteger(value) || value < 0) throw bad(item, 'seed must be a whole number >= 0');
    } else if (key === 'latencyMs' || key === 'latencyJitterMs') {
      if (!(value >= 0 && Number.isFinite(value))) throw bad(item, `${name} must be a number of ms >= 0`);
    } else if (!(value >= 0 && value <= 1)) {
      throw bad(item, `${name} must be a probability in [0, 1]`);
    }
    options[key] = value;
  }
  return options;
}
