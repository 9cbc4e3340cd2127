// A manifest as stored (the layout: store/manifest.ts): its body compressed, sealed and
// framed with the header, and with zstd the tables' frames lent from one write to the next.
import { CODEC_ZSTD, compressBlock, zstdFrame, type CodecId, type Compression } from '../crypto/compress.js';
import type { StoreCipher } from '../crypto/cipher.js';
import {
  BLOCK_ENTRY_BYTES, CHECKSUM_AT, CHUNK_ENTRY_BYTES, MANIFEST_HEADER_BYTES, MANIFEST_MAGIC, MANIFEST_VERSION, MAX_BODY_BYTES, manifestChecksum, manifestLabel, PACK_ID_BYTES,
  type Manifest,
} from './manifest.js';
import { chunkAt, chunkEntryAtOrAfter, manifestBody, tableLayout } from './manifest-body.js';
import type { DecodedManifest } from './manifest-decode.js';

/**
 * Lay out, compress and (with an encrypting `cipher`) seal a manifest for the object
 * `key`. Asserts what decodeManifest checks: valid meta, chunks ascending and unique and
 * inside the volume, every block index valid, every block a stored block with a location.
 */
export function encodeManifest(key: string, m: Manifest, compression: Compression, cipher: StoreCipher): Buffer {
  return sealManifest(key, manifestBody(m, cipher.overhead), compression, cipher).body;
}

/**
 * The stored form of a body's tables (everything after the meta) with zstd: one frame per
 * segment (see tableSegments), concatenated (decompression runs through every frame).
 */
export interface StoredTables {
  /** The raw tables these frames hold. */
  raw: Buffer;
  /** The frames, concatenated: what a relabelled body (a lazy fork) reuses whole. */
  frame: Buffer;
  /** Per segment key, its raw bytes and frame (views of `raw` and `frame`), when this host compressed them. */
  segments?: Map<string, { raw: Buffer; frame: Buffer }>;
  /** Segments the seal that made these compressed (the others were lent). */
  compressed: number;
}

// Segments of the tables, each compressed on its own so that a manifest written again with
// a few chunks changed (an incremental drain, a consistent fork) compresses only the
// segments those chunks touch: the pack and block tables by entry index (a patch only
// appends to them), the chunk table by chunk index (a changed chunk stays in its segment).
// A few changed chunks recompress a few segments of about 50, not the whole tables
// (docs/benchmarks.md).
const SEGMENT_PACKS = 4096;
const SEGMENT_BLOCKS = 2048;
const SEGMENT_CHUNKS = 8192;

/** The tables of `raw` (a body this host laid out or decoded) cut into keyed segments, in order. */
function tableSegments(raw: Buffer): Array<{ key: string; raw: Buffer }> {
  const layout = tableLayout(raw);
  const out: Array<{ key: string; raw: Buffer }> = [];
  const entries = (prefix: string, at: number, count: number, bytes: number, per: number) => {
    out.push({ key: `${prefix}#`, raw: raw.subarray(at - 4, at) });
    for (let i = 0; i < count; i += per) out.push({ key: `${prefix}${i / per}`, raw: raw.subarray(at + i * bytes, at + Math.min(count, i + per) * bytes) });
  };
  entries('p', layout.packsAt, layout.packCount, PACK_ID_BYTES, SEGMENT_PACKS);
  entries('b', layout.blocksAt, layout.blockCount, BLOCK_ENTRY_BYTES, SEGMENT_BLOCKS);
  out.push({ key: 'c#', raw: raw.subarray(layout.chunksAt - 4, layout.chunksAt) });
  for (let i = 0; i < layout.chunkCount; ) {
    const segment = Math.floor(chunkAt(raw, layout, i) / SEGMENT_CHUNKS);
    // First entry of a later segment.
    const lo = chunkEntryAtOrAfter(raw, layout, i + 1, (segment + 1) * SEGMENT_CHUNKS);
    out.push({ key: `c${segment}`, raw: raw.subarray(layout.chunksAt + i * CHUNK_ENTRY_BYTES, layout.chunksAt + lo * CHUNK_ENTRY_BYTES) });
    i = lo;
  }
  return out;
}

/**
 * Compress, seal and frame a manifest body for the object `key`. With
 * zstd the meta and every segment of the tables are frames of their own; `previous` (the
 * stored tables of an earlier body of this volume, or of the manifest a lazy fork copies)
 * lends every frame whose raw bytes did not change, so only what changed is compressed.
 * Returns the stored tables, to lend to the next write.
 */
export function sealManifest(key: string, raw: Buffer, compression: Compression, cipher: StoreCipher, previous?: StoredTables): { body: Buffer; tables?: StoredTables } {
  const what = `encodeManifest ${key}`;
  let stored: { codec: CodecId; data: Buffer };
  let tables: StoredTables | undefined;
  if (compression.codec === CODEC_ZSTD) {
    const tablesAt = 4 + raw.readUInt32LE(0);
    const rawTables = raw.subarray(tablesAt);
    const metaFrame = zstdFrame(raw.subarray(0, tablesAt), compression.level);
    if (previous !== undefined && previous.segments === undefined && previous.raw.equals(rawTables)) {
      // Frames of a manifest this host did not compress (a woken one): reused only whole.
      stored = { codec: CODEC_ZSTD, data: Buffer.concat([metaFrame, previous.frame]) };
      tables = { raw: rawTables, frame: stored.data.subarray(metaFrame.length), compressed: 0 };
    } else {
      const segments = tableSegments(raw);
      let compressed = 0;
      const frames = segments.map(({ key: segment, raw: bytes }) => {
        const lent = previous?.segments?.get(segment);
        if (lent !== undefined && lent.raw.equals(bytes)) return lent.frame;
        compressed++;
        return zstdFrame(bytes, compression.level);
      });
      stored = { codec: CODEC_ZSTD, data: Buffer.concat([metaFrame, ...frames]) };
      const frame = stored.data.subarray(metaFrame.length);
      const views = new Map<string, { raw: Buffer; frame: Buffer }>();
      let at = 0;
      for (let i = 0; i < segments.length; i++) {
        views.set(segments[i].key, { raw: segments[i].raw, frame: frame.subarray(at, at + frames[i].length) });
        at += frames[i].length;
      }
      tables = { raw: rawTables, frame, segments: views, compressed };
    }
  } else stored = compressBlock(compression, raw);
  const storedLength = stored.data.length + cipher.overhead;
  if (storedLength > MAX_BODY_BYTES) throw new Error(`${what}: the stored body would be ${storedLength} bytes; at most ${MAX_BODY_BYTES}`);
  const out = Buffer.allocUnsafe(MANIFEST_HEADER_BYTES + storedLength);
  MANIFEST_MAGIC.copy(out, 0);
  out.writeUInt16LE(MANIFEST_VERSION, 8);
  out.writeUInt8(stored.codec, 10);
  out.writeUInt8(cipher.id, 11);
  out.writeUInt32LE(raw.length, 12);
  out.writeUInt32LE(storedLength, 16);
  cipher.sealInto(out.subarray(MANIFEST_HEADER_BYTES), stored.data, manifestLabel(out, key));
  manifestChecksum(out).copy(out, CHECKSUM_AT);
  return { body: out, tables };
}

/**
 * The stored tables of a decoded manifest that sealManifest stored with zstd at
 * `compression`, found by compressing its meta again (zstd is deterministic) and checking
 * that the stored bytes begin with exactly that frame; undefined otherwise. Its segments
 * are unknown, so it lends its frames only whole (a lazy fork of it).
 */
export function storedTables(decoded: DecodedManifest, compression: Compression): StoredTables | undefined {
  if (decoded.codec !== CODEC_ZSTD || compression.codec !== CODEC_ZSTD) return undefined;
  const head = zstdFrame(decoded.raw.subarray(0, decoded.tablesAt), compression.level);
  if (decoded.stored.length <= head.length || !decoded.stored.subarray(0, head.length).equals(head)) return undefined;
  // A view: the opened body is the manifest object's own buffer (or, encrypted, a fresh
  // one), so it pins no more than the frames themselves and its 36-byte header.
  return { raw: decoded.raw.subarray(decoded.tablesAt), frame: decoded.stored.subarray(head.length), compressed: 0 };
}
