// NBD listeners (unix socket and TCP) and the life of one connection: negotiation
// (upgraded to TLS on NBD_OPT_STARTTLS), then transmission, with the volume's client
// count kept in step.
import fs from 'node:fs';
import net from 'node:net';
import tls from 'node:tls';
import { errorMessage, type Logger } from '../log.js';
import { ByteQueue } from './byte-queue.js';
import { DeferredRequests } from './deferred.js';
import { ReplyPacer } from './reply-pacer.js';
import { Handshake, ProtocolError, type ExportCatalog, type TlsPolicy } from './handshake.js';
import { raiseSendBuffer } from './socket-buffer.js';
import { Transmission } from './transmission.js';

/** Unparsed negotiation bytes buffered before we stop reading from the client. */
const MAX_NEGOTIATION_BACKLOG = 1024 * 1024;

export interface NbdServerOptions {
  unixSocket?: string;
  /** Permissions of the unix socket file. */
  socketMode?: number;
  tcp?: Array<{ host: string; port: number }>;
  /**
   * TLS through NBD_OPT_STARTTLS. `mode` applies to TCP connections; on the unix socket,
   * which its permissions guard, TLS is offered and never required.
   */
  tls?: { mode: 'on' | 'require'; context: tls.SecureContext };
  /** A client that has not finished negotiating by then is disconnected; the time the server spends opening a volume does not count. */
  handshakeTimeoutMs?: number;
  /** Bounds of deferred requests; default MAX_DEFERRED_PER_CONNECTION and MAX_DEFERRED_PER_HOST. */
  deferred?: DeferredRequests;
}

export class NbdServer {
  private readonly servers: net.Server[] = [];
  private readonly sockets = new Set<net.Socket>();
  /** Attached sockets by volume name, to disconnect a volume's clients. */
  private readonly attached = new Map<string, Set<net.Socket>>();
  connections = 0;

  constructor(
    private readonly catalog: ExportCatalog,
    private readonly options: NbdServerOptions,
    private readonly log: Logger,
  ) {
    this.deferred = options.deferred ?? new DeferredRequests();
  }

  /** Large read replies of every connection, written a turn's budget at a time. */
  private readonly pacer = new ReplyPacer();

  /** Requests waiting for the store or a flush, every connection together (metrics). */
  readonly deferred: DeferredRequests;

  async listen(): Promise<void> {
    const { unixSocket, tcp = [] } = this.options;
    if (unixSocket) {
      if (fs.existsSync(unixSocket)) {
        if (await socketAnswers(unixSocket)) throw new Error(`NBD socket ${unixSocket} is in use by another process`);
        fs.unlinkSync(unixSocket); // left behind by a daemon that was killed
      }
      // Created owner-only, then opened up to socket_mode: never more open than configured.
      const umask = process.umask(0o177);
      try {
        await this.start({ path: unixSocket }, `unix:${unixSocket}`, this.options.tls ? 'on' : 'off');
      } finally {
        process.umask(umask);
      }
      fs.chmodSync(unixSocket, this.options.socketMode ?? 0o660);
    }
    const tcpMode = this.options.tls?.mode ?? 'off';
    for (const address of tcp) await this.start({ host: address.host, port: address.port }, `tcp:${address.host}:${address.port}`, tcpMode);
  }

  private start(listenOptions: net.ListenOptions, label: string, tlsMode: TlsPolicy['mode']): Promise<void> {
    const unix = listenOptions.path !== undefined;
    const server = net.createServer({ noDelay: true }, (socket) => {
      if (unix) this.raiseSendBuffer(socket);
      this.accept(socket, tlsMode);
    });
    this.servers.push(server);
    return new Promise((resolve, reject) => {
      server.once('error', (err) => reject(new Error(`NBD listen on ${label}: ${err.message}`)));
      server.listen(listenOptions, () => {
        server.on('error', (err) => this.log.error('listener error', { address: label, error: err.message }));
        resolve();
      });
    });
  }

  /** Whether raiseSendBuffer has logged what it did: once a daemon. */
  private sendBufferLogged = false;

  /** A unix-socket connection's send buffer raised (socket-buffer.ts); said once in the log. */
  private raiseSendBuffer(socket: net.Socket): void {
    const result = raiseSendBuffer(socket);
    if (this.sendBufferLogged) return;
    this.sendBufferLogged = true;
    if (result instanceof Error) this.log.warn('unix-socket connections keep the kernel\'s send buffer: large read replies go out in pieces', { error: result.message });
    else this.log.info('unix-socket connections: send buffer raised', { bytes: result });
  }

  /** Addresses actually bound (TCP ports resolved). */
  addresses(): string[] {
    return this.servers.map((s) => {
      const a = s.address();
      return typeof a === 'string' ? a : a ? `${a.address}:${a.port}` : '';
    });
  }

  /**
   * One connection. `raw` is the TCP or unix socket; after NBD_OPT_STARTTLS, `socket` is
   * the TLS socket wrapped around it. Destroying `raw` ends both.
   */
  private accept(raw: net.Socket, tlsMode: TlsPolicy['mode']): void {
    this.connections++;
    this.sockets.add(raw);
    const peer = raw.remoteAddress ? `${raw.remoteAddress}:${raw.remotePort}` : 'unix';
    const queue = new ByteQueue();
    let socket = raw;
    let transmission: Transmission | undefined;
    let detach: (() => void) | undefined;

    const onData = (chunk: Buffer) => {
      queue.push(chunk);
      if (transmission) transmission.pump();
      else {
        // Options are read one at a time; a client racing ahead is held at the socket.
        if (queue.length > MAX_NEGOTIATION_BACKLOG) socket.pause();
        handshake.reader.onData();
      }
    };
    const context = this.options.tls?.context;
    const startTls = (): Promise<net.Socket> =>
      new Promise((resolve, reject) => {
        // From here on the TLS socket reads the connection; the raw one only sees it close.
        raw.removeListener('data', onData);
        const secure = new tls.TLSSocket(raw, { isServer: true, secureContext: context });
        let handshaken = false;
        secure.on('data', onData);
        secure.once('secure', () => {
          handshaken = true;
          socket = secure;
          resolve(secure);
        });
        secure.on('error', (err) => {
          if (!handshaken) reject(err);
          else this.log.debug('connection error', { peer, error: err.message });
        });
      });
    // The negotiation timeout is the client's time: it stops while the server opens a
    // volume, which may wait on the store (bounded by [storage] request_deadline_s per
    // request), and goes on with what was left (at least a second to read the reply).
    let negotiationLeftMs = this.options.handshakeTimeoutMs ?? 30_000;
    let armedAt = 0;
    const armTimer = () => {
      armedAt = performance.now();
      return setTimeout(() => {
        this.log.warn('closing connection: negotiation timed out', { peer });
        raw.destroy();
      }, Math.max(1000, negotiationLeftMs));
    };
    let timer = armTimer();
    const catalog: ExportCatalog = {
      list: () => this.catalog.list(),
      peek: (name) => this.catalog.peek(name),
      open: async (name) => {
        clearTimeout(timer);
        negotiationLeftMs -= performance.now() - armedAt;
        try {
          return await this.catalog.open(name);
        } finally {
          timer = armTimer();
        }
      },
    };
    const handshake = new Handshake(raw, queue, catalog, { mode: tlsMode, startTls: context ? startTls : undefined });

    raw.on('data', onData);
    raw.on('error', (err) => this.log.debug('connection error', { peer, error: err.message }));
    raw.on('close', () => {
      this.sockets.delete(raw);
      this.connections--;
      handshake.reader.fail(new ProtocolError('client disconnected during negotiation'));
      transmission?.close();
      detach?.();
    });
    handshake.run().then(
      (negotiated) => {
        clearTimeout(timer);
        if (!negotiated) {
          socket.end();
          return;
        }
        if (socket.destroyed) return;
        const volume = negotiated.volume;
        volume.clients++;
        let attached = true;
        let sockets = this.attached.get(volume.name);
        if (!sockets) this.attached.set(volume.name, (sockets = new Set()));
        sockets.add(raw);
        detach = () => {
          if (attached) {
            volume.clients--;
            sockets.delete(raw);
            if (sockets.size === 0 && this.attached.get(volume.name) === sockets) this.attached.delete(volume.name);
          }
          attached = false;
        };
        this.log.debug('client attached', { peer, volume: volume.name, structured: negotiated.structured, tls: socket !== raw });
        transmission = new Transmission(socket, queue, negotiated, this.log, () => detach?.(), this.deferred, this.pacer);
        socket.resume();
        transmission.pump(); // requests may already be queued behind the last option
      },
      (err) => {
        clearTimeout(timer);
        if (err instanceof ProtocolError) {
          if (err.message !== 'client disconnected during negotiation') {
            this.log.warn('closing connection: negotiation failed', { peer, reason: err.message });
          }
        } else {
          this.log.error('negotiation failed unexpectedly', { peer, error: errorMessage(err) });
        }
        raw.destroy();
      },
    );
  }

  /** Close every connection attached to a volume (it is being removed here). */
  disconnect(volume: string): number {
    const sockets = this.attached.get(volume);
    if (!sockets) return 0;
    for (const socket of sockets) socket.destroy();
    return sockets.size;
  }

  /** Stop listening and close every connection. */
  async close(): Promise<void> {
    // server.close() resolves only once every connection has ended: end them first.
    const closed = Promise.all(this.servers.map((s) => new Promise<void>((resolve) => s.close(() => resolve()))));
    for (const socket of this.sockets) socket.destroy();
    await closed;
    if (this.options.unixSocket) fs.rmSync(this.options.unixSocket, { force: true });
  }
}

/** Whether something accepts connections on a unix socket path. */
function socketAnswers(file: string): Promise<boolean> {
  return new Promise((resolve) => {
    const probe = net.connect({ path: file });
    probe.once('connect', () => {
      probe.destroy();
      resolve(true);
    });
    probe.once('error', () => resolve(false));
  });
}
