// Prometheus metrics. Process and cache series through prom-client; the per-volume I/O
// counters and latency histograms are kept as plain numbers on the hot path
// (volume/stats.ts) and rendered here in the text exposition format when scraped.
import client from 'prom-client';
import type { Host } from '../host/host.js';
import { LATENCY_BUCKETS, OP_KINDS } from '../volume/stats.js';

export class Metrics {
  readonly registry = new client.Registry();

  constructor(private readonly host: Host) {
    client.collectDefaultMetrics({ register: this.registry, prefix: 'updraft_' });
    const cache = host.cache;
    const gauge = (name: string, help: string, value: () => number) =>
      new client.Gauge({ name, help, registers: [this.registry], collect() { this.set(value()); } });
    const counter = (name: string, help: string, labelNames: string[], values: () => Array<[Record<string, string>, number]>) =>
      new client.Counter({
        name, help, labelNames, registers: [this.registry],
        collect() {
          this.reset();
          for (const [labels, value] of values()) this.inc(labels, value);
        },
      });
    gauge('updraft_cache_blocks', 'Blocks held in the local disk cache', () => cache.blockCount);
    gauge('updraft_cache_pinned_blocks', 'Cached blocks that are not in the object store yet (never evicted)', () => cache.pinnedBlocks);
    gauge('updraft_cache_memory_bytes', 'Bytes of blocks in the memory tier', () => cache.memoryBytes);
    gauge('updraft_local_used_bytes', 'Local bytes that exist nowhere else: overlay sectors plus pinned blocks', () => cache.space.used);
    gauge('updraft_local_capacity_bytes', 'The disk budget for local-only data ([cache] disk_size_gb)', () => cache.space.capacity);
    gauge('updraft_volumes', 'Volumes open on this host', () => host.all().length);
    counter('updraft_cache_hits_total', 'Block reads served from the cache, by tier', ['tier'], () => [
      [{ tier: 'memory' }, cache.counters.memoryHits],
      [{ tier: 'disk' }, cache.counters.diskHits],
    ]);
    counter('updraft_cache_misses_total', 'Block reads the local cache could not serve', [], () => [[{}, cache.counters.misses]]);
    counter('updraft_cache_evictions_total', 'Blocks evicted, by tier', ['tier'], () => [
      [{ tier: 'memory' }, cache.counters.memoryEvictions],
      [{ tier: 'disk' }, cache.counters.diskEvictions],
    ]);
    counter('updraft_cache_blocks_written_total', 'New blocks written to the disk cache by sealing', [], () => [[{}, cache.counters.blocksWritten]]);
    counter('updraft_cache_dedup_hits_total', 'Sealed chunks whose block was already cached (stored once)', [], () => [[{}, cache.counters.dedupHits]]);
  }

  async text(): Promise<string> {
    return (await this.registry.metrics()) + this.volumeText();
  }

  get contentType(): string {
    return this.registry.contentType;
  }

  private volumeText(): string {
    const lines: string[] = [];
    const head = (name: string, type: string, help: string) => lines.push(`# HELP ${name} ${help}`, `# TYPE ${name} ${type}`);
    const volumes = this.host.all();
    head('updraft_volume_ops_total', 'counter', 'NBD requests served, by volume and operation');
    for (const v of volumes) for (const op of OP_KINDS) lines.push(`updraft_volume_ops_total{volume="${v.name}",op="${op}"} ${v.stats.ops[op].count}`);
    head('updraft_volume_bytes_total', 'counter', 'Bytes read, written, zeroed or trimmed, by volume and operation');
    for (const v of volumes) for (const op of OP_KINDS) lines.push(`updraft_volume_bytes_total{volume="${v.name}",op="${op}"} ${v.stats.ops[op].bytes}`);
    head('updraft_volume_op_seconds', 'histogram', 'Time from request parsed to reply queued, by volume and operation');
    for (const v of volumes) {
      for (const op of OP_KINDS) {
        const s = v.stats.ops[op];
        let cumulative = 0;
        LATENCY_BUCKETS.forEach((le, i) => {
          cumulative += s.buckets[i];
          lines.push(`updraft_volume_op_seconds_bucket{volume="${v.name}",op="${op}",le="${le}"} ${cumulative}`);
        });
        cumulative += s.buckets[LATENCY_BUCKETS.length];
        lines.push(`updraft_volume_op_seconds_bucket{volume="${v.name}",op="${op}",le="+Inf"} ${cumulative}`);
        lines.push(`updraft_volume_op_seconds_sum{volume="${v.name}",op="${op}"} ${s.seconds}`);
        lines.push(`updraft_volume_op_seconds_count{volume="${v.name}",op="${op}"} ${s.count}`);
      }
    }
    head('updraft_volume_dirty_bytes', 'gauge', 'Overlay bytes not sealed into blocks yet');
    for (const v of volumes) lines.push(`updraft_volume_dirty_bytes{volume="${v.name}"} ${v.dirtyBytes}`);
    head('updraft_volume_size_bytes', 'gauge', 'Volume size');
    for (const v of volumes) lines.push(`updraft_volume_size_bytes{volume="${v.name}"} ${v.size}`);
    head('updraft_volume_clients', 'gauge', 'NBD clients attached');
    for (const v of volumes) lines.push(`updraft_volume_clients{volume="${v.name}"} ${v.clients}`);
    head('updraft_volume_chunks_sealed_total', 'counter', 'Overlay chunks sealed into blocks');
    for (const v of volumes) lines.push(`updraft_volume_chunks_sealed_total{volume="${v.name}"} ${v.stats.chunksSealed}`);
    return lines.join('\n') + '\n';
  }
}
