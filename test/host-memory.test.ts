// The memory tier against the memory the daemon can have: the host's, and its cgroup's
// limit (blocks/host-memory.ts). Real daemons; the cgroup ones run in a real memory cgroup.
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { test } from 'node:test';
import { hostMemory } from '../src/blocks/host-memory.js';
import { metric, MiB } from './harness/cluster.js';
import { memoryCgroup } from './harness/cgroup.js';
import { assertRefusesToStart, rssBytes, startDaemon } from './harness/daemon.js';
import { NbdClient } from './harness/nbd-client.js';

const TIMEOUT = 120_000;
const GiB = 1024 * MiB;
/** The harness's memory_size_gb (0.25). */
const TIER = 256 * MiB;

/** A fake /proc and cgroup tree: `files` by path relative to the root. */
function fakeTree(files: Record<string, string>): { proc: string; cgroup: string; remove(): void } {
  const root = mkdtempSync(join(tmpdir(), 'updraft-host-memory-'));
  for (const [file, text] of Object.entries(files)) {
    mkdirSync(dirname(join(root, file)), { recursive: true });
    writeFileSync(join(root, file), text);
  }
  return { proc: join(root, 'proc'), cgroup: join(root, 'cgroup'), remove: () => rmSync(root, { recursive: true, force: true }) };
}

const MEMINFO = 'MemTotal:        8388608 kB\nMemFree:         1048576 kB\nMemAvailable:    4194304 kB\n';

test("hostMemory: the host's memory, bounded by a v2 or v1 cgroup's limit; a cgroup without one changes nothing", () => {
  const cases: Array<{ what: string; files: Record<string, string>; want: ReturnType<typeof hostMemory> }> = [
    {
      what: 'no cgroup files',
      files: { 'proc/meminfo': MEMINFO, 'proc/self/cgroup': '0::/vm.slice\n' },
      want: { totalBytes: 8 * GiB, availableBytes: 4 * GiB, limit: 'host' },
    },
    {
      what: 'v2 with a limit: room is the limit less usage, inactive file pages counted as room',
      files: {
        'proc/meminfo': MEMINFO,
        'proc/self/cgroup': '0::/vm.slice/updraft.service\n',
        'cgroup/vm.slice/updraft.service/memory.max': `${2 * GiB}\n`,
        'cgroup/vm.slice/updraft.service/memory.current': `${1536 * MiB}\n`,
        'cgroup/vm.slice/updraft.service/memory.stat': `anon 1000\nfile 2000\ninactive_file ${256 * MiB}\nactive_file 5\n`,
      },
      want: { totalBytes: 2 * GiB, availableBytes: 768 * MiB, limit: 'cgroup' },
    },
    {
      what: 'v2 without a limit',
      files: { 'proc/meminfo': MEMINFO, 'proc/self/cgroup': '0::/a\n', 'cgroup/a/memory.max': 'max\n', 'cgroup/a/memory.current': '5\n' },
      want: { totalBytes: 8 * GiB, availableBytes: 4 * GiB, limit: 'host' },
    },
    {
      what: 'v1 (hybrid: the v2 line has no memory files), a limit above the host: only its room counts',
      files: {
        'proc/meminfo': MEMINFO,
        'proc/self/cgroup': '4:memory:/process_api/x\n1:cpu:/\n0::/\n',
        'cgroup/memory/process_api/x/memory.limit_in_bytes': `${16 * GiB}\n`,
        'cgroup/memory/process_api/x/memory.usage_in_bytes': `${15 * GiB}\n`,
        'cgroup/memory/process_api/x/memory.stat': `cache 7\ntotal_inactive_file ${512 * MiB}\n`,
      },
      want: { totalBytes: 8 * GiB, availableBytes: 1536 * MiB, limit: 'host' },
    },
    {
      what: 'v1 without a limit (2^63 rounded down to a page)',
      files: { 'proc/meminfo': MEMINFO, 'proc/self/cgroup': '4:memory:/\n', 'cgroup/memory/memory.limit_in_bytes': '9223372036854771712\n', 'cgroup/memory/memory.usage_in_bytes': '7\n' },
      want: { totalBytes: 8 * GiB, availableBytes: 4 * GiB, limit: 'host' },
    },
    { what: 'without /proc/meminfo nothing is known', files: { 'proc/self/cgroup': '0::/\n' }, want: undefined },
  ];
  for (const c of cases) {
    const tree = fakeTree(c.files);
    try {
      assert.deepEqual(hostMemory(tree.proc, tree.cgroup), c.want, c.what);
    } finally {
      tree.remove();
    }
  }
});

test("a memory tier larger than all the memory the daemon can have refuses to start, naming the setting", { timeout: TIMEOUT }, async () => {
  const memory = hostMemory();
  assert.ok(memory !== undefined, 'this machine has /proc/meminfo');
  const gb = Math.ceil((memory.totalBytes * 2) / GiB);
  await assertRefusesToStart({ cache: { memory_size_gb: gb } }, [`config: cache.memory_size_gb = ${gb} is more than`, 'the memory tier could never fit']);
});

test('in a cgroup with too little room to fault the tier in, the daemon leaves it to fill, serves, and is not killed', { timeout: TIMEOUT }, async (t) => {
  const cgroup = memoryCgroup('updraft-test-tier', TIER + 64 * MiB);
  if ('unavailable' in cgroup) return t.skip(cgroup.unavailable);
  const daemon = await startDaemon({ cgroup: cgroup.dir, toml: { cache: { memory_pretouch: true } } });
  try {
    const data = randomBytes(16 * MiB);
    const client = await NbdClient.connect({ path: daemon.socket, exportName: 'small' });
    await client.write(0, data);
    await client.flush();
    assert.ok((await client.read(0, data.length)).equals(data), 'the data reads back');
    await client.disconnect();
    assert.match(daemon.log(), /memory tier not faulted in at start-up: it would not leave enough memory free/);
    assert.match(daemon.log(), /limit=cgroup/, 'the cgroup limit is what bounds it');
    assert.equal(await metric(daemon, 'updraft_cache_memory_faulted_in'), 0);
    assert.ok(daemon.running, 'the daemon is still running');
    const rss = rssBytes(daemon.pid);
    assert.ok(rss < TIER, `RSS ${rss} is below the ${TIER}-byte tier: it was not faulted in`);
  } finally {
    await daemon.cleanup();
    await cgroup.remove();
  }
});

test("a memory tier larger than the daemon's cgroup's limit refuses to start, naming the limit", { timeout: TIMEOUT }, async (t) => {
  const cgroup = memoryCgroup('updraft-test-small', TIER - 64 * MiB);
  if ('unavailable' in cgroup) return t.skip(cgroup.unavailable);
  try {
    await assertRefusesToStart({}, ["config: cache.memory_size_gb = 0.25 is more than the memory limit of the daemon's cgroup (0.19 GB)"], 'updraft-start-', cgroup.dir);
  } finally {
    await cgroup.remove();
  }
});
