// A tiny bootable guest for the VM test and `npm run bench` (vm part): Debian's static
// busybox and a shell script as init in an ext4 image, booted by qemu-system-x86_64 (TCG;
// no KVM here) with Debian's kernel and initrd and an Updraft export as its root disk.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import type { Daemon } from './daemon.js';
import { run, runOk, tail } from './tools.js';

/** What the guest's init writes into /guest-file. */
export const GUEST_LINE = 'hello-from-the-guest';

/** Debian's newest kernel and its initrd in /boot, if installed. */
export function kernel(): { vmlinuz: string; initrd: string } | undefined {
  const boot = fs.existsSync('/boot') ? fs.readdirSync('/boot') : [];
  const vmlinuz = boot.filter((f) => f.startsWith('vmlinuz-')).sort().at(-1);
  if (!vmlinuz) return undefined;
  const initrd = `initrd.img-${vmlinuz.slice('vmlinuz-'.length)}`;
  return boot.includes(initrd) ? { vmlinuz: path.join('/boot', vmlinuz), initrd: path.join('/boot', initrd) } : undefined;
}

/** A 64 MiB ext4 image whose init writes a file and powers off. */
export async function buildRootImage(dir: string): Promise<string> {
  const root = path.join(dir, 'rootfs');
  for (const sub of ['bin', 'proc', 'sys', 'dev', 'run']) fs.mkdirSync(path.join(root, sub), { recursive: true });
  fs.copyFileSync('/bin/busybox', path.join(root, 'bin', 'busybox'));
  fs.chmodSync(path.join(root, 'bin', 'busybox'), 0o755);
  fs.writeFileSync(
    path.join(root, 'init.sh'),
    [
      '#!/bin/busybox sh',
      '/bin/busybox mount -t proc proc /proc',
      'echo "updraft-guest: booted"',
      `echo ${GUEST_LINE} > /guest-file`,
      '/bin/busybox sync',
      'echo "updraft-guest: wrote /guest-file"',
      '/bin/busybox poweroff -f',
      '',
    ].join('\n'),
    { mode: 0o755 },
  );
  const image = path.join(dir, 'root.img');
  await runOk('mke2fs', ['-q', '-t', 'ext4', '-d', root, '-F', image, '64M'], { timeoutMs: 60_000 });
  return image;
}

/** Boot the VM with export `name` of `daemon` as its root disk; resolves with the boot time. */
export async function boot(daemon: Daemon, name: string, k: { vmlinuz: string; initrd: string }): Promise<number> {
  const started = performance.now();
  const r = await run(
    'qemu-system-x86_64',
    [
      '-accel', 'tcg', '-m', '512', '-smp', '1', '-nographic', '-no-reboot', '-nodefaults', '-serial', 'stdio',
      '-kernel', k.vmlinuz, '-initrd', k.initrd,
      '-append', 'root=/dev/vda rw console=ttyS0 init=/init.sh panic=-1 quiet',
      '-drive', `file=${daemon.uri(name)},format=raw,if=virtio,cache=none`,
    ],
    { timeoutMs: 240_000, cwd: daemon.dir },
  );
  const output = `${tail(r.stdout, 20)}\n${tail(r.stderr, 10)}`;
  assert.ok(!r.timedOut, `the VM did not power off within 240 s\n${output}`);
  assert.equal(r.code, 0, `qemu exited ${r.code}\n${output}`);
  assert.match(r.stdout, /updraft-guest: wrote \/guest-file/, `the guest did not run its init\n${output}`);
  return performance.now() - started;
}

/** The contents of /guest-file in an export (copied out with nbdcopy, read with debugfs). */
export async function guestFile(daemon: Daemon, name: string, dir: string): Promise<string> {
  const copy = path.join(dir, `${name.replace(/\//g, '_')}.img`);
  await runOk('nbdcopy', [daemon.uri(name), copy], { timeoutMs: 60_000 });
  const r = await run('debugfs', ['-R', 'cat /guest-file', copy], { timeoutMs: 30_000 });
  fs.rmSync(copy, { force: true });
  return r.stdout.trim();
}
