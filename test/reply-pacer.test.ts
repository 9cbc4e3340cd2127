// The pacing of large read replies (src/nbd/reply-pacer.ts) without a daemon: while another
// connection sends requests, at most a turn's bytes of replies go per turn of the event
// loop, in the order they came, the one that crosses the budget included; a lone sender's
// replies, or any after the other sender went quiet, go at once.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { ReplyPacer, SHARED_MS, TURN_BYTES } from '../src/nbd/reply-pacer.js';

const MiB = 1024 * 1024;

/** Takes replies of `sizes` at once and counts the event loop's turns (setImmediate) until all went: the turn each went in. */
async function turnsOf(pacer: ReplyPacer, sizes: readonly number[], now: number): Promise<number[]> {
  let turn = 0;
  let counting = true;
  const tick = () => {
    turn++;
    if (counting) setImmediate(tick);
  };
  setImmediate(tick);
  const wentIn: number[] = [];
  const writes = sizes.map((bytes, i) => {
    const wait = pacer.take(bytes, now);
    if (wait === undefined) {
      wentIn[i] = turn;
      return Promise.resolve();
    }
    return wait.then(() => {
      wentIn[i] = turn;
    });
  });
  await Promise.all(writes);
  counting = false;
  return wentIn;
}

test('while another connection sends requests, a turn writes one budget of replies, the crossing one included, in order', async () => {
  const pacer = new ReplyPacer(TURN_BYTES);
  const a = {};
  const b = {};
  pacer.request(a, 1000);
  pacer.request(b, 1001);
  // 1 MiB replies: each takes the whole budget; 256 KiB ones: four fit, and the fifth crosses it.
  assert.deepEqual(await turnsOf(pacer, [MiB, MiB, MiB], 1002), [0, 1, 2]);
  // The reply the last turn let go counts against the budget until the next turn.
  const late = pacer.take(MiB / 4, 1003);
  assert.notEqual(late, undefined, 'a reply right after a paced one went at once');
  await late;
  await new Promise(setImmediate);
  await new Promise(setImmediate);
  assert.deepEqual(await turnsOf(pacer, Array(10).fill(MiB / 4), 1004), [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]);
});

test('a reply taken while others wait goes after them, even when the turn has budget left', async () => {
  const pacer = new ReplyPacer(TURN_BYTES);
  pacer.request({}, 0);
  pacer.request({}, 0);
  const order: string[] = [];
  assert.equal(pacer.take(MiB, 1), undefined);
  const second = pacer.take(MiB, 1)!.then(() => order.push('second'));
  const third = pacer.take(MiB / 4, 1)!.then(() => order.push('third'));
  await Promise.all([second, third]);
  assert.deepEqual(order, ['second', 'third']);
});

test('a lone sender, or one whose neighbour went quiet, writes every reply at once', () => {
  const pacer = new ReplyPacer(TURN_BYTES);
  const big = {};
  pacer.request(big, 0);
  // The first sender the server sees is no other one, right away too.
  for (let i = 0; i < 3; i++) assert.equal(pacer.take(MiB, 1), undefined, 'the first sender was paced');
  for (let i = 0; i < 20; i++) assert.equal(pacer.take(MiB, SHARED_MS + 1 + i), undefined, 'a lone sender was paced');
  pacer.request({}, 500);
  pacer.request(big, 501);
  assert.notEqual(pacer.take(MiB, 502) ?? pacer.take(MiB, 502), undefined, 'two senders were not paced');
});
