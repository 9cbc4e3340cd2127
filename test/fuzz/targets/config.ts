// Fuzz target: the config parser (config/config.ts). Any text yields a Config or a
// ConfigError listing at least one problem, never another exception.
import { ConfigError, parseConfig } from '../../../src/config/config.js';

const ENV = { UPDRAFT_PASSWORD: 'secret', UPDRAFT_API_TOKEN: 'a-token-of-32-characters-exactly', EMPTY: '' };

export function fuzz(data: Buffer): void {
  const text = data.toString('utf8');
  try {
    const config = parseConfig(text, '/fuzz', ENV, 'fuzz.toml');
    if (typeof config.storage.url !== 'string' || !Number.isFinite(config.cache.diskSizeGb)) {
      throw new Error(`parseConfig returned a config without a storage url or disk size: ${JSON.stringify(config)}`);
    }
  } catch (err) {
    if (!(err instanceof ConfigError)) throw new Error(`expected a ConfigError, got: ${err instanceof Error ? `${err.name}: ${err.message}` : String(err)}`, { cause: err });
    if (err.problems.length === 0) throw new Error(`ConfigError lists no problem: ${err.message}`);
    if (!err.message.startsWith('config file fuzz.toml is invalid:')) throw new Error(`ConfigError does not name the file: ${err.message}`);
  }
}
