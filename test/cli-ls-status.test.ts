// `updraft ls` and `updraft status` run as the real CLI against a running daemon, through
// its HTTP API with the config's token: a table (or --json) of the volumes an NBD client
// made, and the daemon's summary with its cost; a wrong token and a stopped daemon say so.
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { stringify } from 'smol-toml';
import { DAEMON_MAIN, mergeToml, removeDir, startDaemon } from './harness/daemon.js';
import { requireTools, run, runOk, TOOLS } from './harness/tools.js';

const TOKEN = 'cli-test-token-0123456789abcdef';

function cli(args: string[], cwd: string) {
  return run(process.execPath, [DAEMON_MAIN, ...args], { cwd, timeoutMs: 60_000 });
}

test('updraft ls and status show the running daemon through its API, with the token from the config', { timeout: 300_000 }, async (t) => {
  if (!requireTools(t, [TOOLS.nbdcopy])) return;
  const d = await startDaemon({ toml: { servers: { http: { token: TOKEN } } }, apiToken: TOKEN });
  try {
    const image = path.join(d.dir, 'image.raw');
    writeFileSync(image, Buffer.alloc(1 << 20, 7));
    for (const name of ['web/disk', 'db']) await runOk('nbdcopy', ['--flush', image, d.uri(name)], { timeoutMs: 120_000 });
    assert.equal((await d.api('POST', `/api/exports/${encodeURIComponent('web/disk')}/drain`)).status, 200);

    const ls = await cli(['ls', '-c', d.configPath], d.dir);
    assert.equal(ls.code, 0, ls.stderr);
    const lines = ls.stdout.trimEnd().split('\n');
    assert.match(lines[0], /^NAME\s+SIZE\s+MAPPED\s+DIRTY\s+MODE\s+ACCESS\s+LEASE\s+CLIENTS\s+SEQUENCE\s+MANIFEST$/);
    assert.deepEqual(lines.slice(1).map((l) => l.split(/\s+/)[0]), ['db', 'web/disk']);
    const web = lines.find((l) => l.startsWith('web/disk'))!.split(/\s+/);
    assert.deepEqual([web[1], web[2], web[3]], ['1.00', 'GiB', '1.00'], `size and mapped of web/disk: ${web.join(' ')}`);
    assert.ok(web.includes('writable') && web.includes('gen') && web.includes('demand'), `web/disk line: ${web.join(' ')}`);
    const db = lines.find((l) => l.startsWith('db'))!;
    assert.match(db, /\s-$/, 'db has no manifest yet');

    const lsJson = await cli(['ls', '--json', '-c', d.configPath], d.dir);
    assert.equal(lsJson.code, 0, lsJson.stderr);
    const rows = JSON.parse(lsJson.stdout) as Array<{ name: string; mapped_chunks: number; lease_generation: number }>;
    assert.deepEqual(rows.map((r) => r.name), ['db', 'web/disk']);
    assert.equal(rows[1].lease_generation, 1);

    const status = await cli(['status', '-c', d.configPath], d.dir);
    assert.equal(status.code, 0, status.stderr);
    assert.match(status.stdout, /^store\s+file:\/\//m);
    assert.match(status.stdout, new RegExp(`^daemon\\s+running at ${d.httpUrl.replace(/[.]/g, '\\.')}, host `, 'm'));
    assert.match(status.stdout, /^volumes\s+2 \(0 read-only, 0 failed\), 0 clients$/m);
    assert.match(status.stdout, /^cost\s+[\d.]+ USD a month for storage, [\d.]+ USD of requests since start$/m);

    const statusJson = await cli(['status', '--json', '-c', d.configPath], d.dir);
    assert.equal(statusJson.code, 0, statusJson.stderr);
    const summary = JSON.parse(statusJson.stdout);
    assert.equal(summary.encrypted, false);
    assert.equal(summary.daemon.url, d.httpUrl);
    assert.equal(summary.daemon.volumes, 2);
    assert.equal(summary.daemon.cost.currency, 'USD');
    assert.ok(summary.daemon.cost.requests.put > 0, 'the drain made PUTs');
    // web/disk was sealed by its drain (db may not be yet): at least its mebibyte.
    assert.ok(summary.daemon.dedup.logical_bytes >= 1 << 20, `logical bytes ${summary.daemon.dedup.logical_bytes}`);

    // Another token in the config: refused, and each command says why.
    const wrong = path.join(d.dir, 'wrong-token.toml');
    writeFileSync(wrong, stringify(mergeToml(d.config, { servers: { http: { token: 'not-the-token-0123456789' } } })) + '\n');
    const refused = await cli(['ls', '-c', wrong], d.dir);
    assert.equal(refused.code, 1);
    assert.match(refused.stderr, /GET \/api\/exports: 401 the bearer token is wrong/);
    const refusedStatus = await cli(['status', '--json', '-c', wrong], d.dir);
    assert.equal(refusedStatus.code, 0, refusedStatus.stderr);
    assert.equal(JSON.parse(refusedStatus.stdout).daemon, null);
    assert.match(JSON.parse(refusedStatus.stdout).daemon_problem, /401/);

    // The daemon stopped: ls fails naming the address, status says it is not running.
    await d.stop();
    const down = await cli(['ls', '-c', d.configPath], d.dir);
    assert.equal(down.code, 1);
    assert.match(down.stderr, /cannot reach the daemon at http:\/\/127\.0\.0\.1:\d+\/api\/exports/);
    const downStatus = await cli(['status', '-c', d.configPath], d.dir);
    assert.equal(downStatus.code, 0, downStatus.stderr);
    assert.match(downStatus.stdout, /^daemon\s+not running \(cannot reach the daemon/m);
  } finally {
    await d.stop();
    await removeDir(d.dir);
  }
});
