// Runs one fuzz target under Jazzer.js (coverage-guided: libFuzzer driving the product
// modules in dist/src, instrumented as they are imported), and makes its prebuilt
// libFuzzer addon load on a system older than the one it was built on.
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

/** The repository root (this file runs from dist/test/fuzz/). */
export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');

/** Every target: a module dist/test/fuzz/targets/NAME.js exporting fuzz(data), and its seeds in test/fuzz/corpus/NAME/. */
export const TARGETS = ['nbd', 'manifest', 'pack', 'pack-index', 'lease', 'journal', 'identity', 'boot-set', 'config'] as const;
export type Target = (typeof TARGETS)[number];

/** The largest input libFuzzer generates per target; the seeds may be larger. */
const MAX_LEN: Partial<Record<Target, number>> = { nbd: 16384, manifest: 65536, pack: 65536, 'pack-index': 16384, journal: 16384 };

const ADDON = path.join(ROOT, 'node_modules/@jazzer.js/fuzzer/prebuilds', `fuzzer-${process.platform}-${process.arch}.node`);
const COMPAT_SOURCE = path.join(ROOT, 'test/fuzz/compat/jazzer-compat.cc');
const COMPAT_LIBRARY = path.join(ROOT, 'node_modules/.cache/updraft-fuzz/libjazzer-compat.so');
/** Symbol versions the prebuilt addon asks for that glibc 2.36 / GCC 12's libstdc++ do not have. */
const MISSING_VERSIONS = ['GLIBC_2.38', 'GLIBCXX_3.4.32'];

/** Whether the addon loads with every symbol bound at once (a lazily bound one would fail mid-run instead). */
function addonLoads(env: NodeJS.ProcessEnv): { ok: boolean; error: string } {
  const probe = spawnSync(process.execPath, ['-e', `require(${JSON.stringify(ADDON)})`], { env: { ...env, LD_BIND_NOW: '1' }, encoding: 'utf8' });
  return { ok: probe.status === 0, error: probe.stderr };
}

/**
 * Mark the named version requirements of an ELF shared object weak (VER_FLG_WEAK), so
 * the dynamic loader accepts a library that lacks them; the symbols themselves then come
 * from the preloaded compat library. Returns how many requirements were changed.
 */
export function weakenVersionNeeds(file: string, names: readonly string[]): number {
  const elf = fs.readFileSync(file);
  if (!elf.subarray(0, 4).equals(Buffer.from('\x7fELF', 'latin1')) || elf[4] !== 2 || elf[5] !== 1) {
    throw new Error(`${file}: not a 64-bit little-endian ELF file`);
  }
  const sectionsAt = Number(elf.readBigUInt64LE(0x28));
  const sectionBytes = elf.readUInt16LE(0x3a);
  const sectionCount = elf.readUInt16LE(0x3c);
  const section = (i: number) => {
    const at = sectionsAt + i * sectionBytes;
    return { type: elf.readUInt32LE(at + 4), offset: Number(elf.readBigUInt64LE(at + 24)), link: elf.readUInt32LE(at + 40), info: elf.readUInt32LE(at + 44) };
  };
  const SHT_GNU_VERNEED = 0x6ffffffe;
  const VER_FLG_WEAK = 2;
  let changed = 0;
  for (let i = 0; i < sectionCount; i++) {
    const needs = section(i);
    if (needs.type !== SHT_GNU_VERNEED) continue;
    const strings = section(needs.link).offset;
    const name = (at: number) => elf.toString('latin1', strings + at, elf.indexOf(0, strings + at));
    let need = needs.offset;
    for (let n = 0; n < needs.info; n++) {
      let aux = need + elf.readUInt32LE(need + 8);
      for (let k = 0; k < elf.readUInt16LE(need + 2); k++) {
        const flags = elf.readUInt16LE(aux + 4);
        if (names.includes(name(elf.readUInt32LE(aux + 8))) && (flags & VER_FLG_WEAK) === 0) {
          elf.writeUInt16LE(flags | VER_FLG_WEAK, aux + 4);
          changed++;
        }
        aux += elf.readUInt32LE(aux + 12);
      }
      need += elf.readUInt32LE(need + 12);
    }
  }
  if (changed > 0) fs.writeFileSync(file, elf);
  return changed;
}

let prepared: NodeJS.ProcessEnv | undefined;

/**
 * The environment Jazzer.js runs in. Where its prebuilt addon does not load because the
 * system's glibc/libstdc++ are older than the build machine's, build the compat library
 * (g++), weaken the addon's two newer version requirements, and preload the library.
 */
export function jazzerEnv(): NodeJS.ProcessEnv {
  if (prepared) return prepared;
  if (!fs.existsSync(ADDON)) throw new Error(`Jazzer.js is not installed (${ADDON} is missing): run npm install`);
  const env = { ...process.env };
  const first = addonLoads(env);
  if (first.ok) return (prepared = env);
  if (!MISSING_VERSIONS.some((v) => first.error.includes(v)) && !/undefined symbol: (__isoc23_|_ZSt21ios_base_library_initv)/.test(first.error)) {
    throw new Error(`the Jazzer.js addon does not load: ${first.error.trim()}`);
  }
  if (!fs.existsSync(COMPAT_LIBRARY) || fs.statSync(COMPAT_LIBRARY).mtimeMs < fs.statSync(COMPAT_SOURCE).mtimeMs) {
    fs.mkdirSync(path.dirname(COMPAT_LIBRARY), { recursive: true });
    const build = spawnSync('g++', ['-O2', '-shared', '-fPIC', '-o', COMPAT_LIBRARY, COMPAT_SOURCE], { encoding: 'utf8' });
    if (build.status !== 0) throw new Error(`building ${COMPAT_LIBRARY} (g++) failed: ${build.stderr || build.error?.message}`);
  }
  weakenVersionNeeds(ADDON, MISSING_VERSIONS);
  env.LD_PRELOAD = [COMPAT_LIBRARY, env.LD_PRELOAD].filter(Boolean).join(':');
  const second = addonLoads(env);
  if (!second.ok) throw new Error(`the Jazzer.js addon does not load even with ${COMPAT_LIBRARY} preloaded: ${second.error.trim()}`);
  return (prepared = env);
}

export interface FuzzRun {
  target: Target;
  /** Jazzer's exit code: 0 when no finding. */
  code: number | null;
  /** Executions libFuzzer reported (corpus replay included). */
  executions: number;
  /** Edges covered at the end. */
  coverage: number;
  /** The crashing input, when there was a finding. */
  crash?: Buffer;
  /** What Jazzer said of the finding (the error and its stack), when there was one. */
  finding?: string;
  /** The last lines Jazzer printed, less the long lists of instrumented modules. */
  output: string;
}

export interface FuzzOptions {
  target: Target;
  /** Fuzz for this long (libFuzzer -max_total_time); corpus replay counts. */
  seconds: number;
  /** Where new interesting inputs go; the checked-in seeds are read, never written. */
  workDir: string;
  /** Add new interesting inputs to the checked-in corpus instead (a long pass that grows it). */
  growCorpus?: boolean;
}

/** Run one target; resolves when Jazzer exits. */
export function runTarget(options: FuzzOptions): Promise<FuzzRun> {
  const { target, seconds, workDir } = options;
  const seeds = path.join(ROOT, 'test/fuzz/corpus', target);
  const found = path.join(workDir, `${target}-corpus`);
  const artifacts = path.join(workDir, `${target}-artifacts`);
  fs.mkdirSync(found, { recursive: true });
  fs.mkdirSync(artifacts, { recursive: true });
  const corpora = options.growCorpus ? [seeds] : [found, seeds];
  const args = [
    path.join(ROOT, 'node_modules/@jazzer.js/core/dist/cli.js'),
    path.join(ROOT, 'dist/test/fuzz/targets', `${target}.js`),
    ...corpora,
    '-i', `${path.sep}dist${path.sep}src${path.sep}`,
    '--timeout', '10000',
    // Every target runs in Jazzer's async mode, the synchronous ones too: with --sync the
    // event loop never turns, so Node.js never frees the native objects (BLAKE3 hashers)
    // the decoders leave to the collector, and a pass of a few minutes reached libFuzzer's
    // 2 GB limit. The cheapest targets run slower this way (docs/fuzzing.md).
    '--',
    `-max_total_time=${seconds}`,
    `-max_len=${MAX_LEN[target] ?? 4096}`,
    '-rss_limit_mb=2048',
    `-artifact_prefix=${artifacts}${path.sep}`,
    '-print_final_stats=1',
  ];
  return new Promise((resolve, reject) => {
    // Targets that write files (journal, pack index) do so in TMPDIR: tmpfs makes their fsyncs free.
    const tmp = fs.existsSync('/dev/shm') ? { TMPDIR: '/dev/shm' } : {};
    const child = spawn(process.execPath, args, { env: { ...jazzerEnv(), ...tmp, UPDRAFT_LOG_LEVEL: 'error' }, cwd: workDir, stdio: ['ignore', 'pipe', 'pipe'] });
    // The tail of the output is all a report needs; keep it bounded.
    let output = '';
    const keep = (chunk: Buffer) => {
      output = (output + chunk.toString('utf8')).slice(-64 * 1024);
    };
    child.stdout.on('data', keep);
    child.stderr.on('data', keep);
    child.on('error', reject);
    child.on('close', (code) => {
      // The final stats of an async target can be cut off at exit; the last status line ("#N NEW ...") then says.
      const statusLines = [...output.matchAll(/^#(\d+)\s/gm)];
      const executions = Number(
        /stat::number_of_executed_units:\s*(\d+)/.exec(output)?.[1] ?? (statusLines.length ? statusLines[statusLines.length - 1][1] : 0),
      );
      const covered = [...output.matchAll(/\bcov: (\d+)/g)];
      const coverage = covered.length ? Number(covered[covered.length - 1][1]) : 0;
      const crashFile = fs.readdirSync(artifacts).find((f) => /^(crash|timeout|oom|leak)-/.test(f));
      const lines = output.split('\n').filter((line) => !/^INFO: Loaded \d+ (modules|PC tables)/.test(line));
      // A finding starts "==PID== " (an uncaught exception, a timeout, an OOM) and its stack ends at libFuzzer's "MS:" line.
      const first = lines.findIndex((line) => /^==\d+== /.test(line));
      const last = lines.findIndex((line, i) => i > first && /^(MS:|SUMMARY:|artifact_prefix=)/.test(line));
      resolve({
        target,
        code,
        executions,
        coverage,
        crash: crashFile ? fs.readFileSync(path.join(artifacts, crashFile)) : undefined,
        finding: first >= 0 ? lines.slice(first, last > first ? last : first + 20).join('\n') : undefined,
        output: lines.slice(-40).join('\n'),
      });
    });
  });
}
