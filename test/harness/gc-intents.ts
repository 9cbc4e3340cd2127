// Manifest writes whose PUT got no answer, on every refcount database (run by
// gc-sqlite.test.ts and gc-postgres.test.ts): a later write of the same key with the same
// condition does not wait for the settle time; once it lands the earlier write is
// reverted for good; an earlier write that did land is committed first; and a restart
// between a write's PUT and its commit resolves both without waiting for the settle time.
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { test } from 'node:test';
import { PLAINTEXT } from '../../src/crypto/cipher.js';
import { CODEC_LZ4, parseCompression } from '../../src/crypto/compress.js';
import { Collector } from '../../src/gc/collector.js';
import { PackRefcounts } from '../../src/gc/refcounts.js';
import { IF_NONE_MATCH, putCounted, putCountedThen, putOptionsOf, type PutCondition } from '../../src/store/counted.js';
import { createLogger } from '../../src/log.js';
import { isPreconditionFailed, ObjectStoreError, type ObjectStore } from '../../src/objectstore/types.js';
import { manifestKey } from '../../src/store/manifest.js';
import { ManifestBuilder } from '../../src/store/manifest-builder.js';
import { encodeManifest } from '../../src/store/manifest-seal.js';
import { packKey } from '../../src/store/pack.js';
import type { GcBackend } from './gc.js';
import { gcScratch } from './gc-scratch.js';

const TIMEOUT = 120_000;
const BLOCK = 128 * 1024;
/** An s3:// settle time: nothing in these tests may wait for it (the clock never gets there). */
const SETTLE_MS = 300_000;

/** A refcount database and a file:// store for one test, with a clock the test moves. */
async function setup(t: { after(fn: () => Promise<void>): void }, backend: GcBackend, name: string) {
  const { db, store } = await gcScratch(t, backend, name);
  const log = createLogger('test', 'error');
  const clock = { ms: 1_000_000 };
  const open = () => PackRefcounts.open(db, { hostId: 'h1', store, settleMs: SETTLE_MS, log, now: () => clock.ms });
  const refcounts = await open();
  const pack = async () => {
    const id = randomBytes(16).toString('hex');
    await store.put(packKey(id), randomBytes(64));
    await refcounts.registerPack(id);
    return id;
  };
  const refs = async (ids: string[]) =>
    Promise.all(ids.map(async (id) => Number((await db.tx((tx) => tx.all<{ refs: number }>(`SELECT refs FROM gc_packs WHERE id = $1`, [id])))[0]?.refs)));
  const settings = { gracePeriodMs: 1000, intervalMs: 1000, reconcileIntervalMs: 3_600_000, maxDeletionsPerCycle: 100, dryRun: false };
  /** Reconciliation against the store: what it had to correct. */
  const corrections = async (counts: PackRefcounts) => {
    const { reconcile } = await new Collector(counts, store, PLAINTEXT, settings, log).reconcile({ dryRun: true });
    return { manifests: reconcile.manifest_corrections, sets: reconcile.set_corrections, refcounts: reconcile.refcount_corrections };
  };
  return { db, store, clock, open, refcounts, pack, refs, corrections };
}

let sequence = 0;
/** A manifest body of volume `name` whose blocks are in `packs`, one chunk each (every body differs). */
function manifestOf(name: string, packs: string[]): Buffer {
  const builder = new ManifestBuilder({
    format: 1, name, size: BLOCK * packs.length, blockSize: BLOCK, sequence: ++sequence, generation: 1, host: 'h1', created: new Date().toISOString(),
  });
  packs.forEach((pack, chunk) => builder.setChunk(chunk, randomBytes(16), { pack, offset: 4096, length: 64, rawLength: BLOCK, codec: CODEC_LZ4 }));
  return encodeManifest(manifestKey(name), builder.build(), parseCompression('none'), PLAINTEXT);
}

/** A PUT whose connection dies: the write is left unresolved. `landed`: it reached the store first (the reply was lost). */
async function putWithoutAnswer(refcounts: PackRefcounts, store: ObjectStore, key: string, packs: string[], body: Buffer, condition: PutCondition, landed: boolean) {
  const lost = putCounted(refcounts, key, new Set(packs), body, condition, async () => {
    if (landed) await store.put(key, body, putOptionsOf(condition));
    throw new ObjectStoreError('Unavailable', `put ${key}: ECONNRESET: socket hang up (after 5 attempts)`);
  });
  await assert.rejects(lost, (err: unknown) => err instanceof ObjectStoreError && err.code === 'Unavailable');
}

/** A conditional PUT of `body` at `key` under refcounts; returns the new etag. */
async function put(refcounts: PackRefcounts, store: ObjectStore, key: string, packs: string[], body: Buffer, condition: PutCondition): Promise<string> {
  return (await putCounted(refcounts, key, new Set(packs), body, condition, () => store.put(key, body, putOptionsOf(condition)))).etag;
}

export function defineIntentTests(backend: GcBackend): void {
  const label = backend.label;

  test(`${label}: a manifest PUT that got no answer does not hold up the next write with its condition; once that lands, the earlier write is reverted for good and the counts are exact`, { timeout: TIMEOUT }, async (t) => {
    const { store, clock, refcounts, pack, refs, corrections } = await setup(t, backend, 'noanswer');
    const key = manifestKey('v');
    const [p1, p2, p3, p4] = await Promise.all(Array.from({ length: 4 }, pack));
    const e0 = await put(refcounts, store, key, [p1, p2], manifestOf('v', [p1, p2]), IF_NONE_MATCH);

    const lostBody = manifestOf('v', [p1, p3]);
    await putWithoutAnswer(refcounts, store, key, [p1, p3], lostBody, e0, false);
    assert.deepEqual([...(await refcounts.pendingKeys())], [key]);
    assert.deepEqual(await refs([p1, p2, p3, p4]), [1, 1, 1, 0], 'the unresolved write holds what it adds');

    // The next write carries the same condition: it begins at once, lands, and its commit reverts the earlier one.
    const e2 = await put(refcounts, store, key, [p1, p4], manifestOf('v', [p1, p4]), e0);
    assert.deepEqual([...(await refcounts.pendingKeys())], [], 'the earlier write is still unresolved after its successor landed');
    assert.deepEqual(await refs([p1, p2, p3, p4]), [1, 0, 0, 1]);
    assert.equal((await refcounts.counted(key))?.etag, e2);
    assert.deepEqual([...(await refcounts.counted(key))!.packs].sort(), [p1, p4].sort());
    // Its PUT, should it arrive now, cannot land.
    await assert.rejects(store.put(key, lostBody, { ifMatch: e0 }), isPreconditionFailed);
    assert.deepEqual(await corrections(refcounts), { manifests: 0, sets: 0, refcounts: 0 });

    // A create that got no answer does not hold up the next create either; it holds its packs until the settle time.
    const created = manifestKey('w');
    await putWithoutAnswer(refcounts, store, created, [p2], manifestOf('w', [p2]), IF_NONE_MATCH, false);
    await put(refcounts, store, created, [p3], manifestOf('w', [p3]), IF_NONE_MATCH);
    assert.deepEqual(await refs([p2, p3]), [1, 1]);
    assert.deepEqual([...(await refcounts.pendingKeys())], [created]);
    assert.deepEqual(await corrections(refcounts), { manifests: 0, sets: 0, refcounts: 0 });
    clock.ms += SETTLE_MS;
    assert.deepEqual(await refcounts.resolveIntents(), { committed: 0, reverted: 1, pending: 0 });
    assert.deepEqual(await refs([p2, p3]), [0, 1]);
    assert.deepEqual(await corrections(refcounts), { manifests: 0, sets: 0, refcounts: 0 });
  });

  test(`${label}: a manifest PUT whose reply was lost after it landed: the next write commits it first, then writes over it, and the counts are exact`, { timeout: TIMEOUT }, async (t) => {
    const { store, refcounts, pack, refs, corrections } = await setup(t, backend, 'lostreply');
    const key = manifestKey('v');
    const [p1, p2, p3, p4] = await Promise.all(Array.from({ length: 4 }, pack));
    const e0 = await put(refcounts, store, key, [p1, p2], manifestOf('v', [p1, p2]), IF_NONE_MATCH);
    await putWithoutAnswer(refcounts, store, key, [p1, p3], manifestOf('v', [p1, p3]), e0, true);
    const e1 = (await store.head(key))!.etag;
    assert.notEqual(e1, e0);

    // The writer does not know its PUT landed: its next PUT, conditional on e0 too, is refused, and changes no count.
    const next = manifestOf('v', [p1, p4]);
    await assert.rejects(put(refcounts, store, key, [p1, p4], next, e0), isPreconditionFailed);
    assert.deepEqual(await refs([p1, p2, p3, p4]), [1, 1, 1, 0]);
    assert.equal((await refcounts.counted(key))?.etag, e0);

    // It finds its own write there and writes again conditional on it: the earlier write is committed first.
    let counted: string | undefined;
    const e2 = (await putCounted(refcounts, key, new Set([p1, p4]), next, e1, async () => {
      counted = (await refcounts.counted(key))?.etag;
      return store.put(key, next, { ifMatch: e1 });
    })).etag;
    assert.equal(counted, e1, 'the landed earlier write was not committed before the next PUT');
    assert.deepEqual([...(await refcounts.pendingKeys())], []);
    assert.deepEqual(await refs([p1, p2, p3, p4]), [1, 0, 0, 1]);
    assert.equal((await refcounts.counted(key))?.etag, e2);
    assert.deepEqual(await corrections(refcounts), { manifests: 0, sets: 0, refcounts: 0 });
  });

  test(`${label}: a restart after a write landed over one that got no answer, before its commit: both are resolved at once, without waiting for the settle time`, { timeout: TIMEOUT }, async (t) => {
    const { store, open, refcounts, pack, refs, corrections } = await setup(t, backend, 'crashbetween');
    const key = manifestKey('v');
    const other = manifestKey('u');
    const [p1, p2, p3, p4, p5] = await Promise.all(Array.from({ length: 5 }, pack));
    const e0 = await put(refcounts, store, key, [p1, p2], manifestOf('v', [p1, p2]), IF_NONE_MATCH);
    const u0 = await put(refcounts, store, other, [p5], manifestOf('u', [p5]), IF_NONE_MATCH);
    await putWithoutAnswer(refcounts, store, key, [p1, p3], manifestOf('v', [p1, p3]), e0, false);
    // The successor's PUT lands; the process dies before its commit.
    const body = manifestOf('v', [p1, p4]);
    await putCountedThen(refcounts, key, new Set([p1, p4]), body, e0, () => store.put(key, body, { ifMatch: e0 }));
    // Another key's write that got no answer is moved past by a write the refcounts never saw (a host without GC).
    await putWithoutAnswer(refcounts, store, other, [p2], manifestOf('u', [p2]), u0, false);
    await store.put(other, manifestOf('u', [p5]), { ifMatch: u0 });
    assert.deepEqual([...(await refcounts.pendingKeys())].sort(), [key, other].sort());
    assert.deepEqual(await refs([p1, p2, p3, p4, p5]), [1, 2, 1, 1, 1], 'every unresolved write holds what it adds');

    const restarted = await open();
    assert.deepEqual(await restarted.resolveIntents({ host: 'h1' }), { committed: 1, reverted: 2, pending: 0 });
    assert.deepEqual([...(await restarted.pendingKeys())], []);
    assert.deepEqual(await refs([p1, p2, p3, p4, p5]), [1, 0, 0, 1, 1]);
    assert.equal((await restarted.counted(key))?.etag, (await store.head(key))!.etag);
    // The other key's counted etag is stale (its write went round the refcounts): reconciliation corrects that one, nothing else.
    assert.deepEqual(await corrections(restarted), { manifests: 1, sets: 0, refcounts: 0 });
  });
}
