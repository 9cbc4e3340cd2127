// GC for a daemon or a command, from the config: the refcount database (embedded SQLite
// in the cache folder, or PostgreSQL), the refcounts over it, and the collector.
import type { Config } from '../config/config.js';
import type { Logger } from '../log.js';
import type { StoreCipher } from '../crypto/cipher.js';
import { clockKey, StoreClock } from '../objectstore/clock.js';
import type { ObjectStore } from '../objectstore/types.js';
import type { PackIndex } from '../store/pack-index.js';
import { Collector } from './collector.js';
import { PackRefcounts } from './refcounts.js';
import { openGcDatabase } from './sql.js';

/**
 * How long after its intent a manifest PUT may still land: a file:// put is a local
 * rename, but a write in flight in another process must be given time; this host gives
 * an s3:// put up at [storage] request_deadline_s, but a stalled server may still apply
 * one it received, so the settle time stays well past that.
 */
function settleMsOf(storage: Config['storage']): number {
  return storage.url.startsWith('file:') ? 60_000 : Math.max(300_000, 2 * storage.requestDeadlineMs);
}

export interface Gc {
  refcounts: PackRefcounts;
  /** The store's clock intents are aged on; the daemon's host judges leases on the same one. */
  clock: StoreClock;
  collector: Collector;
  close(): Promise<void>;
}

/**
 * Open the refcount database named by `[gc] database_url` (creating the schema). The
 * daemon (`daemon: true`) then resolves its own unfinished manifest writes (a crash left
 * them): those that landed are committed, the rest reverted (at once on file://: the
 * process that wrote them is gone; on s3:// once a PUT can no longer land). A command
 * records its writes under its own id (host/cli-PID), so a daemon starting meanwhile
 * never takes them for its own dead ones.
 */
export async function openGc(config: Config, store: ObjectStore, cipher: StoreCipher, hostId: string, log: Logger, opts: { daemon: boolean; packIndex?: PackIndex }): Promise<Gc> {
  const db = openGcDatabase(config.gc.databaseUrl, config.cache.dir, log);
  try {
    const settleMs = settleMsOf(config.storage);
    const writer = opts.daemon ? hostId : `${hostId}/cli-${process.pid}`;
    const clock = new StoreClock(store, clockKey(opts.daemon ? hostId : 'cli'));
    const refcounts = await PackRefcounts.open(db, { hostId: writer, store, settleMs, log, storeTime: () => clock.now() });
    if (opts.daemon) {
      const resolved = await refcounts.resolveIntents({ host: hostId, settleMs: config.storage.url.startsWith('file:') ? 0 : settleMs });
      if (resolved.committed + resolved.reverted + resolved.pending > 0) log.info('resolved unfinished manifest writes of this host', { ...resolved });
    }
    const collector = new Collector(refcounts, store, cipher, config.gc, log, opts.packIndex);
    return {
      refcounts,
      clock,
      collector,
      async close() {
        await collector.stop();
        await db.close();
      },
    };
  } catch (err) {
    await db.close().catch(() => undefined);
    throw err;
  }
}
