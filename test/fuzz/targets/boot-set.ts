// Fuzz target: boot hot sets (store/boot-set.ts). The first byte picks the store: even a
// plaintext one, odd an encrypted one with a fixed test key (the seeds hold objects sealed
// with it). Any bytes decode to a JSON value or a FormatError naming the key; a decoded
// value encodes and decodes to itself.
import { PLAINTEXT, storeCipher } from '../../../src/crypto/cipher.js';
import { decodeBootSet, encodeBootSet } from '../../../src/store/boot-set.js';
import { FormatError } from '../../../src/store/errors.js';
import { refusedOr, sameValue } from '../expect.js';
import { FUZZ_DATA_KEY } from '../seeds.js';

const KEY = 'volumes/disk/bootset';
const SEALED = storeCipher(FUZZ_DATA_KEY);

export function fuzz(data: Buffer): void {
  if (data.length === 0) return;
  const cipher = data[0] & 1 ? SEALED : PLAINTEXT;
  const body = data.subarray(1);
  const set = refusedOr(() => decodeBootSet(KEY, body, cipher), FormatError, KEY);
  if (set === undefined) return;
  sameValue(`boot set ${KEY}`, decodeBootSet(KEY, encodeBootSet(KEY, set, cipher), cipher), set);
}
