// Volume names (DESIGN.md, Formats): 1–200 characters of [A-Za-z0-9._-] in
// '/'-separated segments; no empty, '.' or '..' segment. Checked before a name
// reaches a path or an object key.

const SEGMENT = /^[A-Za-z0-9._-]+$/;
export const MAX_VOLUME_NAME = 200;

/** Why `name` is not a valid volume name, or undefined when it is. */
export function volumeNameProblem(name: string): string | undefined {
  if (typeof name !== 'string' || name.length === 0) return 'volume name is empty';
  if (name.length > MAX_VOLUME_NAME) return `volume name is ${name.length} characters; at most ${MAX_VOLUME_NAME} are allowed`;
  for (const segment of name.split('/')) {
    if (segment === '') return `volume name ${JSON.stringify(name)} has an empty segment`;
    if (segment === '.' || segment === '..') return `volume name ${JSON.stringify(name)} has a '${segment}' segment`;
    if (!SEGMENT.test(segment)) return `volume name ${JSON.stringify(name)} has a character outside [A-Za-z0-9._-/]`;
  }
  return undefined;
}
