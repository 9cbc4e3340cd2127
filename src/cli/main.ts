#!/usr/bin/env node
// The `updraft` command. Thin: parses flags, loads the config, hands over to the host.
// Exit codes: 0 done, 1 the daemon or a command failed, 2 the config or the command line is wrong.

import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { dirname, resolve } from 'node:path';
import { Command, CommanderError } from 'commander';
import { createLogger, errorMessage } from '../log.js';
import { CONFIG_TEMPLATE, ConfigError, loadConfig } from '../config/config.js';
import { statusLines, volumeTable, type ExportRow, type HostSummary } from './show.js';

const DEFAULT_CONFIG_FILE = 'updraft.toml';

/** The command line asks for something that cannot be done as asked. */
class UsageError extends Error {
  override name = 'UsageError';
}

/** `updraft scrub` found damage: exit 1 after the report. */
class ScrubFailed extends Error {
  override name = 'ScrubFailed';
}

function packageVersion(): string {
  // Compiled to dist/src/cli/main.js; package.json is three folders up.
  const pkg = JSON.parse(readFileSync(new URL('../../../package.json', import.meta.url), 'utf8')) as { version: string };
  return pkg.version;
}

function init(file: string, force: boolean): void {
  const path = resolve(file);
  mkdirSync(dirname(path), { recursive: true });
  try {
    // 'wx' fails if the file exists, so a concurrent init cannot be overwritten either.
    writeFileSync(path, CONFIG_TEMPLATE, { flag: force ? 'w' : 'wx' });
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'EEXIST') {
      throw new UsageError(`${file} exists; pass --force to overwrite it`);
    }
    throw new Error(`writing ${file}: ${errorMessage(err)}`);
  }
  process.stdout.write(`wrote ${path}\nedit it, then start the daemon with: updraft run -c ${file}\n`);
}

async function run(file: string | undefined): Promise<void> {
  // Without -c, ./updraft.toml if there is one, else the defaults.
  const configFile = file ?? (existsSync(DEFAULT_CONFIG_FILE) ? DEFAULT_CONFIG_FILE : undefined);
  const config = loadConfig(configFile);
  const log = createLogger('updraft');
  log.info('config loaded', { file: configFile === undefined ? '(defaults)' : resolve(configFile), base_dir: config.baseDir });
  // Loaded here so that `init` and `version` do not load the whole daemon.
  const { runDaemon } = await import('./daemon.js');
  await runDaemon(config, log);
}

/** The config a command works with: -c FILE, else ./updraft.toml if there is one, else the defaults. */
function configFor(file: string | undefined) {
  return loadConfig(file ?? (existsSync(DEFAULT_CONFIG_FILE) ? DEFAULT_CONFIG_FILE : undefined));
}

/**
 * A request to the running daemon's HTTP API ([servers.http] address, with its token);
 * its JSON answer.
 */
async function callDaemon(file: string | undefined, method: string, path: string, body?: unknown): Promise<unknown> {
  const config = configFor(file);
  const { address, token } = config.servers.http;
  if (!address) throw new UsageError('[servers.http] address is empty: the daemon has no HTTP API to ask (use --offline where offered)');
  const url = `http://${address}${path}`;
  const headers: Record<string, string> = {};
  if (body !== undefined) headers['content-type'] = 'application/json';
  if (token !== '') headers.authorization = `Bearer ${token}`;
  let response: Response;
  try {
    response = await fetch(url, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      signal: AbortSignal.timeout(10 * 60_000),
    });
  } catch (err) {
    throw new Error(`cannot reach the daemon at ${url}: ${errorMessage((err as Error).cause ?? err)} (is \`updraft run\` running?)`);
  }
  const text = await response.text();
  const json = text ? (JSON.parse(text) as { error?: string }) : null;
  if (!response.ok) throw new Error(`${method} ${path}: ${response.status} ${json?.error ?? text}`);
  return json;
}

/**
 * Whether a daemon with this config is running: its HTTP API answers /healthz. A command
 * that works on the refcount database asks the daemon then instead of opening it beside it.
 */
async function daemonRunning(file: string | undefined): Promise<boolean> {
  const address = configFor(file).servers.http.address;
  if (!address) return false;
  try {
    const response = await fetch(`http://${address}/healthz`, { signal: AbortSignal.timeout(2000) });
    await response.arrayBuffer();
    return response.ok;
  } catch {
    return false;
  }
}

const exportPath = (name: string) => `/api/exports/${encodeURIComponent(name)}`;
const print = (value: unknown): void => {
  process.stdout.write(JSON.stringify(value, null, 2) + '\n');
};

/** Offline work on the store named by the config, with no daemon. */
async function withStore<T>(file: string | undefined, work: (ctx: Awaited<ReturnType<typeof offlineStore>>) => Promise<T>): Promise<T> {
  const ctx = await offlineStore(file);
  try {
    return await work(ctx);
  } finally {
    await ctx.store.close();
  }
}

async function offlineStore(file: string | undefined) {
  const config = configFor(file);
  const log = createLogger('updraft', (process.env.UPDRAFT_LOG_LEVEL as 'warn' | undefined) ?? 'warn');
  const [{ openStore }, { openStoreIdentity }, { parseCompression }] = await Promise.all([
    import('../host/store-stack.js'),
    import('../store/identity.js'),
    import('../crypto/compress.js'),
  ]);
  const { store } = openStore(config, log);
  try {
    const { cipher } = await openStoreIdentity(store, config.storage.encryptionPassword);
    return {
      config, store, cipher,
      compression: parseCompression(config.storage.compression),
      manifestCompression: parseCompression('zstd-3'),
    };
  } catch (err) {
    await store.close().catch(() => undefined);
    throw err;
  }
}

/** All of standard input, without the line break that ends it (a password piped or typed). */
async function readStdinLine(): Promise<string> {
  const parts: Buffer[] = [];
  for await (const part of process.stdin) {
    parts.push(part as Buffer);
    // Typed at a terminal: the first line is the answer.
    if (process.stdin.isTTY && (part as Buffer).includes(10)) break;
  }
  return Buffer.concat(parts).toString('utf8').split(/\r?\n/)[0];
}

async function changePasswordCommand(file: string | undefined): Promise<void> {
  const config = configFor(file);
  if (process.stdin.isTTY) process.stderr.write('new password: ');
  const newPassword = await readStdinLine();
  if (newPassword === '') throw new UsageError('no new password on standard input');
  const log = createLogger('updraft', 'warn');
  const [{ openStore }, { changePassword }] = await Promise.all([import('../host/store-stack.js'), import('../store/identity.js')]);
  const { store } = openStore(config, log);
  try {
    const identity = await changePassword(store, config.storage.encryptionPassword, newPassword);
    print({ store: store.description, id: identity.id, password_changed: identity.encryption?.password_changed, rewritten: ['store.json'] });
    process.stderr.write('password changed; set [storage] encryption_password to the new password before the next start\n');
  } finally {
    await store.close();
  }
}

/** `updraft status`: the store (offline), then the running daemon's summary through its API. */
async function statusCommand(file: string | undefined, json: boolean): Promise<void> {
  const store = await storeStatus(file);
  const address = configFor(file).servers.http.address;
  const url = address ? `http://${address}` : '';
  let host: HostSummary | undefined;
  let problem: string | undefined;
  if (!address) problem = '[servers.http] address is empty: the daemon has no HTTP API to ask';
  else {
    try {
      host = (await callDaemon(file, 'GET', '/api/host')) as HostSummary;
    } catch (err) {
      problem = errorMessage(err);
    }
  }
  if (json) print({ ...store, daemon: host === undefined ? null : { url, ...host }, ...(problem === undefined ? {} : { daemon_problem: problem }) });
  else process.stdout.write(statusLines(store, { url, host, problem }));
}

/** Whether the store is encrypted and whether the configured password opens it (no daemon needed). */
async function storeStatus(file: string | undefined): Promise<Record<string, unknown>> {
  const config = configFor(file);
  const log = createLogger('updraft', 'warn');
  const [{ openStore }, identityModule] = await Promise.all([import('../host/store-stack.js'), import('../store/identity.js')]);
  const { describeEncryption, openStoreIdentity, readIdentity, StoreKeyError } = identityModule;
  const { store } = openStore(config, log);
  try {
    const identity = await readIdentity(store);
    const password = config.storage.encryptionPassword;
    if (identity === undefined) {
      return {
        store: store.description, encrypted: false,
        encryption: `no store.json yet: the first start creates the store ${password === '' ? 'unencrypted' : 'encrypted with the configured password'}`,
      };
    }
    let passwordState: string;
    if (identity.encryption === null) passwordState = password === '' ? 'not needed' : 'set, but the store is not encrypted: the daemon refuses to start';
    else if (password === '') passwordState = 'not set: the store is encrypted, the daemon refuses to start';
    else {
      try {
        await openStoreIdentity(store, password);
        passwordState = 'accepted';
      } catch (err) {
        if (!(err instanceof StoreKeyError)) throw err;
        passwordState = `refused: ${err.message}`;
      }
    }
    return {
      store: store.description, id: identity.id, created: identity.created, encrypted: identity.encryption !== null,
      encryption: describeEncryption(identity), password: passwordState,
      ...(identity.encryption?.password_changed ? { password_changed: identity.encryption.password_changed } : {}),
    };
  } finally {
    await store.close();
  }
}

/** Offline work that needs the refcount database too (no daemon running). */
async function withGc<T>(
  file: string | undefined,
  work: (ctx: Awaited<ReturnType<typeof offlineStore>>, gc: Awaited<ReturnType<typeof import('../gc/open.js').openGc>>) => Promise<T>,
): Promise<T> {
  return withStore(file, async (ctx) => {
    const [{ openGc }, { hostIdentity }] = await Promise.all([import('../gc/open.js'), import('../host/host.js')]);
    const log = createLogger('updraft', (process.env.UPDRAFT_LOG_LEVEL as 'warn' | undefined) ?? 'warn');
    const gc = await openGc(ctx.config, ctx.store, ctx.cipher, hostIdentity(ctx.config.cache.dir, ctx.config.host.id), log.child('gc'), { daemon: false });
    try {
      return await work(ctx, gc);
    } finally {
      await gc.close();
    }
  });
}

async function bless(image: string, opts: { name: string; config?: string; bootRecord?: string }): Promise<void> {
  const { volumeNameProblem } = await import('../volume/names.js');
  const problem = volumeNameProblem(opts.name);
  if (problem) throw new UsageError(problem);
  const { MAX_BOOT_RECORD_SECONDS, writeBootSet } = await import('../store/catalog.js');
  const bootSeconds = opts.bootRecord === undefined ? undefined : Number(opts.bootRecord);
  if (bootSeconds !== undefined && !(Number.isFinite(bootSeconds) && bootSeconds > 0 && bootSeconds <= MAX_BOOT_RECORD_SECONDS)) {
    throw new UsageError(`--boot-record ${JSON.stringify(opts.bootRecord)}: expected seconds, a number in (0, ${MAX_BOOT_RECORD_SECONDS}]`);
  }
  if (!existsSync(image)) throw new UsageError(`image ${image}: no such file`);
  const { blessImage } = await import('../store/image.js');
  const { SingleBar, Presets } = (await import('cli-progress')).default;
  const tty = process.stderr.isTTY === true;
  const bar = tty
    ? new SingleBar({ format: 'bless [{bar}] {percentage}% | {read}/{total} MiB | {rate} MiB/s | uploaded {up} MiB | dedup {dedup} chunks', hideCursor: true }, Presets.shades_classic)
    : undefined;
  const started = performance.now();
  let lastLine = 0;
  const result = await withGc(opts.config, async (ctx, gc) => {
    const blessed = await blessImage({
      refcounts: gc.refcounts,
      store: ctx.store, cipher: ctx.cipher, file: image, name: opts.name, blockSize: ctx.config.servers.nbd.blockSize,
      compression: ctx.compression, manifestCompression: ctx.manifestCompression, blocksPerPack: ctx.config.servers.nbd.blocksPerPack,
      progress: (p) => {
        const mib = (n: number) => (n / 1048576).toFixed(1);
        const rate = mib(p.bytesRead / Math.max(0.001, (performance.now() - started) / 1000));
        const values = { read: mib(p.bytesRead), total: mib(p.totalBytes), rate, up: mib(p.bytesUploaded), dedup: p.dedupChunks };
        if (bar) {
          if (!bar.isActive) bar.start(p.totalBytes, 0, values);
          bar.update(p.bytesRead, values);
        } else if (p.bytesRead === p.totalBytes || performance.now() - lastLine > 2000) {
          lastLine = performance.now();
          process.stderr.write(`bless: ${values.read}/${values.total} MiB read, ${rate} MiB/s, ${values.up} MiB uploaded, ${values.dedup} chunks deduplicated\n`);
        }
      },
    });
    if (bootSeconds === undefined) return blessed;
    await writeBootSet(ctx.store, { format: 1, volume: opts.name, blockSize: ctx.config.servers.nbd.blockSize, seconds: bootSeconds, chunks: [], recording: true }, ctx.cipher);
    return { ...blessed, boot_record_seconds: bootSeconds };
  });
  bar?.stop();
  print({ ...result, duration_ms: Math.round(performance.now() - started) });
}

function program(version: string): Command {
  const updraft = new Command('updraft')
    .description('Serve virtual disks over NBD: local-SSD writes, object-store portability, instant forks')
    .version(version, '-V, --version', 'print the version')
    .exitOverride()
    .configureOutput({ outputError: (text, write) => write(`updraft: ${text.replace(/^error: /, '')}`) })
    .showHelpAfterError('(run "updraft --help" for usage)');

  updraft
    .command('init')
    .description(`write a commented config file with every setting at its default`)
    .option('-c, --config <file>', 'config file to write', DEFAULT_CONFIG_FILE)
    .option('-f, --force', 'overwrite the file if it exists', false)
    .action((opts: { config: string; force: boolean }) => init(opts.config, opts.force));

  updraft
    .command('run')
    .description('run the daemon in the foreground')
    .option('-c, --config <file>', `config file (default: ./${DEFAULT_CONFIG_FILE} if it exists, else the built-in defaults)`)
    .action((opts: { config?: string }) => run(opts.config));

  updraft
    .command('fork')
    .description('fork volume SOURCE to a new volume TARGET (through the running daemon, or --offline on the store)')
    .argument('<source>', 'the volume to fork')
    .argument('<target>', 'the new volume')
    .option('-c, --config <file>', 'config file (for the daemon address and the store)')
    .option('--lazy', 'copy the last manifest in the store instead of snapshotting the running source', false)
    .option('--checkpoint <name>', 'fork from this checkpoint of SOURCE')
    .option('--offline', 'no daemon: lazy fork directly on the store', false)
    .action(async (source: string, target: string, opts: { config?: string; lazy: boolean; checkpoint?: string; offline: boolean }) => {
      if (opts.offline) {
        const { volumeNameProblem } = await import('../volume/names.js');
        const problem = volumeNameProblem(source) ?? volumeNameProblem(target);
        if (problem) throw new UsageError(problem);
        const { lazyFork } = await import('../store/catalog.js');
        const started = performance.now();
        const result = await withGc(opts.config, async (ctx, gc) => {
          if ((await ctx.store.head(`volumes/${target}/manifest`)) !== undefined) throw new Error(`volume ${target} already exists in the store`);
          const forked = await lazyFork(ctx.store, source, target, ctx.manifestCompression, ctx.cipher, opts.checkpoint, gc.refcounts);
          await forked.commit();
          return forked;
        });
        print({ target, sequence: result.sequence, mode: 'lazy', duration_ms: Math.round(performance.now() - started) });
        return;
      }
      print(await callDaemon(opts.config, 'POST', `${exportPath(source)}/fork`, {
        target, mode: opts.lazy ? 'lazy' : 'consistent', ...(opts.checkpoint ? { checkpoint: opts.checkpoint } : {}),
      }));
    });

  const checkpoint = updraft.command('checkpoint').description('checkpoints of a volume (through the running daemon)');
  checkpoint
    .command('create')
    .argument('<volume>')
    .argument('<name>')
    .option('-c, --config <file>', 'config file (for the daemon address)')
    .description('take an immutable checkpoint of VOLUME now')
    .action(async (volume: string, name: string, opts: { config?: string }) => print(await callDaemon(opts.config, 'POST', `${exportPath(volume)}/checkpoints`, { name })));
  checkpoint
    .command('list')
    .argument('<volume>')
    .option('-c, --config <file>', 'config file (for the daemon address)')
    .description("list VOLUME's checkpoints")
    .action(async (volume: string, opts: { config?: string }) => print(await callDaemon(opts.config, 'GET', `${exportPath(volume)}/checkpoints`)));
  checkpoint
    .command('delete')
    .argument('<volume>')
    .argument('<name>')
    .option('-c, --config <file>', 'config file (for the daemon address)')
    .description('delete a checkpoint')
    .action(async (volume: string, name: string, opts: { config?: string }) =>
      print(await callDaemon(opts.config, 'DELETE', `${exportPath(volume)}/checkpoints/${encodeURIComponent(name)}`)));

  updraft
    .command('bless')
    .description('import a raw disk image (or any file) into the store as volume NAME, offline; zero chunks and blocks already stored are skipped')
    .argument('<image>', 'the image file')
    .requiredOption('--name <name>', 'the volume to create')
    .option('--boot-record <seconds>', "record the chunks read in the first SECONDS of the first boot of NAME or a fork of it, on whichever host wakes it, as NAME's boot hot set")
    .option('-c, --config <file>', 'config file (for the store)')
    .action((image: string, opts: { name: string; config?: string; bootRecord?: string }) => bless(image, opts));

  updraft
    .command('dump')
    .description('write volume NAME (its last manifest in the store) out as a sparse raw image, offline')
    .argument('<name>', 'the volume')
    .argument('<file>', 'the image file to write')
    .option('--checkpoint <name>', 'dump this checkpoint instead')
    .option('-c, --config <file>', 'config file (for the store)')
    .action(async (name: string, file: string, opts: { checkpoint?: string; config?: string }) => {
      const { dumpImage } = await import('../store/image.js');
      const started = performance.now();
      const result = await withStore(opts.config, (ctx) => dumpImage({ store: ctx.store, cipher: ctx.cipher, name, checkpoint: opts.checkpoint, file }));
      print({ name, file, ...result, duration_ms: Math.round(performance.now() - started) });
    });

  updraft
    .command('status')
    .description("say whether the store is encrypted and whether the configured password opens it, and summarise the running daemon (volumes, cache, store, GC, dedup, cost)")
    .option('-c, --config <file>', 'config file (for the store, the password, the daemon address and token)')
    .option('--json', 'print JSON (the store fields, and `daemon`: GET /api/host, or null)', false)
    .action((opts: { config?: string; json: boolean }) => statusCommand(opts.config, opts.json));

  updraft
    .command('ls')
    .description('list the volumes of the running daemon as a table (through its HTTP API)')
    .option('-c, --config <file>', 'config file (for the daemon address and token)')
    .option('--json', 'print GET /api/exports as JSON', false)
    .action(async (opts: { config?: string; json: boolean }) => {
      const rows = (await callDaemon(opts.config, 'GET', '/api/exports')) as ExportRow[];
      if (opts.json) print(rows);
      else process.stdout.write(volumeTable(rows, configFor(opts.config).servers.nbd.blockSize));
    });

  updraft
    .command('change-password')
    .description('wrap the store\'s data key with a new password read from standard input (the old one is [storage] encryption_password); no data is rewritten')
    .option('-c, --config <file>', 'config file (for the store and the current password)')
    .action((opts: { config?: string }) => changePasswordCommand(opts.config));

  updraft
    .command('gc')
    .description('run one GC deletion cycle now (through the running daemon, else on the refcount database directly) and exit')
    .option('-c, --config <file>', 'config file (for the daemon address, the store and the refcount database)')
    .option('--reconcile', 'reconcile the refcounts with every manifest in the store first', false)
    .option('--dry-run', 'log and print what would be deleted; delete nothing', false)
    .action(async (opts: { config?: string; reconcile: boolean; dryRun: boolean }) => {
      const body = { reconcile: opts.reconcile, ...(opts.dryRun ? { dry_run: true } : {}) };
      if (await daemonRunning(opts.config)) {
        print(await callDaemon(opts.config, 'POST', '/api/gc', body));
        return;
      }
      print(await withGc(opts.config, async (_ctx, gc) => {
        const dryRun = opts.dryRun || undefined;
        return opts.reconcile ? gc.collector.reconcile({ dryRun }) : { cycle: await gc.collector.cycle({ dryRun }) };
      }));
    });

  updraft
    .command('delete')
    .description("remove volume NAME from the store for good: its manifest, checkpoints, lease and boot hot set, and its refcounts (through the running daemon, else directly)")
    .argument('<name>', 'the volume')
    .option('-c, --config <file>', 'config file (for the daemon address, the store and the refcount database)')
    .option('--force', 'disconnect clients attached to it on the daemon', false)
    .action(async (name: string, opts: { config?: string; force: boolean }) => {
      const { volumeNameProblem } = await import('../volume/names.js');
      const problem = volumeNameProblem(name);
      if (problem) throw new UsageError(problem);
      if (await daemonRunning(opts.config)) {
        print(await callDaemon(opts.config, 'DELETE', `${exportPath(name)}?purge=true${opts.force ? '&force=true' : ''}`));
        return;
      }
      const [{ purgeVolume, MissingError }, { decodeLease, leaseIsLiveAt }, { leaseKey }, { clockKey, StoreClock }] = await Promise.all([
        import('../store/catalog.js'), import('../store/lease.js'), import('../store/manifest.js'), import('../objectstore/clock.js'),
      ]);
      print(await withGc(opts.config, async (ctx, gc) => {
        const leased = await ctx.store.get(leaseKey(name));
        if (leased !== undefined) {
          const lease = decodeLease(leaseKey(name), leased.body);
          if (!lease.released && leaseIsLiveAt(lease, leased.lastModified, (await new StoreClock(ctx.store, clockKey('cli')).now()).earliest)) {
            throw new Error(`volume ${name} is leased by host ${lease.owner} until ${lease.expires}; delete it through that daemon (DELETE /api/exports/NAME?purge=true)`);
          }
        }
        const result = await purgeVolume(ctx.store, name, gc.refcounts);
        if (!result.found) throw new MissingError(`volume ${name} is not in the store ${ctx.store.description}`);
        return { name, purged: true, checkpoints: result.checkpoints, packs_released: result.packsReleased };
      }));
    });

  updraft
    .command('scrub')
    .description('read every pack any manifest or checkpoint names and verify every block; report missing or corrupt packs with the volumes that need them (exit 1 if any)')
    .option('-c, --config <file>', 'config file (for the store)')
    .action(async (opts: { config?: string }) => {
      const { scrubStore } = await import('../gc/scrub.js');
      const started = performance.now();
      const report = await withStore(opts.config, (ctx) =>
        scrubStore(ctx.store, ctx.cipher, (done, total) => {
          if (done === total || done % 100 === 0) process.stderr.write(`scrub: ${done}/${total} packs verified\n`);
        }));
      for (const p of [...report.missing, ...report.corrupt]) {
        process.stderr.write(`scrub: ${p.pack}: ${p.problem}; needed by ${p.needed_by.join(', ')}\n`);
      }
      for (const m of report.unreadable_manifests) process.stderr.write(`scrub: ${m.key}: ${m.problem}\n`);
      print({ ...report, duration_ms: Math.round(performance.now() - started) });
      if (!report.ok) throw new ScrubFailed(`${report.missing.length} missing and ${report.corrupt.length} corrupt pack(s), ${report.unreadable_manifests.length} unreadable manifest(s)`);
    });

  updraft
    .command('version')
    .description('print the version')
    .action(() => {
      process.stdout.write(`${version}\n`);
    });

  return updraft;
}

/** Runs the command line and returns the exit code. */
async function main(argv: string[]): Promise<number> {
  try {
    await program(packageVersion()).parseAsync(argv);
    return 0;
  } catch (err) {
    // Commander has already printed its own message (help, version or a usage error).
    if (err instanceof CommanderError) return err.exitCode === 0 ? 0 : 2;
    process.stderr.write(`updraft: ${errorMessage(err)}\n`);
    if (err instanceof ConfigError || err instanceof UsageError) return 2;
    if (process.env.UPDRAFT_LOG_LEVEL === 'debug' && err instanceof Error && err.stack) {
      process.stderr.write(`${err.stack}\n`);
    }
    return 1;
  }
}

// Exit explicitly: once the daemon has returned, nothing left behind may keep the process alive.
process.exit(await main(process.argv));
