// `npm run sim -- [--seed N | --seeds COUNT [--from N]] [--steps N] [--fault NAME]`:
// run the simulation; a failing seed prints its replay command and its shortest trace.
import { parseArgs } from 'node:util';
import type { InjectedFault } from '../../src/faults/injected.js';
import { runSeed, type SimResult, type SimSettings } from './run.js';
import { shrink } from './shrink.js';

const { values } = parseArgs({
  options: {
    seed: { type: 'string' },
    seeds: { type: 'string', default: '100' },
    from: { type: 'string', default: '1' },
    steps: { type: 'string', default: '60' },
    fault: { type: 'string', multiple: true, default: [] },
    skip: { type: 'string', default: '' },
    set: { type: 'string', multiple: true, default: [] },
    'no-shrink': { type: 'boolean', default: false },
    verbose: { type: 'boolean', default: false },
  },
});

const steps = Number(values.steps);
// `--set gracePeriodMs=0`: replace a drawn setting (SimSettings).
const settings: SimSettings = Object.fromEntries((values.set as string[]).map((kv) => {
  const [k, v] = kv.split('=');
  return [k, Number(v)];
}));
const faults = values.fault as InjectedFault[];
const report = (r: SimResult) => {
  const faultArgs = faults.map((f) => ` --fault ${f}`).join('') + (values.set as string[]).map((kv) => ` --set ${kv}`).join('');
  process.stdout.write(`seed ${r.seed} FAILED at step ${r.failure!.step}: ${r.failure!.message}\n`);
  const skipArg = r.skipped && r.skipped.length > 0 ? ` --skip ${r.skipped.join(',')}` : '';
  process.stdout.write(`replay: npm run sim -- --seed ${r.seed} --steps ${r.steps}${skipArg}${faultArgs}\n`);
  process.stdout.write(`trace:\n  ${r.trace.join('\n  ')}\n`);
  if (values.verbose) process.stdout.write(`log (last lines):\n  ${r.log.join('\n  ')}\n`);
};

const seeds = values.seed !== undefined ? [Number(values.seed)] : Array.from({ length: Number(values.seeds) }, (_, i) => Number(values.from) + i);
const realNow = performance.now.bind(performance);
const started = realNow();
let failed = 0;
for (const seed of seeds) {
  const skip = new Set(values.skip === '' ? [] : values.skip.split(',').map(Number));
  let r = await runSeed({ seed, steps, faults, skip, settings });
  if (r.failure) {
    failed++;
    if (!values['no-shrink'] && skip.size === 0) r = await shrink(r, faults, 200, settings);
    report(r);
  } else if (values.verbose) process.stdout.write(`seed ${seed} ok\n  ${r.trace.join('\n  ')}\n`);
}
process.stdout.write(`${seeds.length} seeds, ${steps} steps each: ${failed} failed (${((realNow() - started) / 1000).toFixed(1)} s)\n`);
process.exit(failed > 0 ? 1 : 0);
