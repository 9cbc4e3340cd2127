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

export interface Config {
  cache: { dir: string; diskSizeGb: number; memorySizeGb: number; scrubBlocksPerSecond: number };
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
    flushMode: 'demand' | 'continuous';
    dirtyBudgetGb: number;
    continuousBlockIntervalMs: number;
    continuousManifestIntervalMs: number;
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

// Written by `updraft init`. Every key at its default; test/config.test.ts checks that it
// parses to the defaults and names every key of the schema.
export const CONFIG_TEMPLATE = `# updraft.toml: settings of the updraft daemon. Every key is optional; the values
# below are the defaults. Relative paths are relative to the folder of this file.
# String values may use \${VAR} for an environment variable; write $\${ for a literal \${.

[cache]
# Folder on local disk for the block cache.
dir = "./.updraft/cache"
# Disk tier of the block cache, in GB (> 0).
disk_size_gb = 50.0
# Memory tier of the block cache, in GB (0 turns it off).
memory_size_gb = 1.0
# Background scrub: cached blocks re-hashed per second; a block that fails is evicted
# (fetched again from the store when read). 0 turns it off.
scrub_blocks_per_second = 20

[storage]
# Object store for packs and manifests: "file://PATH" (a folder), "s3://BUCKET/PREFIX",
# "gs://BUCKET/PREFIX" (Google Cloud Storage) or "az://CONTAINER/PREFIX" (Azure Blob Storage).
url = "file://./.updraft/store"
# Compression of blocks in packs: "lz4", "none" or "zstd-1" to "zstd-19".
compression = "lz4"
# Packs a sequential reader keeps fetched ahead of itself (0 turns read-ahead off).
read_ahead_packs = 8
# Password of an encrypted store; "" for none. Set when the store is created, it encrypts
# every block, index and manifest (XChaCha20-Poly1305, keyed BLAKE3 block names); it must
# then be given on every start. Keep it out of this file: "\${UPDRAFT_PASSWORD}".
# An existing store cannot be encrypted in place; change it with \`updraft change-password\`.
encryption_password = ""
# Seconds one attempt of an s3://, gs:// or az:// request may wait for an answer (or sit on a silent
# connection) before it fails and is tried again.
request_timeout_s = 10.0
# Seconds after which a store request fails, its retries included: a read that needs the
# store fails with EIO, a drain fails, a connection to a volume not on this host is refused.
request_deadline_s = 25.0

[aws]
# Credentials and endpoint for an s3:// storage url. Empty values use the AWS SDK's
# defaults (environment, shared config, instance role). Use \${VAR} to keep secrets out.

# Access key id; "" uses the SDK default chain.
access_key_id = ""
# Secret access key; "" uses the SDK default chain.
secret_access_key = ""
# An S3-compatible endpoint such as "http://127.0.0.1:9000"; "" means AWS.
endpoint = ""
# Region to sign requests for.
default_region = "us-east-1"
# Allow an http:// (unencrypted) endpoint.
allow_http = false
# Address buckets as ENDPOINT/BUCKET instead of BUCKET.ENDPOINT (MinIO and most S3 clones need it).
force_path_style = false

[gcs]
# Credentials and endpoint for a gs:// storage url (docs/stores.md lists the roles needed).

# Path of a service account's JSON key file; "" uses the client's default chain
# (GOOGLE_APPLICATION_CREDENTIALS, gcloud credentials, the metadata server).
service_account_key = ""
# Another endpoint, such as an emulator's "http://127.0.0.1:4443"; "" means Google's.
endpoint = ""
# Allow an http:// (unencrypted) endpoint.
allow_http = false

[azure]
# Credentials and endpoint for an az:// storage url: an account name with its key, a
# connection string, or an account name alone for the default Azure credential chain
# (environment, managed identity, Azure CLI). Use \${VAR} to keep secrets out.

# Storage account name.
account_name = ""
# Shared key of the account; "" for the default Azure credential chain.
account_key = ""
# A connection string instead of account_name and account_key.
connection_string = ""
# Blob service URL, such as an emulator's "http://127.0.0.1:10000/devstoreaccount1";
# "" means https://ACCOUNT.blob.core.windows.net.
endpoint = ""
# Allow an http:// (unencrypted) endpoint.
allow_http = false

[host]
# This host's identity in volume leases; "" generates one on first start and keeps it
# in the cache folder. Two daemons sharing a store must have different ids.
id = ""
# How long a volume lease lasts without renewal, in seconds. The holder renews at a third of it.
lease_ttl_s = 30
# How many seconds before another host may judge a lease expired its holder stops taking
# writes, unless renewed. Expiry is judged on the object store's clock (the lease object's
# Last-Modified), the holder's deadline on its own monotonic clock from when it sent the
# lease, so hosts' wall clocks never matter; the margin covers the store tick that notices
# (a quarter second), event-loop stalls and the store's clock running at another rate
# than the host's. Less than a third of lease_ttl_s.
clock_skew_margin_s = 3

[servers.nbd]
# TCP addresses to serve NBD on, as "host:port", e.g. ["0.0.0.0:10809", "[::1]:10809"].
addresses = []
# Unix socket to serve NBD on; "" disables it.
unix_socket = "./.updraft/nbd.sock"
# Size in GB of a volume created when a client asks for an export that does not exist; 0 disables auto-create.
auto_create_size_gb = 10.0
# Chunk size in bytes, the unit of dedup, caching and upload: a power of two from 65536 to 4194304.
block_size = 131072
# Blocks per pack object uploaded to the store (1 to 1000).
blocks_per_pack = 25
# Permissions of the unix socket, in octal.
socket_mode = "0660"
# TLS for NBD over TCP (NBD_OPT_STARTTLS): "off", "on" (the client chooses) or "require"
# (plaintext clients are refused). The unix socket offers TLS when it is on, never requires it.
tls = "off"
# Server certificate (PEM, with its chain) for TLS; needed unless tls = "off".
tls_cert = ""
# Private key (PEM) of tls_cert.
tls_key = ""

[servers.http]
# Address of the HTTP API and Prometheus metrics, as "host:port"; "" disables HTTP.
# Any address that is not loopback needs a token.
address = "127.0.0.1:8080"
# Bearer token every request must carry (Authorization: Bearer TOKEN), at least 16
# characters; "" for none. Keep it out of the file: token = "\${UPDRAFT_API_TOKEN}".
token = ""

[volumes]
# Seal a volume's dirty chunks after it has been idle this long, in milliseconds.
seal_idle_ms = 30000
# Seal in the background when a volume has more dirty overlay data than this, in MB.
seal_dirty_mb = 4096
# Default flush mode of a new volume: "demand" (the store is touched only by drain, fork,
# migration and the dirty budget) or "continuous" (blocks and manifest follow the writes).
flush_mode = "demand"
# Default dirty budget of a new volume, in GB: past it the oldest chunks not yet in the
# store are uploaded, even in demand mode.
dirty_budget_gb = 5.0
# Continuous mode: upload changed blocks this often, in milliseconds.
continuous_block_interval_ms = 5000
# Continuous mode: write the manifest this often while writes go on, in milliseconds
# (and as soon as the blocks are up once writes stop).
continuous_manifest_interval_ms = 60000

[gc]
# Pack refcounts: "" keeps them in an embedded SQLite database in the cache folder (one
# host per store); "postgres://user:password@host:5432/db" shares one PostgreSQL
# database between every host of a store. Use \${VAR} for the password.
database_url = ""
# A pack no manifest or checkpoint names is deleted once it has been unreferenced this
# long: a duration such as "24h", "90s", "1h30m" or "0s".
grace_period = "24h"
# How often the daemon runs a deletion cycle.
interval = "10m"
# How often refcounts are reconciled with every manifest in the store (the safety net).
reconcile_interval = "30d"
# At most this many packs are deleted per cycle.
max_deletions_per_cycle = 1000
# Log what would be deleted, delete nothing.
dry_run = false

[cost]
# Prices of the object store, for the cost per volume and per host (dashboard, API,
# metrics). The defaults are S3 Standard list prices, US East (N. Virginia).
# Currency the prices are in.
currency = "USD"
# Per GB (10^9 bytes) stored for a month.
storage_gb_month = 0.023
# Per 1,000 PUT and LIST requests.
put_per_1000 = 0.005
# Per 1,000 GET and HEAD requests.
get_per_1000 = 0.0004
# Per 1,000 DELETE requests.
delete_per_1000 = 0.0
`;

// ---- addresses -------------------------------------------------------------------

const HOSTNAME_LABEL = /^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$/;

/** The host and port of `address`, or why it is not a "host:port" address. */
function splitHostPort(address: string): { host: string; port: number } | string {
  const colon = address.lastIndexOf(':');
  if (colon < 0) return 'the ":port" is missing';
  const hostPart = address.slice(0, colon);
  const portText = address.slice(colon + 1);
  const port = Number(portText);
  if (!/^[0-9]+$/.test(portText) || port < 1 || port > 65535) {
    return `port ${JSON.stringify(portText)} is not a number from 1 to 65535`;
  }
  if (hostPart === '') return 'the host is missing; use 0.0.0.0 or [::] for every interface';
  if (hostPart.startsWith('[')) {
    const inner = hostPart.endsWith(']') ? hostPart.slice(1, -1) : '';
    if (!isIPv6(inner)) return `${JSON.stringify(hostPart)} is not a bracketed IPv6 address`;
    return { host: inner, port };
  }
  if (hostPart.includes(':')) return `an IPv6 address goes in brackets, e.g. "[${hostPart}]:${portText}"`;
  if (/^[0-9.]+$/.test(hostPart)) {
    return isIPv4(hostPart) ? { host: hostPart, port } : `${JSON.stringify(hostPart)} is not an IPv4 address`;
  }
  const name = hostPart.endsWith('.') ? hostPart.slice(0, -1) : hostPart;
  if (name.length > 253 || !name.split('.').every((label) => HOSTNAME_LABEL.test(label))) {
    return `${JSON.stringify(hostPart)} is not a hostname`;
  }
  return { host: hostPart, port };
}

/** Splits "host:port" (IPv4, [IPv6] or hostname; port 1..65535). IPv6 hosts are returned without brackets. */
export function parseHostPort(address: string): { host: string; port: number } {
  const parsed = splitHostPort(address);
  if (typeof parsed === 'string') throw new Error(`${JSON.stringify(address)} is not a "host:port" address: ${parsed}`);
  return parsed;
}

function hostPortProblem(address: string): string | undefined {
  const parsed = splitHostPort(address);
  return typeof parsed === 'string' ? parsed : undefined;
}

// ---- durations -------------------------------------------------------------------

const DURATION_UNITS: Record<string, number> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 };
const DURATION = /^(?:\d+(?:\.\d+)?(?:ms|s|m|h|d))+$/;

/** Why `text` is not a duration such as "24h", "90s", "1h30m" or "0s", or undefined. */
function durationProblem(text: string): string | undefined {
  if (!DURATION.test(text)) return 'expected a number with a unit (ms, s, m, h, d), e.g. "24h", "90s", "1h30m", "0s"';
  return parseDuration(text) > 10 * 365 * DURATION_UNITS.d ? 'longer than ten years' : undefined;
}

/** A duration string in milliseconds: "24h", "90s", "1h30m", "0s", "500ms". */
export function parseDuration(text: string): number {
  if (!DURATION.test(text)) throw new Error(`duration ${JSON.stringify(text)}: expected a number with a unit (ms, s, m, h, d), e.g. "24h", "90s", "0s"`);
  let ms = 0;
  for (const [, amount, unit] of text.matchAll(/(\d+(?:\.\d+)?)(ms|s|m|h|d)/g)) ms += Number(amount) * DURATION_UNITS[unit];
  return Math.round(ms);
}

// ---- gc database ------------------------------------------------------------------

function databaseUrlProblem(url: string): string | undefined {
  if (url === '') return undefined;
  if (!/^postgres(ql)?:\/\//.test(url)) return 'the scheme must be postgres:// or postgresql://';
  let parsed: URL;
  try {
    parsed = new URL(url);
  } catch {
    return 'not a URL';
  }
  if (parsed.hostname === '' && !parsed.searchParams.has('host')) return 'no host (postgres://user:password@host:5432/database)';
  if (parsed.port !== '' && !(Number(parsed.port) >= 1 && Number(parsed.port) <= 65535)) return `port ${parsed.port} is not from 1 to 65535`;
  return undefined;
}

// ---- storage ---------------------------------------------------------------------

const FILE_SCHEME = 'file://';
const S3_SCHEME = 's3://';
const GCS_SCHEME = 'gs://';
const AZURE_SCHEMES = ['az://', 'azure://'];

/** Why `bucket` breaks the S3 bucket naming rules, or undefined when it follows them. */
function s3BucketProblem(bucket: string): string | undefined {
  if (bucket.length < 3 || bucket.length > 63) return `bucket name ${JSON.stringify(bucket)} is not 3 to 63 characters`;
  if (!/^[a-z0-9][a-z0-9.-]*[a-z0-9]$/.test(bucket)) {
    return `bucket name ${JSON.stringify(bucket)} must be lowercase letters, digits, "." and "-", starting and ending with a letter or digit`;
  }
  if (bucket.includes('..')) return `bucket name ${JSON.stringify(bucket)} has two adjacent dots`;
  if (isIPv4(bucket)) return `bucket name ${JSON.stringify(bucket)} is an IP address`;
  const reservedPrefix = ['xn--', 'sthree-', 'amzn-s3-demo-'].find((prefix) => bucket.startsWith(prefix));
  if (reservedPrefix) return `bucket names starting with "${reservedPrefix}" are reserved`;
  const reservedSuffix = ['-s3alias', '--ol-s3', '.mrap', '--x-s3', '--table-s3'].find((suffix) => bucket.endsWith(suffix));
  if (reservedSuffix) return `bucket names ending with "${reservedSuffix}" are reserved`;
  return undefined;
}

/** Why `bucket` breaks the GCS bucket naming rules (3-63 characters, or up to 222 with dots). */
function gcsBucketProblem(bucket: string): string | undefined {
  if (!/^[a-z0-9][a-z0-9._-]*[a-z0-9]$/.test(bucket)) {
    return `bucket name ${JSON.stringify(bucket)} must be lowercase letters, digits, "-", "_" and ".", starting and ending with a letter or digit`;
  }
  if (bucket.length < 3 || bucket.length > 222 || bucket.split('.').some((part) => part.length > 63)) return `bucket name ${JSON.stringify(bucket)} is not 3 to 63 characters (222 with dots)`;
  return undefined;
}

/** Why `container` breaks the Azure container naming rules. */
function azureContainerProblem(container: string): string | undefined {
  if (!/^[a-z0-9](?!.*--)[a-z0-9-]{1,61}[a-z0-9]$/.test(container)) {
    return `container name ${JSON.stringify(container)} must be 3 to 63 lowercase letters, digits and single "-", starting and ending with a letter or digit`;
  }
  return undefined;
}

function storageUrlProblem(url: string): string | undefined {
  if (url.startsWith(FILE_SCHEME)) return url.length > FILE_SCHEME.length ? undefined : 'the path is empty';
  const first = (rest: string) => (rest.indexOf('/') < 0 ? rest : rest.slice(0, rest.indexOf('/')));
  if (url.startsWith(S3_SCHEME)) return s3BucketProblem(first(url.slice(S3_SCHEME.length)));
  if (url.startsWith(GCS_SCHEME)) return gcsBucketProblem(first(url.slice(GCS_SCHEME.length)));
  const azure = AZURE_SCHEMES.find((scheme) => url.startsWith(scheme));
  if (azure) return azureContainerProblem(first(url.slice(azure.length)));
  return '';
}

// ---- schema ----------------------------------------------------------------------

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
  flush_mode: setting(z.enum(['demand', 'continuous']), 'demand', '"demand" or "continuous"'),
  dirty_budget_gb: setting(z.number().positive(), 5.0, 'a number of GB greater than 0'),
  continuous_block_interval_ms: setting(z.number().int().min(100), 5000, 'an integer number of milliseconds, 100 or more'),
  continuous_manifest_interval_ms: setting(z.number().int().min(100), 60000, 'an integer number of milliseconds, 100 or more'),
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
      scrubBlocksPerSecond: cache.scrub_blocks_per_second,
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
      dirtyBudgetGb: volumes.dirty_budget_gb,
      continuousBlockIntervalMs: volumes.continuous_block_interval_ms,
      continuousManifestIntervalMs: volumes.continuous_manifest_interval_ms,
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
