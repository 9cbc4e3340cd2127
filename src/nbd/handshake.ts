// Fixed newstyle negotiation (proto.md: "Newstyle negotiation", "Option types", "TLS
// support"). Ends with an export chosen (NBD_OPT_EXPORT_NAME or NBD_OPT_GO) or the
// connection closed. Every length is checked against our limits before anything is
// allocated.
import type { Socket } from 'node:net';
import { isUnavailable } from '../objectstore/types.js';
import { VolumeError, type Volume } from '../volume/volume.js';
import { ByteQueue } from './byte-queue.js';
import * as P from './protocol.js';

export interface ExportCatalog {
  /** Exports to show for NBD_OPT_LIST. */
  list(): Array<{ name: string; description: string }>;
  /**
   * The volume for an export name; undefined when unknown. Throws VolumeError for a bad
   * name, an 'Unavailable' ObjectStoreError when the name must come from a store that
   * does not answer.
   */
  open(name: string): Promise<Volume | undefined>;
  /** An open volume, without creating one (NBD_OPT_INFO). Throws VolumeError for a bad name. */
  peek(name: string): Volume | undefined;
}

export interface Negotiated {
  volume: Volume;
  exportName: string;
  structured: boolean;
  /** Context id chosen for base:allocation, or 0 when not negotiated. */
  baseAllocationId: number;
}

/**
 * How one connection treats TLS, in the spec's server modes: 'off' is NOTLS,
 * 'on' is SELECTIVETLS with no TLS-only export (the client may upgrade), 'require' is
 * FORCEDTLS (every option but NBD_OPT_STARTTLS and NBD_OPT_ABORT waits for TLS).
 */
export interface TlsPolicy {
  mode: 'off' | 'on' | 'require';
  /**
   * Upgrade the connection once the NBD_REP_ACK to NBD_OPT_STARTTLS is written;
   * resolves with the TLS socket when the TLS handshake has succeeded.
   */
  startTls?: () => Promise<Socket>;
}

/** A protocol violation that ends the connection; the message goes to the log. */
export class ProtocolError extends Error {}

const BASE_ALLOCATION_ID = 1;
/** Option reply bytes queued for a client before we stop reading its options. */
const MAX_QUEUED_OPTION_REPLY_BYTES = 1024 * 1024;

/** Transmission flags for a volume: exactly what this server implements. */
export function transmissionFlags(volume: Volume): number {
  let flags =
    P.FLAG_HAS_FLAGS | P.FLAG_SEND_FLUSH | P.FLAG_SEND_FUA | P.FLAG_SEND_TRIM | P.FLAG_SEND_WRITE_ZEROES |
    P.FLAG_SEND_DF | P.FLAG_CAN_MULTI_CONN | P.FLAG_SEND_CACHE | P.FLAG_SEND_FAST_ZERO;
  if (volume.readOnly) flags |= P.FLAG_READ_ONLY;
  return flags;
}

/** Reads exact byte counts from a socket during negotiation. */
class OptionReader {
  private waiting: { n: number; resolve: () => void; reject: (e: Error) => void } | undefined;
  private failure: Error | undefined;

  constructor(
    readonly queue: ByteQueue,
    /** The socket options arrive on: the TLS socket once NBD_OPT_STARTTLS succeeded. */
    public socket: Socket,
  ) {}

  onData(): void {
    if (this.waiting && this.queue.length >= this.waiting.n) {
      const w = this.waiting;
      this.waiting = undefined;
      w.resolve();
    }
  }

  fail(err: Error): void {
    this.failure = err;
    if (this.waiting) {
      const w = this.waiting;
      this.waiting = undefined;
      w.reject(err);
    }
  }

  async read(n: number): Promise<Buffer> {
    if (this.queue.length < n) {
      if (this.failure) throw this.failure;
      // The server pauses a socket whose backlog is large; ours is consumed, so read on.
      this.socket.resume();
      await new Promise<void>((resolve, reject) => {
        this.waiting = { n, resolve, reject };
      });
    }
    return n === 0 ? Buffer.alloc(0) : this.queue.take(n);
  }
}

export class Handshake {
  private structured = false;
  private baseAllocationId = 0;
  private noZeroes = false;
  /** True once NBD_OPT_STARTTLS succeeded: everything since went over TLS. */
  private tlsActive = false;
  readonly reader: OptionReader;

  constructor(
    /** Replaced by the TLS socket when NBD_OPT_STARTTLS succeeds. */
    private socket: Socket,
    readonly queue: ByteQueue,
    private readonly catalog: ExportCatalog,
    private readonly tls: TlsPolicy = { mode: 'off' },
  ) {
    this.reader = new OptionReader(queue, socket);
  }

  /** Run the negotiation. Resolves with the export, or undefined when the client aborted. */
  async run(): Promise<Negotiated | undefined> {
    const greeting = Buffer.alloc(18);
    greeting.writeBigUInt64BE(P.NBDMAGIC, 0);
    greeting.writeBigUInt64BE(P.IHAVEOPT, 8);
    greeting.writeUInt16BE(P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES, 16);
    this.socket.write(greeting);

    const clientFlags = (await this.reader.read(4)).readUInt32BE(0);
    if (clientFlags & ~(P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES)) {
      throw new ProtocolError(`client flags 0x${clientFlags.toString(16)} include bits this server does not know`);
    }
    this.noZeroes = (clientFlags & P.FLAG_C_NO_ZEROES) !== 0;
    // proto.md: TLS needs fixed newstyle; without it the only way in is plaintext.
    if (this.tls.mode === 'require' && (clientFlags & P.FLAG_C_FIXED_NEWSTYLE) === 0) {
      throw new ProtocolError('client did not set NBD_FLAG_C_FIXED_NEWSTYLE, so it cannot negotiate the TLS this server requires');
    }

    for (;;) {
      // A client that sends options without reading the replies waits until it does.
      if (this.socket.writableLength > MAX_QUEUED_OPTION_REPLY_BYTES) {
        this.socket.pause();
        await new Promise((resolve) => {
          this.socket.once('drain', resolve);
          this.socket.once('close', resolve);
        });
      }
      const header = await this.reader.read(P.OPTION_HEADER_BYTES);
      if (header.readBigUInt64BE(0) !== P.IHAVEOPT) throw new ProtocolError('option without the IHAVEOPT magic');
      const option = header.readUInt32BE(8);
      const length = header.readUInt32BE(12);
      if (length > P.MAX_OPTION_BYTES) {
        throw new ProtocolError(`option ${option} carries ${length} bytes; at most ${P.MAX_OPTION_BYTES} are accepted`);
      }
      const data = await this.reader.read(length);
      const done = await this.handleOption(option, data);
      if (done !== null) return done;
    }
  }

  /** null: keep negotiating; undefined: client aborted; otherwise the chosen export. */
  private async handleOption(option: number, data: Buffer): Promise<Negotiated | undefined | null> {
    // FORCEDTLS: before TLS, only NBD_OPT_STARTTLS and NBD_OPT_ABORT are answered.
    if (this.tls.mode === 'require' && !this.tlsActive && option !== P.OPT_STARTTLS && option !== P.OPT_ABORT) {
      // NBD_OPT_EXPORT_NAME has no error reply: the spec's answer is to close.
      if (option === P.OPT_EXPORT_NAME) throw new ProtocolError('NBD_OPT_EXPORT_NAME before NBD_OPT_STARTTLS on a connection that requires TLS');
      return this.error(option, P.REP_ERR_TLS_REQD, 'this server requires TLS: send NBD_OPT_STARTTLS first');
    }
    switch (option) {
      case P.OPT_EXPORT_NAME:
        return this.exportName(data);
      case P.OPT_ABORT:
        this.reply(option, P.REP_ACK);
        return undefined;
      case P.OPT_LIST:
        if (data.length !== 0) return this.error(option, P.REP_ERR_INVALID, 'NBD_OPT_LIST takes no data');
        for (const exp of this.catalog.list()) {
          const name = Buffer.from(exp.name);
          const payload = Buffer.alloc(4 + name.length);
          payload.writeUInt32BE(name.length, 0);
          name.copy(payload, 4);
          this.reply(option, P.REP_SERVER, Buffer.concat([payload, Buffer.from(exp.description)]));
        }
        this.reply(option, P.REP_ACK);
        return null;
      case P.OPT_STRUCTURED_REPLY:
        if (data.length !== 0) return this.error(option, P.REP_ERR_INVALID, 'NBD_OPT_STRUCTURED_REPLY takes no data');
        this.structured = true;
        this.reply(option, P.REP_ACK);
        return null;
      case P.OPT_INFO:
      case P.OPT_GO:
        return this.infoOrGo(option, data);
      case P.OPT_LIST_META_CONTEXT:
      case P.OPT_SET_META_CONTEXT:
        return this.metaContext(option, data);
      case P.OPT_STARTTLS:
        return this.startTls(data);
      default:
        return this.error(option, P.REP_ERR_UNSUP, `option ${option} is not supported`);
    }
  }

  /** NBD_OPT_STARTTLS: acknowledge, then continue the negotiation over TLS. */
  private async startTls(data: Buffer): Promise<null> {
    const option = P.OPT_STARTTLS;
    if (this.tlsActive) return this.error(option, P.REP_ERR_INVALID, 'TLS is already negotiated on this connection');
    if (this.tls.mode === 'off' || !this.tls.startTls) return this.error(option, P.REP_ERR_POLICY, 'TLS is not configured on this server');
    if (data.length !== 0) return this.error(option, P.REP_ERR_INVALID, 'NBD_OPT_STARTTLS takes no data');
    // The client must wait for the ACK before its TLS handshake; plaintext bytes sent
    // ahead of it cannot be told apart from TLS records.
    if (this.queue.length !== 0) throw new ProtocolError(`client sent ${this.queue.length} bytes after NBD_OPT_STARTTLS without waiting for its reply`);
    await new Promise<void>((resolve, reject) => {
      this.socket.write(optionReply(option, P.REP_ACK), (err) => (err ? reject(new ProtocolError(`NBD_OPT_STARTTLS reply: ${err.message}`)) : resolve()));
    });
    try {
      this.socket = await this.tls.startTls();
    } catch (err) {
      throw new ProtocolError(`TLS handshake failed: ${(err as Error).message}`);
    }
    this.reader.socket = this.socket;
    this.tlsActive = true;
    // proto.md: no negotiation state from before NBD_OPT_STARTTLS is kept.
    this.structured = false;
    this.baseAllocationId = 0;
    return null;
  }

  private async exportName(data: Buffer): Promise<Negotiated> {
    const name = data.toString('utf8');
    // NBD_OPT_EXPORT_NAME has no error reply: the spec's answer to a refusal is to close.
    let volume: Volume | undefined;
    try {
      volume = await this.catalog.open(name);
    } catch (err) {
      throw new ProtocolError(`NBD_OPT_EXPORT_NAME ${JSON.stringify(name)} refused: ${(err as Error).message}`);
    }
    if (!volume) throw new ProtocolError(`NBD_OPT_EXPORT_NAME ${JSON.stringify(name)}: no such export`);
    const reply = Buffer.alloc(this.noZeroes ? 10 : 134);
    reply.writeBigUInt64BE(BigInt(volume.size), 0);
    reply.writeUInt16BE(transmissionFlags(volume), 8);
    this.socket.write(reply);
    return { volume, exportName: name, structured: this.structured, baseAllocationId: this.baseAllocationId };
  }

  private async infoOrGo(option: number, data: Buffer): Promise<Negotiated | null> {
    const optName = option === P.OPT_GO ? 'NBD_OPT_GO' : 'NBD_OPT_INFO';
    if (data.length < 6) return this.error(option, P.REP_ERR_INVALID, `${optName} data too short`);
    const nameLength = data.readUInt32BE(0);
    if (nameLength > P.MAX_STRING || 4 + nameLength + 2 > data.length) {
      return this.error(option, P.REP_ERR_INVALID, `${optName} export name length ${nameLength} does not fit the option`);
    }
    const name = data.toString('utf8', 4, 4 + nameLength);
    const requests = data.readUInt16BE(4 + nameLength);
    if (data.length !== 4 + nameLength + 2 + requests * 2) {
      return this.error(option, P.REP_ERR_INVALID, `${optName} lists ${requests} information requests but carries ${data.length} bytes`);
    }
    const wanted = new Set<number>();
    for (let i = 0; i < requests; i++) wanted.add(data.readUInt16BE(4 + nameLength + 2 + i * 2));

    let volume: Volume | undefined;
    try {
      volume = option === P.OPT_GO ? await this.catalog.open(name) : await this.catalog.peek(name);
    } catch (err) {
      // A volume this host keeps out of service (it lost the lease with writes no manifest carries).
      if (err instanceof VolumeError && err.code === 'EPERM') return this.error(option, P.REP_ERR_POLICY, err.message);
      if (err instanceof VolumeError) return this.error(option, P.REP_ERR_INVALID, err.message);
      // proto.md: "The requested export is not available"; the message says why and that it may pass.
      if (isUnavailable(err)) return this.error(option, P.REP_ERR_UNKNOWN, err.message);
      return this.error(option, P.REP_ERR_PLATFORM, (err as Error).message);
    }
    if (!volume) return this.error(option, P.REP_ERR_UNKNOWN, `no export named ${JSON.stringify(name)}`);

    const exportInfo = Buffer.alloc(12);
    exportInfo.writeUInt16BE(P.INFO_EXPORT, 0);
    exportInfo.writeBigUInt64BE(BigInt(volume.size), 2);
    exportInfo.writeUInt16BE(transmissionFlags(volume), 10);
    this.reply(option, P.REP_INFO, exportInfo);
    if (wanted.has(P.INFO_NAME)) this.reply(option, P.REP_INFO, infoString(P.INFO_NAME, volume.name));
    if (wanted.has(P.INFO_DESCRIPTION)) this.reply(option, P.REP_INFO, infoString(P.INFO_DESCRIPTION, describe(volume)));
    // Block size constraints are sent whether asked or not: they are ours to state.
    const blockSize = Buffer.alloc(14);
    blockSize.writeUInt16BE(P.INFO_BLOCK_SIZE, 0);
    blockSize.writeUInt32BE(P.MIN_BLOCK, 2);
    blockSize.writeUInt32BE(P.PREFERRED_BLOCK, 6);
    blockSize.writeUInt32BE(P.MAX_PAYLOAD, 10);
    this.reply(option, P.REP_INFO, blockSize);
    this.reply(option, P.REP_ACK);
    if (option === P.OPT_INFO) return null;
    return { volume, exportName: name, structured: this.structured, baseAllocationId: this.baseAllocationId };
  }

  private metaContext(option: number, data: Buffer): null {
    const optName = option === P.OPT_SET_META_CONTEXT ? 'NBD_OPT_SET_META_CONTEXT' : 'NBD_OPT_LIST_META_CONTEXT';
    if (!this.structured) {
      return this.error(option, P.REP_ERR_INVALID, `${optName} needs NBD_OPT_STRUCTURED_REPLY first`);
    }
    if (data.length < 8) return this.error(option, P.REP_ERR_INVALID, `${optName} data too short`);
    const nameLength = data.readUInt32BE(0);
    if (nameLength > P.MAX_STRING || 4 + nameLength + 4 > data.length) {
      return this.error(option, P.REP_ERR_INVALID, `${optName} export name length ${nameLength} does not fit the option`);
    }
    let at = 4 + nameLength;
    const count = data.readUInt32BE(at);
    at += 4;
    const queries: string[] = [];
    for (let i = 0; i < count; i++) {
      if (at + 4 > data.length) return this.error(option, P.REP_ERR_INVALID, `${optName} query ${i} is cut short`);
      const len = data.readUInt32BE(at);
      at += 4;
      if (len > P.MAX_STRING || at + len > data.length) {
        return this.error(option, P.REP_ERR_INVALID, `${optName} query ${i} length ${len} does not fit the option`);
      }
      queries.push(data.toString('utf8', at, at + len));
      at += len;
    }
    if (at !== data.length) return this.error(option, P.REP_ERR_INVALID, `${optName} has ${data.length - at} trailing bytes`);

    const set = option === P.OPT_SET_META_CONTEXT;
    // LIST with no queries, or the namespace query 'base:', lists every context we have.
    const matches = queries.some((q) => q === P.BASE_ALLOCATION || (!set && q === 'base:')) || (!set && count === 0);
    if (set) this.baseAllocationId = matches ? BASE_ALLOCATION_ID : 0;
    if (matches) {
      const name = Buffer.from(P.BASE_ALLOCATION);
      const payload = Buffer.alloc(4 + name.length);
      payload.writeUInt32BE(set ? BASE_ALLOCATION_ID : 0, 0);
      name.copy(payload, 4);
      this.reply(option, P.REP_META_CONTEXT, payload);
    }
    this.reply(option, P.REP_ACK);
    return null;
  }

  private reply(option: number, type: number, data: Buffer = Buffer.alloc(0)): void {
    this.socket.write(optionReply(option, type, data));
  }

  /** Send an error reply with a human-readable message; negotiation continues. */
  private error(option: number, type: number, message: string): null {
    this.reply(option, type, Buffer.from(message.slice(0, 1024)));
    return null;
  }
}

/** An option reply: magic, option, reply type, length, data. */
function optionReply(option: number, type: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const header = Buffer.alloc(20);
  header.writeBigUInt64BE(P.OPTION_REPLY_MAGIC, 0);
  header.writeUInt32BE(option, 8);
  header.writeUInt32BE(type, 12);
  header.writeUInt32BE(data.length, 16);
  return data.length ? Buffer.concat([header, data]) : header;
}

function infoString(type: number, text: string): Buffer {
  const body = Buffer.from(text.slice(0, P.MAX_STRING));
  const out = Buffer.alloc(2 + body.length);
  out.writeUInt16BE(type, 0);
  body.copy(out, 2);
  return out;
}

/** The export description, for NBD_INFO_DESCRIPTION and NBD_OPT_LIST alike. */
export function describe(volume: { name: string; readOnly: boolean }): string {
  return `updraft volume ${volume.name}${volume.readOnly ? ' (read-only)' : ''}`;
}
