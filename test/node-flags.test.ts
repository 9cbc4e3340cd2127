// The daemon's Node.js flags (src/cli/node-flags.ts): the `updraft` command's first line
// passes them, and a daemon started without them warns in its log.
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';
import { DAEMON_NODE_FLAGS, missingNodeFlags } from '../src/cli/node-flags.js';
import { DAEMON_MAIN, removeDir, startDaemon } from './harness/daemon.js';

const WARNING = 'started without the Node.js flags the daemon runs with';

test('node flags: the updraft command passes them on its first line', () => {
  const first = readFileSync(DAEMON_MAIN, 'utf8').split('\n')[0];
  const match = /^#!\/usr\/bin\/env -S node (.*)$/.exec(first);
  assert.ok(match, `the first line runs node through env -S: ${first}`);
  assert.deepEqual(match[1].split(' '), DAEMON_NODE_FLAGS);
  assert.deepEqual(missingNodeFlags(match[1].split(' ')), []);
  assert.deepEqual(missingNodeFlags(['--initial-heap-size=512']), [], 'another value of the flag counts');
  assert.deepEqual(missingNodeFlags(['--max-old-space-size=128']), DAEMON_NODE_FLAGS);
});

test('node flags: a daemon started without them says so, and one started with them does not', async () => {
  const without = await startDaemon({ nodeFlags: [] });
  try {
    const warned = without.log().split('\n').find((line) => line.includes(WARNING));
    assert.ok(warned, `the daemon started without flags warns:\n${without.log()}`);
    assert.match(warned, /--initial-heap-size=96/, 'naming the flag');
  } finally {
    await without.stop();
    removeDir(without.dir);
  }
  const withFlags = await startDaemon();
  try {
    assert.ok(!withFlags.log().includes(WARNING), 'the daemon started with the flags does not warn');
  } finally {
    await withFlags.stop();
    removeDir(withFlags.dir);
  }
});
