// Replicas (DESIGN.md: replica): a volume served read-only on a host that does not hold
// its lease follows the writer's manifests. Every `[volumes] replica_follow_interval_ms`
// (or the volume's own interval, set by the PUT that woke it) it HEADs the volume's
// manifest and, when the ETag moved, GETs it and serves the newer block map; blocks
// come lazily, through the cold-read path. The swap of block maps is
// one synchronous step on the event loop and a read takes every byte in the tick it is
// served, so a read never mixes two manifests; an older manifest is never taken, so a
// client never sees the volume go back. A replica of a durable volume also serves the
// entries its writer logged past that manifest (follow-log.ts), checked in the same round.
//
// Also here: which local copies are out of service. A host that lost the lease while it
// had writes no manifest carries (it was fenced, or it comes back after a failover) keeps
// them on its disk for an operator to fork (mode "local") or delete, and serves them to
// no new client: they are neither the volume's state in the store nor a state anyone
// will build on.
import type { StoreCipher } from '../crypto/cipher.js';
import type { Compression } from '../crypto/compress.js';
import { errorMessage, type Logger } from '../log.js';
import type { ObjectStore } from '../objectstore/types.js';
import { indexManifest, manifestBlockMap } from '../store/catalog.js';
import { decodeManifest, decodeManifestBody } from '../store/manifest-decode.js';
import { storedTables } from '../store/manifest-seal.js';
import { manifestKey } from '../store/manifest.js';
import type { PackIndex } from '../store/pack-index.js';
import { LOG_FOLLOW_MAX_BYTES, logForManifest, loggedSequence, readNewEntries, viewOf, writerLog, type WriterLog } from './follow-log.js';
import type { StoreLink } from './store-link.js';

/** How far a replica is behind the writer, as the API and metrics show it. */
export interface ReplicaLag {
  /** Sequence of the newest state of the volume this host has seen in the store: a manifest, or (durable volumes) a log entry. */
  latestSequence: number;
  /** Sequences between that state and the state served here (0 once caught up). */
  behindSequences: number;
  /** A durable volume: the writer's log served past the manifest (entries, bytes, the last entry's sequence). */
  log?: { entries: number; bytes: number; sequence: number };
  /** Seconds since this host last confirmed that it serves the newest state in the store. */
  lagSeconds: number;
  /** When the newest manifest seen was written, by the store's clock (its Last-Modified); absent until one was fetched. */
  latestWrittenAt?: string;
  /** Newer manifests taken since the volume was opened here. */
  manifestsApplied: number;
  /** Why the last check failed (the store did not answer, the manifest is gone); absent while checks succeed. */
  error?: string;
  /** How often it checks: the volume's own interval, else the host's. */
  intervalMs: number;
}

/** One replica's following state (one per volume served read-only here). */
interface Follow {
  polling: boolean;
  lastPollAt: number;
  /** When a check last found the newest manifest served here (performance.now()). */
  confirmedAt: number;
  latestSequence: number;
  latestWrittenAt?: Date;
  applied: number;
  error?: string;
  /** A durable volume: what it read of the log of its manifest's writer. */
  log?: WriterLog;
}

/** How often the followers look for replicas due a check; the interval itself is a setting (at least 100 ms). */
const FOLLOW_TICK_MS = 100;

/**
 * Whether the link's volume is a replica that follows the writer: read-only here with no
 * lease, not releasing, at a manifest it loaded (a checkpoint export has none) and with no
 * local change that no manifest carries (those stay, out of service: see outOfService).
 */
export function followsWriter(link: StoreLink): boolean {
  const { state, volume } = link;
  return state.readOnly && state.generation === 0 && state.releasing !== true && state.manifestEtag !== undefined &&
    volume.dirtyChunks === 0 && volume.sequence === state.manifestSequence;
}

/**
 * Why the volume is out of service on this host, or undefined: it lost the lease (or was
 * fenced) while it had writes that no manifest in the store carries. New NBD clients are
 * refused; the copy stays for a local fork or a delete.
 */
export function outOfService(link: StoreLink): string | undefined {
  const { state, volume } = link;
  if (state.lostLease === undefined || state.generation !== 0) return undefined;
  if (volume.dirtyChunks === 0 && volume.sequence === state.manifestSequence) return undefined;
  return `this host no longer holds the lease (${state.lostLease}) and its copy has writes no manifest in the store carries ` +
    `(local sequence ${volume.sequence}, last manifest here ${state.manifestSequence}); not served: fork it with mode "local" to inspect them, or delete it`;
}

/** The host's replicas following their writers: one timer, at most one check in flight and one entry per volume open here. */
export class ReplicaFollowers {
  private readonly follows = new Map<StoreLink, Follow>();
  private timer: NodeJS.Timeout | undefined;
  private stopped = false;

  constructor(
    private readonly options: { store: ObjectStore; cipher: StoreCipher; manifestCompression: Compression; packIndex: PackIndex; intervalMs: number },
    private readonly links: ReadonlyMap<string, StoreLink>,
    private readonly log: Logger,
  ) {}

  /**
   * Start checking, once some volume may follow: the host's interval is set, or a volume
   * has its own (the host calls this again when one gets it). Idempotent. No timer runs
   * on a host where nothing follows.
   */
  start(): void {
    if (this.timer !== undefined || this.stopped) return;
    const wanted = this.options.intervalMs > 0 || [...this.links.values()].some((link) => (link.state.replicaFollowIntervalMs ?? 0) > 0);
    if (!wanted) return;
    this.timer = setInterval(() => this.tick(), FOLLOW_TICK_MS);
    this.timer.unref();
  }

  /** How often the link's volume checks its manifest as a replica; 0 when it does not follow. */
  private intervalOf(link: StoreLink): number {
    return link.state.replicaFollowIntervalMs ?? this.options.intervalMs;
  }

  stop(): void {
    this.stopped = true;
    if (this.timer) clearInterval(this.timer);
  }

  /** The lag of a replica following its writer; undefined for a volume that is not one. */
  lagOf(link: StoreLink): ReplicaLag | undefined {
    const intervalMs = this.intervalOf(link);
    if (intervalMs <= 0 || !followsWriter(link)) return undefined;
    const follow = this.follows.get(link);
    const served = link.volume.servedSequence;
    const view = link.volume.servedLog;
    const log = view === undefined ? {} : { log: { entries: view.entries, bytes: view.bytes, sequence: view.sequence } };
    if (follow === undefined) return { latestSequence: served, behindSequences: 0, lagSeconds: 0, manifestsApplied: 0, intervalMs, ...log };
    const latest = Math.max(follow.latestSequence, loggedSequence(follow.log));
    return {
      intervalMs,
      ...log,
      latestSequence: Math.max(latest, served),
      behindSequences: Math.max(0, latest - served),
      lagSeconds: Math.max(0, performance.now() - follow.confirmedAt) / 1000,
      ...(follow.latestWrittenAt === undefined ? {} : { latestWrittenAt: follow.latestWrittenAt.toISOString() }),
      manifestsApplied: follow.applied,
      ...(follow.error === undefined ? {} : { error: follow.error }),
    };
  }

  private tick(): void {
    if (this.stopped) return;
    const now = performance.now();
    for (const [link, follow] of this.follows) {
      if (follow.polling) continue;
      if (this.links.get(link.name) !== link || !followsWriter(link) || this.intervalOf(link) <= 0) this.follows.delete(link);
    }
    for (const link of this.links.values()) {
      const intervalMs = this.intervalOf(link);
      if (intervalMs <= 0 || !followsWriter(link)) continue;
      let follow = this.follows.get(link);
      if (follow === undefined) {
        // It loaded the newest manifest it knew of when it was opened or last changed hands.
        follow = { polling: false, lastPollAt: -Infinity, confirmedAt: now, latestSequence: link.volume.sequence, applied: 0 };
        this.follows.set(link, follow);
      }
      if (follow.polling || now - follow.lastPollAt < intervalMs) continue;
      follow.polling = true;
      follow.lastPollAt = now;
      const checked = follow;
      this.check(link, checked, now)
        .then(
          () => {
            checked.error = undefined;
          },
          (err: unknown) => {
            // Logged when it starts or changes, not at every check.
            const message = errorMessage(err);
            if (checked.error !== message) this.log.warn('replica: the check of the manifest in the store failed; serving the state it has', { volume: link.name, error: message });
            checked.error = message;
          },
        )
        .finally(() => {
          checked.polling = false;
        });
    }
  }

  /** One check: the manifest, then (a durable volume) the writer's log past it. */
  private async check(link: StoreLink, follow: Follow, started: number): Promise<void> {
    await this.checkManifest(link, follow);
    if (link.state.flushMode === 'durable' && followsWriter(link)) await this.checkLog(link, follow);
    follow.confirmedAt = started;
  }

  /** HEAD the manifest; when its ETag moved, GET it and serve it if it is newer. */
  private async checkManifest(link: StoreLink, follow: Follow): Promise<void> {
    const { store, cipher } = this.options;
    const key = manifestKey(link.name);
    const info = await store.head(key);
    if (info === undefined) throw new Error(`volume ${link.name}: follow: the manifest ${key} is gone from the store`);
    if (info.etag === link.state.manifestEtag) return;
    const object = await store.get(key);
    if (object === undefined) throw new Error(`volume ${link.name}: follow: the manifest ${key} is gone from the store`);
    const decoded = decodeManifestBody(key, object.body, cipher);
    const { manifest, raw } = decoded;
    const sequence = manifest.meta.sequence;
    if (sequence < link.volume.sequence) {
      // Never back: a client that read the newer state must not see an older one (reported once, as a failed check).
      throw new Error(`volume ${link.name}: follow: the manifest ${key} (sequence ${sequence}) is older than the state served here (sequence ${link.volume.sequence}); the replica keeps serving its state`);
    }
    follow.latestSequence = Math.max(follow.latestSequence, sequence);
    follow.latestWrittenAt = object.lastModified;
    await link.serial(async () => {
      // Promoted, removed, closed or changed meanwhile: it is no replica to move on.
      if (this.stopped || this.links.get(link.name) !== link || !followsWriter(link)) return;
      const volume = link.volume;
      // The writer's log entries past this manifest, served with it.
      const log = logForManifest(follow.log, manifest.meta);
      if (sequence > volume.sequence) {
        await indexManifest(this.options.packIndex, manifest);
        const before = { etag: link.state.manifestEtag, sequence: link.state.manifestSequence };
        // The state names the manifest in the same step as the volume takes it: it is a replica throughout.
        link.state.manifestEtag = object.etag;
        link.state.manifestSequence = sequence;
        try {
          // The block map (and the log view) is swapped in one step (no await before it in followManifest); reads in flight keep the old one.
          const view = viewOf(log, sequence, Math.max(volume.size, manifest.meta.size), volume.blockSize);
          await volume.followManifest({ size: manifest.meta.size, sequence, map: manifestBlockMap(manifest) }, view);
        } catch (err) {
          // Refused before the swap: the volume still serves the manifest it had. Failed after
          // it: its disk still holds that one, which a reopen loads and follows on from.
          if (volume.sequence !== sequence || volume.failed !== undefined) Object.assign(link.state, { manifestEtag: before.etag, manifestSequence: before.sequence });
          throw err;
        }
        link.setBase(volume.cloneMap(), raw, object.etag, storedTables(decoded, this.options.manifestCompression));
        follow.applied++;
        this.log.debug('replica: serving a newer manifest', { volume: link.name, sequence, etag: object.etag });
      } else if (follow.log !== undefined || volume.servedLog !== undefined) {
        // The same sequence under another ETag: a new holder rewrote it under its generation, and its log is another.
        volume.setLogView(viewOf(log, volume.sequence, volume.size, volume.blockSize));
      }
      follow.log = log;
      // The same sequence under another ETag: a new holder rewrote it under its generation.
      link.state.manifestEtag = object.etag;
      // The writer's flush mode travels in its manifests: a promotion here keeps it.
      if (manifest.meta.flushMode !== undefined) link.state.flushMode = manifest.meta.flushMode;
      link.state.manifestSequence = volume.sequence;
      link.save();
    });
  }

  /**
   * A durable volume's replica: read the log objects its manifest's writer put since the
   * last check and serve this volume's entries past the manifest. They are served only if
   * the manifest did not move after the listing (follow-log.ts: then no entry between the
   * manifest and them is missing); when it moved, the next check takes the manifest first.
   */
  private async checkLog(link: StoreLink, follow: Follow): Promise<void> {
    const { store, cipher } = this.options;
    const key = manifestKey(link.name);
    let log = follow.log;
    const etag = link.state.manifestEtag;
    if (log === undefined) {
      // Opened at this manifest: which writer and generation wrote it.
      const object = await store.get(key);
      if (object === undefined || object.etag !== etag) return;
      const { meta } = decodeManifest(key, object.body, cipher);
      log = follow.log = writerLog(meta.host, meta.generation);
    }
    await readNewEntries(store, cipher, link.name, log, link.volume.sequence);
    // Something read past what is served, and the manifest has not moved since the listing.
    if (loggedSequence(log) > link.volume.servedSequence && (await store.head(key))?.etag === etag) {
      const taken = log;
      await link.serial(async () => {
        if (this.stopped || this.links.get(link.name) !== link || !followsWriter(link) || link.state.manifestEtag !== etag || follow.log !== taken) return;
        const volume = link.volume;
        const view = viewOf(taken, volume.sequence, volume.size, volume.blockSize);
        if (view !== undefined && view.sequence > (volume.servedLog?.sequence ?? -1)) {
          volume.setLogView(view);
          this.log.debug('replica: serving the writer\'s log past the manifest', { volume: link.name, sequence: view.sequence, entries: view.entries });
        }
      });
    }
    if (log.full) {
      throw new Error(`volume ${link.name}: follow: the writer's log past the manifest is over ${LOG_FOLLOW_MAX_BYTES} bytes; the replica serves what it holds until the writer's next manifest`);
    }
  }
}
