// The refcount tables (gc/refcounts.ts), one schema for SQLite and PostgreSQL, and the
// migrations from older versions, run at open in one transaction:
//   gc_packs       id, refs, state ('live' | 'deleting'), zero_since (ms; set while refs = 0)
//   gc_manifests   key → etag of the object whose packs are counted, set_id of its set
//   gc_sets        id, refs: the keys (gc_manifests rows) and intents that hold the set (an
//                  intent that changes its key's own set in place does not: the row does)
//   gc_set_packs   (set_id, pack): the packs of that set
//   gc_intents     a manifest write between its increments and its PUT's outcome, with the
//                  condition its PUT carries (put_condition: the etag of If-Match, '*' for
//                  If-None-Match; NULL for intents recorded before schema 3: unknown)
//   gc_meta        database id, schema version, last reconciliation
import crypto from 'node:crypto';
import type { Logger } from '../log.js';
import type { SqlDatabase } from './sql.js';

/** The schema this code reads and writes, in gc_meta 'schema'. Version 1 counted packs per key (gc_manifest_packs); 2 had no put_condition. */
const SCHEMA_VERSION = 3;

const SCHEMA = [
  `CREATE TABLE IF NOT EXISTS gc_packs (id TEXT PRIMARY KEY, refs BIGINT NOT NULL, state TEXT NOT NULL, zero_since BIGINT)`,
  `CREATE INDEX IF NOT EXISTS gc_packs_unreferenced ON gc_packs (zero_since) WHERE refs = 0`,
  `CREATE TABLE IF NOT EXISTS gc_manifests (key TEXT PRIMARY KEY, etag TEXT NOT NULL, set_id TEXT NOT NULL)`,
  `CREATE TABLE IF NOT EXISTS gc_sets (id TEXT PRIMARY KEY, refs BIGINT NOT NULL)`,
  // No index by pack: each manifest written adds its new packs' rows at random places in
  // one, which makes a fork's rows several times slower to write (docs/benchmarks.md).
  // Only reconciliation counts by pack (one GROUP BY over the table, and a scan per
  // drifted pack).
  `CREATE TABLE IF NOT EXISTS gc_set_packs (set_id TEXT NOT NULL, pack TEXT NOT NULL, PRIMARY KEY (set_id, pack))`,
  `CREATE TABLE IF NOT EXISTS gc_intents (id TEXT PRIMARY KEY, key TEXT NOT NULL, set_id TEXT NOT NULL, body_hash TEXT NOT NULL, host TEXT NOT NULL,
     created BIGINT NOT NULL, added TEXT NOT NULL, dropped TEXT NOT NULL, put_condition TEXT)`,
  `CREATE INDEX IF NOT EXISTS gc_intents_key ON gc_intents (key)`,
];

/**
 * Schema 1 → 2, in one transaction: each key's rows become a set of its own named by
 * the key (new sets get random UUIDs, so the names cannot meet), held by its row, or by
 * the unresolved intents of a key with no row yet.
 */
const MIGRATE_1_TO_2 = [
  `ALTER TABLE gc_manifests ADD COLUMN set_id TEXT`,
  `UPDATE gc_manifests SET set_id = key`,
  `ALTER TABLE gc_intents ADD COLUMN set_id TEXT`,
  `UPDATE gc_intents SET set_id = key`,
  `CREATE TABLE gc_sets (id TEXT PRIMARY KEY, refs BIGINT NOT NULL)`,
  `INSERT INTO gc_sets (id, refs) SELECT key, 1 FROM gc_manifests`,
  `INSERT INTO gc_sets (id, refs) SELECT key, count(*) FROM gc_intents i WHERE NOT EXISTS (SELECT 1 FROM gc_manifests m WHERE m.key = i.key) GROUP BY key`,
  `CREATE TABLE gc_set_packs (set_id TEXT NOT NULL, pack TEXT NOT NULL, PRIMARY KEY (set_id, pack))`,
  `INSERT INTO gc_set_packs (set_id, pack) SELECT key, pack FROM gc_manifest_packs`,
  `DROP TABLE gc_manifest_packs`,
];

/** Schema 2 → 3: intents record their PUT's condition (unknown for those already there). */
const MIGRATE_2_TO_3 = [`ALTER TABLE gc_intents ADD COLUMN put_condition TEXT`];

/** PostgreSQL's codes for losing a concurrent CREATE or ALTER: unique violation (on the catalog), duplicate column, duplicate table. */
const CONCURRENT_DDL_CODES = new Set(['23505', '42701', '42P07']);

/** Create the tables if missing (or migrate older ones) in `db`; returns the database id. */
export async function openSchema(db: SqlDatabase, log: Logger): Promise<string> {
  const create = () =>
    db.tx(async (tx) => {
      await tx.run(`CREATE TABLE IF NOT EXISTS gc_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)`);
      const meta = new Map((await tx.all<{ name: string; value: string }>(`SELECT name, value FROM gc_meta WHERE name IN ('database_id', 'schema')`)).map((r) => [r.name, r.value]));
      // A database with an id and no schema version was made by schema 1.
      const version = meta.has('schema') ? Number(meta.get('schema')) : meta.has('database_id') ? 1 : SCHEMA_VERSION;
      if (!(version >= 1 && version <= SCHEMA_VERSION)) {
        throw new Error(`gc database ${db.description}: schema version ${meta.get('schema')} is newer than this updraft reads (${SCHEMA_VERSION}); upgrade updraft`);
      }
      if (version === 1) {
        for (const statement of MIGRATE_1_TO_2) await tx.run(statement);
        log.info('gc database: migrated the refcount schema 1 -> 2 (pack sets)', { database: db.description });
      }
      if (version <= 2) {
        for (const statement of MIGRATE_2_TO_3) await tx.run(statement);
        log.info('gc database: migrated the refcount schema 2 -> 3 (intents record their PUT condition)', { database: db.description });
      }
      for (const statement of SCHEMA) await tx.run(statement);
      await tx.run(`INSERT INTO gc_meta (name, value) VALUES ('database_id', $1) ON CONFLICT (name) DO NOTHING`, [crypto.randomUUID()]);
      await tx.run(`INSERT INTO gc_meta (name, value) VALUES ('schema', $1) ON CONFLICT (name) DO UPDATE SET value = excluded.value`, [String(SCHEMA_VERSION)]);
      return (await tx.all<{ value: string }>(`SELECT value FROM gc_meta WHERE name = 'database_id'`))[0].value;
    });
  try {
    return await create();
  } catch (err) {
    // Two hosts creating (or migrating) the schema at once on PostgreSQL: one loses on
    // the catalog or on a column the other added; the tables are there now.
    const code = (err as { cause?: { code?: string } }).cause?.code;
    if (code === undefined || !CONCURRENT_DDL_CODES.has(code)) throw err;
    return create();
  }
}
