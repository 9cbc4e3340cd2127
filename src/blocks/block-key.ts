// Block names as the cache and everything above it key them (DESIGN.md: blocks/).
import { HASH_BYTES } from '../crypto/hash.js';

/** A block name as a 16-character latin1 string: cheap Map key, exact bytes. */
export type BlockKey = string;

export function blockKey(hash: Uint8Array): BlockKey {
  return Buffer.from(hash.buffer, hash.byteOffset, HASH_BYTES).toString('latin1');
}
export function keyBytes(key: BlockKey): Buffer {
  return Buffer.from(key, 'latin1');
}
export function keyHex(key: BlockKey): string {
  return keyBytes(key).toString('hex');
}
