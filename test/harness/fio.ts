// fio's nbd engine (libnbd) as the tests run it: JSON output, crc32c verify, and the check
// that a write-then-verify run really read back what it wrote.
import assert from 'node:assert/strict';
import { commandLine, run, tail } from './tools.js';

const FIO_TIMEOUT_MS = 120_000;

export interface FioJob {
  jobname: string;
  error: number;
  read: { io_bytes: number };
  write: { io_bytes: number };
}

export interface FioRun {
  code: number | null;
  jobs: FioJob[];
  /** fio's stdout and stderr, for failure messages. */
  output: string;
}

/**
 * Runs fio with JSON output in `cwd` (fio leaves verify state files there). The nbd
 * engine prints "fio: connected to NBD server" before the JSON document.
 */
export async function fio(cwd: string, args: string[]): Promise<FioRun> {
  const fullArgs = ['--output-format=json', ...args];
  const result = await run('fio', fullArgs, { timeoutMs: FIO_TIMEOUT_MS, cwd });
  const output = `$ ${commandLine('fio', fullArgs)}\n--- stdout (tail) ---\n${tail(result.stdout, 15)}\n--- stderr (tail) ---\n${tail(result.stderr, 15)}`;
  assert.ok(!result.timedOut, `fio timed out\n${output}`);
  const start = result.stdout.search(/^\{/m);
  assert.ok(start >= 0, `fio printed no JSON\n${output}`);
  let parsed: { jobs: FioJob[] };
  try {
    parsed = JSON.parse(result.stdout.slice(start));
  } catch (err) {
    assert.fail(`fio JSON does not parse: ${(err as Error).message}\n${output}`);
  }
  return { code: result.code, jobs: parsed.jobs, output };
}

/** Options every run here shares: the nbd engine, crc32c verify that stops at the first bad block. */
export function verifyArgs(uri: string): string[] {
  return ['--ioengine=nbd', `--uri=${uri}`, '--verify=crc32c', '--verify_fatal=1'];
}

/** A write-then-verify run passed: exit 0, no job error, and every written byte read back. */
export function assertVerified(result: FioRun, jobs = 1): void {
  assert.equal(result.code, 0, `fio exited ${result.code}\n${result.output}`);
  assert.equal(result.jobs.length, jobs, result.output);
  for (const job of result.jobs) {
    assert.equal(job.error, 0, `job ${job.jobname}: error ${job.error}\n${result.output}`);
    assert.ok(job.write.io_bytes > 0, `job ${job.jobname} wrote nothing\n${result.output}`);
    // The verify phase re-reads every block written; randrw also reads during the workload.
    assert.ok(
      job.read.io_bytes >= job.write.io_bytes,
      `job ${job.jobname}: read ${job.read.io_bytes} bytes, wrote ${job.write.io_bytes}: the verify phase did not read it all\n${result.output}`,
    );
  }
}
