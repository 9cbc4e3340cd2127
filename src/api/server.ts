// The HTTP API: health, the export inventory, create/grow/delete, drain, promotion and
// release, flush modes, metrics. With a token configured, every request is checked for
// it before anything else. Every path and body is validated here; bad input gets a 4xx
// with a JSON error, never a 500.
import Fastify, { type FastifyInstance, type FastifyReply } from 'fastify';
import * as z from 'zod';
import { secretMatcher } from '../crypto/secret.js';
import type { Collector } from '../gc/collector.js';
import { PacksGoneError, WritePendingError } from '../store/counted.js';
import { GcDatabaseError } from '../gc/sql.js';
import type { Host } from '../host/host.js';
import { FencedError, LeaseHeldError } from '../host/store-state.js';
import { errorMessage, type Logger } from '../log.js';
import type { MeteredObjectStore } from '../objectstore/metered.js';
import { ObjectStoreError } from '../objectstore/types.js';
import { ExistsError, MAX_BOOT_RECORD_SECONDS, MissingError } from '../store/catalog.js';
import { FormatError } from '../store/errors.js';
import { checkpointNameField, volumeNameField } from '../store/fields.js';
import { checkpointNameProblem, volumeNameProblem } from '../volume/names.js';
import { VolumeError } from '../volume/volume.js';
import type { DeferredRequests } from '../nbd/deferred.js';
import { Metrics } from './metrics.js';
import { HostView, isPageFile, registerDashboard } from './dashboard.js';
import { S3_STANDARD_PRICES, type CostPrices } from '../host/cost.js';

const GIB = 1024 ** 3;

const FLUSH_MODE = z.enum(['demand', 'continuous', 'durable']);

const PutExportBody = z.strictObject({
  size_gb: z.number().positive().max(1024 * 1024),
  flush_mode: FLUSH_MODE.optional(),
  dirty_budget_gb: z.number().positive().max(1024 * 1024).optional(),
  replica_follow_interval_ms: z.number().int().max(86_400_000).refine((ms) => ms === 0 || ms >= 100, 'an integer number of milliseconds, 100 or more, or 0 (no following)').optional(),
});

const FlushModeBody = z.strictObject({
  flush_mode: FLUSH_MODE,
  dirty_budget_gb: z.number().positive().max(1024 * 1024).optional(),
});

const DeleteQuery = z.strictObject({ force: z.enum(['true', 'false']).optional(), purge: z.enum(['true', 'false']).optional() });

const GcBody = z.strictObject({ reconcile: z.boolean().default(false), dry_run: z.boolean().optional() });

// Names in bodies are checked by the schema, so a problem names its field.
const ForkBody = z.strictObject({
  target: volumeNameField,
  mode: z.enum(['consistent', 'lazy', 'local']).default('consistent'),
  checkpoint: checkpointNameField.optional(),
});

const CheckpointBody = z.strictObject({ name: checkpointNameField });

const BootRecordBody = z.strictObject({ seconds: z.number().positive().max(MAX_BOOT_RECORD_SECONDS) });

function summary(v: ReturnType<Host['list']>[number]) {
  return {
    name: v.name, size: v.size, size_gb: v.size / GIB, clients: v.clients, read_only: v.readOnly,
    sequence: v.sequence, dirty_bytes: v.dirtyBytes, mapped_chunks: v.mappedChunks,
    flush_mode: v.flushMode, dirty_budget_gb: v.dirtyBudgetBytes / GIB, store_dirty_bytes: v.storeDirtyBytes,
    lease_generation: v.leaseGeneration, manifest_sequence: v.manifestSequence,
    failed: v.failed !== undefined, failure: v.failed ?? null,
    ...(v.leaseLost === undefined ? {} : { lease_lost: v.leaseLost }),
    ...(v.outOfService === undefined ? {} : { out_of_service: v.outOfService }),
    ...(v.replica === undefined ? {} : {
      replica: {
        latest_sequence: v.replica.latestSequence, behind_sequences: v.replica.behindSequences, lag_seconds: v.replica.lagSeconds,
        latest_written_at: v.replica.latestWrittenAt ?? null, manifests_applied: v.replica.manifestsApplied, error: v.replica.error ?? null,
        follow_interval_ms: v.replica.intervalMs,
        log: v.replica.log === undefined ? null : { entries: v.replica.log.entries, bytes: v.replica.log.bytes, sequence: v.replica.log.sequence },
      },
    }),
    ...(v.durableSequence === undefined ? {} : { durable_sequence: v.durableSequence }),
  };
}

/** Every problem zod found in a body, each led by the field it is about. */
function bodyProblem(error: z.ZodError): string {
  const problems = error.issues.map((i) =>
    i.code === 'unrecognized_keys'
      ? i.keys.map((key) => `${[...i.path, key].join('.')}: not a field of this body`).join('; ')
      : `${i.path.join('.') || '(body)'}: ${i.message}`,
  );
  return `body: ${problems.join('; ')}`;
}

/** The HTTP status for an error from the host: the client's fault, a conflict, or the store's. */
function statusOf(err: unknown): number | undefined {
  if (err instanceof VolumeError) return err.code === 'ESHUTDOWN' ? 503 : err.code === 'EPERM' ? 409 : 400;
  if (err instanceof LeaseHeldError || err instanceof FencedError || err instanceof ExistsError || err instanceof WritePendingError) return 409;
  if (err instanceof GcDatabaseError) return 503;
  // A pack a manifest to be copied names is gone: the source is damaged (see `updraft scrub`).
  if (err instanceof PacksGoneError) return 502;
  if (err instanceof MissingError) return 404;
  if (err instanceof FormatError) return 502;
  if (err instanceof ObjectStoreError) return err.code === 'PreconditionFailed' ? 409 : err.code === 'Invalid' ? 400 : 503;
  return undefined;
}

function fail(reply: FastifyReply, status: number, message: string) {
  return reply.code(status).send({ error: message });
}

export interface ApiContext {
  host: Host;
  store: MeteredObjectStore;
  /** The GC deletion worker and reconciliation; undefined when GC is off. */
  collector?: Collector;
  /** Disconnect every NBD client of a volume; returns how many there were. */
  disconnect(volume: string): number;
  /** The bearer token every request must carry ([servers.http] token); '' for none. */
  token: string;
  /** The NBD server's deferred requests (metrics). */
  deferred?: DeferredRequests;
  /** Prices for the cost figures ([cost]); S3 Standard's when absent. */
  prices?: CostPrices;
}

export async function startApi(ctx: ApiContext, address: { host: string; port: number }, log: Logger): Promise<FastifyInstance> {
  const { host, store } = ctx;
  // A 200-character name with '/' percent-encoded is up to ~600 characters in a path.
  const app = Fastify({ logger: false, bodyLimit: 64 * 1024, routerOptions: { maxParamLength: 1024 } });
  const dashboard = { host, store, collector: ctx.collector, prices: ctx.prices ?? S3_STANDARD_PRICES };
  const view = new HostView(dashboard);
  const metrics = new Metrics(host, store, ctx.collector, ctx.deferred, view);

  app.setErrorHandler((err: { statusCode?: number; message: string }, _request, reply) => {
    const mapped = statusOf(err);
    const status = mapped ?? (err.statusCode && err.statusCode >= 400 && err.statusCode < 500 ? err.statusCode : 500);
    if (status === 500) log.error('request failed', { error: err.message });
    return fail(reply, status, err.message);
  });
  app.setNotFoundHandler((request, reply) => fail(reply, 404, `no route ${request.method} ${request.url}`));

  if (ctx.token !== '') {
    const matches = secretMatcher(ctx.token);
    // onRequest runs before routing and body parsing: unknown routes and bodies get 401 too.
    app.addHook('onRequest', async (request, reply) => {
      // The dashboard's static files hold no data; the JSON they fetch carries the token.
      if (isPageFile(request.method, request.url)) return;
      const header = request.headers.authorization;
      const presented = header === undefined ? undefined : /^Bearer ([\x21-\x7e]+)$/i.exec(header)?.[1];
      if (presented !== undefined && matches(presented)) return;
      // RFC 6750: no credentials is a bare challenge; wrong ones say invalid_token.
      const why = header === undefined ? 'no Authorization header' : presented === undefined ? 'the Authorization header is not "Bearer TOKEN"' : 'the bearer token is wrong';
      reply.header('www-authenticate', header === undefined ? 'Bearer realm="updraft"' : 'Bearer realm="updraft", error="invalid_token"');
      log.debug('request refused: not authorized', { method: request.method, url: request.url, peer: request.ip, why });
      return fail(reply, 401, `${why}: this API needs "Authorization: Bearer TOKEN" with [servers.http] token`);
    });
  }

  /** The volume name from the path; names with '/' arrive percent-encoded. */
  const nameOf = (raw: string): string => {
    const name = raw;
    const problem = volumeNameProblem(name);
    if (problem) throw Object.assign(new Error(problem), { statusCode: 400 });
    return name;
  };

  app.get('/healthz', async () => ({ status: 'ok', volumes: host.all().length }));

  app.get('/api/exports', async () => host.list().map(summary));

  app.get<{ Params: { name: string } }>('/api/exports/:name', async (request, reply) => {
    const name = nameOf(request.params.name);
    const volume = host.get(name);
    if (!volume) return fail(reply, 404, `no export named ${name}`);
    view.usage.refresh();
    const row = view.volumeRow(volume);
    return { ...summary(host.summary(volume)), last_drain: row.last_drain, usage: row.usage, cost: row.cost };
  });

  app.put<{ Params: { name: string } }>('/api/exports/:name', async (request, reply) => {
    const name = nameOf(request.params.name);
    const body = PutExportBody.safeParse(request.body ?? {});
    if (!body.success) return fail(reply, 400, bodyProblem(body.error));
    const size = Math.round((body.data.size_gb * GIB) / 4096) * 4096;
    if (size <= 0) return fail(reply, 400, `size_gb ${body.data.size_gb} is smaller than one 4 KiB sector`);
    const settings = {
      flushMode: body.data.flush_mode,
      dirtyBudgetBytes: body.data.dirty_budget_gb === undefined ? undefined : Math.floor(body.data.dirty_budget_gb * GIB),
      replicaFollowIntervalMs: body.data.replica_follow_interval_ms,
    };
    const given = Object.fromEntries(Object.entries(settings).filter(([, v]) => v !== undefined));
    let existing = host.get(name);
    if (!existing) {
      const { volume, created } = await host.create(name, size, given);
      if (created) return reply.code(201).send(summary(host.summary(volume)));
      existing = volume; // woken from the store: grow it if asked
    }
    if (size < existing.size) return fail(reply, 409, `export ${name} is ${existing.size} bytes; volumes grow only (asked for ${size})`);
    if (size > existing.size) await host.resize(name, size);
    if (Object.keys(given).length > 0) host.setVolumeSettings(name, given);
    return summary(host.summary(existing));
  });

  app.delete<{ Params: { name: string }; Querystring: Record<string, string> }>('/api/exports/:name', async (request, reply) => {
    const name = nameOf(request.params.name);
    const query = DeleteQuery.safeParse(request.query ?? {});
    if (!query.success) return fail(reply, 400, `query: ${query.error.issues.map((i) => `${i.path.join('.') || '(query)'}: ${i.message}`).join('; ')}`);
    const volume = host.get(name);
    const purge = query.data.purge === 'true';
    // A purge also removes a volume that is only in the store.
    if (!volume && !purge) return fail(reply, 404, `no export named ${name}`);
    const force = query.data.force === 'true';
    if (volume && volume.clients > 0 && !force) {
      return fail(reply, 409, `export ${name} has ${volume.clients} client(s) attached; detach them or add ?force=true`);
    }
    const disconnected = force ? ctx.disconnect(name) : 0;
    if (purge) return { ...(await host.purge(name)), deleted: true, disconnected };
    await host.remove(name);
    return { name, deleted: true, disconnected };
  });

  app.post('/api/gc', async (request, reply) => {
    const body = GcBody.safeParse(request.body ?? {});
    if (!body.success) return fail(reply, 400, bodyProblem(body.error));
    if (!ctx.collector) return fail(reply, 409, 'GC is off on this daemon');
    const dryRun = body.data.dry_run;
    if (body.data.reconcile) return ctx.collector.reconcile({ dryRun });
    return { cycle: await ctx.collector.cycle({ dryRun }) };
  });

  /** POST /api/exports/:name/ACTION for an export that must exist here. */
  const action = <T>(suffix: string, run: (name: string, body: unknown) => Promise<T>) =>
    app.post<{ Params: { name: string } }>(`/api/exports/:name/${suffix}`, async (request, reply) => {
      const name = nameOf(request.params.name);
      if (!host.get(name)) return fail(reply, 404, `no export named ${name}`);
      return run(name, request.body);
    });

  action('drain', (name) => host.drain(name));
  // Close and load again from local state: how a failed volume comes back (or ?force=true, disconnecting its clients).
  app.post<{ Params: { name: string }; Querystring: Record<string, string> }>('/api/exports/:name/reopen', async (request, reply) => {
    const name = nameOf(request.params.name);
    const volume = host.get(name);
    if (!volume) return fail(reply, 404, `no export named ${name}`);
    const force = request.query?.force === 'true';
    if (volume.clients > 0 && !force) return fail(reply, 409, `export ${name} has ${volume.clients} client(s) attached; detach them or add ?force=true`);
    const disconnected = force ? ctx.disconnect(name) : 0;
    for (let waited = 0; host.get(name)!.clients > 0 && waited < 5000; waited += 10) await new Promise((resolve) => setTimeout(resolve, 10));
    return { ...summary(host.summary(await host.reopen(name))), disconnected };
  });
  action('promote', (name) => host.promote(name));
  action('release', (name) => host.release(name));
  // A lazy fork or a fork from a checkpoint reads the store only: the source need not be open here.
  app.post<{ Params: { name: string } }>('/api/exports/:name/fork', async (request, reply) => {
    const name = nameOf(request.params.name);
    const body = ForkBody.safeParse(request.body ?? {});
    if (!body.success) return fail(reply, 400, bodyProblem(body.error));
    const target = body.data.target;
    if (body.data.mode !== 'lazy' && body.data.checkpoint === undefined && !host.get(name)) {
      return fail(reply, 404, `no export named ${name} on this host (a lazy fork reads the store)`);
    }
    try {
      return reply.code(201).send(await host.fork(name, target, { mode: body.data.mode, checkpoint: body.data.checkpoint }));
    } catch (err) {
      host.events.record('error', name, `fork to ${target} failed: ${errorMessage(err)}`);
      throw err;
    }
  });

  action('checkpoints', async (name, raw) => {
    const body = CheckpointBody.safeParse(raw ?? {});
    if (!body.success) throw Object.assign(new Error(bodyProblem(body.error)), { statusCode: 400 });
    return host.createCheckpoint(name, body.data.name);
  });

  app.get<{ Params: { name: string } }>('/api/exports/:name/checkpoints', async (request) => {
    const name = nameOf(request.params.name);
    return host.listCheckpoints(name);
  });

  app.delete<{ Params: { name: string; cp: string } }>('/api/exports/:name/checkpoints/:cp', async (request, reply) => {
    const name = nameOf(request.params.name);
    const problem = checkpointNameProblem(request.params.cp);
    if (problem) return fail(reply, 400, problem);
    if (!(await host.deleteCheckpoint(name, request.params.cp))) return fail(reply, 404, `volume ${name} has no checkpoint ${request.params.cp}`);
    return { name, checkpoint: request.params.cp, deleted: true };
  });

  action('boot-record', async (name, raw) => {
    const body = BootRecordBody.safeParse(raw ?? {});
    if (!body.success) throw Object.assign(new Error(bodyProblem(body.error)), { statusCode: 400 });
    return host.recordBoot(name, body.data.seconds);
  });

  action('flush-mode', async (name, raw) => {
    const body = FlushModeBody.safeParse(raw ?? {});
    if (!body.success) throw Object.assign(new Error(bodyProblem(body.error)), { statusCode: 400 });
    host.setVolumeSettings(name, {
      flushMode: body.data.flush_mode,
      ...(body.data.dirty_budget_gb === undefined ? {} : { dirtyBudgetBytes: Math.floor(body.data.dirty_budget_gb * GIB) }),
    });
    return summary(host.summary(host.get(name)!));
  });

  app.get<{ Params: { name: string } }>('/api/exports/:name/metrics', async (request, reply) => {
    const name = nameOf(request.params.name);
    const volume = host.get(name);
    if (!volume) return fail(reply, 404, `no export named ${name}`);
    const ops: Record<string, { count: number; bytes: number; seconds: number }> = {};
    for (const [op, s] of Object.entries(volume.stats.ops)) ops[op] = { count: s.count, bytes: s.bytes, seconds: s.seconds };
    return {
      name, size: volume.size, clients: volume.clients, sequence: volume.sequence, dirty_bytes: volume.dirtyBytes,
      dirty_chunks: volume.dirtyChunks, mapped_chunks: volume.mappedChunks, map_pages: volume.mapPages.total,
      map_pages_shared: volume.mapPages.shared, chunks_sealed: volume.stats.chunksSealed,
      journal_commits: volume.stats.journalCommits, overlay_only_flushes: volume.stats.overlayOnlyFlushes,
      logged_flushes: volume.stats.loggedFlushes, ops,
    };
  });

  registerDashboard(app, dashboard, view);

  app.get('/metrics', async (_request, reply) => {
    reply.header('content-type', metrics.contentType);
    return metrics.text();
  });

  try {
    await app.listen({ host: address.host, port: address.port });
  } catch (err) {
    throw new Error(`HTTP listen on ${address.host}:${address.port}: ${errorMessage(err)}`);
  }
  return app;
}
