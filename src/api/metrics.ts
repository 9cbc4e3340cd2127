// Prometheus metrics. Process and cache series through prom-client; the per-volume I/O
// counters and latency histograms are kept as plain numbers on the hot path
// (volume/stats.ts) and rendered here in the text exposition format when scraped.
import client from 'prom-client';
import type { Collector } from '../gc/collector.js';
import type { Host } from '../host/host.js';
import type { DeferredRequests } from '../nbd/deferred.js';
import type { MeteredObjectStore } from '../objectstore/metered.js';
import { COMMIT_BUCKETS } from '../host/durable-log.js';
import { LATENCY_BUCKETS, OP_KINDS } from '../volume/stats.js';
import type { HostView } from './dashboard.js';

export class Metrics {
  readonly registry = new client.Registry();

  constructor(
    private readonly host: Host,
    store: MeteredObjectStore,
    collector?: Collector,
    deferred?: DeferredRequests,
    private readonly view?: HostView,
  ) {
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
    gauge('updraft_cache_slab_direct_writes', 'Whether block writes to the disk cache bypass the page cache (O_DIRECT: 1), or the filesystem refused that (0)', () => (cache.slabWritesDirect ? 1 : 0));
    gauge('updraft_cache_memory_held_bytes', 'Bytes of the buffers the memory tier keeps (its arena of memory_size_gb, resident as far as it has filled)', () => cache.memoryHeldBytes);
    gauge('updraft_cache_memory_faulted_in', 'Whether the memory tier has been faulted in at start-up (memory_pretouch): 1 once it has, 0 before or without it', () => (cache.memoryFaultedIn ? 1 : 0));
    gauge('updraft_process_array_buffers_bytes', 'Bytes of ArrayBuffers and Buffers the process holds (process.memoryUsage().arrayBuffers)', () => process.memoryUsage().arrayBuffers);
    gauge('updraft_local_used_bytes', 'Local bytes that exist nowhere else: overlay sectors plus pinned blocks', () => cache.space.used);
    gauge('updraft_local_capacity_bytes', 'The disk budget for local-only data ([cache] disk_size_gb)', () => cache.space.capacity);
    gauge('updraft_volumes', 'Volumes open on this host', () => host.all().length);
    if (view) {
      const currency = () => view.prices.currency;
      gauge('updraft_stored_bytes', 'Pack bytes of every block in the host pack index (what the store keeps for this host)', () => view.usage.packIndexTotals().bytes);
      gauge('updraft_cost_storage_per_month', `What a month of storing updraft_stored_bytes costs at the [cost] prices (${currency()})`, () => view.hostCost().storage_per_month);
      gauge('updraft_cost_requests', `What the store requests since start cost at the [cost] prices (${currency()})`, () => view.hostCost().requests_cost);
    }
    if (deferred) {
      gauge('updraft_nbd_deferred_requests', 'NBD requests waiting for blocks from the store or for a flush, every connection together', () => deferred.count);
      gauge('updraft_nbd_deferred_requests_peak', `The most NBD requests deferred at once on this host (bound ${deferred.perHost})`, () => deferred.peak);
      gauge('updraft_nbd_deferred_requests_connection_peak', `The most NBD requests one connection had deferred at once (bound ${deferred.perConnection})`, () => deferred.connectionPeak);
      gauge('updraft_nbd_deferred_bytes', 'Write payload bytes held by deferred NBD requests, every connection together', () => deferred.bytes);
      gauge('updraft_nbd_deferred_bytes_peak', `The most write payload bytes deferred at once on this host (bound ${deferred.bytesPerHost} plus one request)`, () => deferred.bytesPeak);
      gauge('updraft_nbd_deferred_bytes_connection_peak', `The most write payload bytes one connection had deferred at once (bound ${deferred.bytesPerConnection} plus one request)`, () => deferred.connectionBytesPeak);
    }
    counter('updraft_cache_hits_total', 'Block reads served from the cache, by tier', ['tier'], () => [
      [{ tier: 'memory' }, cache.counters.memoryHits],
      [{ tier: 'disk' }, cache.counters.diskHits],
    ]);
    counter('updraft_fsync_failures_total', 'fdatasync calls of local state that failed, by file (each fails the volumes whose data it may have lost)', ['file'], () => [
      [{ file: 'overlay' }, host.syncFailures.overlay],
      [{ file: 'journal' }, host.syncFailures.journal],
      [{ file: 'slab' }, cache.counters.syncFailures],
    ]);
    gauge('updraft_volumes_failed', 'Volumes refusing writes and flushes after a failed sync, until reopened', () => host.all().filter((v) => v.failed !== undefined).length);
    counter('updraft_cache_misses_total', 'Block reads the local cache could not serve', [], () => [[{}, cache.counters.misses]]);
    counter('updraft_cache_evictions_total', 'Blocks evicted, by tier', ['tier'], () => [
      [{ tier: 'memory' }, cache.counters.memoryEvictions],
      [{ tier: 'disk' }, cache.counters.diskEvictions],
    ]);
    counter('updraft_cache_blocks_written_total', 'New blocks written to the disk cache by sealing', [], () => [[{}, cache.counters.blocksWritten]]);
    counter('updraft_cache_fetched_written_total', 'Blocks fetched from the store and written to the disk cache', [], () => [[{}, cache.counters.fetchedWritten]]);
    counter('updraft_cache_streamed_to_memory_total', 'Blocks fetched for a sequential reader kept in the memory tier only (not written to the disk cache)', [], () => [[{}, cache.counters.streamedToMemory]]);
    counter('updraft_cache_held_for_reads_total', 'Fetched blocks a waiting read needed that neither cache tier could take, held for that read until it had them', [], () => [[{}, cache.counters.heldForReads]]);
    counter('updraft_cache_dedup_hits_total', 'Sealed chunks whose block was already cached (stored once)', [], () => [[{}, cache.counters.dedupHits]]);
    const requests = (pick: 'requests' | 'errors') => () =>
      Object.entries(store.counters()[pick]).map(([kind, n]): [Record<string, string>, number] => [{ kind }, n]);
    counter('updraft_store_requests_total', 'Requests that reached the object store, by kind (every retry counts)', ['kind'], requests('requests'));
    counter('updraft_store_errors_total', 'Object store requests that failed, by kind', ['kind'], requests('errors'));
    counter('updraft_store_bytes_total', 'Bytes sent to and received from the object store', ['direction'], () => [
      [{ direction: 'up' }, store.counters().bytesUp],
      [{ direction: 'down' }, store.counters().bytesDown],
    ]);
    const fetched = host.fetcher.counters;
    counter('updraft_store_packs_fetched_total', 'Packs fetched from the store for cold reads and read-ahead', [], () => [[{}, fetched.packsFetched]]);
    counter('updraft_store_prefetched_packs_total', 'Pack fetches started by read-ahead', [], () => [[{}, fetched.prefetchedPacks]]);
    counter('updraft_store_demand_packs_total', 'Pack fetches a read had to wait for (on-demand)', [], () => [[{}, fetched.demandPacks]]);
    counter('updraft_store_read_waits_total', 'Reads (and unaligned writes) that waited for blocks from the store', [], () => [[{}, fetched.readWaits]]);
    counter('updraft_store_hotset_packs_total', 'Pack fetches started from a boot hot set', [], () => [[{}, fetched.hotsetPacks]]);
    counter('updraft_store_verify_failures_total', 'Packs that failed hash verification when fetched', [], () => [[{}, fetched.verifyFailures]]);
    const durable = host.durableLog.stats;
    counter('updraft_durable_log_puts_total', 'Log objects put for durable volumes (one carries the FLUSHes of every durable volume waiting)', [], () => [[{}, durable.puts]]);
    counter('updraft_durable_log_put_failures_total', 'Log object PUTs that failed (their changes go into the next one)', [], () => [[{}, durable.failedPuts]]);
    counter('updraft_durable_log_bytes_total', 'Bytes of log objects put', [], () => [[{}, durable.bytes]]);
    counter('updraft_durable_flushes_total', 'FLUSHes (and FUA writes) of durable volumes', [], () => [[{}, durable.flushes]]);
    counter('updraft_durable_flushes_committed_total', 'FLUSHes acknowledged by a log PUT (divided by the PUTs: FLUSHes per PUT)', [], () => [[{}, durable.flushesCommitted]]);
    counter('updraft_durable_log_objects_deleted_total', 'Log objects deleted once manifests covered them', [], () => [[{}, durable.deleted]]);
    gauge('updraft_durable_log_objects', 'Log objects this host wrote that no manifest covers yet', () => host.durableLog.liveObjects);
    gauge('updraft_pack_index_blocks', 'Blocks the host pack index knows a pack for', () => host.packIndex.size);
    counter('updraft_cache_slab_write_failures_total', 'Block writes to the disk cache that failed (a block only this host holds is then lost for the volumes that would name it)', [], () => [[{}, cache.counters.slabWriteFailures]]);
    counter('updraft_cache_scrubbed_blocks_total', 'Cached blocks re-hashed by the background scrub', [], () => [[{}, cache.counters.blocksScrubbed]]);
    counter('updraft_cache_scrub_evictions_total', 'Cached blocks the scrub found corrupt and evicted', [], () => [[{}, cache.counters.scrubEvictions]]);
    counter('updraft_cache_verify_evictions_total', 'Cached blocks loaded at start-up whose first read found them not matching their name, dropped', [], () => [[{}, cache.counters.verifyEvictions]]);
    counter('updraft_cache_scrub_corrupt_pinned_total', 'Corrupt blocks the scrub found that only this host holds', [], () => [[{}, cache.counters.scrubCorruptPinned]]);
    if (collector) {
      const gc = collector.counters;
      counter('updraft_gc_cycles_total', 'GC deletion cycles run', [], () => [[{}, gc.cycles]]);
      counter('updraft_gc_packs_deleted_total', 'Packs GC deleted from the store', [], () => [[{}, gc.packsDeleted]]);
      counter('updraft_gc_delete_failures_total', 'Pack deletions that failed (retried next cycle)', [], () => [[{}, gc.deleteFailures]]);
      counter('updraft_gc_reconciliations_total', 'Reconciliations of refcounts with the store', [], () => [[{}, gc.reconciliations]]);
      counter('updraft_gc_refcount_corrections_total', 'Pack refcounts reconciliation corrected', [], () => [[{}, gc.refcountCorrections]]);
      counter('updraft_gc_manifest_corrections_total', 'Manifests whose counted packs reconciliation corrected', [], () => [[{}, gc.manifestCorrections]]);
      counter('updraft_gc_set_corrections_total', 'Pack sets whose holder count reconciliation corrected', [], () => [[{}, gc.setCorrections]]);
      counter('updraft_gc_packs_adopted_total', 'Packs in the store reconciliation found without a refcount row', [], () => [[{}, gc.packsAdopted]]);
      counter('updraft_gc_intents_resolved_total', 'Unfinished manifest writes resolved, by outcome', ['outcome'], () => [
        [{ outcome: 'committed' }, gc.intentsCommitted],
        [{ outcome: 'reverted' }, gc.intentsReverted],
      ]);
      counter('updraft_gc_sql_rows_written_total', 'Rows changed in the refcount database by this process', [], () => [[{}, collector.refcounts.db.rowsWritten]]);
    }
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
    head('updraft_volume_flush_syncs_total', 'counter', 'Flushes by what they synced: "journal" committed a journal batch after the data, "overlay" (a client FLUSH over rewritten sectors only) synced the overlay alone, "logged" (a client FLUSH covering few writes) wrote them into its journal batch and synced the journal alone');
    for (const v of volumes) {
      lines.push(`updraft_volume_flush_syncs_total{volume="${v.name}",synced="journal"} ${v.stats.journalCommits}`);
      lines.push(`updraft_volume_flush_syncs_total{volume="${v.name}",synced="overlay"} ${v.stats.overlayOnlyFlushes}`);
      lines.push(`updraft_volume_flush_syncs_total{volume="${v.name}",synced="logged"} ${v.stats.loggedFlushes}`);
    }
    head('updraft_volume_failed', 'gauge', '1 when a failed sync of local state made the volume refuse writes and flushes until it is reopened');
    for (const v of volumes) lines.push(`updraft_volume_failed{volume="${v.name}"} ${v.failed !== undefined ? 1 : 0}`);
    head('updraft_volume_read_only', 'gauge', '1 when this host may not write the volume (leased elsewhere, released or fenced)');
    for (const v of volumes) lines.push(`updraft_volume_read_only{volume="${v.name}"} ${v.readOnly ? 1 : 0}`);
    head('updraft_volume_lease_generation', 'gauge', 'Lease generation held here; 0 when none');
    for (const v of volumes) lines.push(`updraft_volume_lease_generation{volume="${v.name}"} ${this.host.link(v.name)?.state.generation ?? 0}`);
    const view = this.view;
    if (view) {
      view.usage.refresh();
      const costs = volumes.map((v) => [v.name, view.volumeCost(v.name), view.usage.of(v.name)] as const);
      head('updraft_volume_logical_bytes', 'gauge', 'Mapped chunks times block size: what the guest wrote, before dedup and compression');
      for (const v of volumes) lines.push(`updraft_volume_logical_bytes{volume="${v.name}"} ${v.mappedChunks * v.blockSize}`);
      head('updraft_volume_stored_bytes', 'gauge', 'Pack bytes of the distinct blocks the volume names that are in the store (absent before its first usage walk)');
      for (const [name, , usage] of costs) if (usage) lines.push(`updraft_volume_stored_bytes{volume="${name}"} ${usage.storedBytes}`);
      head('updraft_volume_cost_storage_per_month', 'gauge', 'What a month of storing the volume\'s stored bytes costs at the [cost] prices');
      for (const [name, cost] of costs) lines.push(`updraft_volume_cost_storage_per_month{volume="${name}",currency="${cost.currency}"} ${cost.storage_per_month}`);
      head('updraft_volume_cost_requests', 'gauge', 'What the store requests made for the volume since start cost at the [cost] prices');
      for (const [name, cost] of costs) lines.push(`updraft_volume_cost_requests{volume="${name}",currency="${cost.currency}"} ${cost.requests_cost}`);
    }
    head('updraft_durable_commit_seconds', 'histogram', 'A durable FLUSH\'s wait for the store: from its arrival until a log PUT (or a drain) holds its writes');
    const stats = this.host.durableLog.stats;
    let committed = 0;
    COMMIT_BUCKETS.forEach((le, i) => {
      committed += stats.latency[i];
      lines.push(`updraft_durable_commit_seconds_bucket{le="${le}"} ${committed}`);
    });
    committed += stats.latency[COMMIT_BUCKETS.length];
    lines.push(`updraft_durable_commit_seconds_bucket{le="+Inf"} ${committed}`, `updraft_durable_commit_seconds_sum ${stats.latencySum}`, `updraft_durable_commit_seconds_count ${committed}`);
    head('updraft_volume_durable_sequence', 'gauge', 'A durable volume: the last sequence the store holds (logged or in a manifest)');
    for (const v of volumes) {
      const logged = this.host.durableLog.loggedSequence(v.name);
      if (logged !== undefined) lines.push(`updraft_volume_durable_sequence{volume="${v.name}"} ${logged}`);
    }
    head('updraft_volume_manifest_sequence', 'gauge', 'Sequence of the last manifest written or loaded; -1 before the first');
    for (const v of volumes) lines.push(`updraft_volume_manifest_sequence{volume="${v.name}"} ${this.host.link(v.name)?.state.manifestSequence ?? -1}`);
    const summaries = volumes.filter((v) => this.host.link(v.name) !== undefined).map((v) => this.host.summary(v));
    head('updraft_volume_out_of_service', 'gauge', '1 when the local copy lost the lease with writes no manifest carries: new clients are refused');
    for (const s of summaries) lines.push(`updraft_volume_out_of_service{volume="${s.name}"} ${s.outOfService === undefined ? 0 : 1}`);
    head('updraft_volume_replica_lag_seconds', 'gauge', 'A replica following its writer: seconds since it last confirmed it serves the newest manifest in the store');
    for (const s of summaries) if (s.replica) lines.push(`updraft_volume_replica_lag_seconds{volume="${s.name}"} ${s.replica.lagSeconds.toFixed(3)}`);
    head('updraft_volume_replica_behind_sequences', 'gauge', 'A replica following its writer: sequences between the newest manifest seen in the store and the state served');
    for (const s of summaries) if (s.replica) lines.push(`updraft_volume_replica_behind_sequences{volume="${s.name}"} ${s.replica.behindSequences}`);
    head('updraft_volume_replica_log_bytes', 'gauge', 'A replica of a durable volume: bytes of its writer\'s log entries past the manifest that it serves');
    for (const s of summaries) if (s.replica) lines.push(`updraft_volume_replica_log_bytes{volume="${s.name}"} ${s.replica.log?.bytes ?? 0}`);
    head('updraft_volume_replica_manifests_applied_total', 'counter', 'A replica following its writer: newer manifests it took since the volume was opened here');
    for (const s of summaries) if (s.replica) lines.push(`updraft_volume_replica_manifests_applied_total{volume="${s.name}"} ${s.replica.manifestsApplied}`);
    return lines.join('\n') + '\n';
  }
}
