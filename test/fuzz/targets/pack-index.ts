// Fuzz target: the host pack index file (store/pack-index.ts). The first byte's bit 0 fixes
// up the CRC of every whole record, so mutations reach the record checks. Any file opens
// (torn tail cut, corrupt records dropped) or fails with a FormatError naming the file;
// a file it opened and repaired opens again to the same entries with nothing to repair.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import zlib from 'node:zlib';
import { FormatError } from '../../../src/store/errors.js';
import { PackIndex } from '../../../src/store/pack-index.js';
import { refusedOr } from '../expect.js';

const HEADER_BYTES = 16;
const RECORD_BYTES = 52;
const DIR = fs.mkdtempSync(path.join(os.tmpdir(), 'updraft-fuzz-pack-index-'));
const FILE = path.join(DIR, 'packs.index');
process.on('exit', () => fs.rmSync(DIR, { recursive: true, force: true }));

export function fuzz(data: Buffer): void {
  if (data.length === 0) return;
  const file = Buffer.from(data.subarray(1));
  if (data[0] & 1) {
    for (let at = HEADER_BYTES; at + RECORD_BYTES <= file.length; at += RECORD_BYTES) {
      file.writeUInt32LE(zlib.crc32(file.subarray(at, at + 48)), at + 48);
    }
  }
  fs.rmSync(`${FILE}.compact`, { force: true });
  fs.writeFileSync(FILE, file);
  const index = refusedOr(() => PackIndex.open(FILE), FormatError, FILE);
  if (index === undefined) return;
  const entries = index.size;
  index.close();
  const again = PackIndex.open(FILE);
  try {
    if (again.size !== entries || again.truncatedBytes !== 0 || again.corruptRecords !== 0) {
      throw new Error(`pack index ${FILE}: opened with ${entries} entries; reopened: ${again.size} entries, ${again.truncatedBytes} bytes cut, ${again.corruptRecords} corrupt records`);
    }
  } finally {
    again.close();
  }
}
