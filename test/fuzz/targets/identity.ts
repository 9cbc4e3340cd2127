// Fuzz target: store.json (store/identity.ts). Any bytes decode to a store identity or a
// StoreKeyError naming the store and store.json; a decoded one survives being written again.
import type { ObjectStore } from '../../../src/objectstore/types.js';
import { decodeIdentity, IDENTITY_KEY, StoreKeyError } from '../../../src/store/identity.js';
import { refusedOr, sameValue } from '../expect.js';

// decodeIdentity only reads the description (for its messages).
const STORE = { description: 'file:///fuzz-store' } as ObjectStore;

export function fuzz(data: Buffer): void {
  const identity = refusedOr(() => decodeIdentity(STORE, data), StoreKeyError, IDENTITY_KEY);
  if (identity === undefined) return;
  sameValue(IDENTITY_KEY, decodeIdentity(STORE, Buffer.from(JSON.stringify(identity, null, 2) + '\n')), identity);
}
