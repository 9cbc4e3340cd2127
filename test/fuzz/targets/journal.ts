// Fuzz target: a volume's metadata journal (volume/journal.ts). The first byte says how
// the rest is used: bit 0 writes a valid header (magic, this volume's block size), bit 1
// fixes up the checksum of every whole batch, so mutations reach the batch records. Any
// file replays (a torn tail cut) or fails with an Error naming the file; what it replays
// has the volume's sector mask size and chunks inside the volume; a file it replayed
// opens again to the same state with nothing cut.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { blake3 } from '@napi-rs/blake-hash';
import { Journal } from '../../../src/volume/journal.js';
import { refusedOr, sameValue } from '../expect.js';

const BLOCK_SIZE = 65536;
const MASK_BYTES = 2;
const DIR = fs.mkdtempSync(path.join(os.tmpdir(), 'updraft-fuzz-journal-'));
const FILE = path.join(DIR, 'journal');
process.on('exit', () => fs.rmSync(DIR, { recursive: true, force: true }));

/** Fix the checksum of every whole batch in a journal file. */
export function fixJournalChecksums(file: Buffer): void {
  if (file.length < 16) return;
  const recordBytes = 8 + 16 + file.readUInt32BE(12);
  for (let at = 16; at + 40 <= file.length; ) {
    const magic = file.readUInt32BE(at);
    if (magic !== 0x42544348 && magic !== 0x424d4150 && magic !== 0x424c4f47) return;
    let end = at + 24 + file.readUInt32BE(at + 4) * (magic === 0x424d4150 ? 24 : recordBytes);
    if (magic === 0x424c4f47) {
      // BLOG: u32 extent count, then per extent u64 position, u32 length and the bytes.
      if (end + 4 > file.length) return;
      const extents = file.readUInt32BE(end);
      end += 4;
      for (let i = 0; i < extents; i++) {
        if (end + 12 > file.length) return;
        end += 12 + file.readUInt32BE(end + 8);
      }
    }
    if (end + 16 > file.length) return;
    blake3(file.subarray(at, end)).copy(file, end, 0, 16);
    at = end + 16;
  }
}

export function fuzz(data: Buffer): void {
  if (data.length === 0) return;
  const file = Buffer.from(data.subarray(1));
  if (data[0] & 1 && file.length >= 12) {
    file.write('UPDJRNL1', 0, 'latin1');
    file.writeUInt32BE(BLOCK_SIZE, 8);
  }
  if (data[0] & 2) fixJournalChecksums(file);
  fs.writeFileSync(FILE, file);
  const opened = refusedOr(() => Journal.open(FILE, BLOCK_SIZE, MASK_BYTES), Error, FILE);
  if (opened === undefined) return;
  opened.journal.close();
  // A volume never shrinks, so every chunk a journal names is inside its final size.
  for (const chunk of opened.state.chunks.keys()) {
    if (chunk >= Math.ceil(opened.state.size / BLOCK_SIZE)) throw new Error(`journal ${FILE}: replayed chunk ${chunk} of a ${opened.state.size}-byte volume`);
  }
  // A 64 KiB chunk has 16 sectors of 4 KiB: a 2-byte mask. Records of another mask size cannot be this volume's.
  if (opened.journal.maskBytes !== MASK_BYTES) throw new Error(`journal ${FILE}: opened with ${opened.journal.maskBytes}-byte sector masks for ${BLOCK_SIZE}-byte chunks`);
  const again = Journal.open(FILE, BLOCK_SIZE, MASK_BYTES);
  again.journal.close();
  if (again.state.truncatedBytes !== 0) throw new Error(`journal ${FILE}: reopened after a repair and cut ${again.state.truncatedBytes} more bytes`);
  sameValue(`journal ${FILE}`, { ...again.state, truncatedBytes: 0, chunks: [...again.state.chunks] }, { ...opened.state, truncatedBytes: 0, chunks: [...opened.state.chunks] });
}
