// A replica of a durable volume follows its writer's log as well as its manifests
// (DESIGN.md: replica; store/log.ts): the entries the writer logged after the served
// manifest are read from its log objects and served over the block map (volume/log-view.ts),
// so a FLUSH the writer acknowledged shows on the replica within one check, not at the
// next drain.
//
// Why the entries read make a whole state: a writer puts one log object at a time, so
// a listing that holds one of its objects holds every earlier one, but for objects a newer
// manifest covers (only those are ever deleted). The follower checks that the manifest did
// not move after its listing before it serves what it read; when it moved, the next check
// takes the newer manifest first, and keeps only the entries past it.
import type { StoreCipher } from '../crypto/cipher.js';
import { injected } from '../faults/injected.js';
import type { ObjectStore } from '../objectstore/types.js';
import { decodeLog, logPrefixOf, type LogEntry } from '../store/log.js';
import { LogView } from '../volume/log-view.js';

/** Entry data a replica keeps past its manifest before it waits for the writer's next manifest instead. */
export const LOG_FOLLOW_MAX_BYTES = 256 << 20;

/** What a replica read of one writer's log: the writer of the manifest it serves. */
export interface WriterLog {
  /** The host and lease generation that wrote the served manifest: only their entries are this volume's history. */
  readonly host: string;
  readonly generation: number;
  /** Log objects read (or found to hold nothing of this volume), as last listed. */
  seen: Set<string>;
  /** This volume's entries past the served manifest, ascending by sequence, data copied out of their objects. */
  entries: LogEntry[];
  /** Bytes of entry data held. */
  bytes: number;
  /** Set when LOG_FOLLOW_MAX_BYTES stopped the reading: the replica waits for a manifest. */
  full: boolean;
}

export function writerLog(host: string, generation: number): WriterLog {
  return { host, generation, seen: new Set(), entries: [], bytes: 0, full: false };
}

/**
 * The log to keep when the replica takes a manifest written by `host` at `generation`,
 * of `sequence`: the same writer's entries past it, or a new log for a new writer (whose
 * replay, before its first manifest, took whatever of the old writer's log it had to).
 */
export function logForManifest(log: WriterLog | undefined, meta: { host: string; generation: number; sequence: number }): WriterLog {
  if (log === undefined || log.host !== meta.host || log.generation !== meta.generation) return writerLog(meta.host, meta.generation);
  const entries = log.entries.filter((e) => e.sequence > meta.sequence);
  return { ...log, entries, bytes: dataBytes(entries), full: false };
}

function dataBytes(entries: readonly LogEntry[]): number {
  let n = 0;
  for (const e of entries) for (const x of e.extents) if (!x.zero) n += x.length;
  return n;
}

/**
 * Read the writer's log objects not read before and keep `volume`'s entries of the
 * writer's generation past `after`. A corrupt object fails the check (FormatError naming
 * it) and is read again at the next: the replica serves nothing past it meanwhile.
 */
export async function readNewEntries(store: ObjectStore, cipher: StoreCipher, volume: string, log: WriterLog, after: number): Promise<void> {
  const listed = await store.list(logPrefixOf(log.host));
  const now = new Set(listed.map((o) => o.key));
  for (const key of log.seen) if (!now.has(key)) log.seen.delete(key);
  try {
    for (const { key } of listed) {
      if (log.seen.has(key)) continue;
      if (log.bytes >= LOG_FOLLOW_MAX_BYTES) {
        log.full = true;
        break;
      }
      const object = await store.get(key);
      // Deleted since the listing: a newer manifest covers it, and the next check takes that.
      if (object === undefined) continue;
      for (const entry of decodeLog(key, object.body, cipher).entries) {
        if (entry.volume !== volume || entry.generation !== log.generation || entry.sequence <= after) continue;
        // Copied out: the object may carry other volumes' data, which the replica must not hold on to.
        const extents = entry.extents.map((x) => (x.zero ? x : { ...x, data: Buffer.from(x.data!) }));
        log.entries.push({ ...entry, extents });
        log.bytes += dataBytes([entry]);
      }
      log.seen.add(key);
    }
  } finally {
    // Entries read before a failure stay (their objects are not read again), in order.
    log.entries.sort((a, b) => a.sequence - b.sequence);
  }
}

/** The newest sequence the writer logged that the replica read (or -1). */
export function loggedSequence(log: WriterLog | undefined): number {
  return log === undefined || log.entries.length === 0 ? -1 : log.entries[log.entries.length - 1].sequence;
}

/**
 * The view of the entries past `sequence` on a volume of `size` bytes, or undefined when
 * there are none. It stops before an entry that grew the volume: a size is a manifest's
 * to bring.
 */
export function viewOf(log: WriterLog, sequence: number, size: number, blockSize: number): LogView | undefined {
  const taken: LogEntry[] = [];
  for (const entry of log.entries) {
    if (entry.sequence <= sequence) continue;
    if (entry.size > size) break;
    taken.push(entry);
  }
  if (injected.has('replica-log-gap')) taken.shift();
  return taken.length === 0 ? undefined : new LogView(taken, blockSize);
}
