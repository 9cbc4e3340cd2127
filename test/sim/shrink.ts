// Shrinking a failing seed: the shortest step budget that still fails (bisected), then
// each earlier step dropped in turn while the run still fails the same way.
import type { InjectedFault } from '../../src/faults/injected.js';
import { runSeed, type SimResult, type SimSettings } from './run.js';

/** The failure's kind: its message without the numbers (units, writes, hosts differ as steps drop). */
function kind(r: SimResult): string {
  return (r.failure?.message ?? '').replace(/\d+/g, 'N').slice(0, 80);
}

export async function shrink(failing: SimResult, faults: InjectedFault[], maxRuns = 200, settings?: SimSettings): Promise<SimResult> {
  const want = kind(failing);
  let best = failing;
  let runs = 0;
  const fails = async (steps: number, skip: Set<number>) => {
    runs++;
    const r = await runSeed({ seed: failing.seed, steps, faults, skip, settings });
    return r.failure !== undefined && kind(r) === want ? r : undefined;
  };
  // The failing step is the budget; fewer steps cannot fail the same way later.
  let steps = failing.failure!.step;
  const skip = new Set<number>();
  for (let s = 1; s < steps && runs < maxRuns; s++) {
    skip.add(s);
    const r = await fails(steps, skip);
    if (r) best = r;
    else skip.delete(s);
  }
  steps = best.failure!.step;
  return { ...best, trace: best.trace.filter((line) => !/^#(\d+) /.test(line) || !skip.has(Number(/^#(\d+)/.exec(line)![1]))) };
}
