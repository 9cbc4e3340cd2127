// Comparing a secret a client presented (the API's bearer token) with ours, in time that
// does not depend on where they differ or how long either is: both are hashed to fixed-
// length digests first, and the digests are compared with timingSafeEqual.
import { createHash, timingSafeEqual } from 'node:crypto';

function digest(secret: string): Buffer {
  return createHash('sha256').update(secret, 'utf8').digest();
}

/** A check of presented secrets against `expected`; the expected digest is computed once. */
export function secretMatcher(expected: string): (presented: string) => boolean {
  const want = digest(expected);
  return (presented) => timingSafeEqual(digest(presented), want);
}
