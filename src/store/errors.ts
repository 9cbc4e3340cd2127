// Errors of the store formats (DESIGN.md: Formats). Every object that fails to decode
// (bad magic, unknown version or cipher, checksum mismatch, bounds, hash mismatch) throws
// a FormatError naming the object key, so that a log line says which object is bad.
import { OpenError, type StoreCipher } from '../crypto/cipher.js';
import { codecName, decompressBlock, MAX_BLOCK_BYTES, type CodecId } from '../crypto/compress.js';
import { errorMessage } from '../log.js';

/** A stored object (pack, manifest, lease) or a local index record that is not what it should be. */
export class FormatError extends Error {
  override name = 'FormatError';

  constructor(
    /** The object key (or local file) that failed to decode. */
    readonly key: string,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
  }
}

/**
 * Open a stored body sealed under `label`, then decompress it to its `rawLength` bytes (at
 * most `maxBytes`). A body that does not decrypt or decompress is a FormatError of `key`
 * whose message begins with `what` (for example "pack K: block H" or "manifest K:"). Answers the opened
 * (still compressed) body too.
 */
export function openSealedBody(
  key: string,
  what: string,
  cipher: StoreCipher,
  sealed: Buffer,
  label: Buffer,
  codec: CodecId,
  rawLength: number,
  maxBytes = MAX_BLOCK_BYTES,
): { compressed: Buffer; raw: Buffer } {
  let compressed: Buffer;
  try {
    compressed = cipher.open(sealed, label);
  } catch (err) {
    if (!(err instanceof OpenError)) throw err;
    throw new FormatError(key, `${what} does not decrypt with this store's key: ${err.message}`, { cause: err });
  }
  try {
    return { compressed, raw: decompressBlock(codec, compressed, rawLength, maxBytes) };
  } catch (err) {
    throw new FormatError(key, `${what} does not decompress (${codecName(codec)}): ${errorMessage(err)}`, { cause: err });
  }
}
