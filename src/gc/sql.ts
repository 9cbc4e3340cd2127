// The SQL database of pack refcounts (DESIGN.md: gc/), with one interface over two
// backends: embedded SQLite (better-sqlite3, a file in the cache folder, WAL, no set-up)
// and PostgreSQL (pg Pool, shared by every host). Queries are written once, with $1..$n
// placeholders and only syntax both dialects share; SQLite gets them as ?1..?n.
//
// Every statement that writes adds the rows it touched (SQLite changes(), PostgreSQL
// rowCount, or the rows RETURNING gave back) to `rowsWritten`, so a test and a metric
// can check that a flush costs O(packs changed) whatever the number of volumes.
import fs from 'node:fs';
import path from 'node:path';
import Sqlite from 'better-sqlite3';
import pg from 'pg';
import { errorMessage, type Logger } from '../log.js';

/** One transaction: every statement runs inside it. */
export interface SqlTx {
  /** The rows of a SELECT, or of a write with RETURNING. */
  all<T = Record<string, unknown>>(sql: string, params?: readonly unknown[]): Promise<T[]>;
  /** Run a write; returns the rows it changed. */
  run(sql: string, params?: readonly unknown[]): Promise<number>;
  /**
   * `values` as one bound parameter, read back as rows of column `v` by `rows(n)` (n is
   * the parameter's number): SQLite json_each of a JSON array, PostgreSQL unnest of a
   * text[]. One statement over a fork's thousands of pack ids, about half the time of IN
   * lists of 500 parameters each on SQLite (docs/benchmarks.md).
   */
  list(values: readonly string[]): unknown;
  rows(n: number): string;
}

export interface SqlDatabase {
  readonly kind: 'sqlite' | 'postgres';
  /** For logs and errors: the file, or the URL without its password. */
  readonly description: string;
  /** Rows changed by writes since open. */
  readonly rowsWritten: number;
  /**
   * Run `work` in one transaction: committed when it resolves, rolled back when it
   * throws. May run `work` again after a deadlock or serialization failure, so `work`
   * must only compute from what it reads.
   */
  tx<T>(work: (tx: SqlTx) => Promise<T>): Promise<T>;
  close(): Promise<void>;
}

/** The database cannot be reached or refused a statement; names the database. */
export class GcDatabaseError extends Error {
  override name = 'GcDatabaseError';
}

const WRITE_STATEMENT = /^\s*(insert|update|delete)\b/i;

/** `$1` → `?1`: SQLite's numbered parameters. */
function sqliteText(sql: string): string {
  return sql.replace(/\$(\d+)/g, '?$1');
}

/** Values as better-sqlite3 binds ?1..?n: an object keyed by number (booleans as 0/1); none when there are none. */
function sqliteParams(params: readonly unknown[] | undefined): [Record<number, unknown>] | [] {
  if (params === undefined || params.length === 0) return [];
  const bound: Record<number, unknown> = {};
  params.forEach((p, i) => (bound[i + 1] = typeof p === 'boolean' ? (p ? 1 : 0) : p));
  return [bound];
}

export class SqliteDatabase implements SqlDatabase {
  readonly kind = 'sqlite';
  readonly description: string;
  rowsWritten = 0;
  private readonly db: Sqlite.Database;
  private readonly statements = new Map<string, Sqlite.Statement>();
  /** better-sqlite3 has one connection: transactions take turns. */
  private tail: Promise<unknown> = Promise.resolve();

  constructor(file: string) {
    this.description = `sqlite:${file}`;
    try {
      fs.mkdirSync(path.dirname(file), { recursive: true });
      this.db = new Sqlite(file);
      this.db.pragma('journal_mode = WAL');
      // FULL: an increment must be on disk before the manifest PUT that relies on it,
      // power loss included.
      this.db.pragma('synchronous = FULL');
      // `updraft gc` or `bless` may open the same file while the daemon runs.
      this.db.pragma('busy_timeout = 10000');
    } catch (err) {
      throw new GcDatabaseError(`gc database ${this.description}: cannot open: ${errorMessage(err)}`, { cause: err });
    }
  }

  private statement(sql: string): Sqlite.Statement {
    let statement = this.statements.get(sql);
    if (statement === undefined) {
      try {
        statement = this.db.prepare(sqliteText(sql));
      } catch (err) {
        throw new GcDatabaseError(`gc database ${this.description}: ${errorMessage(err)} in: ${sql.trim().split('\n')[0]}`, { cause: err });
      }
      // IN lists of every length make distinct texts; keep the cache bounded.
      if (this.statements.size > 512) this.statements.clear();
      this.statements.set(sql, statement);
    }
    return statement;
  }

  private readonly txApi: SqlTx = {
    all: async <T>(sql: string, params?: readonly unknown[]) => {
      const rows = this.statement(sql).all(...sqliteParams(params)) as T[];
      if (WRITE_STATEMENT.test(sql)) this.rowsWritten += rows.length;
      return rows;
    },
    run: async (sql: string, params?: readonly unknown[]) => {
      const changes = this.statement(sql).run(...sqliteParams(params)).changes;
      this.rowsWritten += changes;
      return changes;
    },
    list: (values: readonly string[]) => JSON.stringify(values),
    rows: (n: number) => `(SELECT value AS v FROM json_each($${n})) AS list`,
  };

  tx<T>(work: (tx: SqlTx) => Promise<T>): Promise<T> {
    const run = this.tail.then(async () => {
      this.db.exec('BEGIN IMMEDIATE');
      try {
        const result = await work(this.txApi);
        this.db.exec('COMMIT');
        return result;
      } catch (err) {
        if (this.db.inTransaction) this.db.exec('ROLLBACK');
        throw err;
      }
    });
    this.tail = run.catch(() => undefined);
    return run;
  }

  async close(): Promise<void> {
    await this.tail;
    this.db.close();
  }
}

/** postgres://user:secret@host/db → postgres://user:***@host/db */
export function redactUrl(url: string): string {
  return url.replace(/^([a-z][a-z0-9+.-]*:\/\/[^/:@]*):[^/@]*@/i, '$1:***@');
}

/** PostgreSQL errors worth running the transaction again for. */
const RETRY_CODES = new Set(['40P01', '40001']);
const TX_ATTEMPTS = 5;

export class PostgresDatabase implements SqlDatabase {
  readonly kind = 'postgres';
  readonly description: string;
  rowsWritten = 0;
  private readonly pool: pg.Pool;

  constructor(url: string, log?: Logger) {
    this.description = redactUrl(url);
    this.pool = new pg.Pool({
      connectionString: url,
      max: 8,
      connectionTimeoutMillis: 10_000,
      idleTimeoutMillis: 30_000,
      // BIGINT and count(*) come back as strings by default; every value here fits a double.
      types: { getTypeParser: ((oid: number, format?: string) => (oid === 20 ? Number : pg.types.getTypeParser(oid, format as 'text'))) as typeof pg.types.getTypeParser },
    });
    // An idle client losing its connection must not crash the daemon; the next query reports it.
    this.pool.on('error', (err) => log?.warn('gc database: idle connection failed', { database: this.description, error: err.message }));
  }

  private fail(what: string, err: unknown): GcDatabaseError {
    const e = err as { code?: string; message?: string; errors?: unknown[] };
    // An AggregateError (every address refused) has an empty message; its parts say why.
    const why = e.message || (Array.isArray(e.errors) ? e.errors.map(errorMessage).join('; ') : '') || String(e.code ?? err);
    return new GcDatabaseError(`gc database ${this.description}: ${what}: ${why}${e.code && !why.includes(e.code) ? ` (${e.code})` : ''}`, { cause: err });
  }

  async tx<T>(work: (tx: SqlTx) => Promise<T>): Promise<T> {
    for (let attempt = 1; ; attempt++) {
      let client: pg.PoolClient;
      try {
        client = await this.pool.connect();
      } catch (err) {
        throw this.fail('cannot connect', err);
      }
      let written = 0;
      const api: SqlTx = {
        all: async <R>(sql: string, params?: readonly unknown[]) => {
          const result = await client.query(sql, params as unknown[]);
          if (WRITE_STATEMENT.test(sql)) written += result.rowCount ?? 0;
          return result.rows as R[];
        },
        run: async (sql: string, params?: readonly unknown[]) => {
          const result = await client.query(sql, params as unknown[]);
          written += result.rowCount ?? 0;
          return result.rowCount ?? 0;
        },
        list: (values: readonly string[]) => [...values],
        rows: (n: number) => `(SELECT unnest($${n}::text[]) AS v) AS list`,
      };
      let broken = false;
      try {
        await client.query('BEGIN');
        const result = await work(api);
        await client.query('COMMIT');
        this.rowsWritten += written;
        return result;
      } catch (err) {
        try {
          await client.query('ROLLBACK');
        } catch {
          broken = true;
        }
        const code = (err as { code?: string }).code;
        if (code !== undefined && RETRY_CODES.has(code) && attempt < TX_ATTEMPTS) continue;
        if (err instanceof GcDatabaseError || !(err instanceof Error) || !('severity' in err || 'code' in err)) throw err;
        throw this.fail('statement failed', err);
      } finally {
        client.release(broken);
      }
    }
  }

  async close(): Promise<void> {
    await this.pool.end();
  }
}

/** Where the embedded database lives in the cache folder. */
export const EMBEDDED_FILE = 'gc.sqlite';

/** The configured database: PostgreSQL when `url` is set, else SQLite in `cacheDir`. */
export function openGcDatabase(url: string, cacheDir: string, log?: Logger): SqlDatabase {
  if (url === '') return new SqliteDatabase(path.join(cacheDir, EMBEDDED_FILE));
  return new PostgresDatabase(url, log);
}
