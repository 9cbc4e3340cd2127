// The worker threads under the overlay write and pack pools (src/disk/job-threads.ts):
// answers matched to their jobs, a thread started only while every one is busy, the jobs
// of a thread that fails or exits rejected, and an idle pool not keeping the process alive.
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { test } from 'node:test';
import { promisify } from 'node:util';
import { Worker } from 'node:worker_threads';
import { JobThreads } from '../src/disk/job-threads.js';

/** What the test thread does with a job: answer `value` after `ms`, exit with `code`, or throw `error`. */
interface Job {
  job: number;
  value?: number;
  ms?: number;
  code?: number;
  error?: string;
}

interface Answer {
  job: number;
  value?: number;
  thread: number;
}

const THREAD = `
const { parentPort, threadId } = require('node:worker_threads');
parentPort.on('message', ({ job, value, ms, code, error }) => {
  if (code !== undefined) process.exit(code);
  if (error !== undefined) setImmediate(() => { throw new Error(error); });
  else setTimeout(() => parentPort.postMessage({ job, value, thread: threadId }), ms ?? 0);
});
`;

/** A pool of at most `size` test threads, counting the threads it starts. */
function pool(size: number): { threads: JobThreads<Job, Answer>; started: () => number } {
  let started = 0;
  const threads = new JobThreads<Job, Answer>('test', size, () => {
    started++;
    return new Worker(THREAD, { eval: true });
  });
  return { threads, started: () => started };
}

test('job threads: each answer settles its own job, and a thread starts only while every one is busy', async () => {
  const { threads, started } = pool(2);
  try {
    const first = await threads.run({ value: 1 });
    const second = await threads.run({ value: 2 });
    assert.deepEqual([first.job, first.value, second.job, second.value], [0, 1, 1, 2], 'each job is numbered and answered');
    assert.equal(started(), 1, 'jobs one after another share one thread');
    // The slow job's answer comes last: every job still gets its own.
    const answers = await Promise.all([threads.run({ value: 10, ms: 150 }), threads.run({ value: 11 }), threads.run({ value: 12 }), threads.run({ value: 13 })]);
    assert.deepEqual(answers.map((a) => a.value), [10, 11, 12, 13]);
    assert.equal(started(), 2, 'no more threads than the pool size');
    assert.equal(new Set(answers.map((a) => a.thread)).size, 2, 'the jobs went to both threads');
  } finally {
    await threads.close();
  }
});

test('job threads: a thread that exits or fails rejects its pending jobs with its name, and the next job starts a new thread', async () => {
  const { threads, started } = pool(1);
  try {
    const pending = threads.run({ value: 1, ms: 60_000 });
    const exiting = threads.run({ code: 3 });
    await assert.rejects(pending, { message: 'the test thread exited (code 3)' });
    await assert.rejects(exiting, { message: 'the test thread exited (code 3)' });
    assert.equal((await threads.run({ value: 2 })).value, 2);
    assert.equal(started(), 2);
    const waiting = threads.run({ value: 3, ms: 60_000 });
    await assert.rejects(threads.run({ error: 'broken' }), { message: 'the test thread failed: broken' });
    await assert.rejects(waiting, { message: 'the test thread failed: broken' });
    assert.equal((await threads.run({ value: 4 })).value, 4);
    assert.equal(started(), 3);
  } finally {
    await threads.close();
  }
});

test('job threads: close rejects the pending jobs, and a job after it starts a new thread', async () => {
  const { threads, started } = pool(2);
  const pending = threads.run({ value: 1, ms: 60_000 });
  await threads.close();
  await assert.rejects(pending, /^Error: the test thread exited \(code \d+\)$/);
  assert.equal((await threads.run({ value: 2 })).value, 2);
  assert.equal(started(), 2);
  await threads.close();
});

test('job threads: a pending job keeps the process alive until it is answered, an idle thread does not', async () => {
  // No timer or socket of its own: only the pending job can keep this process running, and
  // a thread left referenced once idle would keep it past execFile's timeout.
  const script = `
    const { Worker } = require('node:worker_threads');
    import(${JSON.stringify(new URL('../src/disk/job-threads.js', import.meta.url).href)}).then(({ JobThreads }) => {
      const threads = new JobThreads('test', 1, () => new Worker(${JSON.stringify(THREAD)}, { eval: true }));
      threads.run({ value: 7, ms: 500 }).then((answer) => console.log('answered', answer.value));
    });
  `;
  const { stdout } = await promisify(execFile)(process.execPath, ['-e', script], { timeout: 20_000 });
  assert.equal(stdout.trim(), 'answered 7');
});
