// The data key wrapped by a password (DESIGN.md: Formats, store.json): Argon2id (libsodium
// crypto_pwhash) turns the password and a random salt into a key-encryption key, which
// seals the data key with XChaCha20-Poly1305. Only the salt, the Argon2id parameters and
// the wrapped key are ever stored. A wrong password gives another key-encryption key, and
// the wrapped key then fails to open: that is how a wrong password is recognised.
import sodium from 'sodium-native';
import { DATA_KEY_BYTES, NONCE_BYTES, OpenError, SEAL_OVERHEAD } from './cipher.js';

export const KDF_ALG = 'argon2id13';
export const SALT_BYTES = 16;
export const WRAPPED_KEY_BYTES = DATA_KEY_BYTES + SEAL_OVERHEAD;

/** Argon2id parameters of a wrapped key, as stored. */
export interface KdfParams {
  alg: typeof KDF_ALG;
  /** Passes over memory (libsodium's opslimit). */
  opslimit: number;
  /** Bytes of memory. */
  memlimit: number;
  salt: Buffer;
}

/**
 * Parameters for a new wrap: 3 passes over 64 MiB, paid once per daemon start and per
 * offline command (its time: docs/benchmarks.md). libsodium's "moderate" is 3 × 256 MiB;
 * 64 MiB keeps a small host's start-up memory in bounds and is above OWASP's 19-46 MiB advice.
 */
export const DEFAULT_OPSLIMIT = 3;
export const DEFAULT_MEMLIMIT = 64 * 1024 * 1024;
/** Bounds a reader accepts: a store.json asking for more is refused, not obeyed. */
export const MAX_OPSLIMIT = 16;
export const MAX_MEMLIMIT = 1024 * 1024 * 1024;

if (sodium.crypto_pwhash_SALTBYTES !== SALT_BYTES) throw new Error('crypto/password: libsodium crypto_pwhash salt is not 16 bytes');

/** Why `params` cannot be used, or undefined. */
export function kdfProblem(params: { opslimit: number; memlimit: number; salt: Buffer }): string | undefined {
  if (!Number.isInteger(params.opslimit) || params.opslimit < Math.max(1, sodium.crypto_pwhash_OPSLIMIT_MIN) || params.opslimit > MAX_OPSLIMIT) {
    return `opslimit ${params.opslimit} is outside ${Math.max(1, sodium.crypto_pwhash_OPSLIMIT_MIN)}..${MAX_OPSLIMIT}`;
  }
  if (!Number.isInteger(params.memlimit) || params.memlimit < sodium.crypto_pwhash_MEMLIMIT_MIN || params.memlimit > MAX_MEMLIMIT) {
    return `memlimit ${params.memlimit} is outside ${sodium.crypto_pwhash_MEMLIMIT_MIN}..${MAX_MEMLIMIT}`;
  }
  if (params.salt.length !== SALT_BYTES) return `salt of ${params.salt.length} bytes; expected ${SALT_BYTES}`;
  return undefined;
}

/** Fresh parameters with a new random salt. */
export function newKdfParams(): KdfParams {
  const salt = Buffer.alloc(SALT_BYTES);
  sodium.randombytes_buf(salt);
  return { alg: KDF_ALG, opslimit: DEFAULT_OPSLIMIT, memlimit: DEFAULT_MEMLIMIT, salt };
}

/** The key-encryption key of `password` under `params` (Argon2id, on libsodium's thread). */
export async function keyEncryptionKey(password: string, params: KdfParams): Promise<Buffer> {
  const problem = kdfProblem(params);
  if (problem) throw new Error(`argon2id parameters: ${problem}`);
  const kek = Buffer.alloc(DATA_KEY_BYTES);
  const secret = Buffer.from(password, 'utf8');
  try {
    await sodium.crypto_pwhash_async(kek, secret, params.salt, params.opslimit, params.memlimit, sodium.crypto_pwhash_ALG_ARGON2ID13);
  } finally {
    sodium.sodium_memzero(secret);
  }
  return kek;
}

/** The data key sealed under `kek`; `aad` binds it to its store. */
export function wrapDataKey(kek: Buffer, dataKey: Buffer, aad: Buffer): Buffer {
  if (dataKey.length !== DATA_KEY_BYTES) throw new Error(`wrapDataKey: a ${dataKey.length}-byte data key`);
  const wrapped = Buffer.alloc(WRAPPED_KEY_BYTES);
  const nonce = wrapped.subarray(0, NONCE_BYTES);
  sodium.randombytes_buf(nonce);
  sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(wrapped.subarray(NONCE_BYTES), dataKey, aad, null, nonce, kek);
  return wrapped;
}

/** The data key, or OpenError when `kek` is not the key it was wrapped with (a wrong password). */
export function unwrapDataKey(kek: Buffer, wrapped: Buffer, aad: Buffer): Buffer {
  if (wrapped.length !== WRAPPED_KEY_BYTES) throw new OpenError(`the wrapped key is ${wrapped.length} bytes; expected ${WRAPPED_KEY_BYTES}`);
  const dataKey = Buffer.alloc(DATA_KEY_BYTES);
  try {
    sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(dataKey, null, wrapped.subarray(NONCE_BYTES), aad, wrapped.subarray(0, NONCE_BYTES), kek);
  } catch {
    throw new OpenError('the wrapped data key does not open with this password');
  }
  return dataKey;
}
