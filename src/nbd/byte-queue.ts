// Bytes received on a socket and not yet parsed. Chunks are kept as they arrive; a
// read that falls inside one chunk is a zero-copy view, only a read that spans chunks
// copies (once).

export class ByteQueue {
  private chunks: Buffer[] = [];
  private head = 0;
  /** Bytes already consumed from chunks[head]. */
  private offset = 0;
  length = 0;

  push(chunk: Buffer): void {
    this.chunks.push(chunk);
    this.length += chunk.length;
  }

  /** Remove and return the next n bytes (n ≤ length). */
  take(n: number): Buffer {
    const first = this.chunks[this.head];
    if (first.length - this.offset >= n) {
      const out = first.subarray(this.offset, this.offset + n);
      this.advance(n);
      return out;
    }
    const out = Buffer.allocUnsafe(n);
    let filled = 0;
    while (filled < n) {
      const chunk = this.chunks[this.head];
      const count = Math.min(n - filled, chunk.length - this.offset);
      chunk.copy(out, filled, this.offset, this.offset + count);
      filled += count;
      this.advance(count);
    }
    return out;
  }

  /** Remove the next n bytes (n ≤ length) as views of the received chunks: no copy. */
  takeViews(n: number): Buffer[] {
    const out: Buffer[] = [];
    while (n > 0) {
      const chunk = this.chunks[this.head];
      const count = Math.min(n, chunk.length - this.offset);
      out.push(chunk.subarray(this.offset, this.offset + count));
      this.advance(count);
      n -= count;
    }
    return out;
  }

  /** Read a big-endian u32 at `at` bytes ahead without consuming (at + 4 ≤ length). */
  peekUInt32(at: number): number {
    let index = this.head;
    let pos = this.offset + at;
    let chunk = this.chunks[index];
    while (pos >= chunk.length) {
      pos -= chunk.length;
      chunk = this.chunks[++index];
    }
    if (pos + 4 <= chunk.length) return chunk.readUInt32BE(pos);
    let value = 0;
    for (let i = 0; i < 4; i++) {
      while (pos >= chunk.length) {
        pos -= chunk.length;
        chunk = this.chunks[++index];
      }
      value = value * 256 + chunk[pos++];
    }
    return value;
  }

  private advance(n: number): void {
    this.length -= n;
    this.offset += n;
    while (this.head < this.chunks.length && this.offset >= this.chunks[this.head].length) {
      this.offset -= this.chunks[this.head].length;
      this.head++;
    }
    if (this.head === this.chunks.length) {
      this.chunks = [];
      this.head = 0;
      this.offset = 0;
    } else if (this.head > 64) {
      this.chunks = this.chunks.slice(this.head);
      this.head = 0;
    }
  }
}
