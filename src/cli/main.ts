#!/usr/bin/env node
// The `updraft` command. Thin: parses flags, loads the config, hands over to the host.
// Exit codes: 0 done, 1 the daemon or a command failed, 2 the config or the command line is wrong.

import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { dirname, resolve } from 'node:path';
import { Command, CommanderError } from 'commander';
import { createLogger, errorMessage } from '../log.js';
import { CONFIG_TEMPLATE, ConfigError, loadConfig } from './config.js';

const DEFAULT_CONFIG_FILE = 'updraft.toml';

/** The command line asks for something that cannot be done as asked. */
class UsageError extends Error {
  override name = 'UsageError';
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
  const { runDaemon } = await import('../host/daemon.js');
  await runDaemon(config, log);
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
