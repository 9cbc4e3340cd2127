// Lease object (DESIGN.md: Formats, `volumes/{name}/lease`): which host may write a
// volume, its generation (bumped on every change of hands, for fencing) and expiry.
import * as z from 'zod';
import { FormatError } from './errors.js';

export interface Lease {
  format: 1;
  volume: string;
  /** Host id of the holder. */
  owner: string;
  generation: number;
  /** ISO time after which another host may take the lease. */
  expires: string;
  acquired: string;
  /** Given up by its holder: free at once. */
  released?: boolean;
}

const isoTime = z.string().refine((s) => !Number.isNaN(Date.parse(s)), 'not an ISO time');

const LeaseSchema = z.strictObject({
  format: z.literal(1),
  volume: z.string().min(1),
  owner: z.string().min(1),
  generation: z.number().int().min(1),
  expires: isoTime,
  acquired: isoTime,
  released: z.boolean().optional(),
});

export function encodeLease(lease: Lease): Buffer {
  return Buffer.from(JSON.stringify(lease) + '\n');
}

export function decodeLease(key: string, body: Buffer): Lease {
  let parsed: unknown;
  try {
    parsed = JSON.parse(body.toString('utf8'));
  } catch (err) {
    throw new FormatError(key, `lease ${key} is not JSON: ${(err as Error).message}`);
  }
  const result = LeaseSchema.safeParse(parsed);
  if (!result.success) {
    const problems = result.error.issues.map((i) => `${i.path.join('.') || '(object)'}: ${i.message}`).join('; ');
    throw new FormatError(key, `lease ${key} is not a valid lease: ${problems}`);
  }
  return result.data as Lease;
}

export function leaseIsLive(lease: Lease, now: number): boolean {
  return !lease.released && Date.parse(lease.expires) > now;
}
