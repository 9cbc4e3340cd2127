// Leases (DESIGN.md: Words, lease; Formats, `volumes/{name}/lease`): JSON saying which
// host may write a volume until when, with a generation number for fencing (Invariant 4).
// JSON because operators read it with `aws s3 cp … -`; small, so pretty-printed.
import * as z from 'zod';
import { FormatError } from './errors.js';
import { countField, fieldProblem, isoTimeField, volumeNameField } from './fields.js';
import { errorMessage } from '../log.js';

export interface Lease {
  format: 1;
  volume: string;
  /** Host id of the holder. */
  owner: string;
  /** Bumped by every new holder; a writer with an older generation is fenced. */
  generation: number;
  /** ISO time after which the lease is free unless renewed. */
  expires: string;
  /** ISO time the holder took the lease. */
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

/** Whether the lease still holds at `now` (ms since the epoch). */
export function leaseIsLive(l: Lease, now: number): boolean {
  return !l.released && Date.parse(l.expires) > now;
}
