// `updraft run`: open the host, serve NBD and HTTP, print how to attach, and shut down
// cleanly on SIGTERM/SIGINT (a second signal exits at once).
import type { Config } from '../cli/config.js';
import { parseHostPort } from '../cli/config.js';
import { startApi } from '../api/server.js';
import { describe } from '../nbd/handshake.js';
import { NbdServer } from '../nbd/server.js';
import { errorMessage, type Logger } from '../log.js';
import { parseCompression } from '../crypto/compress.js';
import { probeObjectStore } from '../objectstore/index.js';
import { openGc } from '../gc/open.js';
import { openStore } from './store-stack.js';
import { Host, hostIdentity } from './host.js';

const GB = 1024 ** 3;

export async function runDaemon(config: Config, log: Logger): Promise<void> {
  // Replies to 4 KiB reads (4 KiB + header) are carved from Node's shared allocation pool
  // only below poolSize / 2; the default 8 KiB pool would give each its own ArrayBuffer.
  Buffer.poolSize = 256 * 1024;
  const nbdConfig = config.servers.nbd;
  const { store, metered } = openStore(config, log.child('store'));
  let gc;
  try {
    await probeObjectStore(store);
    gc = await openGc(config, store, hostIdentity(config.cache.dir, config.host.id), log.child('gc'), { daemon: true });
  } catch (err) {
    await store.close().catch(() => undefined);
    throw err;
  }
  const host = Host.open(
    {
      cacheDir: config.cache.dir,
      blockSize: nbdConfig.blockSize,
      diskBytes: Math.floor(config.cache.diskSizeGb * GB),
      memoryBytes: Math.floor(config.cache.memorySizeGb * GB),
      autoCreateBytes: Math.floor((nbdConfig.autoCreateSizeGb * GB) / 4096) * 4096,
      sealIdleMs: config.volumes.sealIdleMs,
      sealDirtyBytes: config.volumes.sealDirtyMb * 1024 * 1024,
      store,
      compression: parseCompression(config.storage.compression),
      manifestCompression: parseCompression('zstd-3'),
      blocksPerPack: nbdConfig.blocksPerPack,
      readAheadPacks: config.storage.readAheadPacks,
      hostId: config.host.id,
      leaseTtlMs: config.host.leaseTtlS * 1000,
      flushMode: config.volumes.flushMode,
      dirtyBudgetBytes: Math.floor(config.volumes.dirtyBudgetGb * GB),
      continuousBlockIntervalMs: config.volumes.continuousBlockIntervalMs,
      continuousManifestIntervalMs: config.volumes.continuousManifestIntervalMs,
      refcounts: gc.refcounts,
      scrubBlocksPerSecond: config.cache.scrubBlocksPerSecond,
    },
    log.child('host'),
  );
  gc.collector.packIndex = host.packIndex;
  gc.collector.start();
  const nbd = new NbdServer(
    {
      list: () => host.list().map((v) => ({ name: v.name, description: describe(v) })),
      open: (name) => host.openForClient(name),
      peek: (name) => host.peek(name),
    },
    {
      unixSocket: nbdConfig.unixSocket || undefined,
      socketMode: nbdConfig.socketMode,
      tcp: nbdConfig.addresses.map(parseHostPort),
    },
    log.child('nbd'),
  );
  let api: Awaited<ReturnType<typeof startApi>> | undefined;
  try {
    await nbd.listen();
    if (config.servers.http.address) {
      api = await startApi(
        { host, store: metered, collector: gc.collector, disconnect: (name) => nbd.disconnect(name) },
        parseHostPort(config.servers.http.address),
        log.child('http'),
      );
    }
  } catch (err) {
    await nbd.close().catch(() => undefined);
    await gc.collector.stop();
    await host.close();
    await gc.close();
    throw err;
  }

  printAttachHelp(config, nbd.addresses());

  await new Promise<void>((resolve) => {
    let stopping = false;
    const stop = (signal: string) => {
      if (stopping) {
        log.warn('second signal: exiting now', { signal });
        process.exit(1);
      }
      stopping = true;
      log.info('shutting down: closing connections, draining volumes to the store', { signal });
      void (async () => {
        try {
          await nbd.close();
          const drained = await host.drainAll();
          log.info('drained volumes', { volumes: drained.length, failed: drained.filter((d) => d.error).length });
          await api?.close();
          await gc.collector.stop();
          await host.close();
          await gc.close();
          log.info('stopped cleanly');
        } catch (err) {
          log.error('shutdown failed', { error: errorMessage(err) });
        }
        resolve();
      })();
    };
    process.on('SIGTERM', () => stop('SIGTERM'));
    process.on('SIGINT', () => stop('SIGINT'));
  });
}

function printAttachHelp(config: Config, addresses: string[]): void {
  const nbd = config.servers.nbd;
  const lines = [`updraft is serving volumes from ${config.cache.dir} (store: ${config.storage.url})`];
  if (nbd.unixSocket) lines.push(`  NBD unix socket  ${nbd.unixSocket}`);
  for (const a of addresses) if (!a.startsWith('/')) lines.push(`  NBD TCP          ${a}`);
  if (config.servers.http.address) lines.push(`  HTTP API         http://${config.servers.http.address}  (GET /api/exports, /metrics)`);
  const auto = nbd.autoCreateSizeGb > 0 ? `created on first connect with ${nbd.autoCreateSizeGb} GB` : 'create it first: PUT /api/exports/NAME';
  lines.push('', `Attach a volume (export name = volume name; ${auto}):`);
  if (nbd.unixSocket) {
    const uri = `nbd+unix:///my-vm?socket=${nbd.unixSocket}`;
    lines.push(`  nbdinfo '${uri}'`, `  qemu-img info '${uri}'`, `  sudo nbd-client -unix ${nbd.unixSocket} /dev/nbd0 -N my-vm`);
  }
  const tcp = addresses.find((a) => !a.startsWith('/'));
  if (tcp) lines.push(`  nbdinfo 'nbd://${tcp}/my-vm'`);
  process.stdout.write(lines.join('\n') + '\n');
}
