// Fuzz target: manifests (store/manifest.ts). The first byte says how the rest is used:
//   bit 0  the rest is a manifest body (the layout after decompression): it is framed with
//          codec none and a valid checksum, so mutations reach the body's parser
//   bit 1  (whole objects) the stored length and checksum are fixed up, so mutations of
//          the codec, cipher and raw length fields get past the checksum
//   bit 2  the round trip compresses with zstd instead of none
//   bit 3  the store is encrypted (a fixed test key; the seeds hold a manifest sealed with it)
// Any bytes decode to a Manifest or a FormatError naming the key; a decoded manifest
// encodes and decodes to itself.
import { Blake3Hasher } from '@napi-rs/blake-hash';
import { PLAINTEXT, storeCipher } from '../../../src/crypto/cipher.js';
import { parseCompression } from '../../../src/crypto/compress.js';
import { FormatError } from '../../../src/store/errors.js';
import { MANIFEST_HEADER_BYTES, MANIFEST_MAGIC } from '../../../src/store/manifest.js';
import { decodeManifest } from '../../../src/store/manifest-decode.js';
import { encodeManifest } from '../../../src/store/manifest-seal.js';
import { refusedOr, sameValue } from '../expect.js';
import { FUZZ_DATA_KEY } from '../seeds.js';

const KEY = 'volumes/disk/manifest';
const SEALED = storeCipher(FUZZ_DATA_KEY);
const NONE = parseCompression('none');
const ZSTD = parseCompression('zstd-1');

/** Write the stored length and checksum of the manifest object `object` (header + body). */
export function fixManifestHeader(object: Buffer): void {
  object.writeUInt32LE(object.length - MANIFEST_HEADER_BYTES, 16);
  new Blake3Hasher()
    .update(object.subarray(0, 20))
    .update(object.subarray(MANIFEST_HEADER_BYTES))
    .digestBuffer()
    .copy(object, 20, 0, 16);
}

export function fuzz(data: Buffer): void {
  if (data.length === 0) return;
  const mode = data[0];
  let object: Buffer;
  if (mode & 1) {
    const body = data.subarray(1);
    object = Buffer.alloc(MANIFEST_HEADER_BYTES + body.length);
    MANIFEST_MAGIC.copy(object, 0);
    object.writeUInt16LE(1, 8);
    object.writeUInt32LE(body.length, 12);
    body.copy(object, MANIFEST_HEADER_BYTES);
    fixManifestHeader(object);
  } else {
    object = Buffer.from(data.subarray(1));
    if (mode & 2 && object.length >= MANIFEST_HEADER_BYTES) fixManifestHeader(object);
  }
  const cipher = mode & 8 ? SEALED : PLAINTEXT;
  const manifest = refusedOr(() => decodeManifest(KEY, object, cipher), FormatError, KEY);
  if (manifest === undefined) return;
  const again = decodeManifest(KEY, encodeManifest(KEY, manifest, mode & 4 ? ZSTD : NONE, cipher), cipher);
  sameValue(`manifest ${KEY}`, again, manifest);
}
