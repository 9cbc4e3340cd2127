// The HTTP API: health, the export inventory, create/grow, metrics. Every path and body
// is validated here; bad input gets a 4xx with a JSON error, never a 500.
import Fastify, { type FastifyInstance, type FastifyReply } from 'fastify';
import * as z from 'zod';
import type { Host } from '../host/host.js';
import { errorMessage, type Logger } from '../log.js';
import { volumeNameProblem } from '../volume/names.js';
import { VolumeError } from '../volume/volume.js';
import { Metrics } from './metrics.js';

const GIB = 1024 ** 3;

const PutExportBody = z.strictObject({
  size_gb: z.number().positive().max(1024 * 1024),
});

function summary(v: ReturnType<Host['list']>[number]) {
  return {
    name: v.name, size: v.size, size_gb: v.size / GIB, clients: v.clients, read_only: v.readOnly,
    sequence: v.sequence, dirty_bytes: v.dirtyBytes, mapped_chunks: v.mappedChunks,
  };
}

function fail(reply: FastifyReply, status: number, message: string) {
  return reply.code(status).send({ error: message });
}

export async function startApi(host: Host, address: { host: string; port: number }, log: Logger): Promise<FastifyInstance> {
  // A 200-character name with '/' percent-encoded is up to ~600 characters in a path.
  const app = Fastify({ logger: false, bodyLimit: 64 * 1024, routerOptions: { maxParamLength: 1024 } });
  const metrics = new Metrics(host);

  app.setErrorHandler((err: { statusCode?: number; message: string }, _request, reply) => {
    const status = err.statusCode && err.statusCode >= 400 && err.statusCode < 500 ? err.statusCode : 500;
    if (status === 500) log.error('request failed', { error: err.message });
    return fail(reply, status, err.message);
  });
  app.setNotFoundHandler((request, reply) => fail(reply, 404, `no route ${request.method} ${request.url}`));

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
    const found = host.list().find((v) => v.name === name);
    return found ? summary(found) : fail(reply, 404, `no export named ${name}`);
  });

  app.put<{ Params: { name: string } }>('/api/exports/:name', async (request, reply) => {
    const name = nameOf(request.params.name);
    const body = PutExportBody.safeParse(request.body ?? {});
    if (!body.success) return fail(reply, 400, `body: ${body.error.issues.map((i) => `${i.path.join('.') || '(body)'}: ${i.message}`).join('; ')}`);
    const size = Math.round((body.data.size_gb * GIB) / 4096) * 4096;
    if (size <= 0) return fail(reply, 400, `size_gb ${body.data.size_gb} is smaller than one 4 KiB sector`);
    const existing = host.get(name);
    try {
      if (!existing) {
        const volume = await host.create(name, size);
        return reply.code(201).send(summary(host.list().find((v) => v.name === volume.name)!));
      }
      if (size < existing.size) return fail(reply, 409, `export ${name} is ${existing.size} bytes; volumes grow only (asked for ${size})`);
      await host.resize(name, size);
      return summary(host.list().find((v) => v.name === name)!);
    } catch (err) {
      if (err instanceof VolumeError) return fail(reply, err.code === 'ESHUTDOWN' ? 503 : 400, err.message);
      throw err;
    }
  });

  app.get<{ Params: { name: string } }>('/api/exports/:name/metrics', async (request, reply) => {
    const name = nameOf(request.params.name);
    const volume = host.get(name);
    if (!volume) return fail(reply, 404, `no export named ${name}`);
    const ops: Record<string, { count: number; bytes: number; seconds: number }> = {};
    for (const [op, s] of Object.entries(volume.stats.ops)) ops[op] = { count: s.count, bytes: s.bytes, seconds: s.seconds };
    return {
      name, size: volume.size, clients: volume.clients, sequence: volume.sequence, dirty_bytes: volume.dirtyBytes,
      dirty_chunks: volume.dirtyChunks, mapped_chunks: volume.mappedChunks, chunks_sealed: volume.stats.chunksSealed, ops,
    };
  });

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
