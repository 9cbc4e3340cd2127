// The simulated object store: one in-memory bucket shared by every host, with S3's
// conditional writes (If-None-Match: *, If-Match: etag). Each host reaches it through
// its own view, whose requests take a seeded virtual latency and may fail before
// landing (Unavailable) or lose their reply after a put landed. A reply to a host that
// crashed meanwhile is never delivered.
import { decodeLease, type Lease } from '../../src/store/lease.js';
import { ObjectStoreError, type ObjectInfo, type ObjectStore, type PutOptions, type StoredObject } from '../../src/objectstore/types.js';

export interface StoreFaults {
  /** Probability that a request fails Unavailable before it reaches the bucket. */
  errorRate: number;
  /** Probability that a put lands and its reply is lost (the caller sees Unavailable). */
  lostReplyRate: number;
  /** Latency of a request, uniformly drawn up to this, in virtual ms. */
  maxLatencyMs: number;
}

interface Stored {
  body: Buffer;
  etag: string;
  lastModified: Date;
}

export class SimBucket {
  readonly objects = new Map<string, Stored>();
  private nextEtag = 1;
  /** Every put and delete that landed, in order: key, the host that made it, what. */
  readonly history: Array<{ key: string; host: string; op: 'put' | 'delete'; at: number; lease?: Lease; leaseModified?: Date }> = [];

  constructor(
    readonly random: () => number,
    public faults: StoreFaults,
  ) {}

  view(host: string): ObjectStore {
    return new SimStoreView(this, host);
  }

  land(key: string, body: Buffer, options: PutOptions | undefined, host: string): string {
    const current = this.objects.get(key);
    if (options?.ifNoneMatch === '*' && current !== undefined) throw new ObjectStoreError('PreconditionFailed', `put ${key}: exists (If-None-Match)`);
    if (options?.ifMatch !== undefined && current?.etag !== options.ifMatch) throw new ObjectStoreError('PreconditionFailed', `put ${key}: etag differs (If-Match)`);
    const etag = `"e${this.nextEtag++}"`;
    this.objects.set(key, { body: Buffer.from(body), etag, lastModified: new Date() });
    // The volume's lease when one of its manifests lands (invariant 4 is checked against it).
    const volume = /^volumes\/(.+)\/(manifest|checkpoints\/.*)$/.exec(key)?.[1];
    const lease = volume === undefined ? undefined : this.objects.get(`volumes/${volume}/lease`);
    this.history.push({ key, host, op: 'put', at: Date.now(), lease: lease === undefined ? undefined : decodeLease(`volumes/${volume}/lease`, lease.body), leaseModified: lease?.lastModified });
    this.onLand?.(key, body, host);
    return etag;
  }

  /** Called as a put lands, before its reply is sent (a crash there loses the reply). */
  onLand: ((key: string, body: Buffer, host: string) => void) | undefined;

  /** Who deleted a key last (for failure messages). */
  readonly deleted = new Map<string, string>();

  remove(key: string, host: string): void {
    if (this.objects.delete(key)) {
      this.history.push({ key, host, op: 'delete', at: Date.now() });
      this.deleted.set(key, `host ${host} at ${Date.now() - Date.UTC(2030, 0, 1)} ms`);
    }
  }
}

function info(key: string, o: Stored): ObjectInfo {
  return { key, size: o.body.length, etag: o.etag, lastModified: o.lastModified };
}

class SimStoreView implements ObjectStore {
  readonly description: string;

  constructor(
    private readonly bucket: SimBucket,
    private readonly host: string,
  ) {
    this.description = `sim://bucket (host ${host})`;
  }

  /** Run `op` after the request's latency unless it fails first; `lostReply`: it may land and still fail. */
  private request<T>(what: string, key: string, op: () => T, lostReply = false): Promise<T> {
    const { random, faults } = this.bucket;
    const delay = Math.floor(random() * (faults.maxLatencyMs + 1));
    const fail = random() < faults.errorRate;
    const lose = lostReply && random() < faults.lostReplyRate;
    return new Promise<T>((resolve, reject) => {
      setTimeout(() => {
        if (fail) return reject(new ObjectStoreError('Unavailable', `${what} ${key}: simulated network error`));
        try {
          const out = op();
          if (lose) reject(new ObjectStoreError('Unavailable', `${what} ${key}: simulated lost reply (the request landed)`));
          else resolve(out);
        } catch (err) {
          reject(err);
        }
      }, delay);
    });
  }

  get(key: string): Promise<StoredObject | undefined> {
    return this.request('get', key, () => {
      const o = this.bucket.objects.get(key);
      return o === undefined ? undefined : { ...info(key, o), body: Buffer.from(o.body) };
    });
  }

  getRange(key: string, offset: number, length: number): Promise<Buffer | undefined> {
    return this.request('get_range', key, () => {
      const o = this.bucket.objects.get(key);
      return o === undefined ? undefined : Buffer.from(o.body.subarray(offset, offset + length));
    });
  }

  put(key: string, body: Buffer, options?: PutOptions): Promise<string> {
    const copy = Buffer.from(body);
    return this.request('put', key, () => this.bucket.land(key, copy, options, this.host), true);
  }

  head(key: string): Promise<ObjectInfo | undefined> {
    return this.request('head', key, () => {
      const o = this.bucket.objects.get(key);
      return o === undefined ? undefined : info(key, o);
    });
  }

  list(prefix: string): Promise<ObjectInfo[]> {
    return this.request('list', prefix, () =>
      [...this.bucket.objects.entries()].filter(([k]) => k.startsWith(prefix)).sort(([a], [b]) => (a < b ? -1 : 1)).map(([k, o]) => info(k, o)),
    );
  }

  delete(key: string): Promise<void> {
    return this.request('delete', key, () => this.bucket.remove(key, this.host), true);
  }

  async close(): Promise<void> {}
}
