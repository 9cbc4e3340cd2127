// The history checker (test/harness/history.ts) on hand-made histories: each anomaly it
// knows is caught in a history that has it, and the legal histories next to them (an
// unflushed write lost in a crash, a stale read on a released host, a torn read during a
// write) pass. So a clean run of history.test.ts means something.

import assert from 'node:assert/strict';
import { test } from 'node:test';
import {
  checkHistory, decodeSector, encodeSector, SECTOR,
  type AnomalyKind, type Fault, type Op, type OpKind, type Outcome, type ReadValue,
} from './harness/history.js';

/** A tiny history builder: ids in order, client 1 on host "a" unless told. */
class H {
  ops: Op[] = [];
  faults: Fault[] = [];
  private id = 1;
  private add(kind: OpKind, start: number, end: number, extra: Partial<Op> = {}, outcome: Outcome = 'ok'): Op {
    const op: Op = { id: this.id++, client: 1, host: 'a', kind, start, end, outcome, ...extra };
    this.ops.push(op);
    return op;
  }
  write(sector: number, start: number, end: number, extra: Partial<Op> = {}, outcome: Outcome = 'ok'): Op {
    return this.add('write', start, end, { sector, ...extra }, outcome);
  }
  read(sector: number, start: number, end: number, of: Op | 'zero' | ReadValue, extra: Partial<Op> = {}): Op {
    const value: ReadValue = of === 'zero' ? { kind: 'zero' } : 'kind' in of && !('id' in of) ? of : decodeSector(encodeSector((of as Op).client, (of as Op).id, (of as Op).sector!));
    return this.add('read', start, end, { sector, value, ...extra });
  }
  barrier(kind: 'flush' | 'drain' | 'release', start: number, end: number, extra: Partial<Op> = {}): Op {
    return this.add(kind, start, end, extra);
  }
  check() {
    return checkHistory({ ops: this.ops, faults: this.faults });
  }
}

function kinds(h: H): AnomalyKind[] {
  return h.check().anomalies.map((a) => a.kind);
}

test('payload: a sector names its write; a torn or foreign sector is told apart', () => {
  const bytes = encodeSector(3, 77, 12);
  assert.deepEqual(decodeSector(bytes), { kind: 'write', client: 3, op: 77, sector: 12 });
  assert.deepEqual(decodeSector(Buffer.alloc(SECTOR)), { kind: 'zero' });
  const torn = Buffer.concat([encodeSector(3, 77, 12).subarray(0, 2048), encodeSector(4, 80, 12).subarray(2048)]);
  assert.deepEqual(decodeSector(torn), { kind: 'torn', parts: ['w77', 'w80'] });
  const halfZero = Buffer.concat([encodeSector(3, 77, 12).subarray(0, 512), Buffer.alloc(SECTOR - 512)]);
  assert.deepEqual(decodeSector(halfZero), { kind: 'torn', parts: ['w77', 'zero'] });
  const flipped = encodeSector(3, 77, 12);
  flipped[1000] ^= 1;
  assert.equal(decodeSector(flipped).kind, 'garbage');
  const forged = encodeSector(3, 77, 12);
  forged.writeUInt32BE(78, 8); // op id changed without its checksum
  assert.equal(decodeSector(forged).kind, 'garbage');
});

test('a linearizable history with overlapping writes and reads has no anomaly', () => {
  const h = new H();
  const w1 = h.write(0, 0, 10);
  const w2 = h.write(0, 5, 20, { client: 2 });
  h.read(0, 1, 3, 'zero');
  h.read(0, 12, 14, w1); // w2 is in flight: w1 or w2
  h.read(0, 15, 16, w2);
  h.read(0, 21, 22, w2);
  h.read(1, 21, 22, 'zero');
  const result = h.check();
  assert.deepEqual(result.anomalies, []);
  assert.equal(result.readsChecked, 5);
});

test('garbage, phantom, future and failed-write reads are caught', () => {
  const h = new H();
  const w1 = h.write(0, 0, 10);
  h.read(0, 11, 12, { kind: 'garbage', detail: 'x' });
  h.read(0, 11, 12, { kind: 'write', client: 9, op: w1.id, sector: 0 }); // wrong client
  h.read(1, 11, 12, w1); // another sector's write
  h.read(0, 13, 14, { kind: 'write', client: 1, op: 999, sector: 0 }); // no such op
  const later = h.write(0, 50, 60);
  h.read(0, 20, 30, later);
  const refused = h.write(0, 70, 71, {}, 'fail');
  h.read(0, 80, 81, refused);
  const found = kinds(h).sort();
  assert.deepEqual(found, ['failed-write-read', 'future-read', 'garbage-read', 'phantom-read', 'phantom-read', 'phantom-read']);
});

test('a stale read (a completed write superseded the value) is caught, and so is a read going back', () => {
  const stale = new H();
  const w1 = stale.write(0, 0, 10);
  stale.write(0, 11, 20, { client: 2 });
  stale.read(0, 21, 22, w1);
  assert.deepEqual(kinds(stale), ['stale-read']);

  const zeroAfterWrite = new H();
  zeroAfterWrite.write(0, 0, 10);
  zeroAfterWrite.read(0, 11, 12, 'zero');
  assert.deepEqual(kinds(zeroAfterWrite), ['stale-read']);

  const back = new H();
  const a = back.write(0, 0, 10);
  const b = back.write(0, 11, 100, { client: 2 }); // in flight a long time
  back.read(0, 20, 21, b);
  back.read(0, 30, 31, a); // b was seen, and b follows a
  assert.deepEqual(kinds(back), ['stale-read']);
});

test('a crash may lose an unflushed write, but the recovered value stays put', () => {
  const h = new H();
  const w1 = h.write(0, 0, 10);
  h.barrier('flush', 11, 12);
  const w2 = h.write(0, 13, 14, { client: 2 });
  h.faults.push({ kind: 'crash', host: 'a', at: 20 });
  h.read(0, 30, 31, w1); // w2 was not flushed: lost
  h.read(0, 32, 33, w1);
  assert.deepEqual(h.check().anomalies, []);
  assert.equal(h.check().rolledBack, 1);

  // ... and it may survive as well.
  const kept = new H();
  kept.write(0, 0, 10);
  kept.barrier('flush', 11, 12);
  const k2 = kept.write(0, 13, 14, { client: 2 });
  kept.faults.push({ kind: 'crash', host: 'a', at: 20 });
  kept.read(0, 30, 31, k2);
  assert.deepEqual(kept.check().anomalies, []);
  assert.equal(kept.check().rolledBack, 0);

  // Flip-flop after recovery: first the old value, then the lost one.
  const flip = new H();
  const f1 = flip.write(0, 0, 10);
  flip.barrier('flush', 11, 12);
  const f2 = flip.write(0, 13, 14, { client: 2 });
  flip.faults.push({ kind: 'crash', host: 'a', at: 20 });
  flip.read(0, 30, 31, f1);
  flip.read(0, 32, 33, f2);
  assert.deepEqual(kinds(flip), ['unstable-read']);
  assert.ok(w2.id > 0);
});

test('a flushed write lost in a crash is caught (FLUSH on another connection, FUA, drain all count)', () => {
  for (const how of ['flush', 'fua', 'drain'] as const) {
    const h = new H();
    const w1 = h.write(0, 0, 10);
    const w2 = h.write(0, 11, 12, { client: 2, fua: how === 'fua' });
    if (how !== 'fua') h.barrier(how, 13, 14, { client: 3 });
    h.faults.push({ kind: 'crash', host: 'a', at: 20 });
    h.read(0, 30, 31, w1);
    assert.deepEqual(kinds(h), ['lost-flushed-write'], how);
    assert.ok(w2);
  }
  // A FLUSH that started before the write's ack does not cover it.
  const early = new H();
  const e1 = early.write(0, 0, 10);
  early.barrier('flush', 11, 12);
  early.write(0, 11, 13, { client: 2 });
  early.barrier('flush', 12, 14, { client: 3 });
  early.faults.push({ kind: 'crash', host: 'a', at: 20 });
  early.read(0, 30, 31, e1);
  assert.deepEqual(kinds(early), []);
  // Zeros are older than any flushed write.
  const zeros = new H();
  zeros.write(0, 0, 10);
  zeros.barrier('flush', 11, 12);
  zeros.faults.push({ kind: 'crash', host: 'a', at: 20 });
  zeros.read(0, 30, 31, 'zero');
  assert.deepEqual(kinds(zeros), ['lost-flushed-write']);
});

test('a write dropped by one recovery is not resurrected by the next', () => {
  const h = new H();
  const w1 = h.write(0, 0, 10);
  h.barrier('flush', 11, 12);
  const w2 = h.write(0, 13, 14, { client: 2 });
  h.faults.push({ kind: 'crash', host: 'a', at: 20 });
  h.read(0, 30, 31, w1); // recovery dropped w2
  h.faults.push({ kind: 'crash', host: 'a', at: 40 });
  h.read(0, 50, 51, w2);
  assert.deepEqual(kinds(h), ['resurrected-write']);
});

test('failover: only drained writes must survive; the paused holder\'s later writes never show on the new holder', () => {
  const ok = new H();
  const w1 = ok.write(0, 0, 10);
  ok.barrier('drain', 11, 12);
  ok.write(0, 13, 14, { client: 2 });
  ok.barrier('flush', 15, 16); // a local FLUSH does not put it in the store
  ok.faults.push({ kind: 'failover', from: 'a', to: 'b', at: 20 });
  ok.write(0, 21, 900, { client: 2 }); // paused holder acks it after it resumed
  ok.read(0, 30, 31, w1, { host: 'b' });
  ok.read(0, 30, 31, 'zero', { host: 'a', client: 3 }); // the dead branch's reads are not checked
  assert.deepEqual(kinds(ok), []);

  const lost = new H();
  lost.write(0, 0, 10);
  lost.barrier('drain', 11, 12);
  lost.faults.push({ kind: 'failover', from: 'a', to: 'b', at: 20 });
  lost.read(0, 30, 31, 'zero', { host: 'b' });
  assert.deepEqual(kinds(lost), ['lost-flushed-write']);

  const fenced = new H();
  fenced.write(0, 0, 10);
  fenced.barrier('drain', 11, 12);
  fenced.faults.push({ kind: 'failover', from: 'a', to: 'b', at: 20 });
  const late = fenced.write(0, 900, 901);
  fenced.read(0, 950, 951, late, { host: 'b' });
  assert.deepEqual(kinds(fenced), ['fenced-write-visible']);
});

/** b wakes from a's drain of w1 (11-12); a drains w2 (30-40, answered before its pause at 50); b's reads before and at its promotion's answer. */
function wokeBeforeLastDrain(promoted: number | undefined) {
  const h = new H();
  const w1 = h.write(0, 0, 10);
  h.barrier('drain', 11, 12);
  const w2 = h.write(0, 20, 21, { client: 2 });
  h.barrier('drain', 30, 40);
  h.faults.push({ kind: 'failover', from: 'a', to: 'b', at: 50, ...(promoted === undefined ? {} : { promoted }) });
  h.write(0, 60, 61, { host: 'b', client: 3 }, 'fail'); // EPERM: b is read-only until promoted
  h.read(0, 70, 71, w1, { host: 'b', client: 3 });
  h.read(0, 195, 205, w1, { host: 'b', client: 4 }); // started before the answer at 200
  return { h, w1, w2 };
}

test('failover: the new holder serves the manifest it woke from until its promotion answers; from then on it is checked', () => {
  const ok = wokeBeforeLastDrain(200);
  ok.h.read(0, 210, 211, ok.w2, { host: 'b', client: 3 });
  assert.deepEqual(kinds(ok.h), []);

  // Without the promotion's time b's replica reads count as the new holder's: w2 was drained, so w1 is lost.
  const unset = wokeBeforeLastDrain(undefined);
  unset.h.read(0, 210, 211, unset.w2, { host: 'b', client: 3 });
  assert.deepEqual(kinds(unset.h), ['lost-flushed-write', 'lost-flushed-write']);

  // Once the promotion answered, the drained w2 must be there.
  const lost = wokeBeforeLastDrain(200);
  lost.h.read(0, 210, 211, lost.w1, { host: 'b', client: 3 });
  assert.deepEqual(kinds(lost.h), ['lost-flushed-write']);

  // A drain answered only after the resume is no flush point: after its promotion b holds w1
  // or w2, then keeps it; a replica read before does not pin which.
  const late = (promoted: number | undefined) => {
    const h = new H();
    const w1 = h.write(0, 0, 10);
    h.barrier('drain', 11, 12);
    const w2 = h.write(0, 20, 21, { client: 2 });
    h.barrier('drain', 30, 900);
    h.faults.push({ kind: 'failover', from: 'a', to: 'b', at: 50, ...(promoted === undefined ? {} : { promoted }) });
    h.read(0, 70, 71, w1, { host: 'b', client: 3 });
    h.read(0, 210, 211, w2, { host: 'b', client: 3 });
    return { h, w1 };
  };
  assert.deepEqual(kinds(late(200).h), []);
  assert.deepEqual(kinds(late(undefined).h), ['unstable-read']);
  const flips = late(200);
  flips.h.read(0, 220, 221, flips.w1, { host: 'b', client: 4 });
  assert.deepEqual(kinds(flips.h), ['unstable-read']);

  // A replica read never shows what the paused holder wrote after its pause.
  const fenced = new H();
  fenced.write(0, 0, 10);
  fenced.barrier('drain', 11, 12);
  fenced.faults.push({ kind: 'failover', from: 'a', to: 'b', at: 50, promoted: 200 });
  const dead = fenced.write(0, 60, 61);
  fenced.read(0, 70, 71, dead, { host: 'b', client: 3 });
  fenced.read(0, 72, 73, dead); // the paused holder's own branch: not checked
  assert.deepEqual(kinds(fenced), ['fenced-write-visible']);
});

test('handover: an acknowledged write must be on the new holder; the old one acks nothing after its release', () => {
  const ok = new H();
  const w1 = ok.write(0, 0, 10);
  ok.barrier('release', 11, 12);
  ok.faults.push({ kind: 'handover', from: 'a', to: 'b', at: 12 });
  ok.write(0, 13, 14, {}, 'fail'); // EPERM on a
  const w2 = ok.write(0, 20, 21, { host: 'b', client: 2 });
  ok.read(0, 22, 23, w1); // a is a replica now: not required to be fresh
  ok.read(0, 24, 25, w2, { host: 'b' });
  assert.deepEqual(kinds(ok), []);

  const lost = new H();
  lost.write(0, 0, 10); // acked before the release, missing on b
  lost.barrier('release', 11, 12);
  lost.faults.push({ kind: 'handover', from: 'a', to: 'b', at: 12 });
  lost.read(0, 20, 21, 'zero', { host: 'b' });
  assert.deepEqual(kinds(lost), ['stale-read']);

  // Migrating back: the first host writes again, and must be fresh again.
  const back = new H();
  back.barrier('release', 11, 12);
  back.faults.push({ kind: 'handover', from: 'a', to: 'b', at: 12 });
  const b1 = back.write(0, 20, 21, { host: 'b' });
  back.barrier('release', 22, 23, { host: 'b' });
  back.faults.push({ kind: 'handover', from: 'b', to: 'a', at: 23 });
  const a1 = back.write(0, 30, 31);
  back.read(0, 40, 41, b1); // a is live again: stale
  back.read(0, 42, 43, a1);
  back.read(0, 44, 45, b1, { host: 'b' }); // b is a replica now
  assert.deepEqual(kinds(back), ['stale-read']);

  const acked = new H();
  acked.barrier('release', 11, 12);
  acked.faults.push({ kind: 'handover', from: 'a', to: 'b', at: 12 });
  acked.write(0, 13, 14);
  assert.deepEqual(kinds(acked), ['write-after-release']);
});

test('a torn read is tolerated only while a write of its sector is in flight', () => {
  const h = new H();
  const w1 = h.write(0, 0, 10);
  h.read(0, 5, 6, { kind: 'torn', parts: ['zero', `w${w1.id}`] });
  h.read(0, 20, 21, { kind: 'torn', parts: ['zero', `w${w1.id}`] });
  const result = h.check();
  assert.equal(result.tornConcurrent, 1);
  assert.deepEqual(result.anomalies.map((a) => a.kind), ['torn-read']);
});
