// Crash points: named places in production code where a test may kill the process.

/**
 * Test-only crash hook: with UPDRAFT_CRASH_AT=NAME[:N] the process kills itself with
 * SIGKILL the Nth time (default 1st) it reaches crash point NAME. Lets a test stop the
 * daemon between two steps of the refcount protocol, as a power cut would.
 */
const crashSpec = process.env.UPDRAFT_CRASH_AT;
const crashCounts = new Map<string, number>();
export async function crashPoint(name: string): Promise<void> {
  if (crashSpec === undefined) return;
  const [point, nth] = crashSpec.split(':');
  if (point !== name) return;
  const n = (crashCounts.get(name) ?? 0) + 1;
  crashCounts.set(name, n);
  if (n === Number(nth ?? 1)) {
    process.stderr.write(`UPDRAFT_CRASH_AT: crashing at ${name} (#${n})\n`);
    process.kill(process.pid, 'SIGKILL');
    await new Promise(() => undefined);
  }
}
