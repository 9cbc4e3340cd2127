// Fuzz target: leases (store/lease.ts). Any bytes decode to a Lease or a FormatError
// naming the key; a decoded lease encodes and decodes to itself.
import { FormatError } from '../../../src/store/errors.js';
import { decodeLease, encodeLease } from '../../../src/store/lease.js';
import { refusedOr, sameValue } from '../expect.js';

const KEY = 'volumes/disk/lease';

export function fuzz(data: Buffer): void {
  const lease = refusedOr(() => decodeLease(KEY, data), FormatError, KEY);
  if (lease === undefined) return;
  sameValue(`lease ${KEY}`, decodeLease(KEY, encodeLease(lease)), lease);
}
