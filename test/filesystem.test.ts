// A real filesystem on an Updraft volume, end to end, across a daemon crash.
//
// The kernel is the client: nbdfuse exposes the export as a file, a loop device turns the
// file into a block device, mkfs.ext4 and mount put ext4 on it, and `cp -a` fills it with
// a few thousand real files. Unmounting, detaching the loop device and unmounting the
// FUSE file push everything through NBD WRITE and FLUSH. Then the daemon is SIGKILLed and
// restarted (DESIGN.md invariant 1: after a FLUSH ack, data survives SIGKILL and a
// restart), the volume is attached again the same way, e2fsck must find the filesystem
// clean and every file must read back with the same SHA-256, mode, size and link target.
//
// Sealing is tuned so that the kill finds the volume in a mixed state, and the test
// checks that it does: part of the data sealed into content-addressed blocks in the
// block cache (a small dirty budget makes the background sealer run while the data
// streams in), part still in the overlay (a long idle time keeps the idle sealer from
// sealing the tail before the kill), and the journal naming both. Recovery must
// reassemble all three.

import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { existsSync } from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { test, type TestContext } from 'node:test';
import { attach, fsckClean, isMounted, mount, Undo } from './harness/block-device.js';
import { removeDir, scratchDir, startDaemon, type Daemon } from './harness/daemon.js';
import { TOOLS, requireRoot, requireTools, runOk, tail } from './harness/tools.js';

const GiB = 1024 ** 3;
const MiB = 1024 ** 2;
const VOLUME = 'fsvol';
/** Source trees copied into the filesystem, in order, until MIN_FILES files are reached. */
const SOURCE_TREES = ['/usr/share/doc', '/usr/include', '/usr/share/perl5', '/usr/lib/python3'];
const MIN_FILES = 2000;

/** Regular files below dir (symlinks not followed). */
async function countFiles(dir: string): Promise<number> {
  let n = 0;
  for (const entry of await fsp.readdir(dir, { withFileTypes: true, recursive: true })) if (entry.isFile()) n++;
  return n;
}

interface TreeSnapshot {
  /** relative path -> description (type, mode, size, SHA-256 or link target). */
  entries: Map<string, string>;
  files: number;
  bytes: number;
}

/** Every entry below root except lost+found, read through the filesystem. */
async function snapshotTree(root: string): Promise<TreeSnapshot> {
  const snapshot: TreeSnapshot = { entries: new Map(), files: 0, bytes: 0 };
  const walk = async (rel: string): Promise<void> => {
    const names = (await fsp.readdir(path.join(root, rel))).sort();
    for (const name of names) {
      if (rel === '' && name === 'lost+found') continue;
      const r = rel === '' ? name : `${rel}/${name}`;
      const full = path.join(root, r);
      const st = await fsp.lstat(full);
      const mode = (st.mode & 0o7777).toString(8);
      if (st.isSymbolicLink()) {
        snapshot.entries.set(r, `link -> ${await fsp.readlink(full)}`);
      } else if (st.isDirectory()) {
        snapshot.entries.set(r, `dir ${mode}`);
        await walk(r);
      } else if (st.isFile()) {
        const data = await fsp.readFile(full);
        snapshot.entries.set(r, `file ${mode} ${st.size} sha256=${createHash('sha256').update(data).digest('hex')}`);
        snapshot.files++;
        snapshot.bytes += st.size;
      } else {
        snapshot.entries.set(r, `other ${st.mode.toString(8)}`);
      }
    }
  };
  await walk('');
  return snapshot;
}

async function metrics(daemon: Daemon): Promise<any> {
  const response = await daemon.api('GET', `/api/exports/${VOLUME}/metrics`);
  assert.equal(response.status, 200, `GET metrics: ${response.text}`);
  return response.json;
}

test('ext4 on nbdfuse + loop survives SIGKILL of the daemon: e2fsck clean, every file intact', async (t: TestContext) => {
  if (!requireRoot(t, 'losetup, mount')) return;
  if (
    !requireTools(t, [TOOLS.nbdfuse, TOOLS.fusermount3, TOOLS.losetup, TOOLS.mkfsExt4, TOOLS.e2fsck, TOOLS.mount])
  ) {
    return;
  }
  if (!existsSync('/dev/fuse')) {
    if (process.env.CI) throw new Error('needs /dev/fuse (CI is set, so this is a failure, not a skip)');
    t.skip('needs /dev/fuse');
    return;
  }

  const undo = new Undo();
  const work = await scratchDir('updraft-fs-');
  const fuseDir = path.join(work, 'fuse');
  const mnt = path.join(work, 'mnt');
  await fsp.mkdir(fuseDir);
  await fsp.mkdir(mnt);
  undo.push(`remove ${work}`, async () => {
    // Never recurse into something still mounted (a dead FUSE mount would hang or fail).
    if (isMounted(fuseDir) || isMounted(mnt)) throw new Error(`not removing ${work}: still mounted`);
    await removeDir(work);
  });

  const daemon = await startDaemon({
    toml: {
      servers: { nbd: { auto_create_size_gb: 1 } },
      // A 16 MB dirty budget seals while the data streams in; a long idle time leaves the
      // tail in the overlay at the kill (see the header).
      volumes: { seal_idle_ms: 120_000, seal_dirty_mb: 16 },
    },
  });
  undo.push('stop the daemon', async () => {
    await daemon.cleanup();
  });
  t.after(async () => {
    const problems = await undo.runAll();
    if (problems.length > 0) throw new Error(`cleanup failed:\n${problems.join('\n')}`);
  });

  try {
    // ---- fill a fresh filesystem ------------------------------------------------------
    let attached = await attach(daemon.uri(VOLUME), GiB, fuseDir, undo);
    await runOk('mkfs.ext4', ['-q', attached.loop], { timeoutMs: 180_000 });
    let umount = await mount(attached.loop, mnt, undo, false);

    const data = path.join(mnt, 'data');
    await fsp.mkdir(data);
    let sources = 0;
    let sourceFiles = 0;
    for (const tree of SOURCE_TREES) {
      if (sourceFiles >= MIN_FILES) break;
      if (!existsSync(tree)) continue;
      await runOk('cp', ['-a', tree, path.join(data, String(sources++))], { timeoutMs: 300_000 });
      sourceFiles += await countFiles(tree);
    }
    const expected = await snapshotTree(mnt);
    t.diagnostic(`copied ${expected.files} files, ${(expected.bytes / MiB).toFixed(1)} MiB from ${sources} source trees`);
    assert.ok(expected.files >= 1000, `only ${expected.files} files found to copy; the test needs at least 1000`);

    await runOk('sync', [], { timeoutMs: 300_000 });
    await umount();
    await fsckClean(attached.loop, 'after writing, before the kill');
    await attached.detach();

    // ---- the state at the kill: sealed blocks, overlay, journal --------------------------
    const before = await metrics(daemon);
    t.diagnostic(
      `before SIGKILL: chunks_sealed=${before.chunks_sealed} mapped_chunks=${before.mapped_chunks} ` +
        `dirty_bytes=${before.dirty_bytes} dirty_chunks=${before.dirty_chunks} flushes=${before.ops.flush.count} ` +
        `writes=${before.ops.write.count} trims=${before.ops.trim.count}`,
    );
    assert.ok(before.ops.flush.count > 0, 'the kernel sent NBD FLUSH on unmount/detach');
    assert.ok(before.chunks_sealed > 0, 'part of the data was sealed into the block cache before the kill');
    assert.ok(before.mapped_chunks > 0, 'the block map names sealed blocks before the kill');
    assert.ok(before.dirty_bytes > 0, 'part of the data was still in the overlay at the kill');

    await daemon.kill9();
    await daemon.restart();
    // What recovery rebuilt from the journal, before the sealer (which sees a recovered
    // volume as idle) seals the overlay away.
    const recovered = new RegExp(`recovered volume volume=${VOLUME} .*chunks=(\\d+) dirty_bytes=(\\d+)`).exec(daemon.log());
    assert.ok(recovered, 'the daemon log shows the volume recovered');
    assert.doesNotMatch(daemon.log(), / ERROR |cannot recover|does not hold/, 'no errors or lost state in the daemon log');
    t.diagnostic(`recovered: mapped_chunks=${recovered[1]} dirty_bytes=${recovered[2]}`);
    assert.ok(Number(recovered[1]) > 0, 'sealed blocks were recovered from the journal');
    assert.ok(Number(recovered[2]) > 0, 'overlay sectors were recovered from the journal');

    // ---- attach again, check ---------------------------------------------------------------
    attached = await attach(daemon.uri(VOLUME), GiB, fuseDir, undo);
    await fsckClean(attached.loop, 'after SIGKILL and restart');
    umount = await mount(attached.loop, mnt, undo, true);
    const actual = await snapshotTree(mnt);
    const problems: string[] = [];
    for (const [rel, want] of expected.entries) {
      const got = actual.entries.get(rel);
      if (got !== want) problems.push(`${rel}: want ${want}, got ${got ?? 'missing'}`);
    }
    for (const rel of actual.entries.keys()) if (!expected.entries.has(rel)) problems.push(`${rel}: unexpected entry`);
    assert.equal(
      problems.length,
      0,
      `${problems.length} of ${expected.entries.size} entries differ after the crash:\n${problems.slice(0, 20).join('\n')}`,
    );
    t.diagnostic(`all ${expected.entries.size} entries (${actual.files} files) match after SIGKILL + restart`);
    await umount();
    await attached.detach();
  } catch (err) {
    t.diagnostic('daemon log (tail):');
    for (const line of tail(daemon.log(), 30).split('\n')) t.diagnostic(line);
    throw err;
  }
});
