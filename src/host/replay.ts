// Replay of a durable volume's log (DESIGN.md: flush mode `durable`; store/log.ts) when
// another host takes the volume over from a holder that did not release it: the records
// written after the latest manifest, by the holder that wrote it, are applied onto the
// volume in sequence order. The caller then writes a manifest of the result before the
// volume takes a write, so a later replay never chains across generations.
//
// Fencing: only records of the manifest's generation (its writer's) are read. A stale
// holder (its lease taken, then a new manifest written) has another generation than the
// manifest, so its late records are never applied.
import type { StoreCipher } from '../crypto/cipher.js';
import type { ObjectStore } from '../objectstore/types.js';
import { readVolumeLog } from '../store/log.js';
import type { ManifestMeta } from '../store/manifest.js';
import type { Volume } from '../volume/volume.js';
import { injected } from '../faults/injected.js';

export interface Replayed {
  /** Log entries applied. */
  records: number;
  /** Log objects read. */
  objects: number;
  /** The sequence the volume was recovered to (the last record's). */
  sequence: number;
}

/**
 * Apply onto `volume` (holding the content of the manifest `meta`) the log entries its
 * writer put after it; undefined when there are none. The volume stays read-only to its
 * clients: `asWriter` makes it writable for exactly the call it runs (each write, zero and
 * the synchronous start of a resize, where the volume checks it). Its sequence ends at the
 * last entry's, and its local state is flushed. `keys`: the log objects read (once a
 * manifest covers them, sweepLogObjects deletes them).
 */
export async function replayLog(
  store: ObjectStore,
  cipher: StoreCipher,
  volume: Volume,
  meta: ManifestMeta,
  asWriter: <T>(call: () => T) => T,
): Promise<{ replayed: Replayed; keys: string[] } | undefined> {
  const { entries, keys } = await readVolumeLog(store, cipher, meta.host, volume.name, meta.generation, meta.sequence);
  if (entries.length === 0 || injected.has('durable-skip-replay')) return undefined;
  for (const entry of entries) {
    if (entry.size > volume.size) await asWriter(() => volume.resize(entry.size));
    for (const extent of entry.extents) {
      if (extent.zero) asWriter(() => volume.zero(extent.offset, extent.length, { noHole: false, fast: false }));
      else asWriter(() => volume.write(extent.offset, extent.data!));
    }
  }
  const last = entries[entries.length - 1].sequence;
  // The writer's numbering: a sequence the store has seen is not reused for other content.
  if (last > volume.sequence) volume.sequence = last;
  await volume.flush();
  return { replayed: { records: entries.length, objects: keys.length, sequence: volume.sequence }, keys };
}
