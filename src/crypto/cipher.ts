// Store encryption (DESIGN.md: crypto/ — nothing else touches a cipher). A store is either
// plaintext or encrypted with one random 256-bit data key (store/identity.ts keeps it
// wrapped by a password in store.json). Two subkeys are derived from the data key with
// BLAKE3's key derivation mode, so neither use can weaken the other:
//
//   name key   keyed BLAKE3 of a raw block, first 16 bytes, is the block's name: equal
//              blocks still get equal names (dedup across every volume of the store), but
//              without the key nobody can compute the name of a guessed plaintext
//   seal key   XChaCha20-Poly1305 (libsodium) of every stored thing: each block of a pack
//              on its own, the pack index, manifests, boot hot sets
//
// A sealed thing is nonce(24, random) ‖ ciphertext ‖ tag(16): SEAL_OVERHEAD bytes more
// than the plaintext. Random 192-bit nonces are safe to pick at random for any number of
// messages under one key. The associated data (AAD) says what the sealed bytes are (the
// block's name, the manifest's object key and header...), so sealed bytes moved to where
// something else belongs fail to open instead of reading as that other thing.
//
// The cipher id is stored in every object's header (crypto/cipher ids below), so a reader
// refuses an object sealed otherwise than its store says, with a clear error.
//
// Seal and hash throughput: docs/benchmarks.md.
import { Blake3Hasher } from '@napi-rs/blake-hash';
import sodium from 'sodium-native';
import { blockHash, HASH_BYTES, type BlockHasher } from './hash.js';

export const CIPHER_NONE = 0;
export const CIPHER_XCHACHA20_POLY1305 = 1;
export type CipherId = 0 | 1;

export const DATA_KEY_BYTES = 32;
export const NONCE_BYTES = 24;
export const TAG_BYTES = 16;
/** Bytes sealing adds to a plaintext: the nonce in front, the tag behind. */
export const SEAL_OVERHEAD = NONCE_BYTES + TAG_BYTES;

// BLAKE3 derive_key contexts: globally unique, fixed forever (changing one changes every name).
const NAME_KEY_CONTEXT = 'updraft 2026-11-22 block names v1';
const SEAL_KEY_CONTEXT = 'updraft 2026-11-22 object sealing v1';
const NAME_KEY_ID_CONTEXT = 'updraft 2026-11-22 block name key id v1';

if (
  sodium.crypto_aead_xchacha20poly1305_ietf_KEYBYTES !== DATA_KEY_BYTES ||
  sodium.crypto_aead_xchacha20poly1305_ietf_NPUBBYTES !== NONCE_BYTES ||
  sodium.crypto_aead_xchacha20poly1305_ietf_ABYTES !== TAG_BYTES
) {
  throw new Error('crypto/cipher: libsodium XChaCha20-Poly1305 sizes are not 32/24/16');
}

export function cipherName(id: number): string {
  switch (id) {
    case CIPHER_NONE:
      return 'none';
    case CIPHER_XCHACHA20_POLY1305:
      return 'xchacha20-poly1305';
    default:
      return `unknown cipher ${id}`;
  }
}

/** Bytes sealing with cipher `id` adds; undefined for an unknown cipher. */
export function cipherOverhead(id: number): number | undefined {
  return id === CIPHER_NONE ? 0 : id === CIPHER_XCHACHA20_POLY1305 ? SEAL_OVERHEAD : undefined;
}

/** Sealed bytes that do not open: tampered, truncated, or sealed under another key or for another place. */
export class OpenError extends Error {
  override name = 'OpenError';
}

/** How a store names blocks and seals what it stores. */
export interface StoreCipher {
  readonly id: CipherId;
  /** Bytes seal() adds: 0 for a plaintext store, SEAL_OVERHEAD otherwise. */
  readonly overhead: number;
  /** The name of a raw block: plain BLAKE3, or keyed BLAKE3 under the store's name key. */
  readonly blockHash: BlockHasher;
  /**
   * 16 bytes that tell block namings apart without revealing the key: all zero for plain
   * BLAKE3. A cache dir remembers it, so blocks named one way are never looked up another way.
   */
  readonly namesId: Buffer;
  /** Seal `plain` into `out`, which must be exactly plain.length + overhead bytes. */
  sealInto(out: Buffer, plain: Buffer, aad: Buffer): void;
  /** `plain` sealed into a new buffer (a plaintext store returns `plain` itself). */
  seal(plain: Buffer, aad: Buffer): Buffer;
  /** The plaintext of `sealed` (a plaintext store returns `sealed` itself); OpenError if it does not open. */
  open(sealed: Buffer, aad: Buffer): Buffer;
  /** open() into `out`, which must be exactly sealed.length - overhead bytes. */
  openInto(out: Buffer, sealed: Buffer, aad: Buffer): void;
}

/** A store without encryption: names are plain BLAKE3, nothing is sealed. */
export const PLAINTEXT: StoreCipher = {
  id: CIPHER_NONE,
  overhead: 0,
  blockHash,
  namesId: Buffer.alloc(16),
  sealInto(out, plain) {
    if (out.length !== plain.length) throw new Error(`sealInto: ${out.length}-byte output for ${plain.length} bytes`);
    plain.copy(out);
  },
  seal: (plain) => plain,
  open: (sealed) => sealed,
  openInto(out, sealed) {
    if (out.length !== sealed.length) throw new Error(`openInto: ${out.length}-byte output for ${sealed.length} bytes`);
    sealed.copy(out);
  },
};

/**
 * The data key each encrypted store cipher was made from, for cipherDataKey. Kept out of
 * the cipher object so it is never logged or serialised with it.
 */
const DATA_KEYS = new WeakMap<StoreCipher, Buffer>();

/**
 * The data key `cipher` was made from (undefined for PLAINTEXT), so that a worker thread
 * can make the same cipher with storeCipher (store/pack-threads.ts).
 */
export function cipherDataKey(cipher: StoreCipher): Buffer | undefined {
  if (cipher.id === CIPHER_NONE) return undefined;
  const key = DATA_KEYS.get(cipher);
  if (key === undefined) throw new Error('cipherDataKey: an encrypted cipher not made by storeCipher');
  return key;
}

/** The cipher of an encrypted store, from its 32-byte data key. */
export function storeCipher(dataKey: Buffer): StoreCipher {
  if (dataKey.length !== DATA_KEY_BYTES) throw new Error(`storeCipher: a ${dataKey.length}-byte data key; expected ${DATA_KEY_BYTES}`);
  const nameKey = Blake3Hasher.deriveKey(NAME_KEY_CONTEXT, dataKey);
  const sealKey = Blake3Hasher.deriveKey(SEAL_KEY_CONTEXT, dataKey);
  const namesId = Blake3Hasher.deriveKey(NAME_KEY_ID_CONTEXT, dataKey).subarray(0, 16);
  const sealInto = (out: Buffer, plain: Buffer, aad: Buffer): void => {
    if (out.length !== plain.length + SEAL_OVERHEAD) throw new Error(`sealInto: ${out.length}-byte output for ${plain.length} bytes`);
    const nonce = out.subarray(0, NONCE_BYTES);
    sodium.randombytes_buf(nonce);
    sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(out.subarray(NONCE_BYTES), plain, aad, null, nonce, sealKey);
  };
  const openInto = (out: Buffer, sealed: Buffer, aad: Buffer): void => {
    try {
      sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(out, null, sealed.subarray(NONCE_BYTES), aad, sealed.subarray(0, NONCE_BYTES), sealKey);
    } catch {
      throw new OpenError('authentication failed (tampered, or sealed under another key or for another object)');
    }
  };
  const cipher: StoreCipher = {
    id: CIPHER_XCHACHA20_POLY1305,
    overhead: SEAL_OVERHEAD,
    blockHash: (block) => Blake3Hasher.newKeyed(nameKey).update(block as Buffer).digestBuffer().subarray(0, HASH_BYTES),
    namesId,
    sealInto,
    seal(plain, aad) {
      const out = Buffer.allocUnsafe(plain.length + SEAL_OVERHEAD);
      sealInto(out, plain, aad);
      return out;
    },
    open(sealed, aad) {
      if (sealed.length < SEAL_OVERHEAD) throw new OpenError(`${sealed.length} sealed bytes; a sealed thing has at least ${SEAL_OVERHEAD}`);
      const plain = Buffer.allocUnsafe(sealed.length - SEAL_OVERHEAD);
      openInto(plain, sealed, aad);
      return plain;
    },
    openInto(out, sealed, aad) {
      if (sealed.length < SEAL_OVERHEAD) throw new OpenError(`${sealed.length} sealed bytes; a sealed thing has at least ${SEAL_OVERHEAD}`);
      if (out.length !== sealed.length - SEAL_OVERHEAD) throw new Error(`openInto: ${out.length}-byte output for ${sealed.length} sealed bytes`);
      openInto(out, sealed, aad);
    },
  };
  DATA_KEYS.set(cipher, Buffer.from(dataKey));
  return cipher;
}

/**
 * Associated data: a fixed label for the kind of thing, then what binds it to its place.
 * Labels end in a NUL so that no label is a prefix of another plus a binding.
 */
export function sealLabel(kind: string, ...parts: Array<Buffer | string>): Buffer {
  return Buffer.concat([Buffer.from(`updraft ${kind}\0`), ...parts.map((p) => (typeof p === 'string' ? Buffer.from(p) : p))]);
}

/** A new random data key. */
export function newDataKey(): Buffer {
  const key = Buffer.alloc(DATA_KEY_BYTES);
  sodium.randombytes_buf(key);
  return key;
}
