// GC on PostgreSQL (`[gc] database_url`), a real server from Debian's packages started
// for this file: the same suite as on the embedded default, and an unreachable server.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { DAEMON_MAIN, freePort, removeDir, scratchDir, startDaemon } from './harness/daemon.js';
import { defineIntentTests } from './harness/gc-intents.js';
import { defineGcTests } from './harness/gc.js';
import { startPostgres, type Postgres } from './harness/postgres.js';
import { run } from './harness/tools.js';

let postgres: Postgres | undefined;
before(async () => {
  postgres = await startPostgres();
});
after(async () => {
  await postgres?.stop();
});

const postgresBackend = {
  label: 'gc on PostgreSQL',
  async gcToml(name: string) {
    if (!postgres) throw new Error('PostgreSQL did not start');
    return { database_url: await postgres.database(name.toLowerCase().replace(/[^a-z0-9_]/g, '_')) };
  },
};
defineGcTests(postgresBackend);
defineIntentTests(postgresBackend);

test('an unreachable PostgreSQL fails start-up and `updraft gc` with an error naming the database, without the password', { timeout: 60_000 }, async () => {
  const port = await freePort();
  const dir = await scratchDir('updraft-gc-pg-down-');
  try {
    const file = path.join(dir, 'updraft.toml');
    fs.writeFileSync(file, `[cache]\ndir = "${dir}/cache"\n[storage]\nurl = "file://${dir}/store"\n[servers.nbd]\nunix_socket = ""\n[servers.http]\naddress = "127.0.0.1:${await freePort()}"\n[gc]\ndatabase_url = "postgres://updraft:s3cret@127.0.0.1:${port}/updraft"\n`);
    for (const command of ['run', 'gc']) {
      const r = await run(process.execPath, [DAEMON_MAIN, command, '-c', file], { timeoutMs: 30_000, cwd: dir });
      assert.equal(r.code, 1, `${command}: ${r.stderr}`);
      assert.match(r.stderr, new RegExp(`gc database postgres://updraft:\\*\\*\\*@127\\.0\\.0\\.1:${port}/updraft: cannot connect: .*ECONNREFUSED`));
      assert.doesNotMatch(r.stderr, /s3cret/);
    }
    // And a daemon on a reachable one starts (the schema is created on first use).
    if (!postgres) throw new Error('PostgreSQL did not start');
    const d = await startDaemon({ toml: { gc: { database_url: await postgres.database('reachable') } } });
    await d.cleanup();
  } finally {
    await removeDir(dir);
  }
});
