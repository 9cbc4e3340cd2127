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
// Throughput and ratios per codec and data kind: docs/benchmarks.md. lz4-napi has no API
// that writes into a caller's buffer, so every call allocates a fresh output of
// compressBound size, and first-touch pages of those are expensive; zstd-napi compresses
// into a reused scratch buffer and does not have the problem.
//
// Everything here is synchronous and runs on the calling thread. Cold reads call it on
// worker threads (store/pack-threads.ts); pack uploads on the event loop (faster there
// for encrypted drains on 2 cores).
import { compressSync as lz4CompressSync, uncompressSync as lz4UncompressSync } from 'lz4-napi';
import zstd from 'zstd-napi/binding.js';
import { errorMessage } from '../log.js';

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
// Scratch buffers only grow up to block size: a larger input (a manifest body) gets a
// buffer of its own, so that one big manifest does not pin megabytes for the process's life.
const SCRATCH_MAX = MAX_BLOCK_BYTES + 64 * 1024;
let zstdScratch = Buffer.alloc(0);
// lz4-napi's block API reads the raw length from a 4-byte little-endian prefix; we store
// the pure LZ4 block and put the prefix back in front of it to decompress.
let lz4Scratch = Buffer.alloc(0);

/**
 * Compress one block (or a manifest body). Returns the raw bytes themselves with
 * CODEC_NONE when the codec does not make them smaller.
 */
export function compressBlock(c: Compression, raw: Buffer): { codec: CodecId; data: Buffer } {
  if (c.codec !== CODEC_NONE && looksIncompressible(raw)) return { codec: CODEC_NONE, data: raw };
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
      let out: Buffer;
      if (bound > SCRATCH_MAX) {
        out = Buffer.allocUnsafe(bound);
      } else {
        if (zstdScratch.length < bound) zstdScratch = Buffer.allocUnsafe(bound);
        out = zstdScratch;
      }
      zstdCompressContext ??= new zstd.CCtx();
      const length = zstdCompressContext.compress(out, raw, c.level);
      if (length >= raw.length) return { codec: CODEC_NONE, data: raw };
      // Out of the scratch buffer: copy exactly the compressed bytes. A buffer of its own
      // is short-lived (it goes to a PUT), so a view of it will do.
      return { codec: CODEC_ZSTD, data: out === zstdScratch ? Buffer.from(out.subarray(0, length)) : out.subarray(0, length) };
    }
    default:
      throw new Error(`compress: ${codecName(c.codec)} (compression ${JSON.stringify(c.name)})`);
  }
}

/**
 * One zstd frame of `raw` at `level`, even where it does not shrink the bytes: a manifest
 * body is stored as two frames (store/manifest-seal.ts), which decompression reads as one.
 */
export function zstdFrame(raw: Buffer, level: number): Buffer {
  const out = Buffer.allocUnsafe(zstd.compressBound(raw.length));
  zstdCompressContext ??= new zstd.CCtx();
  const length = zstdCompressContext.compress(out, raw, level);
  return out.subarray(0, length);
}

/** Blocks at least this large are first judged by a sample (early abort). */
const SAMPLE_FROM_BYTES = 32 * 1024;
const SAMPLE_BYTES = 4096;
/** A sample that LZ4 cannot shrink below this share of its size marks the block incompressible. */
const SAMPLE_MAX_RATIO = 0.97;

/**
 * Early abort: LZ4 over a 4 KiB sample from the middle of the block. Already-compressed or
 * encrypted data (media, packages, random) then skips the full compression, whose output
 * would be thrown away, and every lz4 attempt allocates a fresh output buffer
 * (docs/benchmarks.md).
 */
function looksIncompressible(raw: Buffer): boolean {
  if (raw.length < SAMPLE_FROM_BYTES) return false;
  const start = (raw.length >>> 1) & ~(SAMPLE_BYTES - 1);
  const sample = raw.subarray(start, start + SAMPLE_BYTES);
  return lz4CompressSync(sample).length - 4 >= sample.length * SAMPLE_MAX_RATIO;
}

/** An LZ4 block expands at most this many times (a match length byte of 255 is 255 output bytes), plus a few bytes. */
const LZ4_MAX_EXPANSION = 255;

/**
 * The raw bytes the zstd frames of `data` declare (every frame written here states its
 * content size). Throws for a frame that is damaged or does not say.
 */
function zstdContentSize(data: Buffer): number {
  let total = 0;
  for (let at = 0; at < data.length; ) {
    const frame = data.subarray(at);
    const size = zstd.getFrameContentSize(frame);
    if (size === null) throw new Error(`the frame at byte ${at} does not state its content size`);
    total += size;
    at += zstd.findFrameCompressedSize(frame);
  }
  return total;
}

/**
 * Decompress `data` written with `codec` into exactly `rawLength` bytes. Throws an Error
 * on an unknown codec, a codec error, or any other output length. CODEC_NONE returns
 * `data` itself (after checking its length). `maxLength` bounds the allocation a bad
 * length field can cause: a block by default; a manifest reader passes its own bound.
 * Within it, a `rawLength` the compressed bytes cannot produce is refused before anything
 * is allocated for it.
 */
export function decompressBlock(codec: CodecId, data: Buffer, rawLength: number, maxLength = MAX_BLOCK_BYTES): Buffer {
  if (!Number.isInteger(rawLength) || rawLength < 0 || rawLength > maxLength) {
    throw new Error(`raw length ${rawLength} is outside 0..${maxLength}`);
  }
  switch (codec) {
    case CODEC_NONE:
      if (data.length !== rawLength) throw new Error(`stored ${data.length} bytes uncompressed, expected ${rawLength}`);
      return data;
    case CODEC_LZ4: {
      if (rawLength > LZ4_MAX_EXPANSION * data.length + 64) {
        throw new Error(`lz4: ${data.length} bytes cannot decompress to ${rawLength} (LZ4 expands at most ${LZ4_MAX_EXPANSION}-fold)`);
      }
      const need = 4 + data.length;
      let prefixed: Buffer;
      if (need > SCRATCH_MAX) {
        prefixed = Buffer.allocUnsafe(need);
      } else {
        if (lz4Scratch.length < need) lz4Scratch = Buffer.allocUnsafe(Math.max(need, 256 * 1024));
        prefixed = lz4Scratch;
      }
      prefixed.writeUInt32LE(rawLength, 0);
      data.copy(prefixed, 4);
      let raw: Buffer;
      try {
        raw = lz4UncompressSync(prefixed.subarray(0, need));
      } catch (err) {
        throw new Error(`lz4: ${errorMessage(err)}`, { cause: err });
      }
      if (raw.length !== rawLength) throw new Error(`lz4: decompressed to ${raw.length} bytes, expected ${rawLength}`);
      return raw;
    }
    case CODEC_ZSTD: {
      let declared: number;
      try {
        declared = zstdContentSize(data);
      } catch (err) {
        throw new Error(`zstd: ${errorMessage(err)}`, { cause: err });
      }
      if (declared !== rawLength) throw new Error(`zstd: the frames hold ${declared} bytes, expected ${rawLength}`);
      const raw = Buffer.allocUnsafe(rawLength);
      zstdDecompressContext ??= new zstd.DCtx();
      let length: number;
      try {
        length = zstdDecompressContext.decompress(raw, data);
      } catch (err) {
        throw new Error(`zstd: ${errorMessage(err)}`, { cause: err });
      }
      if (length !== rawLength) throw new Error(`zstd: decompressed to ${length} bytes, expected ${rawLength}`);
      return raw;
    }
    default:
      throw new Error(codecName(codec));
  }
}
