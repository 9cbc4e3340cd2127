// The operators' view: a static page (src/api/dashboard/: HTML, JS, CSS, and uPlot from
// node_modules for the charts) served at / and /dashboard/, and the JSON it polls,
// GET /api/dashboard: every volume, the host (cache, store, GC, dedup, cost) and the
// events recorded since the last poll. Counters are sent as totals since start; the page
// turns two polls into rates. The host summary (GET /api/host) is what `updraft status`
// prints. Nothing here writes: a poll costs no store request.
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import type { FastifyInstance } from 'fastify';
import type { Collector } from '../gc/collector.js';
import { costOf, type Cost, type CostPrices } from '../host/cost.js';
import type { Host } from '../host/host.js';
import { UsageScanner } from '../host/usage.js';
import type { MeteredObjectStore } from '../objectstore/metered.js';
import type { Volume } from '../volume/volume.js';

/** The page's files: served without the token (they hold no data; what they fetch needs it). */
const PAGE_FILES: Record<string, { file: string | URL; type: string }> = {
  '/dashboard/': { file: new URL('../../../src/api/dashboard/index.html', import.meta.url), type: 'text/html; charset=utf-8' },
  '/dashboard/app.js': { file: new URL('../../../src/api/dashboard/app.js', import.meta.url), type: 'text/javascript; charset=utf-8' },
  '/dashboard/style.css': { file: new URL('../../../src/api/dashboard/style.css', import.meta.url), type: 'text/css; charset=utf-8' },
  '/dashboard/uPlot.iife.min.js': { file: createRequire(import.meta.url).resolve('uplot/dist/uPlot.iife.min.js'), type: 'text/javascript; charset=utf-8' },
  '/dashboard/uPlot.min.css': { file: createRequire(import.meta.url).resolve('uplot/dist/uPlot.min.css'), type: 'text/css; charset=utf-8' },
};

/** Whether a request is for one of the page's files (GET, no query), which need no token. */
export function isPageFile(method: string, url: string): boolean {
  return (method === 'GET' || method === 'HEAD') && (url === '/' || url in PAGE_FILES);
}

/** The live pack count (a SQL count) is asked for at most this often. */
const LIVE_PACKS_MS = 10_000;

export interface DashboardContext {
  host: Host;
  store: MeteredObjectStore;
  collector?: Collector;
  prices: CostPrices;
}

/** What the dashboard, the export route and the metrics share: usage, cost, GC figures. */
export class HostView {
  readonly usage: UsageScanner;
  private livePacks: { n: number | undefined; at: number; pending?: Promise<void> } = { n: undefined, at: 0 };
  private readonly started = Date.now();

  constructor(private readonly ctx: DashboardContext) {
    this.usage = new UsageScanner(ctx.host);
  }

  get prices(): CostPrices {
    return this.ctx.prices;
  }

  /** A volume's storage and request cost (storage from its last usage walk; 0 before it). */
  volumeCost(name: string): Cost {
    return costOf(this.ctx.prices, this.usage.of(name)?.storedBytes ?? 0, this.ctx.store.volumeRequests(name));
  }

  /** The host's cost: every block in its pack index, every request since start. */
  hostCost(): Cost {
    return costOf(this.ctx.prices, this.usage.packIndexTotals().bytes, this.ctx.store.counters().requests);
  }

  volumeRow(v: Volume) {
    const { host } = this.ctx;
    const s = host.summary(v);
    const link = host.link(v.name);
    const usage = this.usage.of(v.name);
    const op = (kind: 'read' | 'write' | 'flush') => {
      const o = v.stats.ops[kind];
      return { count: o.count, bytes: o.bytes, seconds: o.seconds, errors: o.errors };
    };
    return {
      name: s.name, size: s.size, mapped_bytes: s.mappedChunks * v.blockSize, dirty_bytes: s.dirtyBytes, store_dirty_bytes: s.storeDirtyBytes,
      flush_mode: s.flushMode, read_only: s.readOnly, clients: s.clients, sequence: s.sequence, manifest_sequence: s.manifestSequence,
      lease: { holder: s.leaseGeneration > 0 ? host.hostId : null, generation: s.leaseGeneration, lost: s.leaseLost ?? null },
      failed: s.failed ?? null,
      out_of_service: s.outOfService ?? null,
      replica: s.replica === undefined ? null : { behind_sequences: s.replica.behindSequences, lag_seconds: s.replica.lagSeconds },
      last_drain: link?.lastDrain === undefined ? null : { at: new Date(link.lastDrain.at).toISOString(), sequence: link.lastDrain.sequence },
      io: { read: op('read'), write: op('write'), flush: op('flush') },
      usage: usage === undefined ? null : {
        logical_bytes: usage.logicalBytes, stored_bytes: usage.storedBytes, blocks: usage.blocks, local_blocks: usage.localBlocks,
        at_sequence: usage.sequence, at: new Date(usage.at).toISOString(),
      },
      cost: this.volumeCost(v.name),
    };
  }

  /** The host summary: cache, store, GC, dedup and cost. */
  async hostSummary() {
    const { host, store, collector } = this.ctx;
    const cache = host.cache;
    const volumes = host.all();
    const counters = store.counters();
    const totals = this.usage.packIndexTotals();
    let logical = 0;
    for (const v of volumes) logical += v.mappedChunks * v.blockSize;
    const c = cache.counters;
    return {
      host_id: host.hostId, now: new Date().toISOString(), uptime_s: Math.round((Date.now() - this.started) / 1000),
      volumes: volumes.length, clients: volumes.reduce((n, v) => n + v.clients, 0),
      volumes_read_only: volumes.filter((v) => v.readOnly).length, volumes_failed: volumes.filter((v) => v.failed !== undefined).length,
      cache: {
        memory_bytes: cache.memoryBytes, memory_capacity: host.options.memoryBytes,
        disk_bytes: cache.blockCount * host.options.blockSize, disk_capacity: host.options.diskBytes, blocks: cache.blockCount,
        pinned_blocks: cache.pinnedBlocks, local_used_bytes: cache.space.used, local_capacity: cache.space.capacity,
        memory_hits: c.memoryHits, disk_hits: c.diskHits, misses: c.misses,
      },
      store: { description: store.description, requests: counters.requests, errors: counters.errors, bytes_up: counters.bytesUp, bytes_down: counters.bytesDown },
      gc: collector === undefined ? null : {
        live_packs: await this.livePackCount(collector), cycles: collector.counters.cycles, packs_deleted: collector.counters.packsDeleted,
        delete_failures: collector.counters.deleteFailures,
        last_cycle: collector.lastCycle === undefined ? null : {
          at: new Date(collector.lastCycle.at).toISOString(), deleted: collector.lastCycle.deleted, failed: collector.lastCycle.failed,
          dry_run: collector.lastCycle.dryRun, skipped: collector.lastCycle.skipped ?? null, duration_ms: collector.lastCycle.durationMs,
        },
      },
      dedup: { logical_bytes: logical, stored_bytes: totals.bytes, raw_bytes: totals.rawBytes, blocks: totals.blocks },
      cost: this.hostCost(),
    };
  }

  /** The live pack count, asked of the refcount database at most every LIVE_PACKS_MS (never waited for after the first). */
  private async livePackCount(collector: Collector): Promise<number | null> {
    const cached = this.livePacks;
    if (cached.pending === undefined && Date.now() - cached.at >= LIVE_PACKS_MS) {
      cached.pending = collector.refcounts.livePacks().then(
        (n) => {
          this.livePacks = { n, at: Date.now() };
        },
        () => {
          this.livePacks = { n: cached.n, at: Date.now() };
        },
      );
    }
    if (cached.n === undefined) await cached.pending;
    return this.livePacks.n ?? null;
  }
}

export function registerDashboard(app: FastifyInstance, ctx: DashboardContext, view: HostView): void {
  // Read at start: a missing file is a start-up error, not a 500 on first view.
  const pages = new Map(Object.entries(PAGE_FILES).map(([path, { file, type }]) => [path, { body: readFileSync(file), type }]));
  app.get('/', async (_request, reply) => reply.redirect('/dashboard/'));
  for (const [path, page] of pages) {
    app.get(path, async (_request, reply) => reply.header('content-type', page.type).header('cache-control', 'no-cache').send(page.body));
  }

  app.get('/api/host', async () => {
    view.usage.refresh();
    return view.hostSummary();
  });

  app.get<{ Querystring: { events_after?: string } }>('/api/dashboard', async (request) => {
    const after = Number(request.query.events_after ?? 0);
    view.usage.refresh();
    const { host } = ctx;
    return {
      host: await view.hostSummary(),
      volumes: host.all().sort((a, b) => a.name.localeCompare(b.name)).map((v) => view.volumeRow(v)),
      events: host.events.since(Number.isSafeInteger(after) && after >= 0 ? after : 0),
      /** The id the next event will get: lower than what a page saw means the daemon restarted. */
      events_next: host.events.nextId,
      prices: ctx.prices,
    };
  });
}
