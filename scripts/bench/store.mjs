#!/usr/bin/env node
// The object-store part of `npm run bench` (scripts/bench.sh, part "store"):
//
//   drain    a volume with BENCH_STORE_SIZE_MIB (1024) written sequentially by fio (random,
//            incompressible data) is drained to MinIO on loopback at once (the drain seals
//            it too), and a second one after it was sealed while idle (upload only):
//            MB/s of volume data, packs, bytes and store requests per GiB.
//   migrate  the write pause of a live migration: A drains the bulk while writable, then
//            (8 MiB of random 64 KiB writes later) releases: writes refused, final drain,
//            lease released; host M, attached read-only, promotes; M's client writes.
//   fork     consistent and lazy fork latency (median of BENCH_FORK_ROUNDS, 5) of volumes
//            with BENCH_FORK_SIZES_MIB (256,1024,8192) written and drained (then `sync`, so
//            the kernel's writeback of that is not timed): right after the drain, and with
//            the same 1 MiB rewritten before each fork (the same dirty data at every size),
//            in rounds over every size in turn, each target deleted once timed; the ratio
//            largest ÷ smallest size per kind; and the time from an NBD connect on another
//            host to the first 4 KiB of a fork read back.
//   cold     a fresh host wakes that volume and fio reads it sequentially (1 MiB, QD1)
//            with BENCH_STORE_LATENCY_MS (20) injected on every store request
//            (UPDRAFT_STORE_FAULTS), with read-ahead (read_ahead_packs = BENCH_READ_AHEAD_PACKS,
//            default 8, the config default) and without (0); the daemon's memory tier is
//            BENCH_COLD_MEMORY_GB (1): below the volume's size, the tier fills early and the
//            rest of the read reuses its memory, as on a host that has run a while.
//
// BENCH_STORE_ENCRYPTED=1 runs every daemon on an encrypted store ([storage]
// encryption_password), to compare drain and cold-read throughput with encryption on and off.
//   coldrand a fresh host with a memory tier of BENCH_COLDRAND_MEMORY_GB (0.25) wakes that
//            volume and fio reads 4 KiB at random (QD32) for BENCH_COLDRAND_SECONDS (60):
//            IOPS, CPU and the daemon's RSS (idle, after, peak) against the memory tier.
// Cold reads also print the daemon's CPU seconds per GiB and its RSS (now and peak).
// Every daemon faults its memory tier in before it is measured ([cache] memory_pretouch,
// the default; the time and CPU that took are printed for the cold hosts), as a host's
// daemon has before a volume wakes on it; BENCH_MEMORY_PRETOUCH=0 turns that off.
// BENCH_STORE_PARTS (drain,migrate,cold,fork; coldrand on request) picks parts; migrate,
// cold and coldrand need drain.
//
// Prints "store KEY VALUE" lines on stdout (bench.sh appends them to its results).
// Needs the MinIO binary scripts/setup-minio.sh builds. Every process started here is
// stopped by its pid; the scratch folder is removed.
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { CreateBucketCommand, S3Client } from '@aws-sdk/client-s3';
import { NbdClient } from '../../dist/test/harness/nbd-client.js';
import { DAEMON_FLAGS, MAIN, MINIO, api, children, freePort, metric, start, stop, waitUrl } from './procs.mjs';

const SIZE_MIB = Number(process.env.BENCH_STORE_SIZE_MIB || 1024);
const LATENCY_MS = Number(process.env.BENCH_STORE_LATENCY_MS || 20);
const FORK_SIZES_MIB = (process.env.BENCH_FORK_SIZES_MIB || '256,1024,8192').split(',').map(Number);
const FORK_ROUNDS = Number(process.env.BENCH_FORK_ROUNDS || 5);
const MiB = 1024 * 1024;
const PRETOUCH = process.env.BENCH_MEMORY_PRETOUCH !== '0';
const ENCRYPTED = process.env.BENCH_STORE_ENCRYPTED === '1';
const PARTS = new Set((process.env.BENCH_STORE_PARTS || 'drain,migrate,cold,fork').split(','));

const scratch = fs.mkdtempSync(path.join(os.tmpdir(), 'updraft-bench-store-'));
const say = (s) => process.stderr.write(`bench store: ${s}\n`);
const record = (key, value) => process.stdout.write(`store ${key} ${value}\n`);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));


/**
 * CPU seconds (user + system, every thread) a process has used so far, from
 * /proc/PID/stat. Less sensitive than throughput to other work on a shared machine: it is
 * what the daemon costs, not how long it waited for a core.
 */
function cpuSeconds(pid) {
  const { user, system } = cpuSplit(pid);
  return user + system;
}

/** cpuSeconds split into user and system (kernel) time. */
function cpuSplit(pid) {
  const fields = fs.readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1].split(' ');
  return { user: Number(fields[11]) / 100, system: Number(fields[12]) / 100 }; // utime, stime in USER_HZ (100 on Linux)
}

/** The process's resident set now and at its peak (VmRSS, VmHWM), in MB. */
function rssMb(pid) {
  const status = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
  const kb = (name) => Number(new RegExp(`^${name}:\\s+(\\d+) kB`, 'm').exec(status)[1]);
  return { rss: kb('VmRSS') / 1024, peak: kb('VmHWM') / 1024 };
}

async function fio(args) {
  const child = start('fio', [...args, '--output-format=json']);
  let out = '';
  child.stdout.on('data', (d) => (out += d));
  const code = await new Promise((r) => child.once('exit', r));
  if (code !== 0) throw new Error(`fio ${args.join(' ')} exited ${code}`);
  return JSON.parse(out.slice(out.indexOf('{'))).jobs[0];
}

async function daemon(name, minio, extraToml = '', env = {}, memoryGb = 1) {
  const dir = path.join(scratch, name);
  fs.mkdirSync(dir, { recursive: true });
  const http = await freePort();
  const toml = `
[cache]
dir = "${dir}/cache"
disk_size_gb = 24
memory_size_gb = ${memoryGb}
memory_pretouch = ${PRETOUCH}
[storage]
url = "s3://${minio.bucket}/bench"
${ENCRYPTED ? 'encryption_password = "${UPDRAFT_BENCH_PASSWORD}"' : ''}
${extraToml}
[aws]
access_key_id = "${minio.key}"
secret_access_key = "${minio.secret}"
endpoint = "${minio.endpoint}"
allow_http = true
force_path_style = true
[host]
id = "${name}"
[servers.nbd]
unix_socket = "${dir}/nbd.sock"
auto_create_size_gb = 0
[servers.http]
address = "127.0.0.1:${http}"
[volumes]
seal_idle_ms = 2000
`;
  fs.writeFileSync(path.join(dir, 'updraft.toml'), toml);
  const nodeArgs = (process.env.BENCH_NODE_ARGS ?? '').split(' ').filter(Boolean);
  const child = start(process.execPath, [...DAEMON_FLAGS, ...nodeArgs, MAIN, 'run', '-c', path.join(dir, 'updraft.toml')], {
    env: { ...process.env, UPDRAFT_BENCH_PASSWORD: 'bench password', ...env },
    logFile: path.join(dir, 'daemon.log'),
  });
  const url = `http://127.0.0.1:${http}`;
  await waitUrl(url + '/healthz', child);
  // A host's daemon runs before a volume wakes on it: wait for its memory tier to be faulted in.
  const faultedIn = { seconds: 0, cpu: 0 };
  if (PRETOUCH && memoryGb > 0) {
    const t0 = performance.now();
    while ((await metric(url, 'updraft_cache_memory_faulted_in')) !== 1) {
      if (performance.now() - t0 > 60_000) throw new Error(`${name}: the memory tier was not faulted in within 60 s`);
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
    faultedIn.seconds = (performance.now() - t0) / 1000;
    faultedIn.cpu = cpuSeconds(child.pid);
  }
  return { child, url, faultedIn, socket: `${dir}/nbd.sock`, uri: (v) => `nbd+unix:///${v}?socket=${dir}/nbd.sock` };
}

async function main() {
  if (!fs.existsSync(MINIO)) throw new Error(`${MINIO} is missing: run scripts/setup-minio.sh`);
  const port = await freePort();
  const minio = { endpoint: `http://127.0.0.1:${port}`, key: 'bench', secret: 'bench-secret-key', bucket: 'updraft-bench' };
  const minioProc = start(MINIO, ['server', '--quiet', '--address', `127.0.0.1:${port}`, '--console-address', `127.0.0.1:${await freePort()}`, path.join(scratch, 'minio')], {
    env: { ...process.env, MINIO_ROOT_USER: minio.key, MINIO_ROOT_PASSWORD: minio.secret },
  });
  await waitUrl(`${minio.endpoint}/minio/health/live`, minioProc);
  const s3 = new S3Client({ endpoint: minio.endpoint, region: 'us-east-1', forcePathStyle: true, credentials: { accessKeyId: minio.key, secretAccessKey: minio.secret } });
  await s3.send(new CreateBucketCommand({ Bucket: minio.bucket }));
  s3.destroy();

  record('encrypted', ENCRYPTED ? 1 : 0);
  // ---- drain ----
  const a = await daemon('host-a', minio);
  const volume = 'bench-drain';
  await api(a.url, 'PUT', `/api/exports/${volume}`, { size_gb: (2 * SIZE_MIB) / 1024 });
  say(`writing ${SIZE_MIB} MiB with fio`);
  await fio(['--name=fill', '--ioengine=nbd', `--uri=${a.uri(volume)}`, '--rw=write', '--bs=1M', '--iodepth=8', `--size=${SIZE_MIB}M`, '--refill_buffers', '--end_fsync=1']);
  const putsBefore = await metric(a.url, 'updraft_store_requests_total');
  say('draining');
  const t0 = performance.now();
  const cpu0 = [cpuSeconds(a.child.pid), cpuSeconds(minioProc.pid)];
  const sys0 = cpuSplit(a.child.pid).system;
  const drained = await api(a.url, 'POST', `/api/exports/${volume}/drain`);
  const seconds = (performance.now() - t0) / 1000;
  const drainCpu = [cpuSeconds(a.child.pid) - cpu0[0], cpuSeconds(minioProc.pid) - cpu0[1]];
  record('drain_cpu_s', drainCpu[0].toFixed(2));
  record('drain_cpu_s_per_gib', ((drainCpu[0] * 1024) / SIZE_MIB).toFixed(2));
  record('drain_sys_s_per_gib', (((cpuSplit(a.child.pid).system - sys0) * 1024) / SIZE_MIB).toFixed(2));
  record('drain_minio_cpu_s', drainCpu[1].toFixed(2));
  const requests = (await metric(a.url, 'updraft_store_requests_total')) - putsBefore;
  record('drain_size_mib', SIZE_MIB);
  record('drain_seconds', seconds.toFixed(2));
  record('drain_mb_s', ((SIZE_MIB * MiB) / 1e6 / seconds).toFixed(0));
  record('drain_packs', drained.packs_uploaded);
  record('drain_bytes_uploaded', drained.bytes_uploaded);
  record('drain_requests_per_gib', ((requests * 1024) / SIZE_MIB).toFixed(0));
  say(`drain: ${seconds.toFixed(2)} s, ${drained.packs_uploaded} packs, ${requests} requests; CPU ${drainCpu[0].toFixed(2)} s daemon, ${drainCpu[1].toFixed(2)} s MinIO`);

  // The same amount again, but sealed (and written back) before the drain, as a volume that
  // went idle before being drained would be: the drain is then upload only.
  const sealed = 'bench-drain-sealed';
  await api(a.url, 'PUT', `/api/exports/${sealed}`, { size_gb: (2 * SIZE_MIB) / 1024 });
  // randrepeat=0: other random data than the first volume (which would all dedup).
  await fio(['--name=fill2', '--ioengine=nbd', `--uri=${a.uri(sealed)}`, '--rw=write', '--bs=1M', '--iodepth=8', `--size=${SIZE_MIB}M`, '--refill_buffers', '--randrepeat=0', '--end_fsync=1']);
  for (;;) {
    const info = await api(a.url, 'GET', `/api/exports/${sealed}`);
    if (info.dirty_bytes === 0) break;
    await sleep(250);
  }
  await sleep(5000); // the idle write-back commits the seal and syncs the slab
  const t1 = performance.now();
  const cpu1 = [cpuSeconds(a.child.pid), cpuSeconds(minioProc.pid)];
  const sys1 = cpuSplit(a.child.pid).system;
  const drained2 = await api(a.url, 'POST', `/api/exports/${sealed}/drain`);
  const seconds2 = (performance.now() - t1) / 1000;
  const sealedCpu = [cpuSeconds(a.child.pid) - cpu1[0], cpuSeconds(minioProc.pid) - cpu1[1]];
  record('drain_sealed_cpu_s', sealedCpu[0].toFixed(2));
  record('drain_sealed_cpu_s_per_gib', ((sealedCpu[0] * 1024) / SIZE_MIB).toFixed(2));
  record('drain_sealed_sys_s_per_gib', (((cpuSplit(a.child.pid).system - sys1) * 1024) / SIZE_MIB).toFixed(2));
  record('drain_sealed_minio_cpu_s', sealedCpu[1].toFixed(2));
  record('drain_sealed_seconds', seconds2.toFixed(2));
  record('drain_sealed_mb_s', ((SIZE_MIB * MiB) / 1e6 / seconds2).toFixed(0));
  say(`drain of a sealed volume: ${seconds2.toFixed(2)} s, ${drained2.packs_uploaded} packs; CPU ${sealedCpu[0].toFixed(2)} s daemon, ${sealedCpu[1].toFixed(2)} s MinIO`);
  // ---- live migration: the write pause ----
  if (PARTS.has('migrate')) {
    // Host M attaches the sealed volume read-only; A writes on and drains the bulk while
    // still writable; then A writes a little more and releases (writes refused, final
    // drain of the delta, lease released); M promotes and its already-connected client
    // writes. The pause runs from the release call to that write's reply.
    const m = await daemon('host-m', minio);
    await api(m.url, 'PUT', `/api/exports/${sealed}`, { size_gb: (2 * SIZE_MIB) / 1024 });
    const client = await NbdClient.connect({ path: m.socket, exportName: sealed });
    const more = (mib) => fio(['--name=more', '--ioengine=nbd', `--uri=${a.uri(sealed)}`, '--rw=randwrite', '--bs=64k', '--iodepth=8', `--size=${mib}M`, '--refill_buffers', '--randrepeat=0']);
    await more(64);
    await api(a.url, 'POST', `/api/exports/${sealed}/drain`);
    await more(8);
    const p0 = performance.now();
    const released = await api(a.url, 'POST', `/api/exports/${sealed}/release`);
    const p1 = performance.now();
    await api(m.url, 'POST', `/api/exports/${sealed}/promote`);
    const p2 = performance.now();
    await client.write(0, Buffer.alloc(4096, 1));
    const p3 = performance.now();
    record('migration_pause_ms', (p3 - p0).toFixed(0));
    record('migration_release_ms', (p1 - p0).toFixed(0));
    record('migration_final_drain_packs', released.drained?.packs_uploaded ?? 0);
    record('migration_promote_ms', (p2 - p1).toFixed(0));
    say(`migration pause ${(p3 - p0).toFixed(0)} ms (release with final drain ${(p1 - p0).toFixed(0)} ms, ${released.drained?.packs_uploaded ?? 0} packs; promote ${(p2 - p1).toFixed(0)} ms)`);
    client.close();
    await stop(m.child);
  }

  await stop(a.child); // its lease stays: the readers below are read-only, which reading does not mind

  // ---- cold sequential reads ----
  if (PARTS.has('cold')) {
    const readAhead = Number(process.env.BENCH_READ_AHEAD_PACKS || 8);
    record('read_ahead_packs', readAhead);
    for (const [label, packs] of [['readahead', readAhead], ['no_readahead', 0]]) {
      const memoryGb = Number(process.env.BENCH_COLD_MEMORY_GB || 1);
      const b = await daemon(`host-${label}`, minio, `read_ahead_packs = ${packs}`, { UPDRAFT_STORE_FAULTS: `seed=1,latency=${LATENCY_MS}` }, memoryGb);
      if (PRETOUCH) {
        record(`cold_read_${label}_pretouch_s`, b.faultedIn.seconds.toFixed(2));
        say(`cold read (${label}): memory tier of ${memoryGb} GB faulted in ${b.faultedIn.seconds.toFixed(2)} s after start-up, daemon CPU by then ${b.faultedIn.cpu.toFixed(2)} s`);
      }
      await api(b.url, 'PUT', `/api/exports/${volume}`, { size_gb: (2 * SIZE_MIB) / 1024 });
      const gets0 = await metric(b.url, 'updraft_store_requests_total', { kind: 'get' });
      const cpu = cpuSeconds(b.child.pid);
      const split = cpuSplit(b.child.pid);
      const job = await fio(['--name=cold', '--ioengine=nbd', `--uri=${b.uri(volume)}`, '--rw=read', '--bs=1M', '--iodepth=1', `--size=${SIZE_MIB}M`]);
      const gets = (await metric(b.url, 'updraft_store_requests_total', { kind: 'get' })) - gets0;
      record(`cold_read_${label}_mb_s`, (job.read.bw_bytes / 1e6).toFixed(0));
      const readCpu = cpuSeconds(b.child.pid) - cpu;
      record(`cold_read_${label}_gets`, gets);
      record(`cold_read_${label}_cpu_s`, readCpu.toFixed(2));
      record(`cold_read_${label}_cpu_s_per_gib`, ((readCpu * 1024) / SIZE_MIB).toFixed(2));
      const after = cpuSplit(b.child.pid);
      record(`cold_read_${label}_sys_s_per_gib`, (((after.system - split.system) * 1024) / SIZE_MIB).toFixed(2));
      const rss = rssMb(b.child.pid);
      record(`cold_read_${label}_rss_mb`, rss.rss.toFixed(0));
      record(`cold_read_${label}_peak_rss_mb`, rss.peak.toFixed(0));
      say(
        `cold read (${label}): ${(job.read.bw_bytes / 1e6).toFixed(0)} MB/s, ${gets} GETs; CPU ${readCpu.toFixed(2)} s daemon ` +
          `(${((readCpu * 1024) / SIZE_MIB).toFixed(2)} s/GiB, of it ${(((after.system - split.system) * 1024) / SIZE_MIB).toFixed(2)} s in the kernel); RSS ${rss.rss.toFixed(0)} MB, peak ${rss.peak.toFixed(0)} MB`,
      );
      await stop(b.child);
    }
    record('latency_ms', LATENCY_MS);
  }

  // ---- cold random 4 KiB reads: the memory tier's bound ----
  if (PARTS.has('coldrand')) {
    // A memory tier smaller than the volume, so that it fills and must evict; the RSS it
    // ends with, against memory_size_gb.
    const memoryGb = Number(process.env.BENCH_COLDRAND_MEMORY_GB || 0.25);
    const b = await daemon('host-coldrand', minio, '', { UPDRAFT_STORE_FAULTS: `seed=1,latency=${LATENCY_MS}` }, memoryGb);
    await api(b.url, 'PUT', `/api/exports/${volume}`, { size_gb: (2 * SIZE_MIB) / 1024 });
    const idle = rssMb(b.child.pid);
    const cpu = cpuSeconds(b.child.pid);
    const job = await fio([
      '--name=coldrand', '--ioengine=nbd', `--uri=${b.uri(volume)}`, '--rw=randread', '--bs=4k', '--iodepth=32', `--size=${SIZE_MIB}M`,
      `--runtime=${process.env.BENCH_COLDRAND_SECONDS || 60}`, '--time_based', '--randrepeat=0',
    ]);
    const readCpu = cpuSeconds(b.child.pid) - cpu;
    const rss = rssMb(b.child.pid);
    const arrayBuffers = (await metric(b.url, 'updraft_process_array_buffers_bytes')) / 1e6;
    const tier = (await metric(b.url, 'updraft_cache_memory_held_bytes')) / 1e6;
    record('cold_rand_array_buffers_mb', arrayBuffers.toFixed(0));
    record('cold_rand_memory_tier_mb', tier.toFixed(0));
    say(`cold random: ArrayBuffers ${arrayBuffers.toFixed(0)} MB, memory tier ${tier.toFixed(0)} MB`);
    if (process.env.BENCH_SMAPS) say(fs.readFileSync(`/proc/${b.child.pid}/smaps_rollup`, 'utf8'));
    record('cold_rand_memory_size_mb', (memoryGb * 1000).toFixed(0));
    record('cold_rand_iops', job.read.iops.toFixed(0));
    record('cold_rand_cpu_s', readCpu.toFixed(2));
    record('cold_rand_idle_rss_mb', idle.rss.toFixed(0));
    record('cold_rand_rss_mb', rss.rss.toFixed(0));
    record('cold_rand_peak_rss_mb', rss.peak.toFixed(0));
    say(`cold random 4 KiB reads (memory tier ${memoryGb} GB): ${job.read.iops.toFixed(0)} IOPS; CPU ${readCpu.toFixed(2)} s; RSS idle ${idle.rss.toFixed(0)} MB, after ${rss.rss.toFixed(0)} MB, peak ${rss.peak.toFixed(0)} MB`);
    await stop(b.child);
  }
  if (!PARTS.has('fork')) return;

  // ---- fork latency vs written size, and wake on another host ----
  const f = await daemon('host-f', minio);
  const g = await daemon('host-g', minio);
  const sources = [];
  for (const mib of FORK_SIZES_MIB) {
    const src = `fork-src-${mib}`;
    await api(f.url, 'PUT', `/api/exports/${src}`, { size_gb: Math.max(1, (2 * mib) / 1024) });
    say(`fork: writing ${mib} MiB`);
    await fio(['--name=forksrc', '--ioengine=nbd', `--uri=${f.uri(src)}`, '--rw=write', '--bs=1M', '--iodepth=8', `--size=${mib}M`, '--refill_buffers', '--randrepeat=0']);
    await api(f.url, 'POST', `/api/exports/${src}/drain`);
    sources.push({ mib, src, writer: await NbdClient.connect({ path: f.socket, exportName: src }) });
  }
  // The kernel writes back what the fills and the drains left dirty (up to 2 × 8 GiB)
  // first: otherwise the forks time that writeback through their few fsyncs.
  await new Promise((resolve, reject) => start('sync', []).once('exit', (code) => (code === 0 ? resolve() : reject(new Error(`sync exited ${code}`)))));
  // Rounds over every size in turn, so that a slow spell of this shared machine lands on
  // all sizes alike rather than on whichever size was forking then. Clean: the source as
  // drained. Dirty: with the same 1 MiB (8 whole chunks) rewritten before each fork, the
  // same dirty data at every size, as the fork target is stated. Each target is deleted
  // once timed (the first lazy one of each size after the wake below), so every fork
  // runs beside the sources only.
  const times = new Map(sources.map(({ mib }) => [mib, { consistent: [], lazy: [], consistent_dirty: [], lazy_dirty: [] }]));
  for (let round = 0; round < FORK_ROUNDS; round++) {
    for (const { mib, src, writer } of sources) {
      for (const dirty of [false, true]) {
        for (const mode of ['consistent', 'lazy']) {
          if (dirty) {
            await writer.write(0, crypto.randomBytes(MiB));
            await writer.flush();
          }
          const target = `${src}-${mode}${dirty ? '-dirty' : ''}-${round}`;
          const t0 = performance.now();
          await api(f.url, 'POST', `/api/exports/${src}/fork`, { target, mode });
          times.get(mib)[dirty ? `${mode}_dirty` : mode].push(performance.now() - t0);
          if (round > 0 || mode !== 'lazy' || dirty) await api(f.url, 'DELETE', `/api/exports/${target}?force=true`);
        }
      }
    }
  }
  const median = (xs) => [...xs].sort((x, y) => x - y)[xs.length >> 1];
  for (const { mib, src, writer } of sources) {
    writer.close();
    const t = times.get(mib);
    for (const [what, xs] of Object.entries(t)) record(`fork_${what}_${mib}mib_ms`, median(xs).toFixed(0));
    // Another host: from the NBD connect to the first 4 KiB read back (the manifest GET,
    // the local map, the lease, one pack).
    const t1 = performance.now();
    const client = await NbdClient.connect({ path: g.socket, exportName: `${src}-lazy-0` });
    await client.read(0, 4096);
    const wakeMs = performance.now() - t1;
    record(`wake_first_byte_${mib}mib_ms`, wakeMs.toFixed(0));
    client.close();
    say(
      `fork ${mib} MiB (medians of ${FORK_ROUNDS}): consistent ${median(t.consistent).toFixed(0)} ms, lazy ${median(t.lazy).toFixed(0)} ms; ` +
        `with 1 MiB dirty: consistent ${median(t.consistent_dirty).toFixed(0)} ms, lazy ${median(t.lazy_dirty).toFixed(0)} ms; ` +
        `wake to first byte ${wakeMs.toFixed(0)} ms`,
    );
  }
  // Largest ÷ smallest written size, per kind of fork: fork time should not grow with the data written.
  const [small, large] = [FORK_SIZES_MIB[0], FORK_SIZES_MIB[FORK_SIZES_MIB.length - 1]];
  for (const what of ['consistent', 'lazy', 'consistent_dirty', 'lazy_dirty']) {
    record(`fork_${what}_ratio`, (median(times.get(large)[what]) / median(times.get(small)[what])).toFixed(2));
  }
  for (const { src } of sources) {
    await api(g.url, 'DELETE', `/api/exports/${src}-lazy-0?force=true`);
    await api(f.url, 'DELETE', `/api/exports/${src}?force=true`);
  }
  record('fork_sizes_mib', FORK_SIZES_MIB.join('/'));
  record('fork_rounds', FORK_ROUNDS);
  await stop(f.child);
  await stop(g.child);
}

try {
  await main();
} catch (err) {
  if (process.env.BENCH_KEEP) say(`keeping ${scratch}`);
  throw err;
} finally {
  if (process.env.BENCH_KEEP) {
    say(`logs in ${scratch}`);
    for (const child of children) await stop(child, 'SIGKILL');
    process.exit(0);
  }
  for (const child of children) await stop(child, 'SIGKILL');
  fs.rmSync(scratch, { recursive: true, force: true });
}
