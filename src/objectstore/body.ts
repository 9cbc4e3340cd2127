// A response body's chunks collected into one Buffer, shared by the network stores.

/**
 * The chunks of `body` in one Buffer: written into `out` (or a new Buffer) when `length`
 * is known, with no chunk list and no second copy; without a length, chunks and one
 * concat. A body longer than `length` is an error; a shorter one comes back short (the
 * caller checks it). `onChunk` runs for each chunk (an attempt's progress).
 */
export async function collectBody(
  body: AsyncIterable<unknown> & { destroy(err?: Error): void },
  length: number | undefined,
  out?: Buffer,
  onChunk?: () => void,
): Promise<Buffer> {
  if (length === undefined) {
    const chunks: Buffer[] = [];
    for await (const chunk of body) {
      onChunk?.();
      chunks.push(chunk as Buffer);
    }
    return chunks.length === 1 ? chunks[0] : Buffer.concat(chunks);
  }
  const target = out ?? Buffer.allocUnsafe(length);
  let filled = 0;
  for await (const chunk of body) {
    onChunk?.();
    const part = chunk as Buffer;
    if (filled + part.length > length) {
      body.destroy();
      throw new Error(`the body is longer than its Content-Length of ${length} bytes`);
    }
    part.copy(target, filled);
    filled += part.length;
  }
  return filled === length ? target : target.subarray(0, filled);
}
