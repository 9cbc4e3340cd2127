// A memory-limited cgroup for a test daemon (StartDaemonOptions.cgroup): a child of this
// process's own memory cgroup under cgroup v1, or of the root under v2. Needs root.
import { mkdirSync, readFileSync, rmdirSync, writeFileSync } from 'node:fs';
import path from 'node:path';

export interface MemoryCgroup {
  dir: string;
  /** Removes the cgroup once the processes in it have exited. */
  remove(): Promise<void>;
}

/** A new cgroup whose memory limit is `limitBytes`, or why this machine cannot make one. */
export function memoryCgroup(name: string, limitBytes: number): MemoryCgroup | { unavailable: string } {
  const root = '/sys/fs/cgroup';
  let parent: string;
  let limitFile: string;
  const own = readFileSync('/proc/self/cgroup', 'utf8').split('\n');
  const v1 = own.map((line) => line.split(':')).find((parts) => parts.length >= 3 && parts[1].split(',').includes('memory'));
  if (v1 !== undefined) {
    parent = path.join(root, 'memory', v1.slice(2).join(':'));
    limitFile = 'memory.limit_in_bytes';
  } else {
    let controllers = '';
    try {
      controllers = readFileSync(path.join(root, 'cgroup.subtree_control'), 'utf8');
    } catch {
      // Not the unified hierarchy at root.
    }
    if (!controllers.split(/\s+/).includes('memory')) return { unavailable: 'no memory cgroup controller this test can use (v1, or v2 with memory enabled at the root)' };
    parent = root;
    limitFile = 'memory.max';
  }
  const dir = path.join(parent, `${name}-${process.pid}`);
  try {
    mkdirSync(dir);
    writeFileSync(path.join(dir, limitFile), String(limitBytes));
  } catch (err) {
    return { unavailable: `cannot make a memory cgroup at ${dir}: ${(err as Error).message}` };
  }
  return {
    dir,
    async remove() {
      // The kernel lets the last process's exit settle before the cgroup can go.
      for (let attempt = 0; ; attempt++) {
        try {
          rmdirSync(dir);
          return;
        } catch (err) {
          if (attempt >= 50) throw new Error(`cannot remove cgroup ${dir}: ${(err as Error).message}`);
          await new Promise((resolve) => setTimeout(resolve, 100));
        }
      }
    },
  };
}
