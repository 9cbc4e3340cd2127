// Data flows down; nothing imports upward (docs/architecture.md, "Layers"). Every import
// of every file under src/ (static, `export ... from`, dynamic and `typeof import()`,
// type-only ones included) is read from the TypeScript source and checked against the
// layer order below, which must be the order docs/architecture.md lists.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { importsOf, uncheckedImports } from './harness/imports.js';

const ROOT = fileURLToPath(new URL('../../', import.meta.url));
const SRC = path.join(ROOT, 'src');

/**
 * Top to bottom. A folder may import only folders on later lines; folders on one line
 * are peers and import nothing of each other. `log` is src/log.ts.
 */
const LAYERS: readonly (readonly string[])[] = [
  ['cli'],
  ['api'],
  ['nbd'],
  ['host'],
  ['gc'],
  ['store'],
  ['volume'],
  ['blocks'],
  ['objectstore'],
  ['config', 'crypto', 'disk', 'faults'],
  ['log'],
];

const rank = new Map<string, number>(LAYERS.flatMap((line, i) => line.map((folder) => [folder, i] as const)));

function sourceFiles(dir: string): string[] {
  return fs.readdirSync(dir, { withFileTypes: true }).flatMap((entry) => {
    const file = path.join(dir, entry.name);
    if (entry.isDirectory()) return sourceFiles(file);
    return entry.name.endsWith('.ts') ? [file] : [];
  });
}

/** The layer a file under src/ belongs to: its folder, or its name for a file at src/ itself. */
function layerOf(file: string): string {
  const [first, ...rest] = path.relative(SRC, file).split(path.sep);
  return rest.length === 0 ? first.replace(/\.(d\.)?ts$/, '') : first;
}

/** Every import under src/ that runs up (or sideways) across the layers, one line each. */
function upwardImports(): string[] {
  const problems: string[] = [];
  for (const file of sourceFiles(SRC)) {
    const from = layerOf(file);
    const where = path.relative(ROOT, file);
    if (!rank.has(from)) {
      problems.push(`${where}: src/${from} is in no layer (add it to docs/architecture.md's layers and to LAYERS here)`);
      continue;
    }
    const text = fs.readFileSync(file, 'utf8');
    for (const line of uncheckedImports(text)) problems.push(`${where}:${line}: a dynamic import of a computed module cannot be checked`);
    for (const { specifier, line } of importsOf(text)) {
      if (!specifier.startsWith('.')) continue; // a package or node: builtin
      const target = path.resolve(path.dirname(file), specifier).replace(/\.js$/, '.ts');
      if (!target.startsWith(SRC + path.sep)) {
        problems.push(`${where}:${line}: imports ${specifier}, outside src/`);
        continue;
      }
      const to = layerOf(target);
      if (to === from) continue;
      if (!rank.has(to)) {
        problems.push(`${where}:${line}: imports ${specifier}; src/${to} is in no layer`);
      } else if (rank.get(to)! <= rank.get(from)!) {
        const how = rank.get(to) === rank.get(from) ? 'sideways to its peer' : 'up to';
        problems.push(`${where}:${line}: ${from}/ imports ${how} ${to}/ (${specifier})`);
      }
    }
  }
  return problems;
}

test('the import reader finds static, type-only, re-exported, side-effect and dynamic imports, and none in comments or strings', () => {
  const source = [
    `import { a } from '../x/a.js';`,
    `import type {`,
    `  B,`,
    `} from "../y/b.js";`,
    `export * from './c.js';`,
    `import '../z/side.js';`,
    `// import { gone } from '../comment/line.js';`,
    `/* import { gone } from '../comment/block.js'; */`,
    `const s = "import { gone } from '../string/x.js'";`,
    `const r = /'/g; const t = \`\${r} from '../template/x.js'\`;`,
    `type M = typeof import('../typeof/m.js');`,
    `const later = () => import('../dynamic/d.js');`,
  ].join('\n');
  assert.deepEqual(
    importsOf(source).map((i) => `${i.line} ${i.specifier}`).sort(),
    ['1 ../x/a.js', '11 ../typeof/m.js', '12 ../dynamic/d.js', '2 ../y/b.js', '5 ./c.js', '6 ../z/side.js'],
  );
  assert.deepEqual(uncheckedImports(`const m = await import(\`./t/\${name}.js\`);`), [1]);
});

test('docs/architecture.md lists the layers in the order this test enforces', () => {
  const doc = fs.readFileSync(path.join(ROOT, 'docs', 'architecture.md'), 'utf8');
  const block = /## Layers\n[\s\S]*?```\n([\s\S]*?)```/.exec(doc);
  assert.ok(block, 'docs/architecture.md has a "## Layers" section with the layers in a code block');
  // One layer a line: "name/ …" for a folder, or "a/ b/ c/  …" for peers; log.ts is "log".
  const listed = block[1]
    .split('\n')
    .filter((line) => /^\S/.test(line))
    .map((line) => [...line.matchAll(/^(?:([a-z]+)(?:\/|\.ts)\s*)+/g)][0][0].trim().split(/\s+/).map((name) => name.replace(/(\/|\.ts)$/, '')));
  assert.deepEqual(listed, LAYERS);
});

test('no import under src/ runs up the layers', () => {
  const problems = upwardImports();
  assert.deepEqual(problems, [], `imports against the layers:\n${problems.join('\n')}`);
});
