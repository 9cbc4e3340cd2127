// A real microVM boots from an Updraft volume. The test builds a tiny root filesystem
// (Debian's static busybox and a shell script as init) into an ext4 image, blesses it,
// forks it, and boots qemu-system-x86_64 (TCG) with Debian's kernel and initrd and the
// fork attached over NBD as its root disk. The guest writes a file and powers off: the
// file is in the fork, not in the base. Then the boot hot set: a fork booted on an empty
// host with the recorded hot set makes fewer on-demand store fetches than one without.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { test, type TestContext } from 'node:test';
import { fileStore, metric, startCluster, waitFor, withLogs } from './harness/cluster.js';
import { DAEMON_MAIN } from './harness/daemon.js';
import { requireTools, runOk, TOOLS } from './harness/tools.js';
import { boot, buildRootImage, guestFile, GUEST_LINE, kernel } from './harness/vm.js';

const TIMEOUT = 600_000;

async function bless(cluster: { dir: string }, image: string, name: string, extra: string[] = []): Promise<void> {
  const config = path.join(cluster.dir, 'offline.toml');
  // One block per pack, so the boot's on-demand fetches count chunks, not the few packs
  // a 64 MiB image would otherwise fit in.
  fs.writeFileSync(config, `[storage]\nurl = "file://${path.join(cluster.dir, 'store')}"\n[servers.nbd]\nblocks_per_pack = 1\n`);
  await runOk(process.execPath, [DAEMON_MAIN, 'bless', image, '--name', name, '-c', config, ...extra], { timeoutMs: 120_000, cwd: cluster.dir });
}

test('a microVM boots from a fork of a blessed image over NBD; its write lands in the fork only; the boot hot set cuts on-demand fetches on a cold host', { timeout: TIMEOUT }, async (t: TestContext) => {
  if (!requireTools(t, [TOOLS.qemuSystem, TOOLS.mke2fs, TOOLS.debugfs, TOOLS.nbdcopy])) return;
  const k = kernel();
  if (!k || !fs.existsSync('/bin/busybox')) {
    if (process.env.CI) assert.fail('needs a kernel and initrd in /boot (linux-image-amd64) and /bin/busybox (busybox-static)');
    t.skip('needs linux-image-amd64 and busybox-static');
    return;
  }
  const cluster = await startCluster(fileStore);
  try {
    // The same image twice (the second costs no upload): images/recorded asks, at bless,
    // for its first boot to be recorded as its hot set; images/busybox has none.
    const image = await buildRootImage(cluster.dir);
    await bless(cluster, image, 'images/busybox');
    // The window starts at the first read (qemu probing the disk as it starts), and the
    // guest mounts its root 15-30 s later under TCG on a loaded machine: 60 s covers the boot.
    await bless(cluster, image, 'images/recorded', ['--boot-record', '60']);
    const bootset = path.join(cluster.dir, 'store', 'volumes', 'images', 'recorded', 'bootset');
    assert.equal(JSON.parse(fs.readFileSync(bootset, 'utf8')).recording, true, 'bless --boot-record left no recording request');
    const a = await cluster.start('host-a');
    await withLogs([a], async () => {
      // Waking the fork answers its image's recording request: this boot is recorded.
      const fork = await a.api('POST', '/api/exports/images%2Frecorded/fork', { target: 'vm/one', mode: 'lazy' });
      assert.equal(fork.status, 201, fork.text);
      const firstMs = await boot(a, 'vm/one', k);
      t.diagnostic(`first boot, blocks fetched on demand from the store: ${(firstMs / 1000).toFixed(1)} s`);
      assert.equal(await guestFile(a, 'vm/one', cluster.dir), GUEST_LINE, 'the guest write is not in the fork');
      const base = await guestFile(a, 'images/recorded', cluster.dir);
      assert.doesNotMatch(base, new RegExp(GUEST_LINE), 'the guest write leaked into the base image');
    });
    // Two cold hosts boot forks made offline (no host holds them): one of images/busybox,
    // which has no hot set, and one of images/recorded, whose hot set the boot above made.
    const config = path.join(cluster.dir, 'offline.toml');
    await runOk(process.execPath, [DAEMON_MAIN, 'fork', 'images/busybox', 'vm/cold', '--offline', '-c', config], { timeoutMs: 60_000, cwd: cluster.dir });
    await waitFor('the boot hot set of images/recorded', async () => {
      const set = JSON.parse(fs.readFileSync(bootset, 'utf8'));
      return set.recording === undefined && set.chunks.length > 0;
    }, 90_000, 500);
    await runOk(process.execPath, [DAEMON_MAIN, 'fork', 'images/recorded', 'vm/hot', '--offline', '-c', config], { timeoutMs: 60_000, cwd: cluster.dir });
    // Read-ahead off on both, so the comparison shows the hot set alone (with it on, read-ahead
    // of this small image already fetches most of what the boot reads).
    const noReadAhead = { storage: { read_ahead_packs: 0 } };
    const b = await cluster.start('host-b', noReadAhead);
    const c = await cluster.start('host-c', noReadAhead);
    await withLogs([a, b, c], async () => {
      const coldMs = await boot(b, 'vm/cold', k);
      const coldDemand = await metric(b, 'updraft_store_read_waits_total');
      // Host C is asked for the volume first, so the hot set goes out while qemu starts.
      assert.equal((await c.api('PUT', '/api/exports/vm%2Fhot', { size_gb: 0.0625 })).status, 200);
      const hotMs = await boot(c, 'vm/hot', k);
      const hotDemand = await metric(c, 'updraft_store_read_waits_total');
      const hotset = await metric(c, 'updraft_store_hotset_packs_total');
      t.diagnostic(`cold host boot: ${(coldMs / 1000).toFixed(1)} s with ${coldDemand} reads waiting on the store; with the hot set: ${(hotMs / 1000).toFixed(1)} s, ${hotDemand} reads waiting, ${hotset} packs fetched up front`);
      assert.ok(hotset > 0, 'no hot set fetch happened');
      assert.ok(coldDemand >= 5, `only ${coldDemand} reads of the cold boot waited on the store`);
      assert.ok(hotDemand < coldDemand, `with the hot set ${hotDemand} reads waited on the store, without ${coldDemand}`);
    });
  } finally {
    await cluster.cleanup();
  }
});
