// Long fuzzing passes (docs/fuzzing.md):
//   npm run fuzz -- --target manifest --seconds 600    one target
//   npm run fuzz -- --seconds 60                       every target, one after another
//   npm run fuzz -- --target pack --seconds 600 --grow add new interesting inputs to the checked-in corpus
//   npm run fuzz -- --make-seeds                       rewrite the seed-* files from the encoders
// Exits 1 when a target found something; its input is printed in base64 and kept in the work folder.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { ROOT, runTarget, TARGETS, type Target } from './jazzer.js';
import { seedsOf } from './seeds.js';

const { values } = parseArgs({
  options: {
    target: { type: 'string', multiple: true },
    seconds: { type: 'string', default: '60' },
    grow: { type: 'boolean', default: false },
    'make-seeds': { type: 'boolean', default: false },
    'work-dir': { type: 'string' },
  },
});

const targets = (values.target ?? [...TARGETS]) as Target[];
for (const target of targets) {
  if (!TARGETS.includes(target)) throw new Error(`unknown target ${JSON.stringify(target)}; the targets are ${TARGETS.join(', ')}`);
}

if (values['make-seeds']) {
  for (const target of targets) {
    const dir = path.join(ROOT, 'test/fuzz/corpus', target);
    fs.mkdirSync(dir, { recursive: true });
    for (const file of fs.readdirSync(dir)) if (file.startsWith('seed-')) fs.rmSync(path.join(dir, file));
    for (const [name, bytes] of Object.entries(await seedsOf(target))) fs.writeFileSync(path.join(dir, `seed-${name}`), bytes);
    console.log(`${target}: seeds written to ${path.relative(ROOT, dir)}`);
  }
  process.exit(0);
}

const seconds = Number(values.seconds);
if (!Number.isInteger(seconds) || seconds < 1) throw new Error(`--seconds ${values.seconds}: expected a whole number of seconds, 1 or more`);
const workDir = values['work-dir'] ?? fs.mkdtempSync(path.join(os.tmpdir(), 'updraft-fuzz-'));
let failed = false;
for (const target of targets) {
  const run = await runTarget({ target, seconds, workDir, growCorpus: values.grow });
  console.log(`${target}: ${run.executions} executions in ${seconds} s, ${run.coverage} edges covered, exit ${run.code}`);
  if (run.code !== 0) {
    failed = true;
    console.log(run.output);
    if (run.crash) console.log(`${target}: crashing input (base64): ${run.crash.toString('base64')}`);
  }
}
console.log(`work folder (new inputs, crash files): ${workDir}`);
process.exit(failed ? 1 : 0);
