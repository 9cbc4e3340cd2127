// `updraft scrub`: read every pack any manifest or checkpoint in the store names, check
// the pack against its id and every block against its hash, and report what is missing
// or corrupt together with the volumes (and checkpoints) that need it (invariants 2, 3).
import type { StoreCipher } from '../crypto/cipher.js';
import { errorMessage } from '../log.js';
import type { ObjectStore } from '../objectstore/types.js';
import { decodeManifest } from '../store/manifest-decode.js';
import { decodePackIndex, packKey, unpackBlock, verifyPackId } from '../store/pack.js';
import { isManifestKey } from './collector.js';
import { eachLimit } from './each-limit.js';

export interface PackProblem {
  pack: string;
  problem: string;
  /** Volumes, and checkpoints as VOLUME@CHECKPOINT, whose manifests name the pack. */
  needed_by: string[];
}

export interface ScrubReport {
  manifests: number;
  packs: number;
  blocks: number;
  bytes: number;
  missing: PackProblem[];
  corrupt: PackProblem[];
  unreadable_manifests: Array<{ key: string; problem: string }>;
  ok: boolean;
}

const CONCURRENCY = 4;

/** "acme/vm-1" for its manifest key, "acme/vm-1@golden" for a checkpoint's. */
export function volumeOfKey(key: string): string {
  const checkpoint = /^volumes\/(.+)\/checkpoints\/([^/]+)$/.exec(key);
  if (checkpoint) return `${checkpoint[1]}@${checkpoint[2]}`;
  return key.replace(/^volumes\//, '').replace(/\/manifest$/, '');
}

export async function scrubStore(store: ObjectStore, cipher: StoreCipher, progress?: (packsDone: number, packs: number) => void): Promise<ScrubReport> {
  const report: ScrubReport = { manifests: 0, packs: 0, blocks: 0, bytes: 0, missing: [], corrupt: [], unreadable_manifests: [], ok: true };
  // pack → the blocks manifests expect in it, and who needs it.
  const needed = new Map<string, { hashes: Set<string>; users: Set<string> }>();
  for (const { key } of (await store.list('volumes/')).filter((o) => isManifestKey(o.key))) {
    const object = await store.get(key);
    if (object === undefined) continue;
    let blocks;
    try {
      blocks = decodeManifest(key, object.body, cipher).blocks;
    } catch (err) {
      report.unreadable_manifests.push({ key, problem: errorMessage(err) });
      continue;
    }
    report.manifests++;
    const user = volumeOfKey(key);
    for (const block of blocks) {
      let entry = needed.get(block.pack);
      if (entry === undefined) needed.set(block.pack, (entry = { hashes: new Set(), users: new Set() }));
      entry.hashes.add(block.hash.toString('hex'));
      entry.users.add(user);
    }
  }
  const packs = [...needed.keys()].sort();
  report.packs = packs.length;
  let done = 0;
  await eachLimit(packs, CONCURRENCY, async (pack) => {
    const { hashes, users } = needed.get(pack)!;
    const needed_by = [...users].sort();
    const key = packKey(pack);
    const object = await store.get(key);
    if (object === undefined) {
      report.missing.push({ pack: key, problem: 'missing from the store', needed_by });
    } else {
      report.bytes += object.body.length;
      try {
        verifyPackId(key, object.body);
        const entries = decodePackIndex(key, object.body, cipher);
        const held = new Set<string>();
        for (const entry of entries) {
          unpackBlock(key, object.body, entry, cipher);
          held.add(entry.hash.toString('hex'));
          report.blocks++;
        }
        const absent = [...hashes].filter((h) => !held.has(h));
        if (absent.length > 0) throw new Error(`pack ${key} does not hold block ${absent[0]}${absent.length > 1 ? ` (and ${absent.length - 1} more)` : ''} that manifests name in it`);
      } catch (err) {
        report.corrupt.push({ pack: key, problem: errorMessage(err), needed_by });
      }
    }
    progress?.(++done, packs.length);
  });
  report.missing.sort((a, b) => a.pack.localeCompare(b.pack));
  report.corrupt.sort((a, b) => a.pack.localeCompare(b.pack));
  report.ok = report.missing.length === 0 && report.corrupt.length === 0 && report.unreadable_manifests.length === 0;
  return report;
}
