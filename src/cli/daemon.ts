// `updraft run`: open the host, serve NBD and HTTP, print how to attach, and shut down
// cleanly on SIGTERM/SIGINT (a second signal exits at once). The composition root: the
// host and the NBD and HTTP servers on top of it are built here, so host/ imports neither.
import { readFileSync } from 'node:fs';
import tls from 'node:tls';
import type { Config } from '../config/config.js';
import { parseHostPort } from '../config/config.js';
import { startApi } from '../api/server.js';
import { describe } from '../nbd/handshake.js';
import { NbdServer } from '../nbd/server.js';
import { errorMessage, type Logger } from '../log.js';
import { parseCompression } from '../crypto/compress.js';
import { describeEncryption, openStoreIdentity, type OpenedStore } from '../store/identity.js';
import { openGc } from '../gc/open.js';
import { openStore } from '../host/store-stack.js';
import { Host, hostIdentity } from '../host/host.js';
import { hostMemory } from '../blocks/host-memory.js';
import { DAEMON_NODE_FLAGS, missingNodeFlags } from './node-flags.js';

const GB = 1024 ** 3;

export async function runDaemon(config: Config, log: Logger): Promise<void> {
  // Replies to 4 KiB reads (4 KiB + header) are carved from Node's shared allocation pool
  // only below poolSize / 2; the default 8 KiB pool would give each its own ArrayBuffer.
  Buffer.poolSize = 256 * 1024;
  const missing = missingNodeFlags();
  if (missing.length > 0) {
    log.warn('started without the Node.js flags the daemon runs with: large writes will spend much of their CPU in garbage collection', {
      missing: missing.join(' '), start_with: `node ${DAEMON_NODE_FLAGS.join(' ')} dist/src/cli/updraft.cjs run (or the updraft command)`,
    });
  }
  const nbdConfig = config.servers.nbd;
  // Before anything opens: a bad certificate is a start-up error, not a first-client one.
  const nbdTls = loadNbdTls(nbdConfig);
  checkMemoryTier(config.cache.memorySizeGb);
  const { store, metered } = openStore(config, log.child('store'));
  let opened: OpenedStore;
  let gc;
  try {
    // The start-up probe: reads store.json, unwraps the data key (or creates a new store).
    opened = await openStoreIdentity(store, config.storage.encryptionPassword);
    gc = await openGc(config, store, opened.cipher, hostIdentity(config.cache.dir, config.host.id), log.child('gc'), { daemon: true });
  } catch (err) {
    await store.close().catch(() => undefined);
    throw err;
  }
  log.info(`store is ${describeEncryption(opened.identity)}`, { store: store.description, id: opened.identity.id, created: opened.created });
  const host = Host.open(
    {
      cacheDir: config.cache.dir,
      blockSize: nbdConfig.blockSize,
      diskBytes: Math.floor(config.cache.diskSizeGb * GB),
      memoryBytes: Math.floor(config.cache.memorySizeGb * GB),
      directWrites: config.cache.directWrites,
      memoryPretouch: config.cache.memoryPretouch,
      autoCreateBytes: Math.floor((nbdConfig.autoCreateSizeGb * GB) / 4096) * 4096,
      sealIdleMs: config.volumes.sealIdleMs,
      sealDirtyBytes: config.volumes.sealDirtyMb * 1024 * 1024,
      store,
      compression: parseCompression(config.storage.compression),
      manifestCompression: parseCompression('zstd-3'),
      cipher: opened.cipher,
      blocksPerPack: nbdConfig.blocksPerPack,
      readAheadPacks: config.storage.readAheadPacks,
      hostId: config.host.id,
      leaseTtlMs: config.host.leaseTtlS * 1000,
      clockSkewMarginMs: config.host.clockSkewMarginS * 1000,
      flushMode: config.volumes.flushMode,
      durableFlushTimeoutMs: config.volumes.durableFlushTimeoutMs,
      dirtyBudgetBytes: Math.floor(config.volumes.dirtyBudgetGb * GB),
      continuousBlockIntervalMs: config.volumes.continuousBlockIntervalMs,
      continuousManifestIntervalMs: config.volumes.continuousManifestIntervalMs,
      replicaFollowIntervalMs: config.volumes.replicaFollowIntervalMs,
      refcounts: gc.refcounts,
      storeClock: gc.clock,
      scrubBlocksPerSecond: config.cache.scrubBlocksPerSecond,
    },
    log.child('host'),
  );
  gc.collector.packIndex = host.packIndex;
  await host.releaseStrayUploads().catch((err) => log.error('cannot let go of packs held for volumes this host no longer has; they stay held', { error: errorMessage(err) }));
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
      tls: nbdTls,
    },
    log.child('nbd'),
  );
  let api: Awaited<ReturnType<typeof startApi>> | undefined;
  try {
    await nbd.listen();
    if (config.servers.http.address) {
      const context = {
        host, store: metered, collector: gc.collector, disconnect: (name: string) => nbd.disconnect(name), token: config.servers.http.token, deferred: nbd.deferred,
        prices: config.cost,
      };
      api = await startApi(context, parseHostPort(config.servers.http.address), log.child('http'));
    }
  } catch (err) {
    await nbd.close().catch(() => undefined);
    await gc.collector.stop();
    await host.close();
    await gc.close();
    throw err;
  }

  if (nbdConfig.unixSocket && (nbdConfig.socketMode & 0o002) !== 0) {
    log.warn('the NBD unix socket is writable by every local user: any of them can attach any volume', { socket_mode: nbdConfig.socketMode.toString(8) });
  }
  log.info('access control', {
    http_token: config.servers.http.token === '' ? 'none (loopback only)' : 'required',
    nbd_tls: nbdTls ? `${nbdTls.mode} on TCP, offered on the unix socket` : 'off',
  });
  printAttachHelp(config, nbd.addresses(), opened.cipher.id !== 0);

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

/**
 * A memory tier larger than all the memory the daemon can have never fits: the kernel
 * would kill the daemon (or a VM) as it filled. Refused before anything opens.
 */
function checkMemoryTier(memorySizeGb: number): void {
  const memory = hostMemory();
  if (memory === undefined || memorySizeGb * GB <= memory.totalBytes) return;
  const has = memory.limit === 'host' ? "this host's memory" : "the memory limit of the daemon's cgroup";
  throw new Error(`config: cache.memory_size_gb = ${memorySizeGb} is more than ${has} (${(memory.totalBytes / GB).toFixed(2)} GB): the memory tier could never fit`);
}

/** The NBD TLS settings as a secure context; throws naming the setting that is wrong. */
function loadNbdTls(nbd: Config['servers']['nbd']): { mode: 'on' | 'require'; context: tls.SecureContext } | undefined {
  if (nbd.tls === 'off') return undefined;
  const read = (key: string, file: string): Buffer => {
    try {
      return readFileSync(file);
    } catch (err) {
      throw new Error(`[servers.nbd] ${key} ${file}: cannot read it: ${errorMessage(err)}`);
    }
  };
  const cert = read('tls_cert', nbd.tlsCert);
  const key = read('tls_key', nbd.tlsKey);
  try {
    // proto.md (TLS versions): at least TLS 1.2.
    return { mode: nbd.tls, context: tls.createSecureContext({ cert, key, minVersion: 'TLSv1.2' }) };
  } catch (err) {
    throw new Error(`[servers.nbd] tls_cert ${nbd.tlsCert} and tls_key ${nbd.tlsKey} are not a usable PEM certificate and key: ${errorMessage(err)}`);
  }
}

function printAttachHelp(config: Config, addresses: string[], encrypted: boolean): void {
  const nbd = config.servers.nbd;
  const lines = [`updraft is serving volumes from ${config.cache.dir} (store: ${config.storage.url}, ${encrypted ? 'encrypted' : 'not encrypted'})`];
  if (nbd.unixSocket) lines.push(`  NBD unix socket  ${nbd.unixSocket}`);
  for (const a of addresses) if (!a.startsWith('/')) lines.push(`  NBD TCP          ${a}`);
  if (config.servers.http.address) lines.push(`  HTTP API         http://${config.servers.http.address}  (GET /api/exports, /metrics; dashboard at /dashboard/)`);
  const auto = nbd.autoCreateSizeGb > 0 ? `created on first connect with ${nbd.autoCreateSizeGb} GB` : 'create it first: PUT /api/exports/NAME';
  lines.push('', `Attach a volume (export name = volume name; ${auto}):`);
  if (nbd.unixSocket) {
    const uri = `nbd+unix:///my-vm?socket=${nbd.unixSocket}`;
    lines.push(`  nbdinfo '${uri}'`, `  qemu-img info '${uri}'`, `  sudo nbd-client -unix ${nbd.unixSocket} /dev/nbd0 -N my-vm`);
  }
  const tcp = addresses.find((a) => !a.startsWith('/'));
  if (tcp && nbd.tls !== 'require') lines.push(`  nbdinfo 'nbd://${tcp}/my-vm'`);
  // libnbd reads ca-cert.pem (the CA that signed tls_cert) from the tls-certificates folder.
  if (tcp && nbd.tls !== 'off') lines.push(`  nbdinfo 'nbds://${tcp}/my-vm?tls-certificates=DIR_WITH_CA_CERT_PEM'`);
  process.stdout.write(lines.join('\n') + '\n');
}
