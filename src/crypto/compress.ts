// Block and manifest compression (DESIGN.md: crypto/ — nothing else touches a codec).
// The codec id is stored next to every compressed thing (pack index entry, manifest
// header), so the configured compression can change without a migration.
//
//   codec 0  none  the bytes as they are
//   codec 1  lz4   one LZ4 *block* (no frame, no size prefix); the reader knows the raw
//                  length from the index entry and decompresses to exactly that size
//   codec 2  zstd  one zstd frame (content size in the frame header, no frame checksum:
//                  blocks are verified by their hash)
//
// Throughput on this machine (Intel Xeon, 2 vCPU, Node 20; scripts/bench of this change:
// 128 KiB blocks, one thread, MB/s of raw data; "text" is compressible log-like text):
//
//   codec    compress random  decompress random  compress text  decompress text  text ratio
//   lz4           (see the commit message and the formats report for the measured figures)
//
// Everything here is synchronous and runs on the calling thread: a 128 KiB block takes
// well under a millisecond with lz4 and zstd-3. Callers that compress many blocks at once
// (a pack upload) may move the work to a worker.
import { compressSync as lz4CompressSync, uncompressSync as lz4UncompressSync } from 'lz4-napi';
import zstd from 'zstd-napi/binding.js';

export const CODEC_NONE = 0;
export const CODEC_LZ4 = 1;
export const CODEC_ZSTD = 2;
export type CodecId = 0 | 1 | 2;

/**
 * The largest raw block any reader accepts: the largest block_size the config allows
 * (4 MiB). Bounds the allocation a corrupt or hostile length field can ask for.
 */
export const MAX_BLOCK_BYTES = 4 * 1024 * 1024;

/** A configured compression: codec, level (zstd only; 0 otherwise) and the name it was configured as. */
export interface Compression {
  codec: CodecId;
  level: number;
  /** As configured: "lz4", "none", "zstd-3". */
  name: string;
}

const ZSTD_DEFAULT_LEVEL = 3;
const ZSTD_MAX_LEVEL = 19;
const ALLOWED = '"lz4", "none", "zstd" (level 3) or "zstd-N" with N from 1 to 19';

/** Parse a configured compression name. Throws an Error naming the value and the allowed forms. */
export function parseCompression(value: string): Compression {
  if (value === 'none') return { codec: CODEC_NONE, level: 0, name: 'none' };
  if (value === 'lz4') return { codec: CODEC_LZ4, level: 0, name: 'lz4' };
  if (value === 'zstd') return { codec: CODEC_ZSTD, level: ZSTD_DEFAULT_LEVEL, name: `zstd-${ZSTD_DEFAULT_LEVEL}` };
  const match = /^zstd-([1-9][0-9]?)$/.exec(value);
  if (match) {
    const level = Number(match[1]);
    if (level <= ZSTD_MAX_LEVEL) return { codec: CODEC_ZSTD, level, name: value };
  }
  throw new Error(`compression ${JSON.stringify(value)} is not allowed: ${ALLOWED}`);
}

export function codecName(codec: number): string {
  switch (codec) {
    case CODEC_NONE:
      return 'none';
    case CODEC_LZ4:
      return 'lz4';
    case CODEC_ZSTD:
      return 'zstd';
    default:
      return `unknown codec ${codec}`;
  }
}

// One compression and one decompression context per process, reused: creating a zstd
// context per block costs more than compressing the block. All use is synchronous, so
// sharing them (and the scratch buffers below) between callers is safe.
let zstdCompressContext: zstd.CCtx | undefined;
let zstdDecompressContext: zstd.DCtx | undefined;
let zstdScratch = Buffer.alloc(0);
// lz4-napi's block API reads the raw length from a 4-byte little-endian prefix; we store
// the pure LZ4 block and put the prefix back in this scratch buffer to decompress.
let lz4Scratch = Buffer.alloc(0);

/**
 * Compress one block (or a manifest body). Returns the raw bytes themselves with
 * CODEC_NONE when the codec does not make them smaller.
 */
export function compressBlock(c: Compression, raw: Buffer): { codec: CodecId; data: Buffer } {
  switch (c.codec) {
    case CODEC_NONE:
      return { codec: CODEC_NONE, data: raw };
    case CODEC_LZ4: {
      // Output is [u32 LE raw length][LZ4 block]; the prefix is redundant with rawLength.
      const prefixed = lz4CompressSync(raw);
      if (prefixed.length - 4 >= raw.length) return { codec: CODEC_NONE, data: raw };
      return { codec: CODEC_LZ4, data: prefixed.subarray(4) };
    }
    case CODEC_ZSTD: {
      const bound = zstd.compressBound(raw.length);
      if (zstdScratch.length < bound) zstdScratch = Buffer.allocUnsafe(bound);
      zstdCompressContext ??= new zstd.CCtx();
      const length = zstdCompressContext.compress(zstdScratch, raw, c.level);
      if (length >= raw.length) return { codec: CODEC_NONE, data: raw };
      // Copy out of the scratch buffer: exactly the compressed size, nothing retained.
      return { codec: CODEC_ZSTD, data: Buffer.from(zstdScratch.subarray(0, length)) };
    }
    default:
      throw new Error(`compress: ${codecName(c.codec)} (compression ${JSON.stringify(c.name)})`);
  }
}

/**
 * Decompress `data` written with `codec` into exactly `rawLength` bytes (at most
 * `maxRawLength`: a block by default; a manifest body passes its own bound). Throws an Error
 * on an unknown codec, a codec error, or any other output length. CODEC_NONE returns
 * `data` itself (after checking its length).
 */
export function decompressBlock(codec: CodecId, data: Buffer, rawLength: number, maxRawLength = MAX_BLOCK_BYTES): Buffer {
  if (!Number.isInteger(rawLength) || rawLength < 0 || rawLength > maxRawLength) {
    throw new Error(`decompress: raw length ${rawLength} is outside 0..${maxRawLength}`);
  }
  switch (codec) {
    case CODEC_NONE:
      if (data.length !== rawLength) throw new Error(`stored ${data.length} bytes uncompressed, expected ${rawLength}`);
      return data;
    case CODEC_LZ4: {
      const need = 4 + data.length;
      if (lz4Scratch.length < need) lz4Scratch = Buffer.allocUnsafe(Math.max(need, 64 * 1024));
      lz4Scratch.writeUInt32LE(rawLength, 0);
      data.copy(lz4Scratch, 4);
      let raw: Buffer;
      try {
        raw = lz4UncompressSync(lz4Scratch.subarray(0, need));
      } catch (err) {
        throw new Error(`lz4: ${err instanceof Error ? err.message : String(err)}`, { cause: err });
      }
      if (raw.length !== rawLength) throw new Error(`lz4: decompressed to ${raw.length} bytes, expected ${rawLength}`);
      return raw;
    }
    case CODEC_ZSTD: {
      const raw = Buffer.allocUnsafe(rawLength);
      zstdDecompressContext ??= new zstd.DCtx();
      let length: number;
      try {
        length = zstdDecompressContext.decompress(raw, data);
      } catch (err) {
        throw new Error(`zstd: ${err instanceof Error ? err.message : String(err)}`, { cause: err });
      }
      if (length !== rawLength) throw new Error(`zstd: decompressed to ${length} bytes, expected ${rawLength}`);
      return raw;
    }
    default:
      throw new Error(`decompress: ${codecName(codec)}`);
  }
}
