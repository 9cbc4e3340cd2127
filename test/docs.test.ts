// The documentation holds together: every relative link of every Markdown page in the
// repository names a file that exists and, with a #fragment, a heading of that page (as
// GitHub makes anchors); no page names a path outside the repository; and test/README.md
// says what each test file proves.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';

const ROOT = fileURLToPath(new URL('../../', import.meta.url));
const SKIP = new Set(['node_modules', 'dist', '.git', '.updraft', 'corpus']);

function markdownFiles(dir: string): string[] {
  return fs.readdirSync(dir, { withFileTypes: true }).flatMap((entry) => {
    if (SKIP.has(entry.name)) return [];
    const file = path.join(dir, entry.name);
    if (entry.isDirectory()) return markdownFiles(file);
    return entry.name.endsWith('.md') ? [file] : [];
  });
}

/** `text` without fenced code blocks and inline code (links in them are not links). */
function prose(text: string): string {
  return text.replace(/^```[\s\S]*?^```/gm, '').replace(/`[^`\n]*`/g, '');
}

/** GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens. */
export function anchorOf(heading: string): string {
  return heading
    .trim()
    .toLowerCase()
    .replace(/`/g, '')
    .replace(/[^\p{L}\p{N}\s_-]/gu, '')
    .replace(/\s/g, '-');
}

function anchorsOf(file: string): Set<string> {
  const anchors = new Set<string>();
  const seen = new Map<string, number>();
  for (const m of fs.readFileSync(file, 'utf8').replace(/^```[\s\S]*?^```/gm, '').matchAll(/^#{1,6}\s+(.+)$/gm)) {
    const base = anchorOf(m[1]);
    const n = seen.get(base) ?? 0;
    seen.set(base, n + 1);
    anchors.add(n === 0 ? base : `${base}-${n}`);
  }
  return anchors;
}

test('GitHub anchors: punctuation is dropped and spaces become hyphens', () => {
  assert.equal(anchorOf('fsync-failure.test.ts: a failed fdatasync fails the volume'), 'fsync-failuretestts-a-failed-fdatasync-fails-the-volume');
  assert.equal(anchorOf('Many volumes, FLUSH'), 'many-volumes-flush');
  assert.equal(anchorOf('`updraft run` and the daemon'), 'updraft-run-and-the-daemon');
});

test('every relative link in the Markdown pages resolves to a file, and every #fragment to a heading of it', () => {
  const broken: string[] = [];
  let checked = 0;
  for (const file of markdownFiles(ROOT)) {
    const where = path.relative(ROOT, file);
    for (const m of prose(fs.readFileSync(file, 'utf8')).matchAll(/\]\(([^)\s]+)\)/g)) {
      const link = m[1];
      if (/^[a-z]+:/i.test(link)) continue; // http:, mailto: …
      checked++;
      const [target, fragment] = link.split('#');
      const targetFile = target === '' ? file : path.resolve(path.dirname(file), target);
      if (!fs.existsSync(targetFile)) {
        broken.push(`${where}: ${link}: no such file`);
      } else if (fragment !== undefined && targetFile.endsWith('.md') && !anchorsOf(targetFile).has(fragment)) {
        broken.push(`${where}: ${link}: no heading with that anchor`);
      } else if (!path.resolve(targetFile).startsWith(ROOT)) {
        broken.push(`${where}: ${link}: outside the repository`);
      }
    }
  }
  assert.ok(checked > 50, `only ${checked} links found: the link reader broke`);
  assert.deepEqual(broken, []);
});

test('no Markdown page names a path outside the repository', () => {
  const outside: string[] = [];
  for (const file of markdownFiles(ROOT)) {
    const text = fs.readFileSync(file, 'utf8');
    for (const m of text.matchAll(/(^|[\s(`'"])((?:\/work|\/tmp|\.\.\/shared|\.\.\/\.\.)\/[^\s)`'"]*)/gm)) {
      outside.push(`${path.relative(ROOT, file)}: ${m[2]}`);
    }
  }
  assert.deepEqual(outside, []);
});

test('test/README.md names every test file', () => {
  const readme = fs.readFileSync(path.join(ROOT, 'test', 'README.md'), 'utf8');
  const missing = fs
    .readdirSync(path.join(ROOT, 'test'))
    .filter((name) => name.endsWith('.test.ts') && !readme.includes(`\`${name}\``));
  assert.deepEqual(missing, []);
});
