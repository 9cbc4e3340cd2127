// The daemon's config file: TOML, `${VAR}` substituted from the environment in string
// values, checked against a strict schema. Every problem is reported at once, one per
// line, naming the key, the value and what is allowed, so an operator fixes the file in
// one pass instead of one error per restart.

import { readFileSync } from 'node:fs';
import { isIPv4, isIPv6 } from 'node:net';
import { dirname, resolve } from 'node:path';
import { pathToFileURL } from 'node:url';
import { parse as parseToml, TomlError } from 'smol-toml';
import * as z from 'zod';
import { errorMessage } from '../log.js';
import { S3_STANDARD_PRICES, type CostPrices } from './prices.js';
import {
  AZURE_SCHEMES, databaseUrlProblem, durationProblem, FILE_SCHEME, hostPortProblem, parseDuration, parseHostPort, storageUrlProblem,
} from './values.js';

export { parseDuration, parseHostPort } from './values.js';

export interface Config {
  cache: { dir: string; diskSizeGb: number; memorySizeGb: number; scrubBlocksPerSecond: number; directWrites: boolean; memoryPretouch: boolean };
  storage: {
    url: string;
    compression: string;
    readAheadPacks: number;
    encryptionPassword: string;
    /** One attempt of an s3:// request: no answer (or a silent connection) this long fails it. */
    requestTimeoutMs: number;
    /** A store request with its retries fails by this long after it started. */
    requestDeadlineMs: number;
  };
  aws: {
    accessKeyId: string;
    secretAccessKey: string;
    endpoint: string;
    defaultRegion: string;
    allowHttp: boolean;
    forcePathStyle: boolean;
  };
  /** For a gs:// storage url; '' means unset. */
  gcs: { serviceAccountKey: string; endpoint: string; allowHttp: boolean };
  /** For an az:// (or azure://) storage url; '' means unset. */
  azure: { accountName: string; accountKey: string; connectionString: string; endpoint: string; allowHttp: boolean };
  host: { id: string; leaseTtlS: number; clockSkewMarginS: number };
  servers: {
    nbd: {
      addresses: string[];
      unixSocket: string;
      autoCreateSizeGb: number;
      blockSize: number;
      blocksPerPack: number;
      socketMode: number;
      /** NBD_OPT_STARTTLS on TCP: 'off', 'on' (the client chooses) or 'require'. */
      tls: 'off' | 'on' | 'require';
      /** PEM files, absolute; '' when not set. */
      tlsCert: string;
      tlsKey: string;
    };
    /** `token` '' means no token: then the address is a loopback one. */
    http: { address: string; token: string };
  };
  volumes: {
    sealIdleMs: number;
    sealDirtyMb: number;
    flushMode: 'demand' | 'continuous' | 'durable';
    durableFlushTimeoutMs: number;
    dirtyBudgetGb: number;
    continuousBlockIntervalMs: number;
    continuousManifestIntervalMs: number;
    /** How often a read-only replica checks its volume's manifest in the store; 0 turns following off. */
    replicaFollowIntervalMs: number;
  };
  gc: {
    /** "" for the embedded SQLite database in the cache folder, else a postgres:// URL. */
    databaseUrl: string;
    gracePeriodMs: number;
    intervalMs: number;
    reconcileIntervalMs: number;
    maxDeletionsPerCycle: number;
    dryRun: boolean;
  };
  /** Prices of the object store, for the cost figures (dashboard, API, metrics). */
  cost: CostPrices;
  /** the folder relative paths were resolved against */
  baseDir: string;
}

/** A config that cannot be read or is invalid; `problems` holds one line per problem. */
export class ConfigError extends Error {
  override name = 'ConfigError';
  readonly problems: readonly string[];

  constructor(problems: readonly string[], source?: string) {
    super(source === undefined ? problems.join('\n') : [`config file ${source} is invalid:`, ...problems].join('\n'));
    this.problems = problems;
  }
}

export { CONFIG_TEMPLATE } from './template.js';

/**
 * A zod check from a function that says why a value is wrong ('' for "wrong, nothing to
 * add"); the reason is appended to the config problem.
 */
function problemCheck<T>(problem: (value: T) => string | undefined) {
  return (value: T, ctx: z.RefinementCtx) => {
    const why = problem(value);
    if (why !== undefined) ctx.addIssue({ code: 'custom', message: why, input: value, params: { reason: why } });
  };
}

interface Setting<T extends z.ZodType> {
  schema: T;
  fallback: z.output<T>;
  /** what the value may be, as the end of "KEY = VALUE is not allowed: ..." */
  allowed: string;
  /** the same for one item of a list */
  itemAllowed?: string;
  /** a secret: problems never show its value */
  secret?: boolean;
}

function setting<T extends z.ZodType>(schema: T, fallback: z.output<T>, allowed: string, itemAllowed?: string): Setting<T> {
  return { schema, fallback, allowed, itemAllowed };
}

function secretSetting<T extends z.ZodType>(schema: T, fallback: z.output<T>, allowed: string): Setting<T> {
  return { schema, fallback, allowed, secret: true };
}

const CACHE = {
  dir: setting(z.string().min(1), './.updraft/cache', 'a non-empty path'),
  disk_size_gb: setting(z.number().positive(), 50.0, 'a number of GB greater than 0'),
  memory_size_gb: setting(z.number().min(0), 1.0, 'a number of GB, 0 or more'),
  scrub_blocks_per_second: setting(z.number().int().min(0).max(100000), 20, 'an integer from 0 (off) to 100000'),
  direct_writes: setting(z.boolean(), true, 'true or false'),
  memory_pretouch: setting(z.boolean(), true, 'true or false'),
};

const STORAGE = {
  url: setting(
    z.string().superRefine(problemCheck(storageUrlProblem)),
    'file://./.updraft/store',
    '"file://PATH" (a relative or absolute folder), "s3://BUCKET/PREFIX", "gs://BUCKET/PREFIX" or "az://CONTAINER/PREFIX" (a valid bucket or container name)',
  ),
  compression: setting(
    z.string().regex(/^(lz4|none|zstd-([1-9]|1[0-9]))$/),
    'lz4',
    '"lz4", "none" or "zstd-N" with N from 1 to 19',
  ),
  read_ahead_packs: setting(z.number().int().min(0).max(64), 8, 'an integer from 0 to 64'),
  // Any string is accepted, so that a problem message never has to quote a password.
  encryption_password: setting(z.string(), '', 'a string ("" for an unencrypted store); use ${UPDRAFT_PASSWORD}'),
  request_timeout_s: setting(z.number().positive().max(3600), 10.0, 'a number of seconds greater than 0, at most 3600'),
  request_deadline_s: setting(z.number().positive().max(3600), 25.0, 'a number of seconds greater than 0, at most 3600'),
};

const AWS = {
  access_key_id: setting(z.string(), '', 'a string ("" for the SDK default credentials)'),
  secret_access_key: setting(z.string(), '', 'a string ("" for the SDK default credentials)'),
  endpoint: setting(
    z.string().superRefine(problemCheck((url: string) => (url === '' || /^https?:\/\/[^/]+\/?$/.test(url) ? undefined : ''))),
    '',
    '"" or an http(s)://host:port URL',
  ),
  default_region: setting(z.string().min(1), 'us-east-1', 'a region name such as "us-east-1"'),
  allow_http: setting(z.boolean(), false, 'true or false'),
  force_path_style: setting(z.boolean(), false, 'true or false'),
};

const ENDPOINT_URL = (url: string) => (url === '' || /^https?:\/\/[^/]+(\/[^?#]*)?$/.test(url) ? undefined : '');

const GCS = {
  service_account_key: setting(z.string(), '', 'a path to a JSON key file, or "" for the default credentials'),
  endpoint: setting(z.string().superRefine(problemCheck(ENDPOINT_URL)), '', '"" or an http(s)://host:port URL'),
  allow_http: setting(z.boolean(), false, 'true or false'),
};

const AZURE = {
  account_name: setting(z.string().regex(/^([a-z0-9]{3,24})?$/), '', '"" or 3 to 24 lowercase letters and digits'),
  account_key: secretSetting(z.string(), '', 'a string ("" for the default Azure credential chain)'),
  connection_string: secretSetting(z.string(), '', 'a connection string, or ""'),
  endpoint: setting(z.string().superRefine(problemCheck(ENDPOINT_URL)), '', '"" or an http(s)://host[:port][/ACCOUNT] URL'),
  allow_http: setting(z.boolean(), false, 'true or false'),
};

const HOST = {
  id: setting(z.string().regex(/^([A-Za-z0-9._-]{1,64})?$/), '', '"" or 1 to 64 characters of A-Z a-z 0-9 . _ -'),
  lease_ttl_s: setting(z.number().int().min(1).max(3600), 30, 'an integer number of seconds from 1 to 3600'),
  clock_skew_margin_s: setting(z.number().min(0.1).max(1200), 3, 'a number of seconds from 0.1 to 1200, less than a third of lease_ttl_s'),
};

const ADDRESS = 'IPv4, [IPv6] or hostname; port from 1 to 65535';

const NBD_SERVER = {
  addresses: setting(
    z.array(z.string().superRefine(problemCheck(hostPortProblem))),
    [],
    `a list of "host:port" TCP addresses (${ADDRESS})`,
    `a "host:port" TCP address (${ADDRESS})`,
  ),
  unix_socket: setting(z.string(), './.updraft/nbd.sock', 'a path, or "" to disable the unix socket'),
  auto_create_size_gb: setting(z.number().min(0), 10.0, 'a number of GB, 0 or more; 0 disables auto-create'),
  block_size: setting(
    z.number().refine((n) => Number.isInteger(n) && n >= 65536 && n <= 4194304 && (n & (n - 1)) === 0),
    131072,
    'a power of two from 65536 to 4194304',
  ),
  blocks_per_pack: setting(z.number().int().min(1).max(1000), 25, 'an integer from 1 to 1000'),
  socket_mode: setting(z.string().regex(/^0?[0-7]{3}$/), '0660', 'permission bits as an octal string from "000" to "0777", e.g. "0660"'),
  tls: setting(z.enum(['off', 'on', 'require']), 'off', '"off", "on" or "require"'),
  tls_cert: setting(z.string(), '', 'a path to a PEM certificate, or ""'),
  tls_key: setting(z.string(), '', 'a path to a PEM private key, or ""'),
};

const HTTP_SERVER = {
  address: setting(
    z.string().superRefine(problemCheck((address: string) => (address === '' ? undefined : hostPortProblem(address)))),
    '127.0.0.1:8080',
    `"host:port" (${ADDRESS}), or "" to disable HTTP`,
  ),
  // Printable ASCII without spaces: it travels in an HTTP header as it is.
  token: secretSetting(z.string().regex(/^([\x21-\x7e]{16,4096})?$/), '', '"" or 16 to 4096 printable ASCII characters without spaces'),
};

const VOLUMES = {
  seal_idle_ms: setting(z.number().int().min(0), 30000, 'an integer number of milliseconds, 0 or more'),
  seal_dirty_mb: setting(z.number().positive(), 4096, 'a number of MB greater than 0'),
  flush_mode: setting(z.enum(['demand', 'continuous', 'durable']), 'demand', '"demand", "continuous" or "durable"'),
  durable_flush_timeout_ms: setting(z.number().int().min(100), 30000, 'an integer number of milliseconds, 100 or more'),
  dirty_budget_gb: setting(z.number().positive(), 5.0, 'a number of GB greater than 0'),
  continuous_block_interval_ms: setting(z.number().int().min(100), 5000, 'an integer number of milliseconds, 100 or more'),
  continuous_manifest_interval_ms: setting(z.number().int().min(100), 60000, 'an integer number of milliseconds, 100 or more'),
  replica_follow_interval_ms: setting(
    z.number().int().refine((ms) => ms === 0 || ms >= 100),
    1000,
    'an integer number of milliseconds, 100 or more, or 0 to turn following off',
  ),
};

const DURATION_ALLOWED = 'a duration: a number with a unit (ms, s, m, h, d) such as "24h", "90s", "1h30m" or "0s"';

const GC = {
  database_url: setting(
    z.string().superRefine(problemCheck(databaseUrlProblem)),
    '',
    '"" (the embedded SQLite database in the cache folder) or "postgres://user:password@host:5432/database"',
  ),
  grace_period: setting(z.string().superRefine(problemCheck(durationProblem)), '24h', DURATION_ALLOWED),
  interval: setting(
    z.string().superRefine(problemCheck((t: string) => durationProblem(t) ?? (parseDuration(t) < 1000 ? 'shorter than 1s' : undefined))),
    '10m',
    `${DURATION_ALLOWED}, at least 1s`,
  ),
  reconcile_interval: setting(
    z.string().superRefine(problemCheck((t: string) => durationProblem(t) ?? (parseDuration(t) < 1000 ? 'shorter than 1s' : undefined))),
    '30d',
    `${DURATION_ALLOWED}, at least 1s`,
  ),
  max_deletions_per_cycle: setting(z.number().int().min(1).max(1_000_000), 1000, 'an integer from 1 to 1000000'),
  dry_run: setting(z.boolean(), false, 'true or false'),
};

const PRICE = 'a price, 0 or more';
const COST = {
  currency: setting(z.string().regex(/^[A-Za-z]{1,8}$/), S3_STANDARD_PRICES.currency, '1 to 8 letters, e.g. "USD"'),
  storage_gb_month: setting(z.number().min(0), S3_STANDARD_PRICES.storageGbMonth, PRICE),
  put_per_1000: setting(z.number().min(0), S3_STANDARD_PRICES.putPer1000, PRICE),
  get_per_1000: setting(z.number().min(0), S3_STANDARD_PRICES.getPer1000, PRICE),
  delete_per_1000: setting(z.number().min(0), S3_STANDARD_PRICES.deletePer1000, PRICE),
};

const SETTINGS: Record<string, Setting<z.ZodType>> = {};
for (const [table, settings] of Object.entries({ cache: CACHE, storage: STORAGE, aws: AWS, gcs: GCS, azure: AZURE, host: HOST, 'servers.nbd': NBD_SERVER, 'servers.http': HTTP_SERVER, volumes: VOLUMES, gc: GC, cost: COST })) {
  for (const [key, value] of Object.entries(settings)) SETTINGS[`${table}.${key}`] = value;
}

/** A strict table that defaults to empty. TOML dates are objects to zod, so they are refused here. */
function table<S extends z.ZodRawShape>(shape: S) {
  return z
    .custom<unknown>((value) => !(value instanceof Date))
    .pipe(z.strictObject(shape))
    .prefault({});
}

type Defaulted<S extends Record<string, Setting<z.ZodType>>> = { [K in keyof S]: z.ZodDefault<S[K]['schema']> };

function tableOf<S extends Record<string, Setting<z.ZodType>>>(settings: S) {
  const shape: Record<string, z.ZodType> = {};
  for (const [key, { schema, fallback }] of Object.entries(settings)) {
    // A factory, so that no two configs share the default list.
    shape[key] = schema.default(() => structuredClone(fallback));
  }
  return table(shape as Defaulted<S>);
}

const FILE_SCHEMA = z.strictObject({
  cache: tableOf(CACHE),
  storage: tableOf(STORAGE),
  aws: tableOf(AWS),
  gcs: tableOf(GCS),
  azure: tableOf(AZURE),
  host: tableOf(HOST),
  servers: table({ nbd: tableOf(NBD_SERVER), http: tableOf(HTTP_SERVER) }),
  volumes: tableOf(VOLUMES),
  gc: tableOf(GC),
  cost: tableOf(COST),
});

type ConfigFile = z.output<typeof FILE_SCHEMA>;

/** Every table of the file by key path ('' is the top level) and the keys it may hold. */
const TABLES: Record<string, readonly string[]> = {
  '': Object.keys(FILE_SCHEMA.shape),
  cache: Object.keys(CACHE),
  storage: Object.keys(STORAGE),
  aws: Object.keys(AWS),
  gcs: Object.keys(GCS),
  azure: Object.keys(AZURE),
  host: Object.keys(HOST),
  servers: ['nbd', 'http'],
  'servers.nbd': Object.keys(NBD_SERVER),
  'servers.http': Object.keys(HTTP_SERVER),
  volumes: Object.keys(VOLUMES),
  gc: Object.keys(GC),
  cost: Object.keys(COST),
};

// ---- problems --------------------------------------------------------------------

type KeyPath = readonly PropertyKey[];

function formatPath(path: KeyPath): string {
  let text = '';
  for (const part of path) {
    if (typeof part === 'number') text += `[${part}]`;
    else {
      const key = String(part);
      const quoted = /^[A-Za-z0-9_-]+$/.test(key) ? key : JSON.stringify(key);
      text += text === '' ? quoted : `.${quoted}`;
    }
  }
  return text;
}

/** A TOML value as it would be written in the file. */
function formatValue(value: unknown): string {
  if (typeof value === 'string') return JSON.stringify(value);
  if (typeof value === 'number') {
    if (Number.isNaN(value)) return 'nan';
    if (!Number.isFinite(value)) return value > 0 ? 'inf' : '-inf';
    return String(value);
  }
  if (value instanceof Date) return value.toISOString();
  if (Array.isArray(value)) return `[${value.map(formatValue).join(', ')}]`;
  if (value !== null && typeof value === 'object') {
    const entries = Object.entries(value).map(([key, item]) => `${formatPath([key])} = ${formatValue(item)}`);
    return entries.length === 0 ? '{}' : `{ ${entries.join(', ')} }`;
  }
  return String(value);
}

function valueAt(root: unknown, path: KeyPath): unknown {
  let value = root;
  for (const part of path) {
    if (value === null || typeof value !== 'object') return undefined;
    value = (value as Record<PropertyKey, unknown>)[part];
  }
  return value;
}

function isTable(value: unknown): boolean {
  return value !== null && typeof value === 'object' && !Array.isArray(value) && !(value instanceof Date);
}

function unknownKeyProblem(file: unknown, tablePath: KeyPath, key: string): string {
  const path = [...tablePath, key];
  const value = valueAt(file, path);
  const shown = isTable(value) ? formatPath(path) : `${formatPath(path)} = ${formatValue(value)}`;
  const where = formatPath(tablePath);
  const known = TABLES[where] ?? [];
  const allowed = where === '' ? `the sections are ${known.join(', ')}` : `the keys of [${where}] are ${known.join(', ')}`;
  return `config: ${shown} is not allowed: unknown ${isTable(value) ? 'section' : 'key'}; ${allowed}`;
}

function addIssue(problems: Problems, file: unknown, issue: z.core.$ZodIssue): void {
  if (issue.code === 'unrecognized_keys') {
    for (const key of issue.keys) problems.add(formatPath([...issue.path, key]), unknownKeyProblem(file, issue.path, key));
    return;
  }
  const where = formatPath(issue.path);
  const settingPath = formatPath(issue.path.filter((part) => typeof part !== 'number'));
  const setting = SETTINGS[settingPath];
  const isItem = issue.path.length > 0 && typeof issue.path[issue.path.length - 1] === 'number';
  const allowed = setting
    ? ((isItem ? setting.itemAllowed : undefined) ?? setting.allowed)
    : settingPath in TABLES
      ? `a table ([${settingPath}])`
      : 'nothing';
  const reason: unknown = issue.code === 'custom' ? issue.params?.reason : undefined;
  const detail = typeof reason === 'string' && reason !== '' ? ` (${reason})` : '';
  const value = setting?.secret ? '(value hidden)' : formatValue(valueAt(file, issue.path));
  problems.add(where, `config: ${where} = ${value} is not allowed: ${allowed}${detail}`);
}

/** Whether `host` (from parseHostPort) only ever reaches this machine. */
export function isLoopbackHost(host: string): boolean {
  if (isIPv4(host)) return host.startsWith('127.');
  if (isIPv6(host)) return host === '::1' || /^::ffff:127\./i.test(host);
  return host === 'localhost';
}

/** Problems that involve more than one key; the file has passed the schema. */
function crossKeyProblems(file: ConfigFile, problems: Problems): void {
  const { nbd, http } = file.servers;
  if (http.address !== '' && http.token === '' && !isLoopbackHost(parseHostPort(http.address).host)) {
    problems.add(
      'servers.http.token',
      `config: servers.http.address = ${formatValue(http.address)} is not a loopback address, so servers.http.token must be set ` +
        '(e.g. token = "${UPDRAFT_API_TOKEN}"); without it anyone who reaches the port controls every volume',
    );
  }
  if (nbd.tls !== 'off') {
    for (const key of ['tls_cert', 'tls_key'] as const) {
      if (nbd[key] === '') problems.add(`servers.nbd.${key}`, `config: servers.nbd.tls = ${formatValue(nbd.tls)} needs servers.nbd.${key} (a PEM file)`);
    }
  }
  if (file.host.clock_skew_margin_s >= file.host.lease_ttl_s / 3) {
    problems.add(
      'host.clock_skew_margin_s',
      `config: host.clock_skew_margin_s = ${file.host.clock_skew_margin_s} is not less than a third of host.lease_ttl_s = ${file.host.lease_ttl_s}; ` +
        'the holder would stop writing before it renews',
    );
  }
  const { azure } = file;
  if (azure.account_key !== '' && azure.account_name === '') {
    problems.add('azure.account_key', 'config: azure.account_key is set but azure.account_name is not; a key needs its account');
  }
  if (azure.connection_string !== '' && (azure.account_key !== '' || azure.account_name !== '')) {
    problems.add('azure.connection_string', 'config: azure.connection_string names the account and its credentials; leave azure.account_name and azure.account_key empty');
  }
  if (AZURE_SCHEMES.some((scheme) => file.storage.url.startsWith(scheme)) && azure.connection_string === '' && azure.account_name === '' && azure.endpoint === '') {
    problems.add('azure.account_name', `config: storage.url = ${formatValue(file.storage.url)} needs azure.account_name (or azure.connection_string, or azure.endpoint)`);
  }
  if ((nbd.tls_cert === '') !== (nbd.tls_key === '')) {
    const [set, unset] = nbd.tls_cert === '' ? ['tls_key', 'tls_cert'] : ['tls_cert', 'tls_key'];
    problems.add(`servers.nbd.${unset}`, `config: servers.nbd.${set} is set but servers.nbd.${unset} is not; a certificate needs its key`);
  }
}

// ---- environment -----------------------------------------------------------------

const VARIABLE_NAME = /^[A-Za-z_][A-Za-z0-9_]*$/;

/** `text` with each `${VAR}` replaced from `env` and `$${` turned into a literal `${`. */
function substitute(text: string, env: NodeJS.ProcessEnv, problem: (why: string) => void): string {
  let out = '';
  let at = 0;
  for (;;) {
    const dollar = text.indexOf('$', at);
    if (dollar < 0) return out + text.slice(at);
    out += text.slice(at, dollar);
    if (text.startsWith('$${', dollar)) {
      out += '${';
      at = dollar + 3;
    } else if (text.startsWith('${', dollar)) {
      const close = text.indexOf('}', dollar + 2);
      if (close < 0) {
        problem('has a "${" without a closing "}" (write "$${" for a literal "${")');
        return out + text.slice(dollar);
      }
      const name = text.slice(dollar + 2, close);
      const value = env[name];
      if (!VARIABLE_NAME.test(name)) problem(`has "\${${name}}", which is not an environment variable name`);
      else if (value === undefined) problem(`uses environment variable ${name}, which is not set`);
      else out += value;
      at = close + 1;
    } else {
      out += '$';
      at = dollar + 1;
    }
  }
}

/** Problems found so far; the schema adds at most one line per key path. */
class Problems {
  readonly lines: string[] = [];
  readonly #paths = new Set<string>();

  add(path: string, line: string): void {
    if (!this.#paths.has(path)) this.addAnother(path, line);
  }

  /** Adds `line` even if `path` already has one (a string can name several unset variables). */
  addAnother(path: string, line: string): void {
    this.#paths.add(path);
    this.lines.push(line);
  }
}

/** A copy of the parsed file with every string substituted from `env`. */
function substituteAll(value: unknown, path: KeyPath, env: NodeJS.ProcessEnv, problems: Problems): unknown {
  if (typeof value === 'string') {
    const where = formatPath(path);
    return substitute(value, env, (why) => problems.addAnother(where, `config: ${where} = ${formatValue(value)} ${why}`));
  }
  if (Array.isArray(value)) return value.map((item, index) => substituteAll(item, [...path, index], env, problems));
  if (isTable(value)) {
    const copy: Record<string, unknown> = {};
    for (const [key, item] of Object.entries(value as Record<string, unknown>)) {
      // defineProperty, so that a "__proto__" key stays a key (and is then refused as unknown).
      Object.defineProperty(copy, key, { value: substituteAll(item, [...path, key], env, problems), enumerable: true, writable: true, configurable: true });
    }
    return copy;
  }
  return value;
}

// ---- loading ---------------------------------------------------------------------

function resolveStorageUrl(url: string, baseDir: string): string {
  if (!url.startsWith(FILE_SCHEME)) return url;
  // Everything after "file://" is a path, so "file://./store" is relative to baseDir.
  return pathToFileURL(resolve(baseDir, url.slice(FILE_SCHEME.length))).href;
}

function toConfig(file: ConfigFile, baseDir: string): Config {
  const { cache, storage, aws, gcs, azure, host, servers, volumes, gc, cost } = file;
  const { nbd, http } = servers;
  return {
    cache: {
      dir: resolve(baseDir, cache.dir), diskSizeGb: cache.disk_size_gb, memorySizeGb: cache.memory_size_gb,
      scrubBlocksPerSecond: cache.scrub_blocks_per_second, directWrites: cache.direct_writes,
      memoryPretouch: cache.memory_pretouch,
    },
    storage: {
      url: resolveStorageUrl(storage.url, baseDir), compression: storage.compression, readAheadPacks: storage.read_ahead_packs,
      encryptionPassword: storage.encryption_password, requestTimeoutMs: Math.round(storage.request_timeout_s * 1000),
      requestDeadlineMs: Math.round(storage.request_deadline_s * 1000),
    },
    aws: {
      accessKeyId: aws.access_key_id,
      secretAccessKey: aws.secret_access_key,
      endpoint: aws.endpoint,
      defaultRegion: aws.default_region,
      allowHttp: aws.allow_http,
      forcePathStyle: aws.force_path_style,
    },
    gcs: {
      serviceAccountKey: gcs.service_account_key === '' ? '' : resolve(baseDir, gcs.service_account_key),
      endpoint: gcs.endpoint,
      allowHttp: gcs.allow_http,
    },
    azure: {
      accountName: azure.account_name, accountKey: azure.account_key, connectionString: azure.connection_string,
      endpoint: azure.endpoint, allowHttp: azure.allow_http,
    },
    host: { id: host.id, leaseTtlS: host.lease_ttl_s, clockSkewMarginS: host.clock_skew_margin_s },
    servers: {
      nbd: {
        addresses: nbd.addresses,
        unixSocket: nbd.unix_socket === '' ? '' : resolve(baseDir, nbd.unix_socket),
        autoCreateSizeGb: nbd.auto_create_size_gb,
        blockSize: nbd.block_size,
        blocksPerPack: nbd.blocks_per_pack,
        socketMode: parseInt(nbd.socket_mode, 8),
        tls: nbd.tls,
        tlsCert: nbd.tls_cert === '' ? '' : resolve(baseDir, nbd.tls_cert),
        tlsKey: nbd.tls_key === '' ? '' : resolve(baseDir, nbd.tls_key),
      },
      http: { address: http.address, token: http.token },
    },
    volumes: {
      sealIdleMs: volumes.seal_idle_ms,
      sealDirtyMb: volumes.seal_dirty_mb,
      flushMode: volumes.flush_mode,
      durableFlushTimeoutMs: volumes.durable_flush_timeout_ms,
      dirtyBudgetGb: volumes.dirty_budget_gb,
      continuousBlockIntervalMs: volumes.continuous_block_interval_ms,
      continuousManifestIntervalMs: volumes.continuous_manifest_interval_ms,
      replicaFollowIntervalMs: volumes.replica_follow_interval_ms,
    },
    gc: {
      databaseUrl: gc.database_url,
      gracePeriodMs: parseDuration(gc.grace_period),
      intervalMs: parseDuration(gc.interval),
      reconcileIntervalMs: parseDuration(gc.reconcile_interval),
      maxDeletionsPerCycle: gc.max_deletions_per_cycle,
      dryRun: gc.dry_run,
    },
    cost: {
      currency: cost.currency, storageGbMonth: cost.storage_gb_month, putPer1000: cost.put_per_1000, getPer1000: cost.get_per_1000,
      deletePer1000: cost.delete_per_1000,
    },
    baseDir,
  };
}

/**
 * Parses config text. Relative paths resolve against `baseDir`; `source` names the
 * text in error messages (usually the file path). Throws ConfigError listing every problem.
 */
export function parseConfig(text: string, baseDir: string, env: NodeJS.ProcessEnv = process.env, source?: string): Config {
  let parsed: unknown;
  try {
    parsed = parseToml(text);
  } catch (err) {
    if (!(err instanceof TomlError)) throw err;
    const what = err.message.split('\n')[0].replace(/^Invalid TOML document: /, '');
    throw new ConfigError([`config: not valid TOML at line ${err.line}, column ${err.column}: ${what}`], source);
  }
  // A value whose substitution failed is reported once, for that; a schema problem
  // with the half-substituted value would only repeat it.
  const problems = new Problems();
  const file = substituteAll(parsed, [], env, problems);
  const result = FILE_SCHEMA.safeParse(file);
  if (!result.success) {
    for (const issue of result.error.issues) addIssue(problems, file, issue);
  } else {
    crossKeyProblems(result.data, problems);
  }
  if (!result.success || problems.lines.length > 0) throw new ConfigError(problems.lines, source);
  return toConfig(result.data, resolve(baseDir));
}

function readProblem(err: unknown): string {
  switch ((err as NodeJS.ErrnoException).code) {
    case 'ENOENT': return 'no such file';
    case 'EACCES': return 'permission denied';
    case 'EISDIR': return 'it is a folder';
    default: return errorMessage(err);
  }
}

/**
 * Reads and parses a config file; relative paths in it resolve against its folder.
 * Without a file, the defaults, with relative paths resolved against the working directory.
 */
export function loadConfig(file?: string, env: NodeJS.ProcessEnv = process.env): Config {
  if (file === undefined) return parseConfig('', process.cwd(), env);
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (err) {
    throw new ConfigError([`config: cannot read ${file}: ${readProblem(err)}`]);
  }
  return parseConfig(text, dirname(resolve(file)), env, file);
}
