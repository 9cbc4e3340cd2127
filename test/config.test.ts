import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, test } from 'node:test';
import { pathToFileURL } from 'node:url';
import { parse as parseToml } from 'smol-toml';
import { CONFIG_TEMPLATE, type Config, ConfigError, loadConfig, parseConfig, parseHostPort } from '../src/config/config.js';

const BASE = '/srv/updraft';

/** The problems parseConfig reports for `text`; fails the test if it accepts it. */
function problemsOf(text: string, env: NodeJS.ProcessEnv = {}): readonly string[] {
  try {
    parseConfig(text, BASE, env, 'test.toml');
  } catch (err) {
    assert.ok(err instanceof ConfigError, `expected a ConfigError, got ${String(err)}`);
    return err.problems;
  }
  assert.fail(`config was accepted:\n${text}`);
}

function defaultsAt(baseDir: string): Config {
  return {
    cache: { dir: join(baseDir, '.updraft/cache'), diskSizeGb: 50, memorySizeGb: 1, scrubBlocksPerSecond: 20, directWrites: true, memoryPretouch: true },
    storage: { url: pathToFileURL(join(baseDir, '.updraft/store')).href, compression: 'lz4', readAheadPacks: 8, encryptionPassword: '',
      requestTimeoutMs: 10_000, requestDeadlineMs: 25_000,
    },
    aws: { accessKeyId: '', secretAccessKey: '', endpoint: '', defaultRegion: 'us-east-1', allowHttp: false, forcePathStyle: false },
    gcs: { serviceAccountKey: '', endpoint: '', allowHttp: false },
    azure: { accountName: '', accountKey: '', connectionString: '', endpoint: '', allowHttp: false },
    host: { id: '', leaseTtlS: 30, clockSkewMarginS: 3 },
    servers: {
      nbd: {
        addresses: [],
        unixSocket: join(baseDir, '.updraft/nbd.sock'),
        autoCreateSizeGb: 10,
        blockSize: 131072,
        blocksPerPack: 25,
        socketMode: 0o660,
        tls: 'off',
        tlsCert: '',
        tlsKey: '',
      },
      http: { address: '127.0.0.1:8080', token: '' },
    },
    volumes: {
      sealIdleMs: 30000,
      sealDirtyMb: 4096,
      flushMode: 'demand',
      durableFlushTimeoutMs: 30000,
      dirtyBudgetGb: 5,
      continuousBlockIntervalMs: 5000,
      continuousManifestIntervalMs: 60000,
      replicaFollowIntervalMs: 1000,
    },
    gc: {
      databaseUrl: '',
      gracePeriodMs: 24 * 3600 * 1000,
      intervalMs: 600_000,
      reconcileIntervalMs: 30 * 24 * 3600 * 1000,
      maxDeletionsPerCycle: 1000,
      dryRun: false,
    },
    cost: { currency: 'USD', storageGbMonth: 0.023, putPer1000: 0.005, getPer1000: 0.0004, deletePer1000: 0 },
    baseDir,
  };
}

const tmp = mkdtempSync(join(tmpdir(), 'updraft-config-'));
after(() => rmSync(tmp, { recursive: true, force: true }));

describe('defaults', () => {
  test('no file gives the defaults, resolved against the working directory', () => {
    assert.deepEqual(loadConfig(undefined, {}), defaultsAt(process.cwd()));
  });

  test('an empty file gives the defaults, resolved against its folder', () => {
    assert.deepEqual(parseConfig('', BASE, {}), defaultsAt(BASE));
  });

  test('two configs do not share the default address list', () => {
    const first = parseConfig('', BASE, {});
    first.servers.nbd.addresses.push('127.0.0.1:10809');
    assert.deepEqual(parseConfig('', BASE, {}).servers.nbd.addresses, []);
  });
});

describe('template', () => {
  test('parses to the defaults', () => {
    assert.deepEqual(parseConfig(CONFIG_TEMPLATE, BASE, {}), defaultsAt(BASE));
  });

  test('names every key of the schema', () => {
    const template = parseToml(CONFIG_TEMPLATE) as Record<string, Record<string, unknown>>;
    const servers = template.servers as Record<string, Record<string, unknown>>;
    assert.deepEqual(
      {
        cache: Object.keys(template.cache),
        storage: Object.keys(template.storage),
        aws: Object.keys(template.aws),
        gcs: Object.keys(template.gcs),
        azure: Object.keys(template.azure),
        host: Object.keys(template.host),
        nbd: Object.keys(servers.nbd),
        http: Object.keys(servers.http),
        volumes: Object.keys(template.volumes),
        gc: Object.keys(template.gc),
        cost: Object.keys(template.cost),
      },
      {
        cache: ['dir', 'disk_size_gb', 'memory_size_gb', 'scrub_blocks_per_second', 'direct_writes', 'memory_pretouch'],
        storage: ['url', 'compression', 'read_ahead_packs', 'encryption_password', 'request_timeout_s', 'request_deadline_s'],
        aws: ['access_key_id', 'secret_access_key', 'endpoint', 'default_region', 'allow_http', 'force_path_style'],
        gcs: ['service_account_key', 'endpoint', 'allow_http'],
        azure: ['account_name', 'account_key', 'connection_string', 'endpoint', 'allow_http'],
        host: ['id', 'lease_ttl_s', 'clock_skew_margin_s'],
        nbd: ['addresses', 'unix_socket', 'auto_create_size_gb', 'block_size', 'blocks_per_pack', 'socket_mode', 'tls', 'tls_cert', 'tls_key'],
        http: ['address', 'token'],
        volumes: [
          'seal_idle_ms',
          'seal_dirty_mb',
          'flush_mode',
          'durable_flush_timeout_ms',
          'dirty_budget_gb',
          'continuous_block_interval_ms',
          'continuous_manifest_interval_ms',
          'replica_follow_interval_ms',
        ],
        gc: ['database_url', 'grace_period', 'interval', 'reconcile_interval', 'max_deletions_per_cycle', 'dry_run'],
        cost: ['currency', 'storage_gb_month', 'put_per_1000', 'get_per_1000', 'delete_per_1000'],
      },
    );
  });

  test('has a comment line before every key', () => {
    const lines = CONFIG_TEMPLATE.split('\n');
    lines.forEach((line, index) => {
      if (/^[a-z_]+ = /.test(line)) assert.match(lines[index - 1], /^# \S/, `no comment above: ${line}`);
    });
  });
});

describe('unknown keys', () => {
  test('an unknown key is refused by its path, listing the known keys', () => {
    assert.deepEqual(problemsOf('[servers.nbd]\nblok_size = 65536\n'), [
      'config: servers.nbd.blok_size = 65536 is not allowed: unknown key; the keys of [servers.nbd] are addresses, unix_socket, auto_create_size_gb, block_size, blocks_per_pack, socket_mode, tls, tls_cert, tls_key',
    ]);
  });

  test('an unknown section is refused by its name', () => {
    assert.deepEqual(problemsOf('[cach]\ndir = "x"\n'), [
      'config: cach is not allowed: unknown section; the sections are cache, storage, aws, gcs, azure, host, servers, volumes, gc, cost',
    ]);
  });

  test('an unknown table under servers is refused', () => {
    assert.deepEqual(problemsOf('[servers.grpc]\naddress = "x:1"\n'), [
      'config: servers.grpc is not allowed: unknown section; the keys of [servers] are nbd, http',
    ]);
  });
});

test('[cost] takes the prices of another store', () => {
  const config = parseConfig('[cost]\ncurrency = "EUR"\nstorage_gb_month = 0.0059\nput_per_1000 = 0.0045\nget_per_1000 = 0.00036\ndelete_per_1000 = 0.0', BASE, {});
  assert.deepEqual(config.cost, { currency: 'EUR', storageGbMonth: 0.0059, putPer1000: 0.0045, getPer1000: 0.00036, deletePer1000: 0 });
});

describe('bad values name the key, the value and what is allowed', () => {
  const cases: [toml: string, problem: string][] = [
    ['[servers.nbd]\nblock_size = 1000', 'config: servers.nbd.block_size = 1000 is not allowed: a power of two from 65536 to 4194304'],
    ['[servers.nbd]\nblock_size = 98304', 'config: servers.nbd.block_size = 98304 is not allowed: a power of two from 65536 to 4194304'],
    ['[servers.nbd]\nblock_size = 8388608', 'config: servers.nbd.block_size = 8388608 is not allowed: a power of two from 65536 to 4194304'],
    ['[storage]\ncompression = "gzip"', 'config: storage.compression = "gzip" is not allowed: "lz4", "none" or "zstd-N" with N from 1 to 19'],
    ['[storage]\ncompression = "zstd-25"', 'config: storage.compression = "zstd-25" is not allowed: "lz4", "none" or "zstd-N" with N from 1 to 19'],
    ['[storage]\ncompression = "zstd-0"', 'config: storage.compression = "zstd-0" is not allowed: "lz4", "none" or "zstd-N" with N from 1 to 19'],
    ['[cache]\ndisk_size_gb = -5', 'config: cache.disk_size_gb = -5 is not allowed: a number of GB greater than 0'],
    ['[cache]\ndisk_size_gb = 0', 'config: cache.disk_size_gb = 0 is not allowed: a number of GB greater than 0'],
    ['[cache]\nmemory_size_gb = -0.5', 'config: cache.memory_size_gb = -0.5 is not allowed: a number of GB, 0 or more'],
    ['[cache]\ndir = ""', 'config: cache.dir = "" is not allowed: a non-empty path'],
    ['[servers.nbd]\nblocks_per_pack = 1001', 'config: servers.nbd.blocks_per_pack = 1001 is not allowed: an integer from 1 to 1000'],
    ['[servers.nbd]\nblocks_per_pack = 2.5', 'config: servers.nbd.blocks_per_pack = 2.5 is not allowed: an integer from 1 to 1000'],
    ['[servers.nbd]\nsocket_mode = "0999"', 'config: servers.nbd.socket_mode = "0999" is not allowed: permission bits as an octal string from "000" to "0777", e.g. "0660"'],
    ['[servers.nbd]\nauto_create_size_gb = "10"', 'config: servers.nbd.auto_create_size_gb = "10" is not allowed: a number of GB, 0 or more; 0 disables auto-create'],
    ['[gc]\ngrace_period = "1 day"', 'config: gc.grace_period = "1 day" is not allowed: a duration: a number with a unit (ms, s, m, h, d) such as "24h", "90s", "1h30m" or "0s" (expected a number with a unit (ms, s, m, h, d), e.g. "24h", "90s", "1h30m", "0s")'],
    ['[gc]\ngrace_period = "24"', 'config: gc.grace_period = "24" is not allowed: a duration: a number with a unit (ms, s, m, h, d) such as "24h", "90s", "1h30m" or "0s" (expected a number with a unit (ms, s, m, h, d), e.g. "24h", "90s", "1h30m", "0s")'],
    ['[gc]\ninterval = "0s"', 'config: gc.interval = "0s" is not allowed: a duration: a number with a unit (ms, s, m, h, d) such as "24h", "90s", "1h30m" or "0s", at least 1s (shorter than 1s)'],
    ['[gc]\ndatabase_url = "mysql://db/x"', 'config: gc.database_url = "mysql://db/x" is not allowed: "" (the embedded SQLite database in the cache folder) or "postgres://user:password@host:5432/database" (the scheme must be postgres:// or postgresql://)'],
    ['[gc]\ndatabase_url = "postgres://"', 'config: gc.database_url = "postgres://" is not allowed: "" (the embedded SQLite database in the cache folder) or "postgres://user:password@host:5432/database" (no host (postgres://user:password@host:5432/database))'],
    ['[volumes]\nseal_idle_ms = -1', 'config: volumes.seal_idle_ms = -1 is not allowed: an integer number of milliseconds, 0 or more'],
    ['[volumes]\nseal_dirty_mb = 0', 'config: volumes.seal_dirty_mb = 0 is not allowed: a number of MB greater than 0'],
    ['[cost]\nstorage_gb_month = -0.01', 'config: cost.storage_gb_month = -0.01 is not allowed: a price, 0 or more'],
    ['[cost]\ncurrency = "US$"', 'config: cost.currency = "US$" is not allowed: 1 to 8 letters, e.g. "USD"'],
    ['servers = 3', 'config: servers = 3 is not allowed: a table ([servers])'],
    ['cache = 2024-01-02', 'config: cache = 2024-01-02 is not allowed: a table ([cache])'],
    [
      '[servers.http]\naddress = "localhost"',
      'config: servers.http.address = "localhost" is not allowed: "host:port" (IPv4, [IPv6] or hostname; port from 1 to 65535), or "" to disable HTTP (the ":port" is missing)',
    ],
    [
      '[servers.http]\naddress = "::1:8080"',
      'config: servers.http.address = "::1:8080" is not allowed: "host:port" (IPv4, [IPv6] or hostname; port from 1 to 65535), or "" to disable HTTP (an IPv6 address goes in brackets, e.g. "[::1]:8080")',
    ],
    [
      '[servers.nbd]\naddresses = ["0.0.0.0:10809", "0.0.0.0:70000"]',
      'config: servers.nbd.addresses[1] = "0.0.0.0:70000" is not allowed: a "host:port" TCP address (IPv4, [IPv6] or hostname; port from 1 to 65535) (port "70000" is not a number from 1 to 65535)',
    ],
    [
      '[servers.nbd]\naddresses = "0.0.0.0:10809"',
      'config: servers.nbd.addresses = "0.0.0.0:10809" is not allowed: a list of "host:port" TCP addresses (IPv4, [IPv6] or hostname; port from 1 to 65535)',
    ],
    [
      '[storage]\nurl = "http://example.com/store"',
      'config: storage.url = "http://example.com/store" is not allowed: "file://PATH" (a relative or absolute folder), "s3://BUCKET/PREFIX", "gs://BUCKET/PREFIX" or "az://CONTAINER/PREFIX" (a valid bucket or container name)',
    ],
    [
      '[storage]\nurl = "s3://Bad_Bucket/prefix"',
      'config: storage.url = "s3://Bad_Bucket/prefix" is not allowed: "file://PATH" (a relative or absolute folder), "s3://BUCKET/PREFIX", "gs://BUCKET/PREFIX" or "az://CONTAINER/PREFIX" (a valid bucket or container name) (bucket name "Bad_Bucket" must be lowercase letters, digits, "." and "-", starting and ending with a letter or digit)',
    ],
    [
      '[storage]\nurl = "gs://Bad/prefix"',
      'config: storage.url = "gs://Bad/prefix" is not allowed: "file://PATH" (a relative or absolute folder), "s3://BUCKET/PREFIX", "gs://BUCKET/PREFIX" or "az://CONTAINER/PREFIX" (a valid bucket or container name) (bucket name "Bad" must be lowercase letters, digits, "-", "_" and ".", starting and ending with a letter or digit)',
    ],
    [
      '[storage]\nurl = "az://a--b/prefix"\n[azure]\naccount_name = "acct"',
      'config: storage.url = "az://a--b/prefix" is not allowed: "file://PATH" (a relative or absolute folder), "s3://BUCKET/PREFIX", "gs://BUCKET/PREFIX" or "az://CONTAINER/PREFIX" (a valid bucket or container name) (container name "a--b" must be 3 to 63 lowercase letters, digits and single "-", starting and ending with a letter or digit)',
    ],
    [
      '[storage]\nurl = "az://disks/prod"',
      'config: storage.url = "az://disks/prod" needs azure.account_name (or azure.connection_string, or azure.endpoint)',
    ],
    [
      '[azure]\naccount_key = "c2VjcmV0"',
      'config: azure.account_key is set but azure.account_name is not; a key needs its account',
    ],
    [
      '[azure]\naccount_name = "acct"\nconnection_string = "AccountName=acct;AccountKey=c2VjcmV0"',
      'config: azure.connection_string names the account and its credentials; leave azure.account_name and azure.account_key empty',
    ],
    [
      '[azure]\naccount_key = 5',
      'config: azure.account_key = (value hidden) is not allowed: a string ("" for the default Azure credential chain)',
    ],
  ];
  for (const [toml, problem] of cases) {
    test(toml.replace(/\n/g, ' '), () => {
      assert.deepEqual(problemsOf(toml), [problem]);
    });
  }

  test('every problem is listed, one per line, after a line naming the file', () => {
    try {
      parseConfig('[cache]\ndisk_size_gb = -1\n[storage]\ncompression = "gzip"\n[nope]\n', BASE, {}, 'test.toml');
      assert.fail('config was accepted');
    } catch (err) {
      assert.ok(err instanceof ConfigError);
      const lines = err.message.split('\n');
      assert.equal(lines[0], 'config file test.toml is invalid:');
      assert.equal(lines.length, 4);
      assert.match(lines[1], /^config: cache\.disk_size_gb = -1 /);
      assert.match(lines[2], /^config: storage\.compression = "gzip" /);
      assert.match(lines[3], /^config: nope is not allowed: unknown section/);
    }
  });

  test('TOML syntax errors name the line', () => {
    assert.deepEqual(problemsOf('[cache]\ndir = \n'), ['config: not valid TOML at line 2, column 7: invalid value']);
  });
});

describe('accepted values', () => {
  test('zstd levels 1 and 19, "none", floats, IPv6 and hostnames are accepted', () => {
    const config = parseConfig(
      [
        '[cache]',
        'disk_size_gb = 0.05',
        'memory_size_gb = 0',
        '[storage]',
        'compression = "zstd-19"',
        '[servers.nbd]',
        'addresses = ["[::]:10809", "nbd.example.com:1", "10.0.0.1:65535"]',
        'block_size = 4194304',
        'socket_mode = "600"',
        'unix_socket = ""',
        '[servers.http]',
        'address = ""',
      ].join('\n'),
      BASE,
      {},
    );
    assert.equal(config.cache.diskSizeGb, 0.05);
    assert.equal(config.storage.compression, 'zstd-19');
    assert.deepEqual(config.servers.nbd.addresses, ['[::]:10809', 'nbd.example.com:1', '10.0.0.1:65535']);
    assert.equal(config.servers.nbd.blockSize, 4194304);
    assert.equal(config.servers.nbd.socketMode, 0o600);
    assert.equal(config.servers.nbd.unixSocket, '');
    assert.equal(config.servers.http.address, '');
    assert.equal(parseConfig('[storage]\ncompression = "zstd-1"', BASE, {}).storage.compression, 'zstd-1');
    assert.equal(parseConfig('[storage]\ncompression = "none"', BASE, {}).storage.compression, 'none');
  });

  test('an s3:// url is kept as written', () => {
    assert.equal(parseConfig('[storage]\nurl = "s3://my-bucket.eu/updraft/prod"', BASE, {}).storage.url, 's3://my-bucket.eu/updraft/prod');
  });

  test('gs:// and az:// urls are kept as written; [gcs] and [azure] are read, a relative key path resolved against the file', () => {
    const gs = parseConfig('[storage]\nurl = "gs://my_bucket.eu/updraft"\n[gcs]\nservice_account_key = "keys/sa.json"\nendpoint = "http://127.0.0.1:4443"\nallow_http = true', BASE, {});
    assert.equal(gs.storage.url, 'gs://my_bucket.eu/updraft');
    assert.deepEqual(gs.gcs, { serviceAccountKey: join(BASE, 'keys/sa.json'), endpoint: 'http://127.0.0.1:4443', allowHttp: true });
    const az = parseConfig(
      '[storage]\nurl = "azure://disks/prod"\n[azure]\naccount_name = "acct1"\naccount_key = "${KEY}"\nendpoint = "http://127.0.0.1:10000/acct1"',
      BASE,
      { KEY: 'c2VjcmV0' },
    );
    assert.equal(az.storage.url, 'azure://disks/prod');
    assert.deepEqual(az.azure, { accountName: 'acct1', accountKey: 'c2VjcmV0', connectionString: '', endpoint: 'http://127.0.0.1:10000/acct1', allowHttp: false });
  });
});

describe('environment variables', () => {
  test('${VAR} in a string value is replaced', () => {
    const config = parseConfig('[cache]\ndir = "${DATA}/cache"\n[servers.http]\naddress = "${HOST}:9090"\ntoken = "${TOKEN}"', BASE, {
      DATA: '/data', HOST: '0.0.0.0', TOKEN: 'a-token-of-24-characters',
    });
    assert.equal(config.cache.dir, '/data/cache');
    assert.equal(config.servers.http.address, '0.0.0.0:9090');
    assert.equal(config.servers.http.token, 'a-token-of-24-characters');
  });

  test('${VAR} in a list item is replaced', () => {
    const config = parseConfig('[servers.nbd]\naddresses = ["${NBD_ADDRESS}"]', BASE, { NBD_ADDRESS: '[::1]:10809' });
    assert.deepEqual(config.servers.nbd.addresses, ['[::1]:10809']);
  });

  test('$${ is a literal ${', () => {
    const config = parseConfig('[cache]\ndir = "/data/$${DATA}/cache"', BASE, { DATA: 'replaced' });
    assert.equal(config.cache.dir, '/data/${DATA}/cache');
  });

  test('the substituted value is validated', () => {
    assert.deepEqual(problemsOf('[storage]\ncompression = "${CODEC}"', { CODEC: 'gzip' }), [
      'config: storage.compression = "gzip" is not allowed: "lz4", "none" or "zstd-N" with N from 1 to 19',
    ]);
  });

  test('a missing variable names the variable and the key', () => {
    assert.deepEqual(problemsOf('[cache]\ndir = "${UPDRAFT_TEST_UNSET}/cache"'), [
      'config: cache.dir = "${UPDRAFT_TEST_UNSET}/cache" uses environment variable UPDRAFT_TEST_UNSET, which is not set',
    ]);
  });

  test('an unterminated ${ is refused', () => {
    assert.deepEqual(problemsOf('[cache]\ndir = "${DATA"', { DATA: '/data' }), [
      'config: cache.dir = "${DATA" has a "${" without a closing "}" (write "$${" for a literal "${")',
    ]);
  });
});

describe('paths', () => {
  test('relative paths resolve against the folder of the config file', () => {
    const dir = join(tmp, 'etc', 'updraft');
    mkdirSync(dir, { recursive: true });
    const file = join(dir, 'updraft.toml');
    writeFileSync(file, '[cache]\ndir = "cache"\n[storage]\nurl = "file://../store"\n[servers.nbd]\nunix_socket = "./run/nbd.sock"\n');
    const config = loadConfig(file, {});
    assert.equal(config.baseDir, dir);
    assert.equal(config.cache.dir, join(dir, 'cache'));
    assert.equal(config.storage.url, pathToFileURL(join(tmp, 'etc', 'store')).href);
    assert.equal(config.servers.nbd.unixSocket, join(dir, 'run', 'nbd.sock'));
  });

  test('absolute paths are kept', () => {
    const config = parseConfig('[cache]\ndir = "/var/cache/updraft"\n[storage]\nurl = "file:///var/lib/updraft"', BASE, {});
    assert.equal(config.cache.dir, '/var/cache/updraft');
    assert.equal(config.storage.url, 'file:///var/lib/updraft');
  });

  test('a file that cannot be read is a ConfigError naming the path', () => {
    const missing = join(tmp, 'missing.toml');
    assert.throws(() => loadConfig(missing, {}), (err: unknown) => {
      assert.ok(err instanceof ConfigError);
      assert.equal(err.message, `config: cannot read ${missing}: no such file`);
      return true;
    });
  });
});

describe('access control', () => {
  const TOKEN = 'x'.repeat(16);

  test('a non-loopback HTTP address without a token is refused, naming servers.http.token', () => {
    for (const address of ['0.0.0.0:8080', '10.1.2.3:8080', '[::]:8080', 'api.example.com:8080']) {
      assert.deepEqual(problemsOf(`[servers.http]\naddress = "${address}"`), [
        `config: servers.http.address = "${address}" is not a loopback address, so servers.http.token must be set (e.g. token = "\${UPDRAFT_API_TOKEN}"); without it anyone who reaches the port controls every volume`,
      ]);
    }
  });

  test('loopback addresses need no token; any address takes one', () => {
    for (const address of ['127.0.0.1:8080', '127.9.9.9:1', '[::1]:8080', 'localhost:8080']) {
      assert.equal(parseConfig(`[servers.http]\naddress = "${address}"`, BASE, {}).servers.http.token, '');
    }
    const open = parseConfig(`[servers.http]\naddress = "0.0.0.0:8080"\ntoken = "\${T}"`, BASE, { T: TOKEN });
    assert.equal(open.servers.http.token, TOKEN);
  });

  test('a token shorter than 16 characters or with a space is refused without showing it', () => {
    for (const token of ['short', 'has a space in it here']) {
      assert.deepEqual(problemsOf(`[servers.http]\ntoken = "\${T}"`, { T: token }), [
        'config: servers.http.token = (value hidden) is not allowed: "" or 16 to 4096 printable ASCII characters without spaces',
      ]);
    }
  });

  test('the clock skew margin is less than a third of the lease TTL, so the holder renews before it stops writing', () => {
    assert.equal(parseConfig('[host]\nlease_ttl_s = 4\nclock_skew_margin_s = 1.2', BASE, {}).host.clockSkewMarginS, 1.2);
    assert.deepEqual(problemsOf('[host]\nlease_ttl_s = 6'), [
      'config: host.clock_skew_margin_s = 3 is not less than a third of host.lease_ttl_s = 6; the holder would stop writing before it renews',
    ]);
    assert.deepEqual(problemsOf('[host]\nclock_skew_margin_s = 0'), [
      'config: host.clock_skew_margin_s = 0 is not allowed: a number of seconds from 0.1 to 1200, less than a third of lease_ttl_s',
    ]);
  });

  test('tls = "on" or "require" needs tls_cert and tls_key; a certificate needs its key', () => {
    assert.deepEqual(problemsOf('[servers.nbd]\ntls = "require"'), [
      'config: servers.nbd.tls = "require" needs servers.nbd.tls_cert (a PEM file)',
      'config: servers.nbd.tls = "require" needs servers.nbd.tls_key (a PEM file)',
    ]);
    assert.deepEqual(problemsOf('[servers.nbd]\ntls_cert = "cert.pem"'), [
      'config: servers.nbd.tls_cert is set but servers.nbd.tls_key is not; a certificate needs its key',
    ]);
    assert.deepEqual(problemsOf('[servers.nbd]\ntls = "yes"'), ['config: servers.nbd.tls = "yes" is not allowed: "off", "on" or "require"']);
  });

  test('TLS paths resolve against the config folder', () => {
    const config = parseConfig('[servers.nbd]\ntls = "on"\ntls_cert = "tls/cert.pem"\ntls_key = "/etc/updraft/key.pem"', BASE, {});
    assert.equal(config.servers.nbd.tls, 'on');
    assert.equal(config.servers.nbd.tlsCert, join(BASE, 'tls/cert.pem'));
    assert.equal(config.servers.nbd.tlsKey, '/etc/updraft/key.pem');
  });
});

describe('parseHostPort', () => {
  test('splits IPv4, bracketed IPv6 and hostnames', () => {
    assert.deepEqual(parseHostPort('127.0.0.1:8080'), { host: '127.0.0.1', port: 8080 });
    assert.deepEqual(parseHostPort('[::1]:10809'), { host: '::1', port: 10809 });
    assert.deepEqual(parseHostPort('localhost:1'), { host: 'localhost', port: 1 });
  });

  test('refuses addresses with a clear reason', () => {
    assert.throws(() => parseHostPort('::1:80'), /^Error: "::1:80" is not a "host:port" address: an IPv6 address goes in brackets/);
    assert.throws(() => parseHostPort('host:0'), /port "0" is not a number from 1 to 65535/);
    assert.throws(() => parseHostPort('host:65536'), /port "65536" is not a number from 1 to 65535/);
    assert.throws(() => parseHostPort('256.1.1.1:80'), /"256\.1\.1\.1" is not an IPv4 address/);
    assert.throws(() => parseHostPort('bad_host:80'), /"bad_host" is not a hostname/);
    assert.throws(() => parseHostPort(':80'), /the host is missing/);
  });
});
