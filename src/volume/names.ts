// Volume names (DESIGN.md, Formats): 1–200 characters of [A-Za-z0-9._-] in
// '/'-separated segments; no empty, '.' or '..' segment. Checked before a name
// reaches a path or an object key.
//
// A volume's objects live under volumes/{name}/ as manifest, lease, bootset and checkpoints/, so
// no segment after the first may be one of those names: volume "a/lease" would keep its
// manifest at volumes/a/lease/manifest, where volume "a" keeps its lease.

const SEGMENT = /^[A-Za-z0-9._-]+$/;
const RESERVED_SEGMENTS = new Set(['manifest', 'lease', 'checkpoints', 'bootset']);
export const MAX_VOLUME_NAME = 200;

/** Why `name` is not a valid volume name, or undefined when it is. */
export function volumeNameProblem(name: string): string | undefined {
  if (typeof name !== 'string' || name.length === 0) return 'volume name is empty';
  if (name.length > MAX_VOLUME_NAME) return `volume name is ${name.length} characters; at most ${MAX_VOLUME_NAME} are allowed`;
  const segments = name.split('/');
  for (const [i, segment] of segments.entries()) {
    if (segment === '') return `volume name ${JSON.stringify(name)} has an empty segment`;
    if (i > 0 && RESERVED_SEGMENTS.has(segment)) {
      return `volume name ${JSON.stringify(name)} has a '${segment}' segment after the first; manifest, lease, bootset and checkpoints are reserved there`;
    }
    if (segment === '.' || segment === '..') return `volume name ${JSON.stringify(name)} has a '${segment}' segment`;
    if (!SEGMENT.test(segment)) return `volume name ${JSON.stringify(name)} has a character outside [A-Za-z0-9._-/]`;
  }
  return undefined;
}

/** Why `name` is not a valid checkpoint name (one segment of a volume name), or undefined. */
export function checkpointNameProblem(name: string): string | undefined {
  if (typeof name !== 'string' || name.length === 0) return 'checkpoint name is empty';
  if (name.length > 100) return `checkpoint name is ${name.length} characters; at most 100 are allowed`;
  if (name === '.' || name === '..') return `checkpoint name ${JSON.stringify(name)} is not allowed`;
  if (!SEGMENT.test(name)) return `checkpoint name ${JSON.stringify(name)} has a character outside [A-Za-z0-9._-]`;
  return undefined;
}

/** An export name VOLUME@CHECKPOINT (a checkpoint served read-only), split; undefined for a plain name. */
export function splitCheckpointExport(name: string): { volume: string; checkpoint: string } | undefined {
  const at = name.lastIndexOf('@');
  if (at < 0) return undefined;
  return { volume: name.slice(0, at), checkpoint: name.slice(at + 1) };
}
