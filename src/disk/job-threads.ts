// Jobs on a few worker threads, matched to their answers by job number: the overlay write
// and pack threads. In disk/: a foundation layer that volume/ and store/ may both import.
import type { TransferListItem, Worker } from 'node:worker_threads';

/** A message to a thread, or its answer: both name the job. */
interface Numbered {
  job: number;
}

interface Pending<Answer> {
  settle: (answer: Answer) => void;
  reject: (err: Error) => void;
}

interface Thread<Answer> {
  worker: Worker;
  /** The jobs posted to this thread and not yet answered. */
  jobs: Map<number, Pending<Answer>>;
}

export class JobThreads<Job extends Numbered, Answer extends Numbered> {
  private readonly threads: Thread<Answer>[] = [];
  private nextJob = 0;

  constructor(
    /** Names the thread in the error of a job it dropped: "the pack thread exited (code 1)". */
    private readonly name: string,
    /** At most this many threads; another starts only while every one has a job. */
    private readonly size: number,
    /** Starts one thread. */
    private readonly startWorker: () => Worker,
  ) {}

  /**
   * Posts `message` with the next job number to the least busy thread. Settles with the
   * thread's answer, whatever it says; rejects if the message cannot be sent, or if the
   * thread fails or exits first.
   */
  run(message: Omit<Job, 'job'>, transfer: readonly TransferListItem[] = []): Promise<Answer> {
    const job = this.nextJob++;
    const thread = this.leastBusy();
    return new Promise<Answer>((settle, reject) => {
      thread.jobs.set(job, { settle, reject });
      if (thread.jobs.size === 1) thread.worker.ref();
      try {
        thread.worker.postMessage({ ...message, job } as Job, transfer);
      } catch (err) {
        // Not sent (a buffer that cannot be cloned or moved): no answer will come.
        thread.jobs.delete(job);
        if (thread.jobs.size === 0) thread.worker.unref();
        throw err;
      }
    });
  }

  /** Stops the threads, failing their pending jobs; the next job starts new ones. */
  async close(): Promise<void> {
    const threads = this.threads.splice(0);
    await Promise.all(threads.map((t) => t.worker.terminate()));
  }

  private leastBusy(): Thread<Answer> {
    let best: Thread<Answer> | undefined;
    for (const t of this.threads) if (best === undefined || t.jobs.size < best.jobs.size) best = t;
    if (best !== undefined && (best.jobs.size === 0 || this.threads.length >= this.size)) return best;
    return this.start();
  }

  private start(): Thread<Answer> {
    const worker = this.startWorker();
    const thread: Thread<Answer> = { worker, jobs: new Map() };
    // An idle thread never keeps the process alive; a busy one does (run() refs it).
    worker.unref();
    worker.on('message', (answer: Answer) => {
      const pending = thread.jobs.get(answer.job);
      if (pending === undefined) return;
      thread.jobs.delete(answer.job);
      if (thread.jobs.size === 0) worker.unref();
      pending.settle(answer);
    });
    const fail = (why: string) => {
      const index = this.threads.indexOf(thread);
      if (index >= 0) this.threads.splice(index, 1);
      for (const pending of thread.jobs.values()) pending.reject(new Error(`the ${this.name} thread ${why}`));
      thread.jobs.clear();
    };
    worker.on('error', (err) => fail(`failed: ${err.message}`));
    worker.on('exit', (code) => fail(`exited (code ${code})`));
    this.threads.push(thread);
    return thread;
  }
}
