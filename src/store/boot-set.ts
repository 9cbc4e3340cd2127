// The stored form of a boot hot set (DESIGN.md: Formats; `volumes/{name}/bootset`, written
// by store/catalog.ts). In a plaintext store it is the JSON itself, as it always was. In an
// encrypted store the JSON is sealed (crypto/cipher.ts) behind a header:
//
//   offset  size  field
//   0       8     magic "UPDBOOT1"
//   8       2     version u16 = 1
//   10      1     cipher u8 (crypto/cipher.ts)
//   11      1     reserved, 0
//   12      ...   nonce(24) ‖ XChaCha20-Poly1305 of the JSON ‖ tag(16), AAD
//                 "updraft boot set\0" ‖ bytes 0..12 ‖ the object key
import { OpenError, sealLabel, type StoreCipher } from '../crypto/cipher.js';
import { errorMessage } from '../log.js';
import { FormatError } from './errors.js';
import { cipherMismatch } from './pack.js';

export const BOOT_SET_MAGIC = Buffer.from('UPDBOOT1');
const VERSION = 1;
const HEADER_BYTES = 12;

/** The object to store under `key` for the boot hot set `set` (any JSON value). */
export function encodeBootSet(key: string, set: unknown, cipher: StoreCipher): Buffer {
  const json = Buffer.from(JSON.stringify(set) + '\n');
  if (cipher.id === 0) return json;
  const out = Buffer.allocUnsafe(HEADER_BYTES + json.length + cipher.overhead);
  BOOT_SET_MAGIC.copy(out, 0);
  out.writeUInt16LE(VERSION, 8);
  out.writeUInt8(cipher.id, 10);
  out.writeUInt8(0, 11);
  cipher.sealInto(out.subarray(HEADER_BYTES), json, sealLabel('boot set', out.subarray(0, HEADER_BYTES), key));
  return out;
}

/** The JSON value of the boot hot set stored under `key`. Throws FormatError naming `key`. */
export function decodeBootSet(key: string, body: Buffer, cipher: StoreCipher): unknown {
  const fail = (what: string, cause?: unknown) => new FormatError(key, `boot set ${key}: ${what}`, cause === undefined ? undefined : { cause });
  const sealed = body.length >= HEADER_BYTES && body.subarray(0, 8).equals(BOOT_SET_MAGIC);
  let json: Buffer;
  if (!sealed) {
    if (cipher.id !== 0) throw fail(cipherMismatch(0, cipher));
    json = body;
  } else {
    const version = body.readUInt16LE(8);
    if (version !== VERSION) throw fail(`format version ${version}; this reader knows version ${VERSION}`);
    const stored = body.readUInt8(10);
    if (stored !== cipher.id) throw fail(cipherMismatch(stored, cipher));
    if (body.readUInt8(11) !== 0) throw fail('nonzero reserved byte');
    try {
      json = cipher.open(body.subarray(HEADER_BYTES), sealLabel('boot set', body.subarray(0, HEADER_BYTES), key));
    } catch (err) {
      if (!(err instanceof OpenError)) throw err;
      throw fail(`does not decrypt with this store's key: ${err.message}`, err);
    }
  }
  try {
    return JSON.parse(json.toString('utf8'));
  } catch (err) {
    throw fail(`is not JSON: ${errorMessage(err)}`, err);
  }
}
