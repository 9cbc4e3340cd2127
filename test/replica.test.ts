// Replicas that follow the writer (DESIGN.md: replica): a volume served read-only on a
// host that does not hold its lease takes each newer manifest of the writer. The writer
// is under a steady write load and drains after each round of a pattern; the replica
// reads all the round's chunks in one NBD read, over and over: no read mixes two rounds
// (a torn view), the round never goes back, and the replica catches up after each drain.
// Lag is reported in the API and the metrics. On the file:// store and on MinIO.
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import {
  CHUNK, connect, createVolume, drain, exportInfo, fileStore, metric, MiB, startCluster, waitFor, withLogs, type SharedStore,
} from './harness/cluster.js';
import type { Daemon } from './harness/daemon.js';
import { minioForTests, minioStore } from './harness/minio.js';
import type { NbdClient } from './harness/nbd-client.js';

const TIMEOUT = 600_000;
const VOLUME = 'replica/follow';
const VOLUME_MIB = 16;
/** The round pattern covers these chunks at the start of the volume; the steady load writes past them. */
const ROUND_CHUNKS = 16;
const LOAD_FROM = 4 * MiB;
const ROUNDS = 10;
const FOLLOW_MS = 1000;

/** Chunk `chunk` of round `round`: every 8 bytes say (round, chunk). */
function roundChunk(round: number, chunk: number): Buffer {
  const b = Buffer.alloc(CHUNK);
  for (let at = 0; at < CHUNK; at += 8) {
    b.writeUInt32LE(round, at);
    b.writeUInt32LE(chunk, at + 4);
  }
  return b;
}

/** The round every chunk of `data` holds; fails naming the chunks when they disagree (a torn view) or a chunk is not a pattern. */
function roundOf(data: Buffer): number {
  const rounds: number[] = [];
  for (let chunk = 0; chunk < ROUND_CHUNKS; chunk++) {
    const part = data.subarray(chunk * CHUNK, (chunk + 1) * CHUNK);
    const round = part.readUInt32LE(0);
    // Round 0 is the volume before the first round: all zeros.
    const expected = round === 0 && part.readUInt32LE(4) === 0 ? Buffer.alloc(CHUNK) : roundChunk(round, chunk);
    assert.ok(part.equals(expected), `chunk ${chunk} is not a whole chunk of one round (starts with round ${round}, chunk ${part.readUInt32LE(4)})`);
    rounds.push(round);
  }
  assert.ok(rounds.every((r) => r === rounds[0]), `one read mixed rounds across chunks (a torn view): ${rounds.join(',')}`);
  return rounds[0];
}

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)];
}

/** A steady write load of 64 KiB writes on the writer, over `span` bytes past the round chunks, until stopped. */
function writeLoad(a: Daemon, name: string, span = VOLUME_MIB * MiB - LOAD_FROM) {
  const state = { running: true, writes: 0 };
  const done = (async () => {
    const client = await connect(a, name);
    while (state.running) {
      await client.write(LOAD_FROM + Math.floor(Math.random() * (span / 65536)) * 65536, randomBytes(65536));
      state.writes++;
    }
    await client.disconnect();
  })();
  return { state, stop: async () => {
    state.running = false;
    await done;
  } };
}

/**
 * The replica read continuously: every round chunk in one read (never two rounds in one,
 * never a round older than the last), and its sequence in the API, sampled every 20 ms
 * (never back; when it first reached each value), until stopped.
 */
function watchReplica(b: Daemon, name: string, reader: NbdClient) {
  const state = { running: true, reads: 0, lastRound: 0, roundsSeen: new Set<number>(), seenAt: [] as Array<{ sequence: number; at: number }> };
  const readLoop = (async () => {
    while (state.running) {
      const round = roundOf(await reader.read(0, ROUND_CHUNKS * CHUNK));
      assert.ok(round >= state.lastRound, `the replica went back from round ${state.lastRound} to round ${round}`);
      state.lastRound = round;
      state.roundsSeen.add(round);
      state.reads++;
    }
  })();
  const watch = (async () => {
    let lastSequence = -1;
    while (state.running) {
      const sequence = (await exportInfo(b, name)).sequence as number;
      assert.ok(sequence >= lastSequence, `the replica's sequence went back from ${lastSequence} to ${sequence}`);
      if (sequence > lastSequence) state.seenAt.push({ sequence, at: performance.now() });
      lastSequence = sequence;
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
  })();
  return { state, stop: async () => {
    state.running = false;
    await Promise.all([readLoop, watch]);
  } };
}

async function followUnderLoad(t: { diagnostic(message: string): void }, label: string, store: SharedStore | ((dir: string) => SharedStore)): Promise<void> {
  const cluster = await startCluster(store);
  try {
    const a = await cluster.start('host-a');
    const b = await cluster.start('host-b', { volumes: { replica_follow_interval_ms: FOLLOW_MS } });
    await withLogs([a, b], async () => {
      await createVolume(a, VOLUME, VOLUME_MIB);
      const writer = await connect(a, VOLUME);
      await writer.flush();
      await drain(a, VOLUME);
      const reader = await connect(b, VOLUME);
      assert.equal((await exportInfo(b, VOLUME)).read_only, true);

      // A steady write load on the writer for the whole test; the replica reads all along.
      const load = writeLoad(a, VOLUME);
      const replica = watchReplica(b, VOLUME, reader);
      const { seenAt } = replica.state;

      const lags: number[] = [];
      try {
        for (let round = 1; round <= ROUNDS; round++) {
          for (let chunk = 0; chunk < ROUND_CHUNKS; chunk++) await writer.write(chunk * CHUNK, roundChunk(round, chunk));
          const drained = await drain(a, VOLUME);
          const drainedAt = performance.now();
          // The replica catches up: it serves this manifest (or a later one) eventually.
          await waitFor(`the replica to reach sequence ${drained.sequence} (round ${round})`, async () => seenAt.some((s) => s.sequence >= drained.sequence), 60_000, 10);
          lags.push(seenAt.find((s) => s.sequence >= drained.sequence)!.at - drainedAt);
          // The reader meets the round too (its blocks come lazily from the store).
          await waitFor(`the replica's reads to show round ${round}`, async () => replica.state.lastRound >= round, 60_000, 10);
        }
      } finally {
        await load.stop();
        await replica.stop();
      }
      const { reads } = replica.state;
      const loadWrites = load.state.writes;
      assert.ok(replica.state.roundsSeen.has(ROUNDS), 'the reader saw the last round');
      assert.ok(loadWrites > 0 && reads > ROUNDS, `load writes ${loadWrites}, replica reads ${reads}`);

      // Lag in the API and the metrics, once caught up.
      const info = await exportInfo(b, VOLUME);
      assert.equal(info.read_only, true);
      assert.ok(info.replica, `no replica field: ${JSON.stringify(info)}`);
      assert.equal(info.replica.behind_sequences, 0);
      assert.equal(info.replica.latest_sequence, info.sequence);
      assert.equal(typeof info.replica.lag_seconds, 'number');
      assert.ok(info.replica.manifests_applied >= 1, JSON.stringify(info.replica));
      assert.equal(info.out_of_service, undefined);
      assert.ok((await metric(b, 'updraft_volume_replica_manifests_applied_total', { volume: VOLUME })) >= 1);
      assert.equal(await metric(b, 'updraft_volume_replica_behind_sequences', { volume: VOLUME }), 0);
      assert.match((await b.api('GET', '/metrics')).text, /updraft_volume_replica_lag_seconds\{volume="replica\/follow"\} [0-9.]+/);
      // The writer is no replica.
      assert.equal((await exportInfo(a, VOLUME)).replica, undefined);

      t.diagnostic(`${label}: catch-up after a drain, follow interval ${FOLLOW_MS} ms: median ${median(lags).toFixed(0)} ms, max ${Math.max(...lags).toFixed(0)} ms over ${lags.length} drains; ${reads} replica reads of ${ROUND_CHUNKS} chunks, ${loadWrites} load writes`);
      await reader.disconnect();
      await writer.disconnect();
    });
  } finally {
    await cluster.cleanup();
  }
}

const minio = minioForTests();

test('a replica follows the writer on the file:// store: reads never mix manifests or go back, lag in the API and metrics', { timeout: TIMEOUT }, async (t) => {
  await followUnderLoad(t, 'file://', fileStore);
});

test('a replica follows the writer on MinIO: reads never mix manifests or go back, lag in the API and metrics', { timeout: TIMEOUT }, async (t) => {
  await followUnderLoad(t, 'MinIO', (dir) => minioStore(minio(), dir));
});

test('a volume\'s own follow interval; what a replica followed survives its SIGKILL; a promoted replica writes and follows no more; the host that released the volume follows the new writer', { timeout: TIMEOUT }, async () => {
  const cluster = await startCluster(fileStore);
  try {
    const a = await cluster.start('host-a');
    // B follows nothing by default: the volume, woken by PUT, sets its own interval.
    const b = await cluster.start('host-b', { volumes: { replica_follow_interval_ms: 0 } });
    await withLogs([a, b], async () => {
      const name = 'replica/promoted';
      await createVolume(a, name, 8);
      const ca = await connect(a, name);
      await ca.write(0, roundChunk(1, 0));
      await drain(a, name);
      const woken = await createVolume(b, name, 8, { replica_follow_interval_ms: 200 }, 200);
      assert.equal(woken.replica?.follow_interval_ms, 200, JSON.stringify(woken));
      let cb = await connect(b, name);
      assert.equal((await exportInfo(b, name)).flush_mode, 'demand');
      // The writer's flush mode travels in its manifests to the replica.
      const switched = await a.api('POST', `/api/exports/${encodeURIComponent(name)}/flush-mode`, { flush_mode: 'continuous' });
      assert.equal(switched.status, 200, switched.text);
      await ca.write(0, roundChunk(2, 0));
      const second = await drain(a, name);
      await waitFor('the replica to follow the second drain', async () => (await exportInfo(b, name)).sequence >= second.sequence);
      assert.equal((await exportInfo(b, name)).flush_mode, 'continuous');
      assert.ok((await cb.read(0, CHUNK)).equals(roundChunk(2, 0)));
      // What it followed is in its journal: killed and restarted, it recovers that state from local disk.
      await cb.disconnect();
      await b.kill9();
      await b.restart();
      assert.match(b.log(), new RegExp(`recovered volume volume=replica/promoted .*sequence=${second.sequence} `));
      cb = await connect(b, name);
      assert.ok((await cb.read(0, CHUNK)).equals(roundChunk(2, 0)));
      const released = await a.api('POST', `/api/exports/${encodeURIComponent(name)}/release`);
      assert.equal(released.status, 200, released.text);
      const promoted = await b.api('POST', `/api/exports/${encodeURIComponent(name)}/promote`);
      assert.equal(promoted.status, 200, promoted.text);
      assert.equal((await exportInfo(b, name)).replica, undefined, 'a writer is no replica');
      await cb.write(0, roundChunk(3, 0));
      await cb.flush();
      assert.ok((await cb.read(0, CHUNK)).equals(roundChunk(3, 0)));
      // The old writer, released, follows the new one.
      const third = await drain(b, name);
      await waitFor('the released host to follow the new writer', async () => (await exportInfo(a, name)).sequence >= third.sequence);
      assert.ok((await ca.read(0, CHUNK)).equals(roundChunk(3, 0)));
      assert.ok((await exportInfo(a, name)).replica, 'the released host is a replica now');
      await ca.disconnect();
      await cb.disconnect();
    });
  } finally {
    await cluster.cleanup();
  }
});

test('a replica never goes back: a manifest gone from the store is reported, an older one (the name purged and made again) is ignored', { timeout: TIMEOUT }, async () => {
  const cluster = await startCluster(fileStore);
  try {
    const a = await cluster.start('host-a');
    const b = await cluster.start('host-b', { volumes: { replica_follow_interval_ms: 200 } });
    await withLogs([a, b], async () => {
      const name = 'replica/again';
      const path = `/api/exports/${encodeURIComponent(name)}`;
      await createVolume(a, name, 8);
      const ca = await connect(a, name);
      for (let i = 0; i < 8; i++) await ca.write(0, roundChunk(5, 0));
      const drained = await drain(a, name);
      await ca.disconnect();
      const cb = await connect(b, name);
      assert.equal((await exportInfo(b, name)).sequence, drained.sequence);

      const purged = await a.api('DELETE', `${path}?purge=true`);
      assert.equal(purged.status, 200, purged.text);
      await waitFor('the replica to report the manifest gone', async () => /gone from the store/.test((await exportInfo(b, name)).replica?.error ?? ''));
      assert.ok((await cb.read(0, CHUNK)).equals(roundChunk(5, 0)), 'the replica serves what it had');

      // The name again, at a lower sequence than the replica serves.
      await createVolume(a, name, 8);
      const again = await connect(a, name);
      await again.write(0, roundChunk(6, 0));
      const lower = await drain(a, name);
      assert.ok(lower.sequence < drained.sequence, `${lower.sequence} < ${drained.sequence}`);
      await again.disconnect();
      await waitFor('the replica to see the older manifest', async () => /older than the state served here/.test(b.log()));
      assert.ok((await cb.read(0, CHUNK)).equals(roundChunk(5, 0)), 'the replica went back to an older manifest');
      assert.equal((await exportInfo(b, name)).sequence, drained.sequence);
      await cb.disconnect();

      const removed = await b.api('DELETE', path);
      assert.equal(removed.status, 200, removed.text);
    });
  } finally {
    await cluster.cleanup();
  }
});

/**
 * A durable volume's replica serves the writer's FLUSHed writes from its log objects, with
 * no drain: each round is written and FLUSHed, and the replica's reads reach it while
 * never mixing two rounds or going back, across a drain that folds the log into a
 * manifest too. The writer then dies; the replica promotes, and its own writes show over
 * what it served of the old writer's log.
 */
async function followDurable(t: { diagnostic(message: string): void }, label: string, store: SharedStore | ((dir: string) => SharedStore)): Promise<void> {
  const cluster = await startCluster(store);
  const shortLease = { lease_ttl_s: 4, clock_skew_margin_s: 1 };
  try {
    // The writer folds its log into a manifest only when the test drains (not by its timer).
    const a = await cluster.start('host-a', { host: shortLease, volumes: { flush_mode: 'durable', continuous_manifest_interval_ms: 600_000 } });
    const b = await cluster.start('host-b', { host: shortLease, volumes: { replica_follow_interval_ms: FOLLOW_MS } });
    await withLogs([a, b], async () => {
      const name = 'replica/durable';
      await createVolume(a, name, VOLUME_MIB, { flush_mode: 'durable' });
      const writer = await connect(a, name);
      await writer.flush();
      await drain(a, name);
      const reader = await connect(b, name);
      assert.equal((await exportInfo(b, name)).flush_mode, 'durable');

      // Unflushed load past the round chunks (each round's FLUSH logs it as well); the replica reads all along.
      // Over 1 MiB only: a round logs at most that much of it, so the log stays under the 64 MiB that folds it.
      const load = writeLoad(a, name, MiB);
      const replica = watchReplica(b, name, reader);

      const lags: number[] = [];
      try {
        for (let round = 1; round <= ROUNDS; round++) {
          for (let chunk = 0; chunk < ROUND_CHUNKS; chunk++) await writer.write(chunk * CHUNK, roundChunk(round, chunk));
          await writer.flush();
          const flushedAt = performance.now();
          // Halfway, a drain folds the log into a manifest: the replica moves to it without going back.
          if (round === ROUNDS / 2) await drain(a, name);
          await waitFor(`the replica's reads to show FLUSHed round ${round}`, async () => replica.state.lastRound >= round, 60_000, 5);
          lags.push(performance.now() - flushedAt);
        }
      } finally {
        await load.stop();
        await replica.stop();
      }
      // The last rounds came from the log: the API says so.
      await waitFor('the replica to catch up with the log', async () => (await exportInfo(b, name)).replica?.behind_sequences === 0);
      const info = await exportInfo(b, name);
      assert.ok(info.replica.log !== null && info.replica.log.entries > 0 && info.replica.log.bytes > 0, `no log served: ${JSON.stringify(info.replica)}`);
      assert.equal(info.sequence, info.replica.log.sequence, 'the replica serves the sequence of the last log entry');
      assert.ok(info.sequence > info.manifest_sequence, `served ${info.sequence}, manifest ${info.manifest_sequence}`);
      assert.ok((await metric(b, 'updraft_volume_replica_log_bytes', { volume: name })) > 0);

      if (cluster.store.label === 'file://') {
        // A corrupt log object: the check fails naming it, the replica serves what it had, and goes on once it is gone.
        const bad = path.join(cluster.dir, 'store', 'log', 'host-a', '999999999999999-00000000');
        fs.writeFileSync(bad, 'not a log object');
        await waitFor('the replica to report the corrupt log object', async () => /999999999999999-00000000/.test((await exportInfo(b, name)).replica?.error ?? ''));
        assert.equal(roundOf(await reader.read(0, ROUND_CHUNKS * CHUNK)), ROUNDS);
        fs.rmSync(bad);
        await waitFor('the replica\'s check to succeed again', async () => (await exportInfo(b, name)).replica?.error === null);
      }

      // The writer dies; the replica promotes once the lease runs out, with every FLUSHed round.
      await a.kill9();
      await new Promise((resolve) => setTimeout(resolve, 5_000));
      await waitFor('B to promote the volume', async () => (await b.api('POST', `/api/exports/${encodeURIComponent(name)}/promote`)).status === 200, 30_000, 500);
      assert.equal(roundOf(await reader.read(0, ROUND_CHUNKS * CHUNK)), ROUNDS);
      assert.equal((await exportInfo(b, name)).replica, undefined, 'a writer is no replica');
      // Its own writes show: no view of the old writer's log stays over them.
      for (let chunk = 0; chunk < ROUND_CHUNKS; chunk++) await reader.write(chunk * CHUNK, roundChunk(ROUNDS + 1, chunk));
      assert.equal(roundOf(await reader.read(0, ROUND_CHUNKS * CHUNK)), ROUNDS + 1, 'the promoted replica read the old writer\'s log over its own writes');
      await reader.flush();
      assert.equal(roundOf(await reader.read(0, ROUND_CHUNKS * CHUNK)), ROUNDS + 1);

      t.diagnostic(`${label}: a durable replica shows a FLUSHed round, follow interval ${FOLLOW_MS} ms: median ${median(lags).toFixed(0)} ms, max ${Math.max(...lags).toFixed(0)} ms over ${lags.length} FLUSHes`);
      await reader.disconnect();
      await writer.disconnect().catch(() => undefined);
    });
  } finally {
    await cluster.cleanup();
  }
}

test('a replica of a durable volume follows the writer\'s log on the file:// store: FLUSHed rounds show within the interval, never torn or back; promoted, its own writes show', { timeout: TIMEOUT }, async (t) => {
  await followDurable(t, 'file://', fileStore);
});

test('a replica of a durable volume follows the writer\'s log on MinIO: FLUSHed rounds show within the interval, never torn or back; promoted, its own writes show', { timeout: TIMEOUT }, async (t) => {
  await followDurable(t, 'MinIO', (dir) => minioStore(minio(), dir));
});
