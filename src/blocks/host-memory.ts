// The memory this daemon may hold: the host's (/proc/meminfo) and, when it runs in a
// memory-limited cgroup (v2 or v1), that cgroup's limit. The memory tier is checked
// against it: a tier larger than the memory the daemon could ever have is refused at
// start-up, and one that does not fit now is not faulted in at once (memory_pretouch).
import { readFileSync } from 'node:fs';
import path from 'node:path';

/** cgroup limits at or above this mean "no limit" (v1 reports 2^63 rounded down to a page). */
const UNLIMITED = 2 ** 60;

export interface HostMemory {
  /** The most this process could ever hold: the host's memory, or its cgroup's limit if lower. */
  totalBytes: number;
  /**
   * What it may take now without the kernel killing or swapping something for it: the
   * host's MemAvailable, or the cgroup's limit less its usage if that is less (inactive
   * file pages, which the kernel reclaims first, count as room).
   */
  availableBytes: number;
  /** What bounds totalBytes: the host's memory or the cgroup's limit. */
  limit: 'host' | 'cgroup';
}

/** The memory of this host as this process sees it; undefined where /proc/meminfo is not there. */
export function hostMemory(procRoot = '/proc', cgroupRoot = '/sys/fs/cgroup'): HostMemory | undefined {
  const meminfo = readText(path.join(procRoot, 'meminfo'));
  if (meminfo === undefined) return undefined;
  const total = meminfoBytes(meminfo, 'MemTotal');
  if (total === undefined) return undefined;
  const memory: HostMemory = { totalBytes: total, availableBytes: meminfoBytes(meminfo, 'MemAvailable') ?? total, limit: 'host' };
  const cgroup = cgroupMemory(readText(path.join(procRoot, 'self', 'cgroup')) ?? '', cgroupRoot);
  if (cgroup !== undefined) {
    if (cgroup.limit < memory.totalBytes) {
      memory.totalBytes = cgroup.limit;
      memory.limit = 'cgroup';
    }
    memory.availableBytes = Math.min(memory.availableBytes, Math.max(0, cgroup.limit - cgroup.usage + cgroup.inactiveFile));
  }
  return memory;
}

/** The limit, usage and inactive file bytes of this process's memory cgroup, if it has a limit. */
function cgroupMemory(selfCgroup: string, root: string): { limit: number; usage: number; inactiveFile: number } | undefined {
  for (const line of selfCgroup.split('\n')) {
    const [id, controllers, where] = splitCgroupLine(line);
    if (where === undefined) continue;
    // v2: "0::/path", files in the unified hierarchy mounted at root.
    if (id === '0' && controllers === '') {
      const dir = path.join(root, where);
      const limit = cgroupNumber(readText(path.join(dir, 'memory.max')));
      if (limit === undefined) continue;
      return { limit, usage: cgroupNumber(readText(path.join(dir, 'memory.current'))) ?? 0, inactiveFile: statBytes(dir, 'inactive_file') };
    }
    // v1: "N:memory:/path" (perhaps with other controllers), files under root/memory.
    if (controllers.split(',').includes('memory')) {
      const dir = path.join(root, 'memory', where);
      const limit = cgroupNumber(readText(path.join(dir, 'memory.limit_in_bytes')));
      if (limit === undefined) continue;
      return { limit, usage: cgroupNumber(readText(path.join(dir, 'memory.usage_in_bytes'))) ?? 0, inactiveFile: statBytes(dir, 'total_inactive_file') };
    }
  }
  return undefined;
}

/** "id:controllers:path", the path keeping any colons it has. */
function splitCgroupLine(line: string): [string, string, string | undefined] {
  const first = line.indexOf(':');
  const second = first < 0 ? -1 : line.indexOf(':', first + 1);
  if (second < 0) return ['', '', undefined];
  return [line.slice(0, first), line.slice(first + 1, second), line.slice(second + 1)];
}

/** A cgroup file's number; undefined for "max", a value meaning no limit, or no file. */
function cgroupNumber(text: string | undefined): number | undefined {
  const value = Number(text?.trim());
  return text === undefined || !Number.isFinite(value) || value >= UNLIMITED ? undefined : value;
}

function statBytes(dir: string, key: string): number {
  const match = new RegExp(`^${key} (\\d+)$`, 'm').exec(readText(path.join(dir, 'memory.stat')) ?? '');
  return match === null ? 0 : Number(match[1]);
}

function meminfoBytes(meminfo: string, key: string): number | undefined {
  const match = new RegExp(`^${key}:\\s+(\\d+) kB$`, 'm').exec(meminfo);
  return match === null ? undefined : Number(match[1]) * 1024;
}

function readText(file: string): string | undefined {
  try {
    return readFileSync(file, 'utf8');
  } catch {
    return undefined;
  }
}
