// Block names (DESIGN.md, Words: hash): BLAKE3 of the raw block, first 16 bytes; in an
// encrypted store keyed BLAKE3 instead (crypto/cipher.ts: StoreCipher.blockHash), so the
// host names blocks with the function its store's cipher gives it, never this one directly.
// The all-zero chunk is never hashed or stored; it has a fixed well-known name.
import { blake3 } from '@napi-rs/blake-hash';

export const HASH_BYTES = 16;

/** Name of the all-zero chunk: reads as zeros, reported as a hole. */
export const ZERO_HASH: Buffer = Buffer.alloc(HASH_BYTES);

/**
 * Name of a chunk zeroed with NBD_CMD_FLAG_NO_HOLE: reads as zeros like ZERO_HASH but is
 * reported as allocated, because the client asked us not to punch a hole.
 */
export const ZERO_ALLOCATED_HASH: Buffer = Buffer.from('00000000000000000000000000000001', 'hex');

/** A function from a raw block to its 16-byte name. */
export type BlockHasher = (block: Uint8Array) => Buffer;

/** The 16-byte plain BLAKE3 name of a block's content (a plaintext store's names). */
export function blockHash(block: Uint8Array): Buffer {
  return blake3(block).subarray(0, HASH_BYTES);
}

export function isAllZero(buf: Buffer): boolean {
  // Compare against a shared zero buffer in slices: native memcmp, no per-byte JS loop.
  let offset = 0;
  while (offset < buf.length) {
    const n = Math.min(ZERO_PAGE.length, buf.length - offset);
    if (buf.compare(ZERO_PAGE, 0, n, offset, offset + n) !== 0) return false;
    offset += n;
  }
  return true;
}
const ZERO_PAGE = Buffer.alloc(1 << 20);
