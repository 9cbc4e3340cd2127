// Errors of the store formats (DESIGN.md: Formats). Every object that fails to decode
// (bad magic, unknown version or cipher, checksum mismatch, bounds, hash mismatch) throws
// a FormatError naming the object key, so that a log line says which object is bad.

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
