// The host pack index's sync() across failed syncs and a power cut, on the simulation's
// disk (test/sim/disk.ts), which keeps only what reached the medium: an fdatasync that
// fails drops the file's dirty pages, and a rename stays undone at a power cut until its
// folder is fsynced. What a sync() that resolved covered must be found after a power cut
// (the cache lets a block go once its pack index entry is durable: src/store/upload.ts).
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { blockKey } from '../src/blocks/cache.js';
import { CODEC_LZ4 } from '../src/crypto/compress.js';
import { blockHash } from '../src/crypto/hash.js';
import { useDisk, type Disk } from '../src/disk/disk.js';
import { PackIndex, type PackLocation } from '../src/store/pack-index.js';
import { SimDisk } from './sim/disk.js';

const FILE = '/host/packs.index';
const key = (i: number) => blockKey(blockHash(Buffer.from(`block ${i}`)));
const location = (pack: string, i: number): PackLocation => ({ pack, offset: 64 + i * 1000, length: 900, rawLength: 65536, codec: CODEC_LZ4 });

/**
 * A simulated disk on which every unsynced page and folder entry is lost at a power cut,
 * with switches to fail the next fdatasync of a file and the next fsync of a folder.
 */
function failingDisk(): { sim: SimDisk; disk: Disk; fail: { fdatasync: boolean; folderFsync: boolean } } {
  // random() 0.9: a power cut keeps the old version of everything unsynced; no fsync fails at rate 0.
  const sim = new SimDisk(() => 0.9, { fsyncErrorRate: 0, capacityBytes: 1 << 30 });
  const fail = { fdatasync: false, folderFsync: false };
  const once = (which: keyof typeof fail, call: () => Promise<void>): Promise<void> => {
    if (!fail[which]) return call();
    fail[which] = false;
    sim.faults.fsyncErrorRate = 1; // SimDisk fails it as Linux does: dirty pages dropped
    return call().finally(() => (sim.faults.fsyncErrorRate = 0));
  };
  const disk: Disk = {
    ...sim.api,
    fdatasync: (fd) => once('fdatasync', () => sim.api.fdatasync(fd)),
    fsync: (fd) => once('folderFsync', () => sim.api.fsync(fd)),
  };
  disk.mkdirSync('/host', { recursive: true });
  return { sim, disk, fail };
}

test('a sync whose rewrite could not make its rename durable fails, and the next sync rewrites again: what it covered survives a power cut', async () => {
  const { sim, disk, fail } = failingDisk();
  const previous = useDisk(disk);
  try {
    const pack = 'e0acf03d953fb6363f3684a5f4a82ff1';
    const index = PackIndex.open(FILE);
    index.add([[key(1), location(pack, 1)]]);
    await index.sync();

    // A failed fdatasync drops the page with block 2's record: the next sync must rewrite the file.
    index.add([[key(2), location(pack, 2)]]);
    fail.fdatasync = true;
    await assert.rejects(index.sync(), /pack index \/host\/packs\.index: fdatasync: EIO/);

    // The rewrite renames its new file over the old one, but the folder's fsync fails: the
    // old file, without block 2, may come back at a power cut, so this sync did not make it durable.
    fail.folderFsync = true;
    await assert.rejects(index.sync(), /pack index \/host\/packs\.index: rewrite after a failed sync: .*fsync of its folder after the rewrite: EIO/);

    await index.sync();
    index.close();
    sim.powerCut();
    const reopened = PackIndex.open(FILE);
    assert.deepEqual(reopened.get(key(1)), location(pack, 1));
    assert.deepEqual(reopened.get(key(2)), location(pack, 2), 'block 2, covered by a sync that resolved, is in the pack index after the power cut');
    reopened.close();
  } finally {
    useDisk(previous);
  }
});
