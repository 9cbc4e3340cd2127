// fio's nbd engine (libnbd) against Updraft: write a pattern, read it back and check
// every block's crc32c. Each run asserts that fio saw no error and that the verify
// phase really read the data back.

import assert from 'node:assert/strict';
import { after, before, test, type TestContext } from 'node:test';
import { removeDir, scratchDir, startDaemon, type Daemon } from './harness/daemon.js';
import { withLogs } from './harness/cluster.js';
import { TOOLS, requireTools } from './harness/tools.js';
import { assertVerified, fio, verifyArgs } from './harness/fio.js';

const MiB = 1024 * 1024;
const TEST_TIMEOUT_MS = 180_000;

async function exportMetrics(daemon: Daemon, name: string): Promise<any> {
  const response = await daemon.api('GET', `/api/exports/${encodeURIComponent(name)}/metrics`);
  assert.equal(response.status, 200, response.text);
  return response.json;
}


// One daemon for the plain workloads: sealing far off, so reads come from the overlay.
let daemon: Daemon | undefined;
let workDir: string | undefined;
before(async () => {
  workDir = await scratchDir('updraft-fio-');
  daemon = await startDaemon({ toml: { volumes: { seal_idle_ms: 600_000 } } });
});
after(async () => {
  await daemon?.cleanup();
  if (workDir) await removeDir(workDir);
});

function plain(t: TestContext): { daemon: Daemon; cwd: string } | undefined {
  if (!requireTools(t, [TOOLS.fio])) return undefined;
  assert.ok(daemon && workDir, 'daemon not started');
  return { daemon, cwd: workDir };
}

test('fio random 4 KiB writes at QD32 verify (crc32c)', { timeout: TEST_TIMEOUT_MS }, async (t) => {
  const env = plain(t);
  if (!env) return;
  await withLogs([env.daemon], async () => {
    const result = await fio(env.cwd, [
      '--name=randwrite-4k', ...verifyArgs(env.daemon.uri('fio-randwrite')),
      '--rw=randwrite', '--bs=4k', '--iodepth=32', '--size=64M', '--do_verify=1',
    ]);
    assertVerified(result);
    assert.equal(result.jobs[0].write.io_bytes, 64 * MiB);
  });
});

test('fio sequential 1 MiB writes at QD8 verify (crc32c)', { timeout: TEST_TIMEOUT_MS }, async (t) => {
  const env = plain(t);
  if (!env) return;
  await withLogs([env.daemon], async () => {
    const result = await fio(env.cwd, [
      '--name=write-1m', ...verifyArgs(env.daemon.uri('fio-seq')),
      '--rw=write', '--bs=1M', '--iodepth=8', '--size=128M', '--do_verify=1',
    ]);
    assertVerified(result);
    assert.equal(result.jobs[0].write.io_bytes, 128 * MiB);
  });
});

test('fio random writes of 512 B to 1 MiB at 512-byte (sector-unaligned) offsets, QD16, verify (crc32c)', { timeout: TEST_TIMEOUT_MS }, async (t) => {
  const env = plain(t);
  if (!env) return;
  await withLogs([env.daemon], async () => {
    const result = await fio(env.cwd, [
      '--name=bsrange', ...verifyArgs(env.daemon.uri('fio-bsrange')),
      '--rw=randwrite', '--bsrange=512-1M', '--blockalign=512', '--iodepth=16', '--size=64M', '--do_verify=1',
    ]);
    assertVerified(result);
  });
});

test('fio mixed random reads and writes at QD1 verify (crc32c)', { timeout: TEST_TIMEOUT_MS }, async (t) => {
  const env = plain(t);
  if (!env) return;
  await withLogs([env.daemon], async () => {
    const result = await fio(env.cwd, [
      '--name=randrw', ...verifyArgs(env.daemon.uri('fio-randrw')),
      '--rw=randrw', '--bs=4k', '--iodepth=1', '--size=64M', '--do_verify=1',
    ]);
    assertVerified(result);
  });
});

test('two concurrent fio processes on disjoint halves of one export (unix socket and TCP) both verify', { timeout: TEST_TIMEOUT_MS }, async (t) => {
  const env = plain(t);
  if (!env) return;
  await withLogs([env.daemon], async () => {
    const half = (name: string, uri: string, offset: string, bs: string) =>
      fio(env.cwd, [
        `--name=${name}`, ...verifyArgs(uri),
        '--rw=randwrite', `--bs=${bs}`, '--iodepth=16', `--offset=${offset}`, '--size=64M', '--do_verify=1',
      ]);
    const [low, high] = await Promise.all([
      half('low-half', env.daemon.uri('fio-shared'), '0', '4k'),
      half('high-half', env.daemon.tcpUri('fio-shared'), '64M', '64k'),
    ]);
    assertVerified(low);
    assertVerified(high);
    const metrics = await exportMetrics(env.daemon, 'fio-shared');
    assert.equal(metrics.ops.write.bytes, 128 * MiB, 'both processes wrote to the one export');
  });
});

test('an export does not hold another export\'s data: fio verify_only of export A\'s pattern fails on fresh export B', { timeout: TEST_TIMEOUT_MS }, async (t) => {
  // Also shows the verify check above can fail: the same verify, pointed at other data, reports it.
  const env = plain(t);
  if (!env) return;
  await withLogs([env.daemon], async () => {
    const job = ['--name=isolation', '--rw=randwrite', '--bs=4k', '--iodepth=16', '--size=16M'];
    const written = await fio(env.cwd, [...job, ...verifyArgs(env.daemon.uri('fio-iso-a')), '--do_verify=1']);
    assertVerified(written);
    const again = await fio(env.cwd, [...job, ...verifyArgs(env.daemon.uri('fio-iso-a')), '--do_verify=1', '--verify_only']);
    assert.equal(again.code, 0, `verify_only of A on A failed\n${again.output}`);
    assert.equal(again.jobs[0].error, 0, again.output);
    const other = await fio(env.cwd, [...job, ...verifyArgs(env.daemon.uri('fio-iso-b')), '--do_verify=1', '--verify_only']);
    assert.notEqual(other.code, 0, `verify_only of A's pattern passed on B\n${other.output}`);
    assert.notEqual(other.jobs[0].error, 0, other.output);
  });
});

test('fio verify_only passes when every block is sealed (reads from the disk-tier block cache), and random writes verify while sealing runs under a 4 MB dirty budget', { timeout: TEST_TIMEOUT_MS }, async (t) => {
  if (!requireTools(t, [TOOLS.fio])) return;
  // No memory tier: sealed blocks are read from the disk tier.
  const sealing = await startDaemon({
    toml: { volumes: { seal_idle_ms: 100, seal_dirty_mb: 4 }, cache: { memory_size_gb: 0 } },
  });
  const cwd = await scratchDir('updraft-fio-seal-');
  t.after(async () => {
    await sealing.cleanup();
    await removeDir(cwd);
  });
  await withLogs([sealing], async () => {
    const size = 64 * MiB;
    const chunks = size / (128 * 1024);
    const job = ['--name=sealed', ...verifyArgs(sealing.uri('fio-sealed')), '--rw=randwrite', '--bs=4k', '--iodepth=32', `--size=${size}`];

    // Write and verify at once, with sealing interleaved: a chunk sealed more often than
    // once was written again after a seal of it began. Two passes over the region, so that
    // every chunk is written again after the first pass sealed it, however the sealer and
    // the writes share a loaded machine.
    const written = await fio(cwd, [...job, '--loops=2', '--do_verify=1']);
    assertVerified(written);
    const during = await exportMetrics(sealing, 'fio-sealed');
    assert.ok(
      during.chunks_sealed > chunks,
      `${during.chunks_sealed} chunk seals for ${chunks} chunks: sealing did not run during the writes`,
    );

    // Idle past seal_idle_ms: the whole overlay is sealed before the next pass reads.
    await new Promise((resolve) => setTimeout(resolve, 1000));
    const deadline = Date.now() + 15_000;
    let idle = await exportMetrics(sealing, 'fio-sealed');
    while (idle.dirty_chunks > 0 && Date.now() < deadline) {
      await new Promise((resolve) => setTimeout(resolve, 100));
      idle = await exportMetrics(sealing, 'fio-sealed');
    }
    assert.equal(idle.dirty_chunks, 0, `overlay not sealed after idling: ${JSON.stringify(idle)}`);
    assert.ok(idle.chunks_sealed > 0);
    assert.equal(idle.mapped_chunks, chunks);

    const diskHits = async () => {
      const text = (await sealing.api('GET', '/metrics')).text;
      const match = /^updraft_cache_hits_total\{tier="disk"\} (\d+)/m.exec(text);
      assert.ok(match, 'no updraft_cache_hits_total{tier="disk"} in /metrics');
      return Number(match[1]);
    };
    const hitsBefore = await diskHits();
    const verified = await fio(cwd, [...job, '--do_verify=1', '--verify_only']);
    assert.equal(verified.code, 0, verified.output);
    assert.equal(verified.jobs[0].error, 0, verified.output);
    assert.equal(verified.jobs[0].read.io_bytes, size, `verify_only read ${verified.jobs[0].read.io_bytes} bytes\n${verified.output}`);
    const served = await exportMetrics(sealing, 'fio-sealed');
    assert.equal(served.ops.read.bytes - idle.ops.read.bytes, size, 'the daemon served the verify reads');
    const hits = (await diskHits()) - hitsBefore;
    assert.ok(hits >= size / 4096, `${hits} disk-tier cache hits for ${size / 4096} reads of sealed blocks`);
  });
});
