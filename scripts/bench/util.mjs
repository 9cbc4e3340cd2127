#!/usr/bin/env node
// Small helpers for scripts/bench.sh and scripts/bench/nbd-compare.sh, so that the bench
// needs only node, fio and nbdkit (no python, jq or curl).
//
//   node util.mjs fio-summary FILE        fio --output-format=json file -> "iops p50us p99us"
//   node util.mjs median X...             median of numbers
//   node util.mjs ratio A B [MIN]         A / max(B, MIN) to 3 decimals (MIN default 1)
//   node util.mjs lines-to-json OUT       stdin "name k=v k=v" lines -> {name: {k: v}} in OUT
//   node util.mjs free-port               a TCP port on 127.0.0.1 that was free a moment ago
//   node util.mjs wait-healthy URL PID [TIMEOUT_MS]
//       poll URL/healthz every 5 ms until 200; print that moment as ns since the epoch.
//   node util.mjs create-volumes URL PREFIX N SIZE_GB   PUT /api/exports/PREFIX001..N
//   node util.mjs metric URL NAME         sum of the samples of one metric at URL/metrics
//   node util.mjs dirty-bytes URL         sum of dirty_bytes over URL/api/exports
//   node util.mjs assemble OUT COMPARE_JSON LINES   the results file (see bench.sh)
//   node util.mjs wait-sealed URL TIMEOUT_MS
//       poll URL/api/exports until no volume has dirty bytes; print seconds waited.
//   node util.mjs host-ready-ms LOG       the ms= of the last "host ready" line in LOG
//   node util.mjs report RESULTS_JSON     print the summary table of a bench-results.json
import fs from 'node:fs';
import net from 'node:net';

const [cmd, ...args] = process.argv.slice(2);
const out = (s) => process.stdout.write(`${s}\n`);
const die = (s) => {
  process.stderr.write(`bench util: ${s}\n`);
  process.exit(1);
};
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function median(xs) {
  const v = xs.map(Number).filter((x) => Number.isFinite(x)).sort((a, b) => a - b);
  if (v.length === 0) return 0;
  const m = v.length >> 1;
  return v.length % 2 ? v[m] : (v[m - 1] + v[m]) / 2;
}

async function getJson(url, timeoutMs = 5000) {
  const r = await fetch(url, { signal: AbortSignal.timeout(timeoutMs) });
  const text = await r.text();
  return { status: r.status, json: text ? JSON.parse(text) : null };
}

/** number -> compact string for tables */
function fmt(x, digits = 0) {
  if (x === undefined || x === null || Number.isNaN(x)) return '-';
  return Number(x).toFixed(digits);
}

switch (cmd) {
  case 'fio-summary': {
    const text = fs.readFileSync(args[0], 'utf8');
    // The nbd engine may print a line before the JSON.
    const j = JSON.parse(text.slice(text.indexOf('{'))).jobs[0];
    const iops = j.read.iops + j.write.iops;
    const side = j.write.iops > 0 ? j.write : j.read;
    const pct = side.clat_ns?.percentile ?? {};
    const p50 = (pct['50.000000'] ?? 0) / 1000;
    const p99 = (pct['99.000000'] ?? 0) / 1000;
    out(`${iops.toFixed(0)} ${p50.toFixed(1)} ${p99.toFixed(1)}`);
    break;
  }
  case 'median':
    out(String(median(args)));
    break;
  case 'ratio': {
    const [a, b, min = '1'] = args.map(Number);
    out((a / Math.max(b, min)).toFixed(3));
    break;
  }
  case 'lines-to-json': {
    const result = {};
    for (const line of fs.readFileSync(0, 'utf8').split('\n')) {
      const parts = line.trim().split(/\s+/);
      if (!parts[0]) continue;
      result[parts[0]] = Object.fromEntries(parts.slice(1).map((p) => p.split('=')).map(([k, v]) => [k, Number(v)]));
    }
    fs.writeFileSync(args[0], JSON.stringify(result, null, 2) + '\n');
    break;
  }
  case 'free-port': {
    const server = net.createServer();
    await new Promise((resolve, reject) => {
      server.once('error', reject);
      server.listen(0, '127.0.0.1', resolve);
    });
    const { port } = server.address();
    await new Promise((resolve) => server.close(resolve));
    out(String(port));
    break;
  }
  case 'wait-healthy': {
    // Prints the wall clock (ns since the epoch) of the first 200, for bash to subtract
    // its own `date +%s%N` taken just before it spawned the daemon.
    const [url, pid, timeout = '60000'] = args;
    const deadline = performance.now() + Number(timeout);
    for (;;) {
      try {
        const r = await fetch(`${url}/healthz`, { signal: AbortSignal.timeout(1000) });
        await r.arrayBuffer();
        if (r.status === 200) break;
      } catch {
        // not listening yet
      }
      try {
        process.kill(Number(pid), 0);
      } catch {
        die(`daemon pid ${pid} exited before /healthz answered 200`);
      }
      if (performance.now() > deadline) die(`daemon not healthy after ${timeout} ms`);
      await sleep(5);
    }
    const nowNs = BigInt(Math.round((performance.timeOrigin + performance.now()) * 1000)) * 1000n;
    out(String(nowNs));
    break;
  }
  case 'create-volumes': {
    const [url, prefix, n, sizeGb] = args;
    for (let i = 1; i <= Number(n); i++) {
      const name = `${prefix}${String(i).padStart(3, '0')}`;
      const r = await fetch(`${url}/api/exports/${name}`, {
        method: 'PUT',
        body: JSON.stringify({ size_gb: Number(sizeGb) }),
        headers: { 'content-type': 'application/json' },
        signal: AbortSignal.timeout(60000),
      });
      const text = await r.text();
      if (r.status >= 300) die(`PUT /api/exports/${name}: ${r.status} ${text}`);
    }
    break;
  }
  case 'metric': {
    // Sum of every sample of one Prometheus metric.
    const [url, name] = args;
    const text = await (await fetch(`${url}/metrics`, { signal: AbortSignal.timeout(10000) })).text();
    let sum = 0;
    for (const line of text.split('\n')) {
      const m = line.match(/^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)/);
      if (m && m[1] === name) sum += Number(m[3]);
    }
    out(String(sum));
    break;
  }
  case 'dirty-bytes': {
    const { json } = await getJson(`${args[0]}/api/exports`);
    out(String(json.reduce((s, v) => s + v.dirty_bytes, 0)));
    break;
  }
  case 'assemble': {
    // assemble OUT COMPARE_JSON LINES: LINES holds "section key value" lines.
    const [outFile, compareFile, linesFile] = args;
    const result = {};
    const value = (v) => (v === 'null' || v === undefined ? null : v !== '' && Number.isFinite(Number(v)) ? Number(v) : v);
    for (const line of fs.readFileSync(linesFile, 'utf8').split('\n')) {
      const [section, key, ...rest] = line.trim().split(/\s+/);
      if (!section || !key) continue;
      (result[section] ??= {})[key] = value(rest.join(' '));
    }
    // The compare part's workloads, beside the lines it recorded itself (the daemon's RSS).
    if (compareFile && fs.existsSync(compareFile)) result.compare = { ...JSON.parse(fs.readFileSync(compareFile, 'utf8')), ...result.compare };
    const order = ['config', 'compare', 'memory', 'flush', 'concurrency', 'tls', 'store', 'durable', 'gc', 'run'];
    const sorted = Object.fromEntries([...order.filter((k) => k in result), ...Object.keys(result).filter((k) => !order.includes(k))].map((k) => [k, result[k]]));
    fs.writeFileSync(outFile, JSON.stringify(sorted, null, 2) + '\n');
    break;
  }
  case 'wait-sealed': {
    const [url, timeout = '600000'] = args;
    const t0 = performance.now();
    for (;;) {
      const { json } = await getJson(`${url}/api/exports`);
      const dirty = json.reduce((s, v) => s + v.dirty_bytes, 0);
      if (dirty === 0) break;
      if (performance.now() - t0 > Number(timeout)) die(`still ${dirty} dirty bytes after ${timeout} ms`);
      await sleep(200);
    }
    out(((performance.now() - t0) / 1000).toFixed(1));
    break;
  }
  case 'host-ready-ms': {
    const lines = fs.readFileSync(args[0], 'utf8').split('\n').filter((l) => l.includes('host ready'));
    const m = lines.at(-1)?.match(/\bms=([0-9.]+)/);
    out(m ? m[1] : 'null');
    break;
  }
  case 'report': {
    const r = JSON.parse(fs.readFileSync(args[0], 'utf8'));
    const lines = [];
    const c = r.compare ?? {};
    lines.push('', `Updraft bench  (${r.config?.runtime_s}s x ${r.config?.rounds} rounds, size ${r.config?.size}; reference = nbdkit file plugin on a sparse local file)`);
    if (Object.values(c).some((v) => typeof v === 'object' && v !== null)) {
      lines.push('', 'throughput / latency vs reference (median of rounds)');
      lines.push(`  ${'workload'.padEnd(10)} ${'updraft'.padStart(12)} ${'reference'.padStart(12)} ${'ratio'.padStart(7)}`);
    }
    for (const [w, v] of Object.entries(c)) {
      if (typeof v !== 'object' || v === null) continue;
      if (w === 'lat') {
        lines.push(`  ${'lat p50'.padEnd(10)} ${(fmt(v.candidate_p50_us, 1) + 'us').padStart(12)} ${(fmt(v.reference_p50_us, 1) + 'us').padStart(12)} ${fmt(v.ratio, 3).padStart(7)}  (ref/updraft; >1 = updraft faster)`);
        lines.push(`  ${'lat p99'.padEnd(10)} ${(fmt(v.candidate_p99_us, 1) + 'us').padStart(12)} ${(fmt(v.reference_p99_us, 1) + 'us').padStart(12)}`);
      } else {
        const unit = w.startsWith('seq') ? ' MiB/s' : ' IOPS';
        lines.push(`  ${w.padEnd(10)} ${fmt(v.candidate).padStart(12)} ${fmt(v.reference).padStart(12)} ${fmt(v.ratio, 3).padStart(7)}  ${unit.trim()}${w.startsWith('seq') ? ' (1 MiB ops/s = MiB/s)' : ''}`);
      }
    }
    if (c.rss_after_mib !== undefined) lines.push(`  daemon RSS after the compare part ${fmt(c.rss_after_mib)} MiB (peak ${fmt(c.rss_peak_mib)} MiB)`);
    const m = r.memory ?? {};
    if (Object.keys(m).length) {
      lines.push('', `${m.volumes} volumes x ${m.volume_size_gib} GiB, ${m.written_mib_per_volume} MiB written in each (took ${fmt(m.write_seconds, 1)}s)`);
      lines.push(`  RSS, volumes created, nothing written ${fmt(m.rss_idle_mib, 1).padStart(8)} MiB`);
      lines.push(`  RSS, right after the last write       ${fmt(m.rss_dirty_mib, 1).padStart(8)} MiB  (${fmt(m.dirty_mib_at_rss)} MiB still unsealed then)`);
      lines.push(`  RSS, everything sealed                ${fmt(m.rss_sealed_mib, 1).padStart(8)} MiB  (${fmt(m.seal_wait_s, 1)}s after the last write; memory tier of the block cache holds ${fmt(m.cache_memory_mib)} MiB)`);
      lines.push(`  RSS peak (VmHWM)                      ${fmt(m.rss_peak_mib, 1).padStart(8)} MiB`);
      lines.push(`  stop (SIGTERM -> exit)                ${fmt(m.stop_ms, 0).padStart(8)} ms`);
      lines.push(`  restart: spawn -> /healthz 200        ${fmt(m.restart_healthz_ms, 0).padStart(8)} ms  (${m.restart_volumes} volumes)`);
      lines.push(`  restart: 'host ready' ms=             ${fmt(m.restart_host_ready_ms, 1).padStart(8)} ms`);
      lines.push(`  RSS right after restart               ${fmt(m.rss_after_restart_mib, 1).padStart(8)} MiB`);
    }
    const f = r.flush ?? {};
    if (Object.keys(f).length) {
      lines.push('', `FLUSH right after ${f.written_gib} GiB of random 4 KiB writes (QD32, no fsync)`);
      lines.push(`  ${''.padEnd(10)} ${'updraft'.padStart(12)} ${'reference'.padStart(12)}`);
      lines.push(`  ${'write IOPS'.padEnd(10)} ${fmt(f.candidate_write_iops).padStart(12)} ${fmt(f.reference_write_iops).padStart(12)}`);
      lines.push(`  ${'FLUSH'.padEnd(10)} ${(fmt(f.candidate_flush_ms, 1) + 'ms').padStart(12)} ${(fmt(f.reference_flush_ms, 1) + 'ms').padStart(12)}`);
      lines.push(`  ${'2nd FLUSH'.padEnd(10)} ${(fmt(f.candidate_second_flush_ms, 2) + 'ms').padStart(12)} ${(fmt(f.reference_second_flush_ms, 2) + 'ms').padStart(12)}`);
    }
    const cc = r.concurrency;
    if (cc) {
      const us = (v) => `${fmt(v)}us`;
      lines.push('', 'several VMs at once (reference: nbdkit file plugin, one sparse file per volume)');
      for (const [key, what] of [['fsync_fresh', 'fsync=1, fresh volume'], ['fsync_written', 'fsync=1, written volume'], ['fsync_4', 'fsync=1, 4 volumes at once']]) {
        lines.push(`  ${what.padEnd(27)} ${fmt(cc[`${key}_iops`]).padStart(7)} IOPS, FLUSH p50 ${us(cc[`${key}_flush_p50_us`]).padStart(8)}; reference ${fmt(cc[`${key}_reference_iops`]).padStart(6)} IOPS, ${us(cc[`${key}_reference_flush_p50_us`]).padStart(8)}; ratio ${fmt(cc[`${key}_ratio`], 2)}`);
      }
      lines.push(`  random 70/30 QD16: one volume ${fmt(cc.many_1_iops)} IOPS, four at once ${fmt(cc.many_4_iops)} IOPS (${fmt(cc.many_ratio, 2)}x); daemon CPU ${fmt(cc.many_4_cpu_s, 1)} s, event loop ${fmt(cc.many_4_event_loop_cpu_s, 1)} s; reference ${fmt(cc.many_1_reference_iops)} and ${fmt(cc.many_4_reference_iops)} IOPS (${fmt(cc.many_reference_ratio, 2)}x)`);
      lines.push(`  4 KiB random read p99: alone ${us(cc.isolation_read_p99_alone_us)}, beside a 1 MiB QD8 writer ${us(cc.isolation_read_p99_beside_writer_us)} (${fmt(cc.isolation_ratio, 2)}x); reference ${us(cc.isolation_reference_read_p99_alone_us)} and ${us(cc.isolation_reference_read_p99_beside_writer_us)} (${fmt(cc.isolation_reference_ratio, 2)}x)`);
    }
    const tl = r.tls;
    if (tl) {
      lines.push('', 'NBD over TLS (nbds://) against plaintext TCP, the same volume on one daemon (median of rounds)');
      for (const [w, what] of [['randread', '4 KiB random read, QD32'], ['randwrite', '4 KiB random write, QD32'], ['seqread', '1 MiB sequential read, QD8'], ['seqwrite', '1 MiB sequential write, QD8']]) {
        if (tl[`${w}_ratio`] === undefined) continue;
        const unit = w.startsWith('seq') ? 'MiB/s' : 'IOPS';
        lines.push(`  ${what.padEnd(27)} plaintext ${fmt(tl[`${w}_plain`]).padStart(8)} ${unit}, TLS ${fmt(tl[`${w}_tls`]).padStart(8)} ${unit}: ${fmt(tl[`${w}_ratio`], 2)}`);
      }
    }
    const du = r.durable;
    if (du) {
      lines.push('', `durable flush mode (MinIO on loopback)`);
      lines.push(`  FLUSH after a 4 KiB write, ${du.latency_injected_ms} ms injected: p50 ${du.flush_p50_ms} ms, p99 ${du.flush_p99_ms} ms; one 4 KiB PUT p50 ${du.put_p50_ms} ms, p99 ${du.put_p99_ms} ms (${du.flush_to_put_p50_ratio}x)`);
      for (const [key, what] of [['qd1', 'durable, QD1 fsync=1'], ['qd32', 'durable, QD32 fsync=32'], ['demand_qd32', 'demand, QD32 fsync=32']]) {
        lines.push(`  ${what.padEnd(22)} ${fmt(du[`${key}_iops`]).padStart(6)} IOPS, FLUSH p50 ${du[`${key}_flush_p50_ms`]} ms p99 ${du[`${key}_flush_p99_ms`]} ms, ${du[`${key}_store_requests_per_gib`]} store requests per GiB${du[`${key}_flushes_per_log_put`] ? `, ${du[`${key}_flushes_per_log_put`]} FLUSHes per log PUT` : ''}`);
      }
    }
    const st = r.store;
    if (st) {
      lines.push('', `object store (MinIO on loopback, ${st.drain_size_mib} MiB of incompressible data)`);
      lines.push(`  drain, unsealed (drain seals too)  ${fmt(st.drain_mb_s).padStart(8)} MB/s  (${fmt(st.drain_seconds, 2)}s, ${st.drain_packs} packs, ${st.drain_requests_per_gib} requests per GiB)`);
      lines.push(`  drain, sealed beforehand           ${fmt(st.drain_sealed_mb_s).padStart(8)} MB/s  (${fmt(st.drain_sealed_seconds, 2)}s)`);
      lines.push(`  live migration write pause         ${fmt(st.migration_pause_ms).padStart(8)} ms  (release with its final drain of ${st.migration_final_drain_packs} packs ${st.migration_release_ms} ms, promote ${st.migration_promote_ms} ms)`);
      lines.push(`  cold sequential read, ${st.latency_ms} ms store latency, read-ahead ${st.read_ahead_packs} packs ${fmt(st.cold_read_readahead_mb_s).padStart(6)} MB/s  (${st.cold_read_readahead_gets} GETs)`);
      lines.push(`  cold sequential read, ${st.latency_ms} ms store latency, no read-ahead    ${fmt(st.cold_read_no_readahead_mb_s).padStart(6)} MB/s  (${st.cold_read_no_readahead_gets} GETs)`);
    }
    if (st?.fork_sizes_mib) {
      lines.push('', `fork latency (median of ${st.fork_rounds ?? 3}; MinIO on loopback): right after a drain, and with the same 1 MiB dirty; wake on another host to the first byte`);
      for (const mib of String(st.fork_sizes_mib).split('/')) {
        lines.push(
          `  ${String(mib).padStart(5)} MiB written: consistent ${fmt(st[`fork_consistent_${mib}mib_ms`]).padStart(5)} ms, lazy ${fmt(st[`fork_lazy_${mib}mib_ms`]).padStart(5)} ms;` +
            ` 1 MiB dirty: consistent ${fmt(st[`fork_consistent_dirty_${mib}mib_ms`]).padStart(5)} ms, lazy ${fmt(st[`fork_lazy_dirty_${mib}mib_ms`]).padStart(5)} ms;` +
            ` wake to first byte ${fmt(st[`wake_first_byte_${mib}mib_ms`]).padStart(5)} ms`,
        );
      }
      if (st.fork_lazy_ratio !== undefined) {
        lines.push(`  largest ÷ smallest: consistent ${st.fork_consistent_ratio}×, lazy ${st.fork_lazy_ratio}×; 1 MiB dirty: consistent ${st.fork_consistent_dirty_ratio}×, lazy ${st.fork_lazy_dirty_ratio}×`);
      }
    }
    const g = r.gc;
    if (g) {
      lines.push('', 'gc: reconciliation per 1,000 manifests (empty refcount database / steady state), deletion, refcount updates');
      lines.push(`  reconcile, file://  ${fmt(g.reconcile_file_empty_db_ms_per_1000).padStart(7)} ms / ${fmt(g.reconcile_file_steady_ms_per_1000).padStart(7)} ms`);
      lines.push(`  reconcile, MinIO    ${fmt(g.reconcile_minio_empty_db_ms_per_1000).padStart(7)} ms / ${fmt(g.reconcile_minio_steady_ms_per_1000).padStart(7)} ms`);
      lines.push(`  delete              ${fmt(g.delete_file_packs_per_s).padStart(7)} packs/s file://, ${fmt(g.delete_minio_packs_per_s)} packs/s MinIO`);
      lines.push(`  refcount update     SQLite median ${g.refcount_sqlite_median_ms} ms (p99 ${g.refcount_sqlite_p99_ms}), PostgreSQL median ${g.refcount_postgres_median_ms} ms (p99 ${g.refcount_postgres_p99_ms})`);
    }
    if (r.run?.elapsed_s !== undefined) lines.push('', `total bench time ${r.run.elapsed_s}s; load average before ${r.run.loadavg_start ?? '-'}, after ${r.run.loadavg_end ?? '-'} (${r.config?.cpus} CPUs)`);
    out(lines.join('\n'));
    break;
  }
  default:
    die(`unknown command ${cmd}`);
}
