// The HTTP API and Prometheus metrics of a running daemon, with NBD traffic from the
// independent test client so the numbers have something real to count.

import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import http from 'node:http';
import { after, before, test } from 'node:test';
import { startDaemon, type ApiResponse, type Daemon } from './harness/daemon.js';
import { BASE_ALLOCATION, NbdClient } from './harness/nbd-client.js';
import { tail } from './harness/tools.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const CHUNK = 128 * KiB;
const TEST_TIMEOUT_MS = 60_000;

let daemon: Daemon;
before(async () => {
  daemon = await startDaemon({
    toml: { servers: { nbd: { block_size: CHUNK, auto_create_size_gb: 0.0625 } }, volumes: { seal_idle_ms: 100 } },
  });
});
after(async () => {
  await daemon?.cleanup();
});

/** Runs body; a failure carries the daemon's log tail. */
async function withLog(body: () => Promise<void>, d: Daemon = daemon): Promise<void> {
  try {
    await body();
  } catch (err) {
    if (err instanceof Error) err.message += `\n--- daemon log (tail) ---\n${tail(d.log(), 30)}`;
    throw err;
  }
}

/**
 * One HTTP request with the path sent exactly as given (fetch would resolve '..') and the
 * body as raw text (so it can be invalid JSON).
 */
function rawRequest(
  method: string,
  path: string,
  body?: string,
  contentType = 'application/json',
): Promise<ApiResponse & { contentType: string }> {
  const url = new URL(daemon.httpUrl);
  return new Promise((resolve, reject) => {
    const request = http.request(
      {
        host: url.hostname,
        port: Number(url.port),
        method,
        path,
        headers: body === undefined ? {} : { 'content-type': contentType, 'content-length': Buffer.byteLength(body) },
        timeout: 30_000,
      },
      (response) => {
        const parts: Buffer[] = [];
        response.on('data', (chunk: Buffer) => parts.push(chunk));
        response.on('end', () => {
          const text = Buffer.concat(parts).toString('utf8');
          let json: unknown = null;
          try {
            json = text.length > 0 ? JSON.parse(text) : null;
          } catch {
            json = null;
          }
          resolve({ status: response.statusCode ?? 0, json, text, contentType: String(response.headers['content-type'] ?? '') });
        });
        response.on('error', reject);
      },
    );
    request.on('timeout', () => request.destroy(new Error(`${method} ${path}: timed out`)));
    request.on('error', reject);
    request.end(body);
  });
}

function assertJsonError(response: ApiResponse & { contentType?: string }, status: number, what: string): void {
  assert.equal(response.status, status, `${what}: status ${response.status}: ${response.text}`);
  assert.equal(typeof response.json?.error, 'string', `${what}: no JSON error in ${JSON.stringify(response.text)}`);
  assert.ok(response.json.error.length > 0, `${what}: empty error`);
  if (response.contentType !== undefined) assert.match(response.contentType, /^application\/json/, `${what}: content-type`);
}

const path = (name: string, suffix = '') => `/api/exports/${encodeURIComponent(name)}${suffix}`;

async function connect(name: string, opts: { tcp?: boolean; d?: Daemon } = {}): Promise<NbdClient> {
  const d = opts.d ?? daemon;
  const target = opts.tcp ? { host: d.tcp.host, port: d.tcp.port } : { path: d.socket };
  return NbdClient.connect({ ...target, exportName: name, metaContexts: [BASE_ALLOCATION] });
}

/** Polls GET /api/exports/NAME until `done` holds; fails after timeoutMs. */
async function waitForExport(name: string, done: (e: any) => boolean, timeoutMs = 10_000): Promise<any> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const response = await daemon.api('GET', path(name));
    assert.equal(response.status, 200, response.text);
    if (done(response.json)) return response.json;
    if (Date.now() > deadline) assert.fail(`export ${name}: condition not reached in ${timeoutMs} ms; last ${response.text}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

async function waitSealed(name: string, d: Daemon = daemon): Promise<void> {
  const deadline = Date.now() + 15_000;
  for (;;) {
    const metrics = (await d.api('GET', path(name, '/metrics'))).json;
    if (metrics.dirty_chunks === 0) return;
    if (Date.now() > deadline) assert.fail(`export ${name} not sealed: ${JSON.stringify(metrics)}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

interface Traffic {
  ops: Record<string, { count: number; bytes: number }>;
}

/** A known mix of NBD commands on one export; returns what each kind should count. */
async function driveTraffic(name: string): Promise<Traffic> {
  const client = await connect(name);
  try {
    const writes = [4096, 512, 3 * CHUNK, 65536, 1];
    let offset = 0;
    for (const length of writes) {
      await client.write(offset, randomBytes(length));
      offset += length + 4096;
    }
    const reads = [4096, CHUNK, 100];
    for (const length of reads) await client.read(0, length);
    await client.flush();
    await client.flush();
    await client.trim(4 * CHUNK, CHUNK);
    await client.writeZeroes(5 * CHUNK, 8192);
    await client.cache(0, CHUNK);
    await client.blockStatus(0, 8 * CHUNK);
    await client.blockStatus(0, CHUNK);
    const sum = (xs: number[]) => xs.reduce((a, b) => a + b, 0);
    return {
      ops: {
        write: { count: writes.length, bytes: sum(writes) },
        read: { count: reads.length, bytes: sum(reads) },
        flush: { count: 2, bytes: 0 },
        trim: { count: 1, bytes: CHUNK },
        zero: { count: 1, bytes: 8192 },
        cache: { count: 1, bytes: CHUNK },
        block_status: { count: 2, bytes: 0 },
      },
    };
  } finally {
    await client.disconnect();
  }
}

// ---------------------------------------------------------------------------

test('GET /healthz answers 200 {status: "ok"}', { timeout: TEST_TIMEOUT_MS }, async () => {
  const response = await daemon.api('GET', '/healthz');
  assert.equal(response.status, 200, response.text);
  assert.equal(response.json?.status, 'ok');
});

test('GET /api/exports lists name and size, and counts attached NBD clients: 1 while attached, 2 with a second, 0 after both disconnect', { timeout: TEST_TIMEOUT_MS }, async () => {
  await withLog(async () => {
    const created = await daemon.api('PUT', path('listed'), { size_gb: 0.125 });
    assert.equal(created.status, 201, created.text);
    const entry = async () => {
      const list = (await daemon.api('GET', '/api/exports')).json as Array<{ name: string; size: number; clients: number }>;
      const found = list.find((e) => e.name === 'listed');
      assert.ok(found, `listed not in ${JSON.stringify(list)}`);
      return found;
    };
    const listed = await entry();
    assert.equal(listed.size, 128 * MiB);
    assert.equal(listed.clients, 0);

    const first = await connect('listed');
    let second: NbdClient | undefined;
    try {
      assert.equal((await entry()).clients, 1, 'one client attached');
      second = await connect('listed', { tcp: true });
      assert.equal((await entry()).clients, 2, 'two clients attached');
      await second.disconnect();
      await waitForExport('listed', (e) => e.clients === 1);
    } finally {
      await second?.disconnect();
      await first.disconnect();
    }
    await waitForExport('listed', (e) => e.clients === 0);
    assert.equal((await entry()).clients, 0);

    // A client that drops the connection without NBD_CMD_DISC is counted out too.
    const dropped = await connect('listed');
    assert.equal((await entry()).clients, 1);
    dropped.close();
    await waitForExport('listed', (e) => e.clients === 0);
  });
});

test('a volume name with "/" is addressed percent-encoded: PUT, GET and metrics of acme%2Fvm-1 reach the export that NBD serves as acme/vm-1', { timeout: TEST_TIMEOUT_MS }, async () => {
  await withLog(async () => {
    const created = await daemon.api('PUT', '/api/exports/acme%2Fvm-1', { size_gb: 0.0625 });
    assert.equal(created.status, 201, created.text);
    assert.equal(created.json.name, 'acme/vm-1');
    const got = await daemon.api('GET', '/api/exports/acme%2Fvm-1');
    assert.equal(got.status, 200, got.text);
    assert.equal(got.json.name, 'acme/vm-1');
    assert.equal(got.json.size, 64 * MiB);

    const client = await connect('acme/vm-1');
    try {
      assert.equal(client.size, 64 * MiB, 'NBD sees the size set by PUT (not the auto-create size)');
      await client.write(0, randomBytes(4096));
    } finally {
      await client.disconnect();
    }
    const metrics = await daemon.api('GET', '/api/exports/acme%2Fvm-1/metrics');
    assert.equal(metrics.status, 200, metrics.text);
    assert.equal(metrics.json.name, 'acme/vm-1');
    assert.equal(metrics.json.ops.write.count, 1);
    const names = ((await daemon.api('GET', '/api/exports')).json as Array<{ name: string }>).map((e) => e.name);
    assert.equal(names.filter((n) => n === 'acme/vm-1').length, 1, `one acme/vm-1 in ${JSON.stringify(names)}`);
  });
});

test('PUT with a bad body is 400 with a JSON error and creates nothing', { timeout: TEST_TIMEOUT_MS }, async () => {
  await withLog(async () => {
    const bodies: Array<[string, string | undefined]> = [
      ['missing size_gb', '{}'],
      ['negative size_gb', '{"size_gb":-1}'],
      ['zero size_gb', '{"size_gb":0}'],
      ['string size_gb', '{"size_gb":"1"}'],
      ['extra key', '{"size_gb":1,"colour":"blue"}'],
      ['invalid JSON', '{"size_gb":1'],
      ['JSON array', '[1]'],
      ['JSON null', 'null'],
      ['size_gb too large', '{"size_gb":1e12}'],
      ['size_gb below one sector', '{"size_gb":1e-9}'],
      ['no body', undefined],
    ];
    for (const [what, body] of bodies) {
      const response = await rawRequest('PUT', path('badbody'), body);
      assertJsonError(response, 400, `PUT ${what}`);
    }
    // On an existing export the same bodies must not change it either.
    assert.equal((await daemon.api('PUT', path('badbody-existing'), { size_gb: 0.0625 })).status, 201);
    for (const [what, body] of bodies) {
      assertJsonError(await rawRequest('PUT', path('badbody-existing'), body), 400, `PUT ${what} on an existing export`);
    }
    assert.equal((await daemon.api('GET', path('badbody-existing'))).json.size, 64 * MiB);
    assertJsonError(await rawRequest('GET', path('badbody')), 404, 'GET after refused PUTs');
    const names = ((await daemon.api('GET', '/api/exports')).json as Array<{ name: string }>).map((e) => e.name);
    assert.ok(!names.includes('badbody'), `a refused PUT created badbody: ${JSON.stringify(names)}`);
  });
});

test('every route refuses an invalid volume name in its path with 400 and a JSON error naming it, and creates nothing', { timeout: TEST_TIMEOUT_MS }, async () => {
  await withLog(async () => {
    const exportNames = async () => ((await daemon.api('GET', '/api/exports')).json as Array<{ name: string }>).map((e) => e.name);
    const before = await exportNames();
    const routes: Array<[string, string, string | undefined]> = [
      ['GET', '', undefined],
      ['PUT', '', '{"size_gb":0.0625}'],
      ['DELETE', '?force=true', undefined],
      ['GET', '/metrics', undefined],
      ['POST', '/drain', undefined],
      ['POST', '/promote', undefined],
      ['POST', '/release', undefined],
      ['POST', '/fork', '{"target":"fork-of-bad","mode":"lazy"}'],
      ['POST', '/checkpoints', '{"name":"cp"}'],
      ['GET', '/checkpoints', undefined],
      ['DELETE', '/checkpoints/cp', undefined],
      ['POST', '/boot-record', '{"seconds":1}'],
      ['POST', '/flush-mode', '{"flush_mode":"demand"}'],
    ];
    const problems: string[] = [];
    const rawNames = ['..', '.', '%2E%2E', 'a%2F..%2Fb', 'x%2Flease', '%2Flead', 'trail%2F', 'a%2F%2Fb', 'bad%20name', 'semi%3Bcolon', 'y'.repeat(201)];
    // Every case is checked before the test fails, so one run shows all that are wrong.
    for (const raw of rawNames) {
      for (const [method, suffix, body] of routes) {
        const what = `${method} /api/exports/${raw.slice(0, 20)}${suffix}`;
        try {
          const response = await rawRequest(method, `/api/exports/${raw}${suffix}`, body);
          assertJsonError(response, 400, what);
          assert.match(response.json.error, /volume name/, `${what}: the error does not say the volume name is wrong`);
        } catch (err) {
          problems.push((err as Error).message.split('\n')[0].slice(0, 300));
        }
      }
    }
    assert.deepEqual(problems, [], 'invalid names not refused with 400');
    assert.deepEqual(await exportNames(), before, 'an invalid name created an export');
  });
});

test('every route that takes a JSON body refuses a bad one with 400 naming the field, and changes nothing', { timeout: TEST_TIMEOUT_MS }, async () => {
  await withLog(async () => {
    assert.equal((await daemon.api('PUT', path('bodies'), { size_gb: 0.0625 })).status, 201);
    // [route suffix, body, the field the error must name]
    const cases: Array<[string, string, string]> = [
      ['/fork', '{}', 'target'],
      ['/fork', '{"target":"../x"}', 'target'],
      ['/fork', '{"target":"a/lease"}', 'target'],
      ['/fork', '{"target":7}', 'target'],
      ['/fork', `{"target":"${'t'.repeat(201)}"}`, 'target'],
      ['/fork', '{"target":"ok-target","mode":"eager"}', 'mode'],
      ['/fork', '{"target":"ok-target","checkpoint":"a/b"}', 'checkpoint'],
      ['/fork', '{"target":"ok-target","checkpoint":""}', 'checkpoint'],
      ['/fork', '{"target":"ok-target","colour":"blue"}', 'colour'],
      ['/checkpoints', '{}', 'name'],
      ['/checkpoints', '{"name":".."}', 'name'],
      ['/checkpoints', '{"name":"x y"}', 'name'],
      ['/checkpoints', `{"name":"${'c'.repeat(101)}"}`, 'name'],
      ['/checkpoints', '{"name":["cp"]}', 'name'],
      ['/boot-record', '{}', 'seconds'],
      ['/boot-record', '{"seconds":0}', 'seconds'],
      ['/boot-record', '{"seconds":601}', 'seconds'],
      ['/boot-record', '{"seconds":"5"}', 'seconds'],
      ['/flush-mode', '{"flush_mode":"sometimes"}', 'flush_mode'],
      ['/flush-mode', '{"flush_mode":"demand","dirty_budget_gb":0}', 'dirty_budget_gb'],
      ['/flush-mode', '{"flush_mode":"demand","dirty_budget_gb":1e12}', 'dirty_budget_gb'],
      ['', '{"size_gb":1,"dirty_budget_gb":-1}', 'dirty_budget_gb'],
      ['', '{"size_gb":1,"flush_mode":"never"}', 'flush_mode'],
    ];
    const problems: string[] = [];
    for (const [suffix, body, field] of cases) {
      const method = suffix === '' ? 'PUT' : 'POST';
      const what = `${method} ${suffix || '(export)'} ${body.slice(0, 60)}`;
      try {
        const response = await rawRequest(method, path('bodies', suffix), body);
        assertJsonError(response, 400, what);
        assert.ok(response.json.error.includes(`${field}:`), `${what}: the error does not name ${field}: ${response.json.error}`);
      } catch (err) {
        problems.push((err as Error).message.split('\n')[0].slice(0, 300));
      }
    }
    // Not JSON, or not an object: refused before any field is read.
    for (const suffix of ['/fork', '/checkpoints', '/boot-record', '/flush-mode']) {
      for (const body of ['{"target":', '[1]', '"text"', '42']) {
        try {
          assertJsonError(await rawRequest('POST', path('bodies', suffix), body), 400, `POST ${suffix} ${body}`);
        } catch (err) {
          problems.push((err as Error).message.split('\n')[0].slice(0, 300));
        }
      }
    }
    assert.deepEqual(problems, []);
    const after = (await daemon.api('GET', path('bodies'))).json;
    assert.equal(after.size, 64 * MiB);
    assert.equal(after.flush_mode, 'demand');
    assert.deepEqual((await daemon.api('GET', path('bodies', '/checkpoints'))).json, [], 'a refused body made a checkpoint');
    const names = ((await daemon.api('GET', '/api/exports')).json as Array<{ name: string }>).map((e) => e.name);
    assert.ok(!names.includes('ok-target') && !names.includes('x'), `a refused fork made a volume: ${JSON.stringify(names)}`);
  });
});

test('the API takes volume names up to 200 characters, as NBD does: 101 to 200 (with "/" segments too) work, 201 is 400', { timeout: TEST_TIMEOUT_MS }, async () => {
  await withLog(async () => {
    const names = ['L'.repeat(101), 'M'.repeat(200), `tenant/${'v'.repeat(100)}/disk-${'d'.repeat(80)}`];
    for (const name of names) {
      assert.ok(name.length <= 200);
      const created = await daemon.api('PUT', path(name), { size_gb: 0.0625 });
      assert.equal(created.status, 201, `PUT a ${name.length}-character name: ${created.text}`);
      assert.equal(created.json.name, name);
      const got = await daemon.api('GET', path(name));
      assert.equal(got.status, 200, `GET a ${name.length}-character name: ${got.text}`);
      const metrics = await daemon.api('GET', path(name, '/metrics'));
      assert.equal(metrics.status, 200, `GET metrics of a ${name.length}-character name: ${metrics.text}`);
    }
    // The same limit as NBD: a name made by connecting is reachable by the API.
    const viaNbd = 'N'.repeat(150);
    const client = await connect(viaNbd);
    await client.disconnect();
    const got = await daemon.api('GET', path(viaNbd));
    assert.equal(got.status, 200, `GET a 150-character name created over NBD: ${got.text}`);

    assertJsonError(await rawRequest('PUT', path('y'.repeat(201)), JSON.stringify({ size_gb: 0.0625 })), 400, 'PUT a 201-character name');
    assertJsonError(await rawRequest('GET', path('y'.repeat(201))), 400, 'GET a 201-character name');
  });
});

test('unknown routes and unknown exports are 404 with a JSON error', { timeout: TEST_TIMEOUT_MS }, async () => {
  await withLog(async () => {
    assertJsonError(await rawRequest('GET', '/nope'), 404, 'GET /nope');
    assertJsonError(await rawRequest('GET', '/api/exports/a/b/c/d'), 404, 'GET /api/exports/a/b/c/d');
    assertJsonError(await rawRequest('POST', '/api/exports'), 404, 'POST /api/exports');
    assertJsonError(await rawRequest('GET', '/api/exports/never-made'), 404, 'GET an export that does not exist');
    assertJsonError(await rawRequest('GET', '/api/exports/never-made/metrics'), 404, 'GET metrics of an export that does not exist');
  });
});

test('GET /metrics is Prometheus text whose per-volume op counters, byte counters and latency histograms match the NBD requests made', { timeout: TEST_TIMEOUT_MS }, async () => {
  await withLog(async () => {
    const traffic = await driveTraffic('prom');
    const response = await rawRequest('GET', '/metrics');
    assert.equal(response.status, 200);
    assert.match(response.contentType, /^text\/plain/);
    const text = response.text;

    // Exposition format: every sample line parses, every family has one TYPE.
    const types = new Map<string, number>();
    for (const line of text.split('\n')) {
      if (line === '') continue;
      const type = /^# TYPE (\S+) (counter|gauge|histogram|summary|untyped)$/.exec(line);
      if (type) types.set(type[1], (types.get(type[1]) ?? 0) + 1);
      else if (!line.startsWith('# HELP ')) {
        assert.match(line, /^[a-zA-Z_:][a-zA-Z0-9_:]*(\{[^}]*\})? (-?[0-9.]+(e[+-]?[0-9]+)?|NaN|[+-]Inf)$/, `bad sample line: ${line}`);
      }
    }
    for (const [family, count] of types) assert.equal(count, 1, `# TYPE ${family} appears ${count} times`);

    const sample = (series: string): number => {
      const line = text.split('\n').find((l) => l.startsWith(series + ' '));
      assert.ok(line, `no sample ${series} in /metrics`);
      return Number(line.slice(series.length + 1));
    };
    for (const [op, want] of Object.entries(traffic.ops)) {
      assert.equal(sample(`updraft_volume_ops_total{volume="prom",op="${op}"}`), want.count, `ops_total ${op}`);
      assert.equal(sample(`updraft_volume_op_seconds_bucket{volume="prom",op="${op}",le="+Inf"}`), want.count, `histogram +Inf ${op}`);
      assert.equal(sample(`updraft_volume_op_seconds_count{volume="prom",op="${op}"}`), want.count, `histogram count ${op}`);
      if (op !== 'flush' && op !== 'block_status') {
        assert.equal(sample(`updraft_volume_bytes_total{volume="prom",op="${op}"}`), want.bytes, `bytes_total ${op}`);
      }
    }
    // Histogram buckets are cumulative: non-decreasing in le order.
    const buckets = text
      .split('\n')
      .filter((l) => l.startsWith('updraft_volume_op_seconds_bucket{volume="prom",op="write",'))
      .map((l) => Number(l.slice(l.lastIndexOf(' ') + 1)));
    assert.ok(buckets.length > 2, 'write histogram has buckets');
    for (let i = 1; i < buckets.length; i++) assert.ok(buckets[i] >= buckets[i - 1], `buckets not cumulative: ${buckets}`);
    assert.ok(types.has('updraft_cache_blocks'), 'no updraft_cache_blocks gauge');
    assert.equal(sample('updraft_volume_size_bytes{volume="prom"}'), 64 * MiB);
  });
});

test('updraft_cache_blocks counts sealed blocks once per distinct content (two chunks with equal data are one block)', { timeout: TEST_TIMEOUT_MS }, async (t) => {
  // A daemon of its own: no other volume's blocks come and go while this one counts.
  const own = await startDaemon({ toml: { servers: { nbd: { block_size: CHUNK } }, volumes: { seal_idle_ms: 100 } } });
  t.after(() => own.cleanup());
  await withLog(async () => {
    const scrape = async (series: string) => {
      const text = (await own.api('GET', '/metrics')).text;
      const line = text.split('\n').find((l) => l.startsWith(series + ' '));
      assert.ok(line, `no ${series} in /metrics`);
      return Number(line.slice(series.length + 1));
    };
    assert.equal(await scrape('updraft_cache_blocks'), 0, 'a new daemon caches no blocks');

    const a = randomBytes(CHUNK);
    const b = randomBytes(CHUNK);
    const client = await connect('dedup', { d: own });
    try {
      await client.write(0, a);
      await client.write(CHUNK, b);
      await client.write(2 * CHUNK, a); // same content as chunk 0
      await client.write(3 * CHUNK, Buffer.alloc(CHUNK)); // all zeros: never stored
      await client.flush();
    } finally {
      await client.disconnect();
    }
    await waitSealed('dedup', own);
    const exported = (await own.api('GET', path('dedup', '/metrics'))).json;
    assert.equal(exported.chunks_sealed, 4, `chunks sealed: ${JSON.stringify(exported)}`);
    assert.equal(exported.mapped_chunks, 3, 'the all-zero chunk maps to no block');
    assert.equal(await scrape('updraft_cache_blocks'), 2, 'distinct blocks after sealing a, b, a, zeros');
    assert.ok((await scrape('updraft_cache_dedup_hits_total')) >= 1, 'the repeated chunk was not a dedup hit');
    // Both chunks that share a block still read their data.
    const reader = await connect('dedup', { d: own });
    try {
      assert.ok((await reader.read(0, CHUNK)).equals(a));
      assert.ok((await reader.read(2 * CHUNK, CHUNK)).equals(a));
      assert.ok((await reader.read(CHUNK, CHUNK)).equals(b));
    } finally {
      await reader.disconnect();
    }
  }, own);
});

test('GET /api/exports/NAME/metrics counts every NBD op kind with its bytes', { timeout: TEST_TIMEOUT_MS }, async () => {
  await withLog(async () => {
    const traffic = await driveTraffic('opcounts');
    await waitForExport('opcounts', (e) => e.clients === 0);
    const response = await daemon.api('GET', path('opcounts', '/metrics'));
    assert.equal(response.status, 200, response.text);
    const m = response.json;
    assert.equal(m.name, 'opcounts');
    assert.equal(m.size, 64 * MiB, 'auto-created with the configured size');
    for (const [op, want] of Object.entries(traffic.ops)) {
      assert.equal(m.ops[op]?.count, want.count, `${op} count in ${JSON.stringify(m.ops)}`);
      if (op !== 'flush' && op !== 'block_status') assert.equal(m.ops[op].bytes, want.bytes, `${op} bytes`);
      assert.ok(m.ops[op].seconds >= 0, `${op} seconds`);
    }
    assert.ok(m.sequence > 0, 'sequence advanced with the writes');
  });
});
