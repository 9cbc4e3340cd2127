// A refcount database of one backend and a file:// store in a fresh folder, for the GC
// suite's tests that drive PackRefcounts without a daemon.
import { mkdir } from 'node:fs/promises';
import path from 'node:path';
import { openGcDatabase, type SqlDatabase } from '../../src/gc/sql.js';
import { openObjectStore } from '../../src/objectstore/index.js';
import type { ObjectStore } from '../../src/objectstore/types.js';
import type { GcBackend } from './gc.js';
import { removeDir, scratchDir } from './daemon.js';

/** Opened for the test `t`; closed and removed after it. `name` tells the folder and the database apart. */
export async function gcScratch(
  t: { after(fn: () => Promise<void>): void },
  backend: GcBackend,
  name: string,
): Promise<{ dir: string; db: SqlDatabase; store: ObjectStore }> {
  const gc = await backend.gcToml(`${name}${Date.now().toString(36)}`);
  const dir = await scratchDir(`updraft-gc-${name}-`);
  await mkdir(path.join(dir, 'store'));
  const db = openGcDatabase(typeof gc.database_url === 'string' ? gc.database_url : '', dir);
  const store = openObjectStore(`file://${dir}/store`, {});
  t.after(async () => {
    await db.close();
    await store.close();
    await removeDir(dir);
  });
  return { dir, db, store };
}
