// npm run bench, part vm: boot time of the test microVM (test/harness/vm.ts: busybox init in
// a 64 MiB ext4 image, qemu-system-x86_64 with TCG) from a fork on a cold host (empty
// cache, store on file://), without and with the boot hot set that `updraft bless
// --boot-record` had the first boot record. Default read-ahead; BENCH_VM_ROUNDS (2) boots
// of each, the median reported, with the reads that waited on the store.
// Prints "vm KEY VALUE" lines on stdout; progress on stderr.
import fs from 'node:fs';
import path from 'node:path';
import { fileStore, metric, startCluster, waitFor } from '../../dist/test/harness/cluster.js';
import { DAEMON_MAIN } from '../../dist/test/harness/daemon.js';
import { runOk } from '../../dist/test/harness/tools.js';
import { boot, buildRootImage, kernel } from '../../dist/test/harness/vm.js';

const ROUNDS = Number(process.env.BENCH_VM_ROUNDS || 2);
const say = (s) => process.stderr.write(`bench vm: ${s}\n`);
const record = (key, value) => process.stdout.write(`vm ${key} ${value}\n`);
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

const k = kernel();
if (!k || !fs.existsSync('/bin/busybox')) {
  say('needs linux-image-amd64 (a kernel and initrd in /boot) and busybox-static; skipped');
  process.exit(0);
}
const cluster = await startCluster(fileStore);
try {
  const config = path.join(cluster.dir, 'offline.toml');
  fs.writeFileSync(config, `[storage]\nurl = "file://${path.join(cluster.dir, 'store')}"\n`);
  const cli = (args) => runOk(process.execPath, [DAEMON_MAIN, ...args, '-c', config], { timeoutMs: 120_000, cwd: cluster.dir });
  const image = await buildRootImage(cluster.dir);
  await cli(['bless', image, '--name', 'images/plain']);
  await cli(['bless', image, '--name', 'images/recorded', '--boot-record', '30']);
  say('first boot (records the hot set of images/recorded)');
  const recorder = await cluster.start('recorder');
  await cli(['fork', 'images/recorded', 'vm/first', '--offline']);
  const firstMs = await boot(recorder, 'vm/first', k);
  const bootset = path.join(cluster.dir, 'store', 'volumes', 'images', 'recorded', 'bootset');
  await waitFor('the boot hot set', async () => JSON.parse(fs.readFileSync(bootset, 'utf8')).recording === undefined, 60_000, 500);
  const recorded = JSON.parse(fs.readFileSync(bootset, 'utf8')).chunks.length;
  record('first_boot_s', (firstMs / 1000).toFixed(1));
  record('hot_set_chunks', recorded);
  for (const [label, base] of [['cold', 'images/plain'], ['hot', 'images/recorded']]) {
    const times = [];
    const waits = [];
    for (let round = 0; round < ROUNDS; round++) {
      const host = await cluster.start(`${label}-${round}`);
      const name = `vm/${label}-${round}`;
      await cli(['fork', base, name, '--offline']);
      // Ask for the volume first, as a VMM's launcher would: the hot set goes out while qemu starts.
      const started = performance.now();
      const woke = await host.api('PUT', `/api/exports/${encodeURIComponent(name)}`, { size_gb: 0.0625 });
      if (woke.status !== 200) throw new Error(`wake ${name}: ${woke.status} ${woke.text}`);
      const bootMs = await boot(host, name, k);
      times.push(performance.now() - started);
      waits.push(await metric(host, 'updraft_store_read_waits_total'));
      say(`${label} boot ${round + 1}: ${(bootMs / 1000).toFixed(1)} s of qemu, ${waits.at(-1)} reads waited on the store`);
      await host.stop();
    }
    record(`${label}_boot_s`, (median(times) / 1000).toFixed(1));
    record(`${label}_read_waits`, median(waits));
  }
} finally {
  await cluster.cleanup();
}
