#!/usr/bin/env node
// The durable-mode part of `npm run bench` (scripts/bench.sh, part "durable"), on MinIO on
// loopback:
//
//   latency  BENCH_DURABLE_FLUSHES (200) rounds of one 4 KiB write and a FLUSH on a durable
//            volume, with BENCH_STORE_LATENCY_MS (20) injected on every store request of the
//            daemon (UPDRAFT_STORE_FAULTS); beside it, in the same run, the same number of
//            4 KiB PUTs from this process to the same MinIO after the same injected wait:
//            FLUSH p50/p99 next to one small PUT's p50/p99, and their ratio.
//   fio      no injected latency: fio 4 KiB random writes at QD1 with a FLUSH after each
//            (--fsync=1) on a durable volume: IOPS and FLUSH p50/p99; then QD32 with a
//            FLUSH after every 32 writes (--fsync=32) on a durable and on a demand volume.
//            Store requests per GiB written and FLUSHes per log PUT for the durable runs.
//
// Prints "durable KEY VALUE" lines on stdout (bench.sh appends them to its results).
// Needs the MinIO binary scripts/setup-minio.sh builds, and fio with the nbd engine.
// Every process started here is stopped by its pid; the scratch folder is removed.
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { CreateBucketCommand, PutObjectCommand, S3Client } from '@aws-sdk/client-s3';
import { NbdClient } from '../../dist/test/harness/nbd-client.js';
import { DAEMON_FLAGS, MAIN, MINIO, api, children, freePort, metric, start, stop, waitUrl } from './procs.mjs';

const LATENCY_MS = Number(process.env.BENCH_STORE_LATENCY_MS || 20);
const FLUSHES = Number(process.env.BENCH_DURABLE_FLUSHES || 200);
const RUNTIME = Number(process.env.BENCH_RUNTIME || 8);
const GiB = 1024 ** 3;

const scratch = fs.mkdtempSync(path.join(os.tmpdir(), 'updraft-bench-durable-'));
const say = (s) => process.stderr.write(`bench durable: ${s}\n`);
const record = (key, value) => process.stdout.write(`durable ${key} ${value}\n`);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const pct = (sorted, p) => sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];

/** One fio run (nbd engine): IOPS, bytes written, and FLUSH (sync) latency p50/p99 in ms. */
async function fio(args) {
  const child = start('fio', [...args, '--output-format=json']);
  let out = '';
  child.stdout.on('data', (d) => (out += d));
  const code = await new Promise((r) => child.once('exit', r));
  if (code !== 0) throw new Error(`fio ${args.join(' ')} exited ${code}`);
  const job = JSON.parse(out.slice(out.indexOf('{'))).jobs[0];
  const sync = job.sync?.lat_ns?.percentile ?? {};
  return { iops: job.write.iops, bytes: job.write.io_bytes, p50: (sync['50.000000'] ?? 0) / 1e6, p99: (sync['99.000000'] ?? 0) / 1e6 };
}

async function daemon(name, minio, env = {}) {
  const dir = path.join(scratch, name);
  fs.mkdirSync(dir, { recursive: true });
  const http = await freePort();
  fs.writeFileSync(path.join(dir, 'updraft.toml'), `
[cache]
dir = "${dir}/cache"
disk_size_gb = 8
[storage]
url = "s3://${minio.bucket}/${name}"
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
`);
  const child = start(process.execPath, [...DAEMON_FLAGS, MAIN, 'run', '-c', path.join(dir, 'updraft.toml')], { env: { ...process.env, ...env }, logFile: path.join(dir, 'daemon.log') });
  const url = `http://127.0.0.1:${http}`;
  await waitUrl(url + '/healthz', child);
  return { child, url, socket: `${dir}/nbd.sock`, uri: (v) => `nbd+unix:///${v}?socket=${dir}/nbd.sock` };
}

async function volume(d, name, mode) {
  await api(d.url, 'PUT', `/api/exports/${name}`, { size_gb: 2, flush_mode: mode });
  // The first FLUSH of a durable volume drains (its lease and first manifest): not timed.
  const client = await NbdClient.connect({ path: d.socket, exportName: name });
  await client.write(0, crypto.randomBytes(4096));
  await client.flush();
  await client.disconnect();
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

  // ---- latency: FLUSH vs one small PUT, with injected store latency ----
  const slow = await daemon('slow', minio, { UPDRAFT_STORE_FAULTS: `seed=1,latency=${LATENCY_MS}` });
  await volume(slow, 'lat', 'durable');
  const client = await NbdClient.connect({ path: slow.socket, exportName: 'lat' });
  const flushes = [];
  const puts = [];
  const block = crypto.randomBytes(4096);
  for (let i = 0; i < FLUSHES; i++) {
    await client.write((i % 4096) * 4096, crypto.randomBytes(4096));
    let t = performance.now();
    await client.flush();
    flushes.push(performance.now() - t);
    t = performance.now();
    await sleep(LATENCY_MS);
    await s3.send(new PutObjectCommand({ Bucket: minio.bucket, Key: `put-probe/${i}`, Body: block }));
    puts.push(performance.now() - t);
  }
  await client.disconnect();
  flushes.sort((a, b) => a - b);
  puts.sort((a, b) => a - b);
  record('latency_injected_ms', LATENCY_MS);
  record('flush_p50_ms', pct(flushes, 50).toFixed(1));
  record('flush_p99_ms', pct(flushes, 99).toFixed(1));
  record('put_p50_ms', pct(puts, 50).toFixed(1));
  record('put_p99_ms', pct(puts, 99).toFixed(1));
  record('flush_to_put_p50_ratio', (pct(flushes, 50) / pct(puts, 50)).toFixed(2));
  say(`FLUSH p50 ${pct(flushes, 50).toFixed(1)} ms p99 ${pct(flushes, 99).toFixed(1)} ms; one 4 KiB PUT p50 ${pct(puts, 50).toFixed(1)} ms p99 ${pct(puts, 99).toFixed(1)} ms (${LATENCY_MS} ms injected)`);
  await stop(slow.child);

  // ---- fio: durable at QD1 and QD32, demand at QD32 ----
  const fast = await daemon('fast', minio);
  await volume(fast, 'qd1', 'durable');
  await volume(fast, 'qd32', 'durable');
  await volume(fast, 'demand', 'demand');
  const timed = ['--rw=randwrite', '--bs=4k', '--size=1G', '--time_based', `--runtime=${RUNTIME}`, '--randrepeat=0'];
  const counters = async () => ({
    requests: await metric(fast.url, 'updraft_store_requests_total'), puts: await metric(fast.url, 'updraft_durable_log_puts_total'),
    flushes: await metric(fast.url, 'updraft_durable_flushes_committed_total'), nbdFlushes: await metric(fast.url, 'updraft_volume_ops_total', { op: 'flush' }),
  });
  for (const [key, vol, depth, fsync] of [['qd1', 'qd1', 1, 1], ['qd32', 'qd32', 32, 32], ['demand_qd32', 'demand', 32, 32]]) {
    const before = await counters();
    const r = await fio(['--name=' + key, '--ioengine=nbd', `--uri=${fast.uri(vol)}`, `--iodepth=${depth}`, `--fsync=${fsync}`, ...timed]);
    const after = await counters();
    record(`${key}_iops`, r.iops.toFixed(0));
    record(`${key}_flush_p50_ms`, r.p50.toFixed(2));
    record(`${key}_flush_p99_ms`, r.p99.toFixed(2));
    record(`${key}_store_requests_per_gib`, (((after.requests - before.requests) * GiB) / r.bytes).toFixed(0));
    if (after.puts > before.puts) record(`${key}_flushes_per_log_put`, ((after.flushes - before.flushes) / (after.puts - before.puts)).toFixed(2));
    // What fio sent: NBD FLUSHes per 4 KiB write.
    record(`${key}_nbd_flushes_per_write`, ((after.nbdFlushes - before.nbdFlushes) / (r.bytes / 4096)).toFixed(3));
    say(`${key}: ${r.iops.toFixed(0)} IOPS, FLUSH p50 ${r.p50.toFixed(2)} ms p99 ${r.p99.toFixed(2)} ms, ${(((after.requests - before.requests) * GiB) / r.bytes).toFixed(0)} store requests per GiB`);
  }
  await stop(fast.child);
  s3.destroy();
}

try {
  await main();
} finally {
  for (const child of children) await stop(child, 'SIGKILL');
  fs.rmSync(scratch, { recursive: true, force: true });
}
