// The log of the host's durable volumes (DESIGN.md: flush mode `durable`; format in
// store/log.ts). A client's FLUSH on a durable volume is acknowledged once the store holds
// every write acknowledged before it: the sectors changed since the volume's last logged
// point go up as a small log object, GROUP-COMMITTED: while one log PUT is in flight, the
// FLUSHes of every durable volume of the host wait together and the next PUT carries them all.
//
// Per volume: the changed sectors (volume/changes.ts) leave the pending set only when the
// PUT carrying them succeeded; a failed PUT's go into the next one. A commit captures the
// volume's sequence first and reads the data after (through the read path), so a record
// never holds data older than its sequence. A record is written only while this host holds
// the lease by its own reckoning, and the FLUSH is acknowledged only if that still holds once
// the PUT returned: a taker (which lists the log after taking the lease) then sees it.
// A volume whose changes since its manifest are not all tracked (just opened, just switched
// to durable, never leased, or more pending than a log object should carry) drains instead.
// A log object is deleted once manifests cover every entry in it; the GC sweep
// (sweepLogObjects) removes those whose writer went away.
import { VolumeError, type Volume } from '../volume/volume.js';
import { ChangedSectors } from '../volume/changes.js';
import type { Compression } from '../crypto/compress.js';
import type { StoreCipher } from '../crypto/cipher.js';
import { errorMessage, type Logger } from '../log.js';
import type { ObjectStore } from '../objectstore/types.js';
import { encodeLog, logKey, type LogEntry, type LogExtent } from '../store/log.js';

/** What the log needs of a volume's store link. */
export interface DurableLink {
  readonly name: string;
  readonly volume: Volume;
  /** Lease generation held here (0: none). */
  readonly generation: number;
  /** Sequence of the volume's last manifest this host wrote or loaded (-1: none). */
  readonly manifestSequence: number;
  /** Whether this host may write the volume's objects now: the lease is held, not past its deadline, no release under way. */
  mayLog(): boolean;
  /** Whether the manifest in the store is this host's own under the lease it holds (records go only on top of it). */
  readonly ownsManifest: boolean;
  /** Sequences up to this may be in records this host put (0: none). */
  readonly reservedSequence: number;
  /** Reserve sequences up to `sequence` before a record carries it (durable on return). */
  reserveSequence(sequence: number): void;
  /** Snapshot, upload, write the manifest (see StoreLink.drain). */
  drain(): Promise<{ sequence: number }>;
}

export interface DurableLogOptions {
  store: ObjectStore;
  hostId: string;
  compression: Compression;
  cipher: StoreCipher;
  /** A durable FLUSH fails (EIO) when the store has not taken its writes this long after it arrived. */
  flushTimeoutMs: number;
  log: Logger;
}

export const DEFAULT_DURABLE_FLUSH_TIMEOUT_MS = 30_000;
/** Pending bytes past which a volume's FLUSH drains rather than logs (a log object stays small). */
const MAX_LOGGED_BYTES_PER_VOLUME = 32 << 20;
/** Wait after a failed log PUT before the next (the FLUSHes waiting keep their own timeouts). */
const RETRY_MS = 250;
/** Latency histogram bounds (seconds) of a commit: a FLUSH's wait for its log PUT. */
export const COMMIT_BUCKETS = [0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30];

interface Waiter {
  sequence: number;
  resolve: () => void;
  reject: (err: Error) => void;
  timer: NodeJS.Timeout;
}

interface Tracked {
  link: DurableLink;
  changes: ChangedSectors;
  /** The store holds every write up to this sequence (a log record or a manifest). */
  logged: number;
  /** Writes since the manifest were not all tracked: the next FLUSH drains. */
  untracked: boolean;
  /** At most one per FLUSH a client has in flight (bounded by the NBD server's deferred requests). */
  waiters: Waiter[];
  /** A drain standing in for a log record is running. */
  draining: boolean;
  /** Bytes logged since the last manifest (what the background drain folds). */
  loggedBytes: number;
}

/** A log object this host wrote, and the entries in it no manifest covers yet. */
interface WrittenLog {
  key: string;
  /** volume → the highest sequence it carries of that volume. */
  entries: Map<string, number>;
}

export interface DurableLogStats {
  puts: number;
  failedPuts: number;
  bytes: number;
  flushes: number;
  /** FLUSHes acknowledged by each successful PUT, summed (flushes per PUT = this / puts). */
  flushesCommitted: number;
  deleted: number;
  /** Commit latency (a FLUSH's wait from its arrival to its acknowledgement): counts per COMMIT_BUCKETS, then the overflow. */
  latency: number[];
  latencySum: number;
}

export class DurableLog {
  private readonly volumes = new Map<string, Tracked>();
  /** The volumes with FLUSHes waiting: what a commit looks at (not every durable volume of the host). */
  private readonly waiting = new Set<Tracked>();
  /**
   * Log objects written by this host that manifests do not cover yet, oldest first: at most
   * the log PUTs since the volumes' last manifests (a durable volume is drained within
   * `continuous_manifest_interval_ms` or 64 MiB logged); a volume that leaves drops its entries.
   */
  private written: WrittenLog[] = [];
  private committing = false;
  private again = false;
  private retryTimer: NodeJS.Timeout | undefined;
  private counter = 0;
  private lastError = '';
  private closed = false;
  readonly stats: DurableLogStats = {
    puts: 0, failedPuts: 0, bytes: 0, flushes: 0, flushesCommitted: 0, deleted: 0, latency: new Array(COMMIT_BUCKETS.length + 1).fill(0), latencySum: 0,
  };

  constructor(private readonly options: DurableLogOptions) {}

  /**
   * `link`'s volume is durable from now on: its changes are tracked and its FLUSHes wait
   * for the store. Changes made before (since its manifest) make its first FLUSH drain.
   */
  attach(link: DurableLink, reset = false): void {
    const volume = link.volume;
    const before = this.volumes.get(link.name);
    if (!reset && before?.link === link && volume.changes === before.changes) return;
    // Records of sequences past the local state may be in the store (local writes lost in a
    // crash after they were logged): continue above them, so none is taken for a new write.
    if (link.generation > 0 && link.reservedSequence > volume.sequence) volume.sequence = link.reservedSequence;
    if (before !== undefined && before.link !== link) this.fail(before, 'the volume was opened again');
    const tracked: Tracked = {
      link, changes: new ChangedSectors(volume.blockSize), logged: link.manifestSequence,
      untracked: volume.sequence !== link.manifestSequence, waiters: before?.link === link ? before.waiters : [], draining: false, loggedBytes: 0,
    };
    this.volumes.set(link.name, tracked);
    if (before !== undefined) this.waiting.delete(before);
    if (tracked.waiters.length > 0) this.waiting.add(tracked);
    volume.changes = tracked.changes;
    volume.durableFlush = (sequence) => this.flush(tracked, sequence);
  }

  /** `link`'s volume is not durable any more (another mode, or it leaves the host): FLUSHes waiting fail. */
  detach(link: DurableLink, why: string): void {
    const tracked = this.volumes.get(link.name);
    if (tracked === undefined || tracked.link !== link) return;
    this.volumes.delete(link.name);
    link.volume.changes = undefined;
    link.volume.durableFlush = undefined;
    this.fail(tracked, why);
    // Its records no longer wait for a manifest here: reconciliation deletes what no replay needs.
    for (const log of this.written) log.entries.delete(link.name);
    this.written = this.written.filter((log) => log.entries.size > 0);
  }

  /** The last sequence the store holds of `name` (logged or in a manifest); undefined when not durable here. */
  loggedSequence(name: string): number | undefined {
    return this.volumes.get(name)?.logged;
  }

  /** Bytes logged for `name` since its last manifest (the background drain folds them). */
  loggedBytes(name: string): number {
    return this.volumes.get(name)?.loggedBytes ?? 0;
  }

  /** Log objects this host wrote that no manifest covers yet. */
  get liveObjects(): number {
    return this.written.length;
  }

  private flush(tracked: Tracked, sequence: number): Promise<void> {
    this.stats.flushes++;
    if (sequence <= tracked.logged) return Promise.resolve();
    const started = performance.now();
    return new Promise<void>((resolve, reject) => {
      const timeoutMs = this.options.flushTimeoutMs;
      const waiter: Waiter = {
        sequence,
        resolve: () => {
          clearTimeout(waiter.timer);
          this.observe((performance.now() - started) / 1000);
          resolve();
        },
        reject: (err) => {
          clearTimeout(waiter.timer);
          reject(err);
        },
        timer: setTimeout(() => {
          const i = tracked.waiters.indexOf(waiter);
          if (i >= 0) tracked.waiters.splice(i, 1);
          if (tracked.waiters.length === 0) this.waiting.delete(tracked);
          reject(new VolumeError('EIO', `volume ${tracked.link.name}: durable flush: the store did not take the log within ${timeoutMs} ms` +
            (this.lastError === '' ? '' : `: ${this.lastError}`) + '; the writes stay on this host'));
        }, timeoutMs),
      };
      tracked.waiters.push(waiter);
      this.waiting.add(tracked);
      this.kick();
    });
  }

  private observe(seconds: number): void {
    let i = 0;
    while (i < COMMIT_BUCKETS.length && seconds > COMMIT_BUCKETS[i]) i++;
    this.stats.latency[i]++;
    this.stats.latencySum += seconds;
  }

  /** Start a commit now, or right after the one in flight. */
  private kick(): void {
    if (this.closed) return;
    if (this.committing || this.retryTimer !== undefined) {
      this.again = true;
      return;
    }
    this.committing = true;
    this.again = false;
    void this.commit().then((ok) => {
      this.committing = false;
      if (!ok && this.waiting.size > 0) {
        this.retryLater();
        return;
      }
      // FLUSHes that came during this commit; a drain standing in for one kicks when it ends.
      if (this.again) this.kick();
    });
  }

  /** One group commit: a log object with every waiting volume's changes. False when its PUT failed. */
  private async commit(): Promise<boolean> {
    const carried: Array<{ tracked: Tracked; taken: ChangedSectors; entry: LogEntry }> = [];
    let waitingForLease = false;
    for (const tracked of [...this.waiting]) {
      if (tracked.draining) continue;
      const { link } = tracked;
      if (!link.mayLog()) {
        // Never leased here yet: the drain takes the lease and writes the first manifest.
        if (link.generation === 0 && !link.volume.readOnly) this.drainFor(tracked);
        // Read-only here with no write of this host pending (its content came from the store): nothing to put.
        else if (link.generation === 0 && tracked.changes.size === 0 && !tracked.untracked) this.settle(tracked, link.volume.sequence);
        // Held, but past this host's own deadline (a restart, a renewal late): wait for the renewal, within the FLUSH's timeout.
        else if (link.generation > 0) waitingForLease = true;
        else this.fail(tracked, 'this host does not hold the lease; the writes stay on this host');
        continue;
      }
      if (tracked.untracked || !link.ownsManifest || tracked.changes.bytes > MAX_LOGGED_BYTES_PER_VOLUME) {
        this.drainFor(tracked);
        continue;
      }
      try {
        // The sequence first, then the data: the record holds every write up to it.
        const sequence = link.volume.sequence;
        link.reserveSequence(sequence);
        const taken = tracked.changes.take();
        let entry: LogEntry;
        try {
          entry = await this.entryOf(link, sequence, taken);
        } catch (err) {
          tracked.changes.merge(taken);
          throw err;
        }
        carried.push({ tracked, taken, entry });
      } catch (err) {
        this.fail(tracked, `reading the changed sectors failed: ${errorMessage(err)}`);
      }
    }
    if (carried.length === 0) return !waitingForLease;
    const key = logKey(this.options.hostId, Date.now(), this.counter++);
    let body: Buffer;
    try {
      body = encodeLog(key, { host: this.options.hostId, created: Date.now(), entries: carried.map((c) => c.entry) }, this.options.compression, this.options.cipher);
      await this.options.store.put(key, body);
    } catch (err) {
      this.stats.failedPuts++;
      this.lastError = `put ${key}: ${errorMessage(err)}`;
      this.options.log.warn('durable log put failed; its changes go into the next one', { key, volumes: carried.length, error: errorMessage(err) });
      for (const { tracked, taken } of carried) tracked.changes.merge(taken);
      return false;
    }
    this.lastError = '';
    this.stats.puts++;
    this.stats.bytes += body.length;
    this.written.push({ key, entries: new Map(carried.map((c) => [c.entry.volume, c.entry.sequence])) });
    for (const { tracked, entry } of carried) {
      // Acknowledged only while the lease still holds by this host's reckoning after the PUT:
      // a taker lists the log after it took the lease, so it sees this record.
      if (!tracked.link.mayLog()) {
        this.fail(tracked, 'the lease ran out while the log was written; the writes stay on this host');
        continue;
      }
      tracked.loggedBytes += entry.extents.reduce((n, x) => n + (x.zero ? 0 : x.length), 0);
      this.settle(tracked, entry.sequence);
    }
    return !waitingForLease;
  }

  /** The log entry of `link`'s volume at `sequence`: the data of the `taken` sectors, read now. */
  private async entryOf(link: DurableLink, sequence: number, taken: ChangedSectors): Promise<LogEntry> {
    const volume = link.volume;
    const size = volume.size;
    const extents: LogExtent[] = [];
    for (const { offset, length } of taken.extents(size)) {
      const fetching = volume.readReady(offset, length);
      if (fetching !== undefined) await fetching;
      const data = Buffer.allocUnsafe(length);
      volume.read(offset, length, data, 0);
      const zero = data.every((b) => b === 0);
      extents.push(zero ? { offset, length, zero } : { offset, length, zero, data });
    }
    return { volume: link.name, generation: link.generation, manifestSequence: link.manifestSequence, sequence, size, extents };
  }

  /** A drain stands in for the log record: the manifest then holds every write up to its sequence. */
  private drainFor(tracked: Tracked): void {
    tracked.draining = true;
    tracked.untracked = false;
    tracked.link.drain().then(
      (drained) => {
        tracked.draining = false;
        tracked.loggedBytes = 0;
        this.settle(tracked, drained.sequence);
        this.kick();
      },
      (err: unknown) => {
        tracked.draining = false;
        tracked.untracked = true;
        this.lastError = `drain: ${errorMessage(err)}`;
        // A failed volume drains no more until it is reopened: its FLUSHes fail now, not at their timeout.
        if ((!tracked.link.mayLog() && tracked.link.generation > 0) || tracked.link.volume.failed !== undefined) {
          this.fail(tracked, `drain failed: ${errorMessage(err)}`);
          return;
        }
        this.options.log.warn('durable flush: drain failed; retrying until the FLUSH times out', { volume: tracked.link.name, error: errorMessage(err) });
        this.retryLater();
      },
    );
  }

  /**
   * Commit again after RETRY_MS: one timer at a time, however many drains and commits
   * failed meanwhile (a timer each would multiply with every kick they start).
   */
  private retryLater(): void {
    if (this.closed || this.retryTimer !== undefined) return;
    this.retryTimer = setTimeout(() => {
      this.retryTimer = undefined;
      this.kick();
    }, RETRY_MS);
    this.retryTimer.unref?.();
  }

  /** The store holds every write of the volume up to `sequence`: the FLUSHes up to it are acknowledged. */
  private settle(tracked: Tracked, sequence: number): void {
    if (sequence > tracked.logged) tracked.logged = sequence;
    const done = tracked.waiters.filter((w) => w.sequence <= tracked.logged);
    if (done.length === 0) return;
    tracked.waiters = tracked.waiters.filter((w) => w.sequence > tracked.logged);
    if (tracked.waiters.length === 0) this.waiting.delete(tracked);
    this.stats.flushesCommitted += done.length;
    for (const w of done) w.resolve();
  }

  private fail(tracked: Tracked, why: string): void {
    const waiters = tracked.waiters;
    tracked.waiters = [];
    this.waiting.delete(tracked);
    for (const w of waiters) w.reject(new VolumeError('EIO', `volume ${tracked.link.name}: durable flush: ${why}`));
  }

  /**
   * A manifest of `name` at `sequence` is in the store (a drain): its log entries up to it
   * are covered; log objects with nothing left uncovered are deleted.
   */
  manifestWritten(name: string, sequence: number): void {
    const tracked = this.volumes.get(name);
    if (tracked !== undefined) {
      tracked.loggedBytes = 0;
      if (sequence > tracked.logged) this.settle(tracked, sequence);
    }
    const covered: string[] = [];
    this.written = this.written.filter((log) => {
      const logged = log.entries.get(name);
      if (logged !== undefined && logged <= sequence) log.entries.delete(name);
      if (log.entries.size > 0) return true;
      covered.push(log.key);
      return false;
    });
    for (const key of covered) {
      this.options.store.delete(key).then(
        () => this.stats.deleted++,
        (err: unknown) => this.options.log.warn('cannot delete a log object a manifest covers; the GC sweep will', { key, error: errorMessage(err) }),
      );
    }
  }

  /** Stop: FLUSHes waiting fail. */
  close(): void {
    this.closed = true;
    if (this.retryTimer !== undefined) clearTimeout(this.retryTimer);
    for (const tracked of this.volumes.values()) this.fail(tracked, 'the host is closing');
  }
}
