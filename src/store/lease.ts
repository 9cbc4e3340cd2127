// Leases (DESIGN.md: Words, lease; Formats, `volumes/{name}/lease`): JSON saying which
// host may write a volume until when, with a generation number for fencing (Invariant 4).
// JSON because operators read it with `aws s3 cp … -`; small, so pretty-printed.
import * as z from 'zod';
import { FormatError } from './errors.js';
import { countField, fieldProblem, isoTimeField, volumeNameField } from './fields.js';
import { errorMessage } from '../log.js';
import { STAMP_RESOLUTION_MS } from '../objectstore/clock.js';

export interface Lease {
  format: 1;
  volume: string;
  /** Host id of the holder. */
  owner: string;
  /** Bumped by every new holder; a writer with an older generation is fenced. */
  generation: number;
  /**
   * ISO time after which the lease is free unless renewed, by the holder's wall clock (for
   * people reading it). Decisions use only `expires - acquired`, the TTL, counted from the
   * object's Last-Modified in the store's clock (leaseIsLiveAt).
   */
  expires: string;
  /** ISO time the holder took or last renewed the lease, by its wall clock. */
  acquired: string;
  /** Set when the holder gave the lease up before it expired. */
  released?: boolean;
}

const LEASE_SCHEMA = z.object({
  format: z.literal(1),
  volume: volumeNameField,
  owner: z.string().min(1),
  generation: countField,
  expires: isoTimeField,
  acquired: isoTimeField,
  released: z.boolean().optional(),
});

/**
 * The lease `owner` writes for `volume` at `generation`, taken or renewed at `now` (its
 * wall clock) for `ttlMs`; `released` when it gives the lease up (expiring at once).
 */
export function leaseBody(volume: string, owner: string, generation: number, now: number, ttlMs: number, released = false): Lease {
  const at = new Date(now).toISOString();
  const lease: Lease = { format: 1, volume, owner, generation, expires: released ? at : new Date(now + ttlMs).toISOString(), acquired: at };
  if (released) lease.released = true;
  return lease;
}

export function encodeLease(l: Lease): Buffer {
  const parsed = LEASE_SCHEMA.safeParse(l);
  if (!parsed.success) throw new Error(`encodeLease ${l?.volume}: ${fieldProblem(parsed.error)}`);
  return Buffer.from(JSON.stringify(l, null, 2) + '\n');
}

/** Parse and validate a lease. Throws FormatError naming `key` and the bad field. */
export function decodeLease(key: string, body: Buffer): Lease {
  let value: unknown;
  try {
    value = JSON.parse(body.toString('utf8'));
  } catch (err) {
    throw new FormatError(key, `lease ${key}: not JSON: ${errorMessage(err)}`, { cause: err });
  }
  const parsed = LEASE_SCHEMA.safeParse(value);
  if (!parsed.success) throw new FormatError(key, `lease ${key}: ${fieldProblem(parsed.error)}`);
  const lease: Lease = parsed.data;
  // A lease copied to another volume's key must not grant that volume.
  const match = /^volumes\/(.+)\/lease$/.exec(key);
  if (match && match[1] !== lease.volume) {
    throw new FormatError(key, `lease ${key}: field volume: names volume ${JSON.stringify(lease.volume)}, not ${JSON.stringify(match[1])}`);
  }
  return lease;
}

/**
 * Whether a taker must still honour the lease when the store's clock reads at least
 * `storeEarliest` (objectstore/clock.ts): it lasts its TTL from when the store stamped it
 * (`lastModified`, truncated to the second, so up to a second later than it reads). No
 * host's wall clock enters: the holder wrote only the TTL. Its holder stops writing
 * `[host] clock_skew_margin_s` before its own (earlier) reckoning of this instant.
 */
export function leaseIsLiveAt(l: Lease, lastModified: Date, storeEarliest: number): boolean {
  if (l.released === true) return false;
  const ttl = Date.parse(l.expires) - Date.parse(l.acquired);
  return storeEarliest <= lastModified.getTime() + STAMP_RESOLUTION_MS + ttl;
}
