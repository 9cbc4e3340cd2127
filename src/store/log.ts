// Log objects of durable volumes (DESIGN.md: flush mode `durable`): the sectors written
// since a volume's last logged point, put by its lease holder before a FLUSH is
// acknowledged, and folded into packs and a manifest by a later drain. One object may carry
// the records of many volumes of the host (group commit).
//
// Key: `log/{host}/{ms since the epoch, 15 digits}-{counter, 8 digits}`: one folder per
// writing host, names that sort by time. Layout:
//
//   offset  size  field
//   0       8     magic "UPDLOGR1"
//   8       2     version u16 = 1
//   10      1     codec u8 (crypto/compress.ts) of the payload
//   11      1     cipher u8 (crypto/cipher.ts)
//   12      4     raw payload length u32
//   16      4     stored length u32 (bytes after the header)
//   20      16    BLAKE3 of the stored bytes (a torn or changed object is refused)
//   36      ...   the payload, compressed, then sealed with AAD "updraft log" ‖ bytes 0..20 ‖ key
//
// Payload (little-endian; numbers f64 holding safe integers):
//   host str, created f64, entries u32, then per entry:
//     volume str, generation f64, manifest sequence f64, sequence f64, size f64,
//     extents u32, then per extent: offset f64, length u32, flags u8 (1: reads as zeros)
//   then the data of every extent without the zero flag, in entry and extent order.
// A str is a u16 byte length and UTF-8.
import { blockHash } from '../crypto/hash.js';
import { sealLabel, type StoreCipher } from '../crypto/cipher.js';
import { compressBlock, type CodecId, type Compression } from '../crypto/compress.js';
import type { ObjectStore } from '../objectstore/types.js';
import { FormatError, openSealedBody } from './errors.js';
import { manifestKey } from './manifest.js';
import { decodeManifest } from './manifest-decode.js';
import { cipherMismatch } from './pack.js';

export const LOG_MAGIC = Buffer.from('UPDLOGR1');
export const LOG_VERSION = 1;
const HEADER_BYTES = 36;
const AAD_BYTES = 20;
const CHECKSUM_AT = 20;
/** Largest payload a log object may hold; a writer logs more than this as a drain instead. */
export const MAX_LOG_PAYLOAD_BYTES = 256 << 20;
export const LOG_PREFIX = 'log/';
const FLAG_ZERO = 1;

export interface LogExtent {
  offset: number;
  length: number;
  /** The range reads as zeros (trimmed or zeroed); no data is stored for it. */
  zero: boolean;
  /** The bytes of the range (absent for a zero extent). */
  data?: Buffer;
}

/** One volume's record in a log object: its changes since its last logged point. */
export interface LogEntry {
  volume: string;
  /** Lease generation of the writer: replay takes only the generation of the latest manifest. */
  generation: number;
  /** Sequence of the manifest the writer built on. */
  manifestSequence: number;
  /** Volume sequence captured before the data was read: the record holds every write up to it. */
  sequence: number;
  /** Volume size at that sequence. */
  size: number;
  extents: LogExtent[];
}

export interface LogRecord {
  host: string;
  /** When it was written (ms since the epoch, the writer's clock; informational). */
  created: number;
  entries: LogEntry[];
}

/** The folder of log objects written by `host`. */
export function logPrefixOf(host: string): string {
  return `${LOG_PREFIX}${encodeURIComponent(host)}/`;
}

/** The key of a log object `host` writes at `now` (ms), `counter` telling apart those of one ms. */
export function logKey(host: string, now: number, counter: number): string {
  return `${logPrefixOf(host)}${String(Math.floor(now)).padStart(15, '0')}-${String(counter % 1e8).padStart(8, '0')}`;
}

function strBytes(s: string): Buffer {
  const b = Buffer.from(s, 'utf8');
  if (b.length > 0xffff) throw new Error(`log: string of ${b.length} bytes is too long`);
  return b;
}

/** The raw payload of `record` (before compression and sealing). */
function encodePayload(record: LogRecord): Buffer {
  const host = strBytes(record.host);
  const names = record.entries.map((e) => strBytes(e.volume));
  let headerBytes = 2 + host.length + 8 + 4;
  let dataBytes = 0;
  record.entries.forEach((e, i) => {
    headerBytes += 2 + names[i].length + 8 * 4 + 4 + e.extents.length * 13;
    for (const x of e.extents) {
      if (x.zero) continue;
      if (x.data === undefined || x.data.length !== x.length) throw new Error(`log: extent ${x.offset}+${x.length} of volume ${e.volume} has ${x.data?.length ?? 0} bytes of data`);
      dataBytes += x.length;
    }
  });
  const out = Buffer.allocUnsafe(headerBytes + dataBytes);
  let at = 0;
  const str = (b: Buffer) => {
    at = out.writeUInt16LE(b.length, at);
    at += b.copy(out, at);
  };
  str(host);
  at = out.writeDoubleLE(record.created, at);
  at = out.writeUInt32LE(record.entries.length, at);
  record.entries.forEach((e, i) => {
    str(names[i]);
    for (const n of [e.generation, e.manifestSequence, e.sequence, e.size]) at = out.writeDoubleLE(n, at);
    at = out.writeUInt32LE(e.extents.length, at);
    for (const x of e.extents) {
      at = out.writeDoubleLE(x.offset, at);
      at = out.writeUInt32LE(x.length, at);
      at = out.writeUInt8(x.zero ? FLAG_ZERO : 0, at);
    }
  });
  for (const e of record.entries) for (const x of e.extents) if (!x.zero) at += x.data!.copy(out, at);
  if (at !== out.length) throw new Error(`log: encoded ${at} of ${out.length} bytes`);
  return out;
}

/** The object to store under `key` for `record`: compressed and sealed like packs. */
export function encodeLog(key: string, record: LogRecord, compression: Compression, cipher: StoreCipher): Buffer {
  const raw = encodePayload(record);
  if (raw.length > MAX_LOG_PAYLOAD_BYTES) throw new Error(`log ${key}: ${raw.length} bytes is over the ${MAX_LOG_PAYLOAD_BYTES}-byte maximum`);
  const { codec, data } = compressBlock(compression, raw);
  const out = Buffer.allocUnsafe(HEADER_BYTES + data.length + cipher.overhead);
  LOG_MAGIC.copy(out, 0);
  out.writeUInt16LE(LOG_VERSION, 8);
  out.writeUInt8(codec, 10);
  out.writeUInt8(cipher.id, 11);
  out.writeUInt32LE(raw.length, 12);
  out.writeUInt32LE(data.length + cipher.overhead, 16);
  const sealed = out.subarray(HEADER_BYTES);
  cipher.sealInto(sealed, data, sealLabel('log', out.subarray(0, AAD_BYTES), key));
  blockHash(sealed).copy(out, CHECKSUM_AT);
  return out;
}

/** The record stored under `key`. Throws FormatError naming `key` for anything not a whole, valid log object. */
export function decodeLog(key: string, body: Buffer, cipher: StoreCipher): LogRecord {
  const fail = (what: string, cause?: unknown) => new FormatError(key, `log object ${key}: ${what}`, cause === undefined ? undefined : { cause });
  if (body.length < HEADER_BYTES) throw fail(`${body.length} bytes is shorter than the ${HEADER_BYTES}-byte header (truncated)`);
  if (!body.subarray(0, 8).equals(LOG_MAGIC)) throw fail('bad magic (not a log object)');
  const version = body.readUInt16LE(8);
  if (version !== LOG_VERSION) throw fail(`format version ${version}; this reader knows version ${LOG_VERSION}`);
  const codec = body.readUInt8(10) as CodecId;
  const stored = body.readUInt8(11);
  if (stored !== cipher.id) throw fail(cipherMismatch(stored, cipher));
  const rawLength = body.readUInt32LE(12);
  const storedLength = body.readUInt32LE(16);
  if (HEADER_BYTES + storedLength !== body.length) throw fail(`the header says ${storedLength} stored bytes, the object has ${body.length - HEADER_BYTES} (truncated or extended)`);
  const sealed = body.subarray(HEADER_BYTES);
  if (!blockHash(sealed).equals(body.subarray(CHECKSUM_AT, HEADER_BYTES))) throw fail('checksum mismatch (corrupt)');
  const { raw } = openSealedBody(key, `log object ${key}:`, cipher, sealed, sealLabel('log', body.subarray(0, AAD_BYTES), key), codec, rawLength, MAX_LOG_PAYLOAD_BYTES);
  return decodePayload(raw, fail);
}

function decodePayload(raw: Buffer, fail: (what: string) => FormatError): LogRecord {
  let at = 0;
  const need = (n: number, what: string) => {
    if (at + n > raw.length) throw fail(`${what} runs past the end of the ${raw.length}-byte payload`);
  };
  const str = (what: string) => {
    need(2, what);
    const n = raw.readUInt16LE(at);
    need(2 + n, what);
    const s = raw.toString('utf8', at + 2, at + 2 + n);
    at += 2 + n;
    return s;
  };
  const int = (what: string) => {
    need(8, what);
    const n = raw.readDoubleLE(at);
    at += 8;
    if (!Number.isSafeInteger(n) || n < -1) throw fail(`${what} ${n} is not a whole number`);
    return n;
  };
  const u32 = (what: string) => {
    need(4, what);
    const n = raw.readUInt32LE(at);
    at += 4;
    return n;
  };
  const host = str('host');
  const created = int('created');
  const count = u32('entry count');
  // Each entry takes at least 38 bytes: a count past that is refused before anything is allocated for it.
  if (count * 38 > raw.length - at) throw fail(`${count} entries cannot fit in the payload`);
  const entries: LogEntry[] = [];
  for (let i = 0; i < count; i++) {
    const volume = str(`entry ${i} volume`);
    const generation = int(`entry ${i} generation`);
    const manifestSequence = int(`entry ${i} manifest sequence`);
    const sequence = int(`entry ${i} sequence`);
    const size = int(`entry ${i} size`);
    const n = u32(`entry ${i} extent count`);
    if (n * 13 > raw.length - at) throw fail(`entry ${i}: ${n} extents cannot fit in the payload`);
    const extents: LogExtent[] = [];
    for (let j = 0; j < n; j++) {
      const offset = int(`entry ${i} extent ${j} offset`);
      const length = u32(`entry ${i} extent ${j} length`);
      need(1, `entry ${i} extent ${j} flags`);
      const flags = raw.readUInt8(at++);
      if ((flags & ~FLAG_ZERO) !== 0) throw fail(`entry ${i} extent ${j}: unknown flags 0x${flags.toString(16)}`);
      if (offset + length > size) throw fail(`entry ${i} extent ${j}: ${offset}+${length} is past the volume's ${size} bytes`);
      extents.push({ offset, length, zero: (flags & FLAG_ZERO) !== 0 });
    }
    entries.push({ volume, generation, manifestSequence, sequence, size, extents });
  }
  for (const e of entries) {
    for (const x of e.extents) {
      if (x.zero) continue;
      need(x.length, `data of ${e.volume} at ${x.offset}+${x.length}`);
      x.data = raw.subarray(at, at + x.length);
      at += x.length;
    }
  }
  if (at !== raw.length) throw fail(`${raw.length - at} bytes after the last extent's data`);
  return { host, created, entries };
}

/**
 * What replay applies to `volume`: the entries of the log objects `host` wrote with lease
 * generation `generation` whose sequence is past `afterSequence`, by ascending sequence,
 * and the keys read. A corrupt object fails the replay (FormatError naming it): skipping
 * it would serve a volume without writes a FLUSH acknowledged.
 */
export async function readVolumeLog(
  store: ObjectStore,
  cipher: StoreCipher,
  host: string,
  volume: string,
  generation: number,
  afterSequence: number,
): Promise<{ entries: LogEntry[]; keys: string[] }> {
  const objects = await store.list(logPrefixOf(host));
  const entries: LogEntry[] = [];
  const keys: string[] = [];
  for (const { key } of objects) {
    const object = await store.get(key);
    // Deleted since the listing: a manifest covers it.
    if (object === undefined) continue;
    keys.push(key);
    for (const entry of decodeLog(key, object.body, cipher).entries) {
      if (entry.volume === volume && entry.generation === generation && entry.sequence > afterSequence) entries.push(entry);
    }
  }
  entries.sort((a, b) => a.sequence - b.sequence);
  return { entries, keys };
}

/**
 * Whether an entry can never be replayed again: the volume is gone, or its latest manifest
 * covers the entry's sequence, or was written under a later generation (whose holder
 * replayed what it had to before writing it; a stale holder's records are never replayed).
 */
export function logEntryObsolete(entry: LogEntry, manifest: { generation: number; sequence: number } | undefined): boolean {
  if (manifest === undefined) return true;
  return manifest.generation > entry.generation || manifest.sequence >= entry.sequence;
}

/**
 * Delete the log objects (all under `log/`, or `keys`) that can never be replayed again:
 * every entry is obsolete (logEntryObsolete) by the volume's manifest in the store now.
 * Obsolete stays obsolete (a manifest only moves on), so no age is needed. An object that
 * does not decode is kept and counted: it is a replay's error to report, not to hide.
 */
export async function sweepLogObjects(
  store: ObjectStore,
  cipher: StoreCipher,
  readManifestMeta: (volume: string) => Promise<{ generation: number; sequence: number } | undefined>,
  keys?: readonly string[],
): Promise<{ examined: number; deleted: string[]; unreadable: string[] }> {
  const listed = keys ?? (await store.list(LOG_PREFIX)).map((o) => o.key);
  const manifests = new Map<string, { generation: number; sequence: number } | undefined>();
  const deleted: string[] = [];
  const unreadable: string[] = [];
  for (const key of listed) {
    const object = await store.get(key);
    if (object === undefined) continue;
    let record: LogRecord;
    try {
      record = decodeLog(key, object.body, cipher);
    } catch (err) {
      if (!(err instanceof FormatError)) throw err;
      unreadable.push(key);
      continue;
    }
    let obsolete = true;
    for (const entry of record.entries) {
      if (!manifests.has(entry.volume)) manifests.set(entry.volume, await readManifestMeta(entry.volume));
      if (!logEntryObsolete(entry, manifests.get(entry.volume))) {
        obsolete = false;
        break;
      }
    }
    if (!obsolete) continue;
    await store.delete(key);
    deleted.push(key);
  }
  return { examined: listed.length, deleted, unreadable };
}

/** The generation and sequence of `volume`'s manifest in the store (undefined: none), for sweepLogObjects. */
export function storedManifestMeta(store: ObjectStore, cipher: StoreCipher): (volume: string) => Promise<{ generation: number; sequence: number } | undefined> {
  return async (volume) => {
    const key = manifestKey(volume);
    const object = await store.get(key);
    if (object === undefined) return undefined;
    const { meta } = decodeManifest(key, object.body, cipher);
    return { generation: meta.generation, sequence: meta.sequence };
  };
}
