// `updraft bless`, `updraft dump`, `updraft fork` and `updraft checkpoint` as a user runs
// them: the real CLI against a file:// store, offline or through a running daemon.
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { connect, fileStore, MiB, readAll, startCluster, withLogs } from './harness/cluster.js';
import { DAEMON_MAIN } from './harness/daemon.js';
import { run } from './harness/tools.js';

const TIMEOUT = 180_000;

async function cli(args: string[], cwd: string): Promise<{ code: number | null; json: any; stderr: string }> {
  const r = await run(process.execPath, [DAEMON_MAIN, ...args], { cwd, timeoutMs: 120_000 });
  let json: any = null;
  try {
    json = JSON.parse(r.stdout);
  } catch {
    // Not JSON: the test looks at code and stderr.
  }
  return { code: r.code, json, stderr: r.stderr };
}

/** Every object file under a file:// store folder. */
function storeBytes(dir: string, sub: string): number {
  const root = path.join(dir, sub);
  if (!fs.existsSync(root)) return 0;
  let total = 0;
  for (const entry of fs.readdirSync(root, { recursive: true, withFileTypes: true })) {
    if (entry.isFile() && !entry.name.startsWith('.~')) total += fs.statSync(path.join(entry.parentPath, entry.name)).size;
  }
  return total;
}

test('bless imports an image (zeros skipped, re-run uploads nothing), a second image stores only its difference, dump writes it back', { timeout: TIMEOUT }, async () => {
  const cluster = await startCluster(fileStore);
  try {
    const storeDir = path.join(cluster.dir, 'store');
    const config = path.join(cluster.dir, 'offline.toml');
    fs.writeFileSync(config, `[storage]\nurl = "file://${storeDir}"\n[cache]\ndir = "${path.join(cluster.dir, 'offline-cache')}"\n`);
    // Image 1: 12 MiB of data, 8 MiB of zeros, the first MiB again, an odd tail.
    const data = randomBytes(12 * MiB);
    const image1 = Buffer.concat([data, Buffer.alloc(8 * MiB), data.subarray(0, MiB), randomBytes(5000)]);
    const file1 = path.join(cluster.dir, 'base.img');
    fs.writeFileSync(file1, image1);
    const first = await cli(['bless', file1, '--name', 'images/base', '-c', config], cluster.dir);
    assert.equal(first.code, 0, first.stderr);
    assert.equal(first.json.zeroChunks, 64);
    assert.equal(first.json.newBlocks, 12 * 8 + 1);
    assert.equal(first.json.dedupChunks, 8, 'the repeated MiB is stored once');
    assert.match(first.stderr, /bless: .* MiB read/, 'progress lines when not on a terminal');
    const stored1 = storeBytes(storeDir, 'packs');
    assert.ok(stored1 < 13.2 * MiB, `stored ${stored1} bytes for 13 MiB of distinct data`);
    const again = await cli(['bless', file1, '--name', 'images/base', '-c', config], cluster.dir);
    assert.equal(again.code, 0, again.stderr);
    assert.equal(again.json.bytesUploaded, 0);
    assert.equal(again.json.unchanged, true);
    assert.equal(again.json.etag, first.json.etag);
    // Image 2 shares image 1 and adds 2 MiB: only the difference is stored.
    const file2 = path.join(cluster.dir, 'derived.img');
    fs.writeFileSync(file2, Buffer.concat([image1.subarray(0, 20 * MiB), randomBytes(2 * MiB)]));
    const second = await cli(['bless', file2, '--name', 'images/derived', '-c', config], cluster.dir);
    assert.equal(second.code, 0, second.stderr);
    const added = storeBytes(storeDir, 'packs') - stored1;
    assert.ok(second.json.bytesUploaded <= 2.1 * MiB && added <= 2.1 * MiB, `the second image stored ${added} bytes`);
    // dump writes the volume back out: the image, padded to 4 KiB, sparse where it was zero.
    const out = path.join(cluster.dir, 'out.img');
    const dumped = await cli(['dump', 'images/base', out, '-c', config], cluster.dir);
    assert.equal(dumped.code, 0, dumped.stderr);
    const back = fs.readFileSync(out);
    assert.equal(back.length, Math.ceil(image1.length / 4096) * 4096);
    assert.ok(back.subarray(0, image1.length).equals(image1));
    assert.ok(fs.statSync(out).blocks * 512 < back.length - 6 * MiB, 'the zero range was written');
    // A daemon serves the blessed image like any volume.
    const a = await cluster.start('host-a');
    await withLogs([a], async () => {
      const c = await connect(a, 'images/derived');
      assert.ok((await readAll(c, 0, 22 * MiB)).equals(fs.readFileSync(file2)));
      await c.disconnect();
    });
    // The daemon took the volume over (lease, manifest under its generation): blessing
    // another image over it is refused, while a blessed image nobody took may be replaced.
    const live = await cli(['bless', file1, '--name', 'images/derived', '-c', config], cluster.dir);
    assert.equal(live.code, 1, live.stderr);
    assert.match(live.stderr, /opened by a daemon/);
    const replaced = await cli(['bless', file2, '--name', 'images/base', '-c', config], cluster.dir);
    assert.equal(replaced.code, 0, replaced.stderr);
    assert.equal(replaced.json.bytesUploaded, 0);
  } finally {
    await cluster.cleanup();
  }
});

test('bless of a missing file fails clearly and writes nothing; fork and checkpoint from the command line', { timeout: TIMEOUT }, async () => {
  const cluster = await startCluster(fileStore);
  try {
    const storeDir = path.join(cluster.dir, 'store');
    const config = path.join(cluster.dir, 'offline.toml');
    fs.writeFileSync(config, `[storage]\nurl = "file://${storeDir}"\n`);
    const missing = await cli(['bless', path.join(cluster.dir, 'nope.img'), '--name', 'x', '-c', config], cluster.dir);
    assert.equal(missing.code, 2, missing.stderr);
    assert.match(missing.stderr, /nope\.img: no such file/);
    assert.equal(storeBytes(storeDir, '.'), 0, 'bless of a missing file wrote to the store');
    const badName = await cli(['bless', config, '--name', '../x', '-c', config], cluster.dir);
    assert.equal(badName.code, 2, badName.stderr);
    for (const seconds of ['0', '-1', 'soon', '601']) {
      const badRecord = await cli(['bless', config, '--name', 'x', '--boot-record', seconds, '-c', config], cluster.dir);
      assert.equal(badRecord.code, 2, badRecord.stderr);
      assert.match(badRecord.stderr, /--boot-record/);
    }
    assert.equal(storeBytes(storeDir, '.'), 0, 'a refused bless wrote to the store');

    const a = await cluster.start('host-a');
    await withLogs([a], async () => {
      const image = randomBytes(4 * MiB);
      const file = path.join(cluster.dir, 'small.img');
      fs.writeFileSync(file, image);
      assert.equal((await cli(['bless', file, '--name', 'small', '-c', config], cluster.dir)).code, 0);
      // Offline lazy fork, no daemon involved.
      const offline = await cli(['fork', 'small', 'small-copy', '--offline', '-c', config], cluster.dir);
      assert.equal(offline.code, 0, offline.stderr);
      assert.equal(offline.json.mode, 'lazy');
      const dup = await cli(['fork', 'small', 'small-copy', '--offline', '-c', config], cluster.dir);
      assert.equal(dup.code, 1);
      assert.match(dup.stderr, /already exists/);
      // Through the daemon: a consistent fork and a checkpoint.
      const c = await connect(a, 'small-copy');
      assert.ok((await readAll(c, 0, 4 * MiB)).equals(image));
      await c.write(0, Buffer.alloc(4096, 9));
      await c.disconnect();
      const fork = await cli(['fork', 'small-copy', 'small-copy-2', '-c', a.configPath], cluster.dir);
      assert.equal(fork.code, 0, fork.stderr);
      assert.equal(fork.json.mode, 'consistent');
      const created = await cli(['checkpoint', 'create', 'small-copy', 'cp1', '-c', a.configPath], cluster.dir);
      assert.equal(created.code, 0, created.stderr);
      const listed = await cli(['checkpoint', 'list', 'small-copy', '-c', a.configPath], cluster.dir);
      assert.deepEqual(listed.json.map((x: { name: string }) => x.name), ['cp1']);
      const deleted = await cli(['checkpoint', 'delete', 'small-copy', 'cp1', '-c', a.configPath], cluster.dir);
      assert.equal(deleted.code, 0, deleted.stderr);
      const c2 = await connect(a, 'small-copy-2');
      const expected = Buffer.from(image);
      Buffer.alloc(4096, 9).copy(expected, 0);
      assert.ok((await readAll(c2, 0, 4 * MiB)).equals(expected));
      await c2.disconnect();
    });
  } finally {
    await cluster.cleanup();
  }
});
