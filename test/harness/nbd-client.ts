// A small NBD client for tests, written from the protocol specification
// (NetworkBlockDevice/nbd doc/proto.md). It is independent of src/nbd on purpose: the
// daemon's codec must not be checked against itself. test/nbd-client.test.ts proves this
// client against nbdkit, the reference server.
//
// Covered: fixed newstyle handshake, NBD_OPT_LIST / INFO / GO / EXPORT_NAME,
// STRUCTURED_REPLY, SET_META_CONTEXT; pipelined commands with simple and structured
// replies. Not covered: TLS, extended headers.

import net from 'node:net';

// ---------------------------------------------------------------------------
// Protocol constants

export const NBD_MAGIC = 0x4e42444d41474943n; // "NBDMAGIC"
export const NBD_OPTS_MAGIC = 0x49484156454f5054n; // "IHAVEOPT"
export const NBD_OLDSTYLE_MAGIC = 0x00420281861253n;
export const NBD_OPTION_REPLY_MAGIC = 0x3e889045565a9n;
export const NBD_REQUEST_MAGIC = 0x25609513;
export const NBD_SIMPLE_REPLY_MAGIC = 0x67446698;
export const NBD_STRUCTURED_REPLY_MAGIC = 0x668e33ef;

/** Handshake flags (server, 16 bits). */
export const NBD_FLAG_FIXED_NEWSTYLE = 1 << 0;
export const NBD_FLAG_NO_ZEROES = 1 << 1;
/** Client flags (32 bits). */
export const NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0;
export const NBD_FLAG_C_NO_ZEROES = 1 << 1;

export const NBD_OPT = {
  EXPORT_NAME: 1,
  ABORT: 2,
  LIST: 3,
  STARTTLS: 5,
  INFO: 6,
  GO: 7,
  STRUCTURED_REPLY: 8,
  LIST_META_CONTEXT: 9,
  SET_META_CONTEXT: 10,
  EXTENDED_HEADERS: 11,
} as const;

export const NBD_REP = { ACK: 1, SERVER: 2, INFO: 3, META_CONTEXT: 4 } as const;

/** Option error replies: bit 31 set. */
export const NBD_REP_ERR = {
  UNSUP: 2 ** 31 + 1,
  POLICY: 2 ** 31 + 2,
  INVALID: 2 ** 31 + 3,
  PLATFORM: 2 ** 31 + 4,
  TLS_REQD: 2 ** 31 + 5,
  UNKNOWN: 2 ** 31 + 6,
  SHUTDOWN: 2 ** 31 + 7,
  BLOCK_SIZE_REQD: 2 ** 31 + 8,
  TOO_BIG: 2 ** 31 + 9,
  EXT_HEADER_REQD: 2 ** 31 + 10,
} as const;

export const NBD_INFO = { EXPORT: 0, NAME: 1, DESCRIPTION: 2, BLOCK_SIZE: 3 } as const;

/** Transmission flags (16 bits, sent with the export). */
export const NBD_FLAG = {
  HAS_FLAGS: 1 << 0,
  READ_ONLY: 1 << 1,
  SEND_FLUSH: 1 << 2,
  SEND_FUA: 1 << 3,
  ROTATIONAL: 1 << 4,
  SEND_TRIM: 1 << 5,
  SEND_WRITE_ZEROES: 1 << 6,
  SEND_DF: 1 << 7,
  CAN_MULTI_CONN: 1 << 8,
  SEND_RESIZE: 1 << 9,
  SEND_CACHE: 1 << 10,
  SEND_FAST_ZERO: 1 << 11,
  BLOCK_STAT_PAYLOAD: 1 << 12,
} as const;

export const NBD_CMD = {
  READ: 0,
  WRITE: 1,
  DISC: 2,
  FLUSH: 3,
  TRIM: 4,
  CACHE: 5,
  WRITE_ZEROES: 6,
  BLOCK_STATUS: 7,
  RESIZE: 8,
} as const;

export const NBD_CMD_FLAG = {
  FUA: 1 << 0,
  NO_HOLE: 1 << 1,
  DF: 1 << 2,
  REQ_ONE: 1 << 3,
  FAST_ZERO: 1 << 4,
  PAYLOAD_LEN: 1 << 5,
} as const;

export const NBD_REPLY_FLAG_DONE = 1 << 0;

export const NBD_REPLY_TYPE = {
  NONE: 0,
  OFFSET_DATA: 1,
  OFFSET_HOLE: 2,
  BLOCK_STATUS: 5,
  ERROR: 2 ** 15 + 1,
  ERROR_OFFSET: 2 ** 15 + 2,
} as const;
const REPLY_TYPE_ERROR_BIT = 1 << 15;

/** base:allocation status flags. */
export const NBD_STATE_HOLE = 1 << 0;
export const NBD_STATE_ZERO = 1 << 1;

export const BASE_ALLOCATION = 'base:allocation';

/** Error values in replies. */
export const NBD_ERRNO = {
  EPERM: 1,
  EIO: 5,
  ENOMEM: 12,
  EINVAL: 22,
  ENOSPC: 28,
  EOVERFLOW: 75,
  ENOTSUP: 95,
  ESHUTDOWN: 108,
} as const;

/** Request header size on the wire (compact headers). */
export const NBD_REQUEST_SIZE = 28;

function nameOf(table: Record<string, number>, value: number, prefix: string): string {
  for (const [name, v] of Object.entries(table)) if (v === value) return prefix + name;
  return `${prefix}${value}`;
}

/** EIO, EINVAL, ... or 'errno N' for a value the spec does not define. */
export function nbdErrorName(errno: number): string {
  for (const [name, value] of Object.entries(NBD_ERRNO)) if (value === errno) return name;
  return `errno ${errno}`;
}
export const optionName = (option: number): string => nameOf(NBD_OPT, option, 'NBD_OPT_');
export const optionReplyName = (reply: number): string =>
  reply >= 2 ** 31 ? nameOf(NBD_REP_ERR, reply, 'NBD_REP_ERR_') : nameOf(NBD_REP, reply, 'NBD_REP_');
export const commandName = (type: number): string => nameOf(NBD_CMD, type, 'NBD_CMD_');
export const replyTypeName = (type: number): string => nameOf(NBD_REPLY_TYPE, type, 'NBD_REPLY_TYPE_');

// ---------------------------------------------------------------------------
// Errors

/** The peer closed (or reset) the connection while we waited for bytes. */
export class ConnectionClosedError extends Error {
  constructor(message = 'NBD connection closed by peer', options?: ErrorOptions) {
    super(message, options);
    this.name = 'ConnectionClosedError';
  }
}

export const isConnectionClosed = (err: unknown): boolean => err instanceof ConnectionClosedError;

/** The server answered an option with NBD_REP_ERR_*; `code` is that name. */
export class NbdOptionError extends Error {
  constructor(
    readonly option: number,
    readonly reply: number,
    readonly serverMessage: string,
  ) {
    super(`${optionName(option)}: ${optionReplyName(reply)}${serverMessage ? `: ${serverMessage}` : ''}`);
    this.name = 'NbdOptionError';
  }
  get code(): string {
    return optionReplyName(this.reply);
  }
}

/** A command's error reply; `errno` is the NBD error value, `code` its name (EIO, ...). */
export class NbdCommandError extends Error {
  readonly code: string;
  constructor(
    readonly command: string,
    readonly offset: number,
    readonly length: number,
    readonly errno: number,
    readonly serverMessage = '',
    /** From NBD_REPLY_TYPE_ERROR_OFFSET. */
    readonly errorOffset?: number,
  ) {
    const code = nbdErrorName(errno);
    super(
      `${command}(offset=${offset}, length=${length}) failed: ${code} (${errno})` +
        (errorOffset !== undefined ? ` at offset ${errorOffset}` : '') +
        (serverMessage ? `: ${serverMessage}` : ''),
    );
    this.name = 'NbdCommandError';
    this.code = code;
  }
}

/** The server broke the protocol (bad magic, unknown cookie, malformed chunk, ...). */
export class NbdProtocolError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'NbdProtocolError';
  }
}

// ---------------------------------------------------------------------------
// Byte-exact reading from a socket

/** Buffers a socket's data and hands it out in exact sizes, one read at a time. */
class ByteReader {
  private chunks: Buffer[] = [];
  private size = 0;
  private waiter: { n: number; resolve: (b: Buffer) => void; reject: (e: Error) => void; timer?: NodeJS.Timeout } | null =
    null;
  private endError: Error | null = null;
  readonly closed: Promise<void>;
  isClosed = false;

  constructor(socket: net.Socket) {
    socket.on('data', (chunk: Buffer) => {
      this.chunks.push(chunk);
      this.size += chunk.length;
      this.pump();
    });
    socket.on('end', () => this.finish(new ConnectionClosedError()));
    socket.on('error', (err) => this.finish(new ConnectionClosedError(`NBD connection failed: ${err.message}`, { cause: err })));
    this.closed = new Promise((resolve) =>
      socket.once('close', () => {
        this.isClosed = true;
        this.finish(new ConnectionClosedError());
        resolve();
      }),
    );
  }

  get buffered(): number {
    return this.size;
  }

  read(n: number, timeoutMs?: number): Promise<Buffer> {
    if (this.waiter) return Promise.reject(new Error('ByteReader: concurrent reads'));
    if (this.size >= n) return Promise.resolve(this.take(n));
    if (this.endError) return Promise.reject(this.endError);
    return new Promise((resolve, reject) => {
      this.waiter = { n, resolve, reject };
      if (timeoutMs !== undefined) {
        this.waiter.timer = setTimeout(() => {
          this.waiter = null;
          reject(new Error(`timed out after ${timeoutMs} ms waiting for ${n} bytes (have ${this.size})`));
        }, timeoutMs);
      }
    });
  }

  private finish(err: Error): void {
    if (!this.endError) this.endError = err;
    this.pump();
  }

  private pump(): void {
    const waiter = this.waiter;
    if (!waiter) return;
    if (this.size >= waiter.n) {
      this.waiter = null;
      clearTimeout(waiter.timer);
      waiter.resolve(this.take(waiter.n));
    } else if (this.endError) {
      this.waiter = null;
      clearTimeout(waiter.timer);
      waiter.reject(this.endError);
    }
  }

  private take(n: number): Buffer {
    this.size -= n;
    const first = this.chunks[0];
    if (n === 0) return Buffer.alloc(0);
    if (first.length >= n) {
      if (first.length === n) this.chunks.shift();
      else this.chunks[0] = first.subarray(n);
      return first.subarray(0, n);
    }
    const out = Buffer.allocUnsafe(n);
    let filled = 0;
    while (filled < n) {
      const chunk = this.chunks[0];
      const want = n - filled;
      if (chunk.length <= want) {
        chunk.copy(out, filled);
        filled += chunk.length;
        this.chunks.shift();
      } else {
        chunk.copy(out, filled, 0, want);
        this.chunks[0] = chunk.subarray(want);
        filled += want;
      }
    }
    return out;
  }
}

const readers = new WeakMap<net.Socket, ByteReader>();
function readerFor(socket: net.Socket): ByteReader {
  let reader = readers.get(socket);
  if (!reader) {
    reader = new ByteReader(socket);
    readers.set(socket, reader);
  }
  return reader;
}

/**
 * Exactly n bytes from the socket, or a rejection: ConnectionClosedError when the peer
 * closes first, a timeout Error when timeoutMs passes. Bytes beyond n stay for the next call.
 */
export function readExact(socket: net.Socket, n: number, timeoutMs: number): Promise<Buffer> {
  return readerFor(socket).read(n, timeoutMs);
}

/** Resolves true once the socket is closed, false if it is still open after timeoutMs. */
export async function waitClosed(socket: net.Socket, timeoutMs: number): Promise<boolean> {
  const reader = readerFor(socket);
  if (reader.isClosed) return true;
  let timer: NodeJS.Timeout | undefined;
  const outcome = await Promise.race([
    reader.closed.then(() => true),
    new Promise<boolean>((resolve) => (timer = setTimeout(() => resolve(false), timeoutMs))),
  ]);
  clearTimeout(timer);
  return outcome;
}

// ---------------------------------------------------------------------------
// Encoding

export interface RequestHeader {
  flags?: number;
  type: number;
  cookie?: bigint | number;
  offset?: bigint | number;
  length?: number;
  /** Override the request magic, for bad-input tests. */
  magic?: number;
}

/** A 28-byte transmission request header. */
export function encodeRequest(req: RequestHeader): Buffer {
  const buf = Buffer.alloc(NBD_REQUEST_SIZE);
  buf.writeUInt32BE(req.magic ?? NBD_REQUEST_MAGIC, 0);
  buf.writeUInt16BE(req.flags ?? 0, 4);
  buf.writeUInt16BE(req.type, 6);
  buf.writeBigUInt64BE(BigInt(req.cookie ?? 0), 8);
  buf.writeBigUInt64BE(BigInt(req.offset ?? 0), 16);
  buf.writeUInt32BE(req.length ?? 0, 24);
  return buf;
}

/** An option request: IHAVEOPT, option, length, data. */
export function encodeOption(option: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const head = Buffer.alloc(16);
  head.writeBigUInt64BE(NBD_OPTS_MAGIC, 0);
  head.writeUInt32BE(option, 8);
  head.writeUInt32BE(data.length, 12);
  return Buffer.concat([head, data]);
}

/** u32 length + UTF-8 bytes, the spec's string-with-length. */
function lengthPrefixed(text: string): Buffer {
  const bytes = Buffer.from(text, 'utf8');
  const len = Buffer.alloc(4);
  len.writeUInt32BE(bytes.length, 0);
  return Buffer.concat([len, bytes]);
}

/** NBD_OPT_INFO / NBD_OPT_GO data: name and the NBD_INFO_* items requested. */
export function encodeInfoRequest(exportName: string, infoRequests: readonly number[]): Buffer {
  const tail = Buffer.alloc(2 + 2 * infoRequests.length);
  tail.writeUInt16BE(infoRequests.length, 0);
  infoRequests.forEach((info, i) => tail.writeUInt16BE(info, 2 + 2 * i));
  return Buffer.concat([lengthPrefixed(exportName), tail]);
}

/** NBD_OPT_SET_META_CONTEXT / LIST_META_CONTEXT data. */
export function encodeMetaContextRequest(exportName: string, queries: readonly string[]): Buffer {
  const count = Buffer.alloc(4);
  count.writeUInt32BE(queries.length, 0);
  return Buffer.concat([lengthPrefixed(exportName), count, ...queries.map(lengthPrefixed)]);
}

// ---------------------------------------------------------------------------
// Handshake

export interface NbdTarget {
  /** Unix socket path; when set, host/port are ignored. */
  path?: string;
  host?: string;
  /** Default 10809. */
  port?: number;
  /** Connect and per-step handshake timeout; default 10 s. */
  timeoutMs?: number;
}

export interface BlockSizeConstraints {
  minimum: number;
  preferred: number;
  maximum: number;
}

export interface ExportInfo {
  /** The name asked for. */
  name: string;
  size: number;
  /** Transmission flags (NBD_FLAG.*). */
  flags: number;
  /** From NBD_INFO_BLOCK_SIZE, when the server sent it. */
  blockSize: BlockSizeConstraints | null;
  /** From NBD_INFO_NAME / NBD_INFO_DESCRIPTION, when sent. */
  canonicalName?: string;
  description?: string;
}

export interface OptionReply {
  option: number;
  type: number;
  data: Buffer;
}

const DEFAULT_TIMEOUT_MS = 10_000;

async function openSocket(target: NbdTarget): Promise<net.Socket> {
  const timeoutMs = target.timeoutMs ?? DEFAULT_TIMEOUT_MS;
  const socket =
    target.path !== undefined
      ? net.createConnection({ path: target.path })
      : net.createConnection({ host: target.host ?? '127.0.0.1', port: target.port ?? 10809 });
  socket.setNoDelay(true);
  readerFor(socket); // attach before any byte can arrive
  const where = target.path ?? `${target.host ?? '127.0.0.1'}:${target.port ?? 10809}`;
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new Error(`NBD connect ${where}: timed out after ${timeoutMs} ms`));
    }, timeoutMs);
    socket.once('connect', () => {
      clearTimeout(timer);
      resolve();
    });
    socket.once('error', (err) => {
      clearTimeout(timer);
      reject(new Error(`NBD connect ${where}: ${err.message}`, { cause: err }));
    });
  });
  return socket;
}

/** Reads the server greeting and sends the client flags. Returns the handshake flags. */
async function greet(socket: net.Socket, timeoutMs: number): Promise<number> {
  const reader = readerFor(socket);
  const head = await reader.read(16, timeoutMs);
  const magic = head.readBigUInt64BE(0);
  if (magic !== NBD_MAGIC) throw new NbdProtocolError(`bad greeting magic 0x${magic.toString(16)}`);
  const second = head.readBigUInt64BE(8);
  if (second === NBD_OLDSTYLE_MAGIC) throw new NbdProtocolError('server speaks oldstyle negotiation, not supported');
  if (second !== NBD_OPTS_MAGIC) throw new NbdProtocolError(`bad newstyle magic 0x${second.toString(16)}`);
  const handshakeFlags = (await reader.read(2, timeoutMs)).readUInt16BE(0);
  if (!(handshakeFlags & NBD_FLAG_FIXED_NEWSTYLE)) throw new NbdProtocolError('server does not offer fixed newstyle');
  const clientFlags = Buffer.alloc(4);
  clientFlags.writeUInt32BE(NBD_FLAG_C_FIXED_NEWSTYLE | (handshakeFlags & NBD_FLAG_NO_ZEROES ? NBD_FLAG_C_NO_ZEROES : 0), 0);
  socket.write(clientFlags);
  return handshakeFlags;
}

/** One option reply (header and data). */
async function readOptionReply(socket: net.Socket, timeoutMs: number): Promise<OptionReply> {
  const reader = readerFor(socket);
  const head = await reader.read(20, timeoutMs);
  const magic = head.readBigUInt64BE(0);
  if (magic !== NBD_OPTION_REPLY_MAGIC) throw new NbdProtocolError(`bad option reply magic 0x${magic.toString(16)}`);
  const option = head.readUInt32BE(8);
  const type = head.readUInt32BE(12);
  const length = head.readUInt32BE(16);
  const data = await reader.read(length, timeoutMs);
  return { option, type, data };
}

/**
 * Sends an option and collects its replies up to the final ACK. Rejects with
 * NbdOptionError on an NBD_REP_ERR_* reply.
 */
async function optionRequest(socket: net.Socket, option: number, data: Buffer, timeoutMs: number): Promise<OptionReply[]> {
  socket.write(encodeOption(option, data));
  const replies: OptionReply[] = [];
  for (;;) {
    const reply = await readOptionReply(socket, timeoutMs);
    if (reply.option !== option) {
      throw new NbdProtocolError(`${optionName(option)}: reply is for ${optionName(reply.option)}`);
    }
    if (reply.type >= 2 ** 31) throw new NbdOptionError(option, reply.type, reply.data.toString('utf8'));
    if (reply.type === NBD_REP.ACK) return replies;
    replies.push(reply);
  }
}

function parseInfoReplies(name: string, option: number, replies: OptionReply[]): ExportInfo {
  let size: number | undefined;
  let flags = 0;
  const info: ExportInfo = { name, size: 0, flags: 0, blockSize: null };
  for (const reply of replies) {
    if (reply.type !== NBD_REP.INFO) {
      throw new NbdProtocolError(`${optionName(option)}: unexpected ${optionReplyName(reply.type)}`);
    }
    const d = reply.data;
    const kind = d.readUInt16BE(0);
    if (kind === NBD_INFO.EXPORT) {
      if (d.length !== 12) throw new NbdProtocolError(`NBD_INFO_EXPORT of ${d.length} bytes, want 12`);
      size = Number(d.readBigUInt64BE(2));
      flags = d.readUInt16BE(10);
    } else if (kind === NBD_INFO.NAME) {
      info.canonicalName = d.subarray(2).toString('utf8');
    } else if (kind === NBD_INFO.DESCRIPTION) {
      info.description = d.subarray(2).toString('utf8');
    } else if (kind === NBD_INFO.BLOCK_SIZE) {
      if (d.length !== 14) throw new NbdProtocolError(`NBD_INFO_BLOCK_SIZE of ${d.length} bytes, want 14`);
      info.blockSize = { minimum: d.readUInt32BE(2), preferred: d.readUInt32BE(6), maximum: d.readUInt32BE(10) };
    }
    // Unknown info types are ignored, as the spec requires.
  }
  if (size === undefined) throw new NbdProtocolError(`${optionName(option)}: succeeded without NBD_INFO_EXPORT`);
  info.size = size;
  info.flags = flags;
  return info;
}

/** Sends NBD_OPT_ABORT and closes, tolerating a server that closes without the ACK. */
async function abortAndClose(socket: net.Socket): Promise<void> {
  try {
    socket.write(encodeOption(NBD_OPT.ABORT));
    await readOptionReply(socket, 1000);
  } catch {
    // The spec lets the server close without replying.
  } finally {
    socket.destroy();
  }
}

export interface HandshakeOptions {
  exportName: string;
  /** Negotiate NBD_OPT_STRUCTURED_REPLY (default: true when metaContexts are given). */
  structuredReplies?: boolean;
  /** Contexts for NBD_OPT_SET_META_CONTEXT, e.g. ['base:allocation']. */
  metaContexts?: string[];
  /** NBD_INFO_* items for NBD_OPT_GO; default [NBD_INFO.BLOCK_SIZE]. */
  infoRequests?: number[];
  /** Enter transmission with the old NBD_OPT_EXPORT_NAME instead of NBD_OPT_GO. */
  useExportName?: boolean;
}

export interface Negotiated {
  export: ExportInfo;
  handshakeFlags: number;
  structuredReplies: boolean;
  /** Context name -> id, as the server granted them. */
  metaContexts: Map<string, number>;
}

/** The whole handshake, from greeting to transmission phase. */
async function negotiate(socket: net.Socket, opts: HandshakeOptions, timeoutMs: number): Promise<Negotiated> {
  const handshakeFlags = await greet(socket, timeoutMs);
  const wantStructured = opts.structuredReplies ?? (opts.metaContexts !== undefined && opts.metaContexts.length > 0);
  let structuredReplies = false;
  if (wantStructured) {
    await optionRequest(socket, NBD_OPT.STRUCTURED_REPLY, Buffer.alloc(0), timeoutMs);
    structuredReplies = true;
  }
  const metaContexts = new Map<string, number>();
  if (opts.metaContexts && opts.metaContexts.length > 0) {
    const replies = await optionRequest(
      socket,
      NBD_OPT.SET_META_CONTEXT,
      encodeMetaContextRequest(opts.exportName, opts.metaContexts),
      timeoutMs,
    );
    for (const reply of replies) {
      if (reply.type !== NBD_REP.META_CONTEXT) {
        throw new NbdProtocolError(`NBD_OPT_SET_META_CONTEXT: unexpected ${optionReplyName(reply.type)}`);
      }
      metaContexts.set(reply.data.subarray(4).toString('utf8'), reply.data.readUInt32BE(0));
    }
  }
  if (opts.useExportName) {
    socket.write(encodeOption(NBD_OPT.EXPORT_NAME, Buffer.from(opts.exportName, 'utf8')));
    const reader = readerFor(socket);
    const head = await reader.read(10, timeoutMs);
    if (!(handshakeFlags & NBD_FLAG_NO_ZEROES)) await reader.read(124, timeoutMs);
    const info: ExportInfo = {
      name: opts.exportName,
      size: Number(head.readBigUInt64BE(0)),
      flags: head.readUInt16BE(8),
      blockSize: null,
    };
    return { export: info, handshakeFlags, structuredReplies, metaContexts };
  }
  const replies = await optionRequest(
    socket,
    NBD_OPT.GO,
    encodeInfoRequest(opts.exportName, opts.infoRequests ?? [NBD_INFO.BLOCK_SIZE]),
    timeoutMs,
  );
  return { export: parseInfoReplies(opts.exportName, NBD_OPT.GO, replies), handshakeFlags, structuredReplies, metaContexts };
}

// ---------------------------------------------------------------------------
// Client

export interface ConnectOptions extends NbdTarget, HandshakeOptions {
  /**
   * A command without a complete reply after this long fails the whole connection
   * (the socket is destroyed). Default 120 s; 0 disables.
   */
  commandTimeoutMs?: number;
}

export interface BlockStatusExtent {
  length: number;
  /** NBD_STATE_HOLE | NBD_STATE_ZERO for base:allocation. */
  flags: number;
}

export interface CommandRequest {
  type: number;
  flags?: number;
  offset?: number;
  length?: number;
  /** Payload sent after the header (NBD_CMD_WRITE). */
  data?: Buffer;
}

/** What a command's reply carried: read data, or block status per context id. */
export interface CommandResult {
  data?: Buffer;
  extents?: Map<number, BlockStatusExtent[]>;
}

interface InFlight {
  cookie: bigint;
  type: number;
  offset: number;
  length: number;
  /** Reads: the reassembled data. */
  data?: Buffer;
  /** Structured reads: byte ranges delivered so far, to detect overlap and gaps. */
  ranges: Array<[number, number]>;
  extents?: Map<number, BlockStatusExtent[]>;
  error: Error | null;
  timer?: NodeJS.Timeout;
  resolve: (result: CommandResult) => void;
  reject: (err: Error) => void;
}

export class NbdClient {
  readonly exportName: string;
  readonly size: number;
  /** Transmission flags (NBD_FLAG.*). */
  readonly flags: number;
  readonly blockSize: BlockSizeConstraints | null;
  readonly structuredReplies: boolean;
  /** Negotiated metadata contexts: name -> id. */
  readonly metaContexts: Map<string, number>;
  readonly handshakeFlags: number;
  readonly info: ExportInfo;

  private readonly reader: ByteReader;
  private readonly inflight = new Map<bigint, InFlight>();
  private nextCookie = 1n;
  private failure: Error | null = null;
  private disconnecting = false;
  private readonly commandTimeoutMs: number;
  /** disconnect() waits here for the requests in flight. */
  private idleWaiters: Array<() => void> = [];

  private constructor(
    readonly socket: net.Socket,
    negotiated: Negotiated,
    commandTimeoutMs: number,
  ) {
    this.reader = readerFor(socket);
    this.info = negotiated.export;
    this.exportName = negotiated.export.name;
    this.size = negotiated.export.size;
    this.flags = negotiated.export.flags;
    this.blockSize = negotiated.export.blockSize;
    this.structuredReplies = negotiated.structuredReplies;
    this.metaContexts = negotiated.metaContexts;
    this.handshakeFlags = negotiated.handshakeFlags;
    this.commandTimeoutMs = commandTimeoutMs;
    void this.receiveLoop();
  }

  /** Connects, negotiates and enters the transmission phase. */
  static async connect(opts: ConnectOptions): Promise<NbdClient> {
    const socket = await openSocket(opts);
    try {
      const negotiated = await negotiate(socket, opts, opts.timeoutMs ?? DEFAULT_TIMEOUT_MS);
      return new NbdClient(socket, negotiated, opts.commandTimeoutMs ?? 120_000);
    } catch (err) {
      socket.destroy();
      throw err;
    }
  }

  /** Export names from NBD_OPT_LIST. */
  static async list(target: NbdTarget): Promise<string[]> {
    const timeoutMs = target.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    const socket = await openSocket(target);
    try {
      await greet(socket, timeoutMs);
      const replies = await optionRequest(socket, NBD_OPT.LIST, Buffer.alloc(0), timeoutMs);
      const names = replies.map((reply) => {
        if (reply.type !== NBD_REP.SERVER) throw new NbdProtocolError(`NBD_OPT_LIST: unexpected ${optionReplyName(reply.type)}`);
        const len = reply.data.readUInt32BE(0);
        if (len > reply.data.length - 4) throw new NbdProtocolError('NBD_REP_SERVER name longer than its reply');
        return reply.data.subarray(4, 4 + len).toString('utf8');
      });
      await abortAndClose(socket);
      return names;
    } finally {
      socket.destroy();
    }
  }

  /** NBD_OPT_INFO for one export, without entering transmission. */
  static async info(target: NbdTarget, exportName: string, infoRequests: number[] = [NBD_INFO.BLOCK_SIZE]): Promise<ExportInfo> {
    const timeoutMs = target.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    const socket = await openSocket(target);
    try {
      await greet(socket, timeoutMs);
      const replies = await optionRequest(socket, NBD_OPT.INFO, encodeInfoRequest(exportName, infoRequests), timeoutMs);
      const info = parseInfoReplies(exportName, NBD_OPT.INFO, replies);
      await abortAndClose(socket);
      return info;
    } finally {
      socket.destroy();
    }
  }

  /** Requests sent and not yet answered. */
  get inFlight(): number {
    return this.inflight.size;
  }

  /** Set once the connection is unusable: the reason. */
  get broken(): Error | null {
    return this.failure;
  }

  async read(offset: number, length: number, opts: { df?: boolean; fua?: boolean } = {}): Promise<Buffer> {
    const flags = (opts.df ? NBD_CMD_FLAG.DF : 0) | (opts.fua ? NBD_CMD_FLAG.FUA : 0);
    const result = await this.command({ type: NBD_CMD.READ, flags, offset, length });
    return result.data!;
  }

  async write(offset: number, data: Buffer, opts: { fua?: boolean } = {}): Promise<void> {
    await this.command({ type: NBD_CMD.WRITE, flags: opts.fua ? NBD_CMD_FLAG.FUA : 0, offset, length: data.length, data });
  }

  async flush(): Promise<void> {
    await this.command({ type: NBD_CMD.FLUSH });
  }

  async trim(offset: number, length: number, opts: { fua?: boolean } = {}): Promise<void> {
    await this.command({ type: NBD_CMD.TRIM, flags: opts.fua ? NBD_CMD_FLAG.FUA : 0, offset, length });
  }

  async writeZeroes(
    offset: number,
    length: number,
    opts: { noHole?: boolean; fastZero?: boolean; fua?: boolean } = {},
  ): Promise<void> {
    const flags =
      (opts.noHole ? NBD_CMD_FLAG.NO_HOLE : 0) | (opts.fastZero ? NBD_CMD_FLAG.FAST_ZERO : 0) | (opts.fua ? NBD_CMD_FLAG.FUA : 0);
    await this.command({ type: NBD_CMD.WRITE_ZEROES, flags, offset, length });
  }

  async cache(offset: number, length: number): Promise<void> {
    await this.command({ type: NBD_CMD.CACHE, offset, length });
  }

  /**
   * Extents of one metadata context (default base:allocation) covering at most
   * [offset, offset+length). Needs structured replies and that context negotiated.
   */
  async blockStatus(
    offset: number,
    length: number,
    opts: { reqOne?: boolean; context?: string } = {},
  ): Promise<BlockStatusExtent[]> {
    const contextName = opts.context ?? BASE_ALLOCATION;
    const id = this.metaContexts.get(contextName);
    const result = await this.command({
      type: NBD_CMD.BLOCK_STATUS,
      flags: opts.reqOne ? NBD_CMD_FLAG.REQ_ONE : 0,
      offset,
      length,
    });
    if (id === undefined) {
      throw new Error(`blockStatus: metadata context ${contextName} was not negotiated`);
    }
    const extents = result.extents?.get(id);
    if (!extents) throw new NbdProtocolError(`NBD_CMD_BLOCK_STATUS reply has no chunk for context ${contextName} (id ${id})`);
    return extents;
  }

  /**
   * Sends any request (also ones this client would not send itself, for tests of the
   * server's checks) and resolves with what the reply carried.
   */
  command(req: CommandRequest): Promise<CommandResult> {
    if (this.failure) return Promise.reject(this.failure);
    if (this.disconnecting) return Promise.reject(new Error('NBD client is disconnecting'));
    const cookie = this.nextCookie++;
    const offset = req.offset ?? 0;
    const length = req.length ?? 0;
    return new Promise<CommandResult>((resolve, reject) => {
      const entry: InFlight = { cookie, type: req.type, offset, length, ranges: [], error: null, resolve, reject };
      if (req.type === NBD_CMD.READ && this.structuredReplies) entry.data = Buffer.alloc(length);
      if (this.commandTimeoutMs > 0) {
        entry.timer = setTimeout(() => {
          this.fail(
            new Error(`${commandName(req.type)}(offset=${offset}, length=${length}) got no reply within ${this.commandTimeoutMs} ms`),
          );
        }, this.commandTimeoutMs);
      }
      this.inflight.set(cookie, entry);
      this.socket.write(encodeRequest({ flags: req.flags ?? 0, type: req.type, cookie, offset, length }));
      if (req.data) this.socket.write(req.data);
    });
  }

  /**
   * Soft disconnect: waits for requests in flight, sends NBD_CMD_DISC, then waits
   * (up to 5 s) for the server to close the connection.
   */
  async disconnect(): Promise<void> {
    if (this.failure) {
      this.socket.destroy();
      return;
    }
    this.disconnecting = true;
    if (this.inflight.size > 0) await new Promise<void>((resolve) => this.idleWaiters.push(resolve));
    if (!this.failure) this.socket.write(encodeRequest({ type: NBD_CMD.DISC, cookie: this.nextCookie++ }));
    this.socket.end();
    if (!(await waitClosed(this.socket, 5000))) this.socket.destroy();
  }

  /** Hard disconnect: drops the connection; requests in flight reject. */
  close(): void {
    this.fail(new ConnectionClosedError('NBD client closed the connection'));
  }

  private fail(err: Error): void {
    if (!this.failure) this.failure = err;
    for (const entry of this.inflight.values()) {
      clearTimeout(entry.timer);
      entry.reject(this.failure);
    }
    this.inflight.clear();
    this.socket.destroy();
    this.wakeIdleWaiters();
  }

  private wakeIdleWaiters(): void {
    if (this.inflight.size > 0) return;
    const waiters = this.idleWaiters;
    this.idleWaiters = [];
    for (const wake of waiters) wake();
  }

  private settle(entry: InFlight): void {
    this.inflight.delete(entry.cookie);
    clearTimeout(entry.timer);
    queueMicrotask(() => this.wakeIdleWaiters());
    if (entry.error) {
      entry.reject(entry.error);
      return;
    }
    if (entry.type === NBD_CMD.READ && this.structuredReplies) {
      const covered = entry.ranges.reduce((sum, [start, end]) => sum + (end - start), 0);
      if (covered !== entry.length) {
        entry.reject(
          new NbdProtocolError(`NBD_CMD_READ(offset=${entry.offset}, length=${entry.length}): reply covered ${covered} bytes`),
        );
        return;
      }
    }
    entry.resolve({ data: entry.data, extents: entry.extents });
  }

  private async receiveLoop(): Promise<void> {
    try {
      for (;;) {
        const head = await this.reader.read(4);
        const magic = head.readUInt32BE(0);
        if (magic === NBD_SIMPLE_REPLY_MAGIC) await this.onSimpleReply();
        else if (magic === NBD_STRUCTURED_REPLY_MAGIC) await this.onStructuredChunk();
        else throw new NbdProtocolError(`bad reply magic 0x${magic.toString(16)}`);
      }
    } catch (err) {
      const closedCleanly = err instanceof ConnectionClosedError && this.disconnecting && this.inflight.size === 0;
      if (!closedCleanly) this.fail(err as Error);
      else this.failure ??= err as Error;
    }
  }

  private take(cookie: bigint): InFlight {
    const entry = this.inflight.get(cookie);
    if (!entry) throw new NbdProtocolError(`reply for unknown cookie ${cookie}`);
    return entry;
  }

  private async onSimpleReply(): Promise<void> {
    const rest = await this.reader.read(12);
    const errno = rest.readUInt32BE(0);
    const entry = this.take(rest.readBigUInt64BE(4));
    if (errno !== 0) {
      entry.error = new NbdCommandError(commandName(entry.type), entry.offset, entry.length, errno);
    } else if (entry.type === NBD_CMD.READ) {
      if (this.structuredReplies) throw new NbdProtocolError('simple reply to NBD_CMD_READ after structured replies were negotiated');
      entry.data = await this.reader.read(entry.length);
    } else if (entry.type === NBD_CMD.BLOCK_STATUS) {
      throw new NbdProtocolError('simple success reply to NBD_CMD_BLOCK_STATUS');
    }
    this.settle(entry);
  }

  private async onStructuredChunk(): Promise<void> {
    const rest = await this.reader.read(16);
    const flags = rest.readUInt16BE(0);
    const type = rest.readUInt16BE(2);
    const cookie = rest.readBigUInt64BE(4);
    const length = rest.readUInt32BE(12);
    const payload = await this.reader.read(length);
    if (!this.structuredReplies) throw new NbdProtocolError('structured reply without NBD_OPT_STRUCTURED_REPLY');
    const entry = this.take(cookie);
    const what = `${replyTypeName(type)} for ${commandName(entry.type)}(offset=${entry.offset}, length=${entry.length})`;

    if (type & REPLY_TYPE_ERROR_BIT) {
      if (length < 6) throw new NbdProtocolError(`${what}: ${length}-byte error chunk`);
      const errno = payload.readUInt32BE(0);
      const messageLength = payload.readUInt16BE(4);
      if (6 + messageLength > length) throw new NbdProtocolError(`${what}: message longer than chunk`);
      const message = payload.subarray(6, 6 + messageLength).toString('utf8');
      let errorOffset: number | undefined;
      if (type === NBD_REPLY_TYPE.ERROR_OFFSET) {
        if (length !== 6 + messageLength + 8) throw new NbdProtocolError(`${what}: bad length ${length}`);
        errorOffset = Number(payload.readBigUInt64BE(6 + messageLength));
      }
      if (errno === 0) throw new NbdProtocolError(`${what}: error value 0`);
      entry.error ??= new NbdCommandError(commandName(entry.type), entry.offset, entry.length, errno, message, errorOffset);
    } else if (type === NBD_REPLY_TYPE.NONE) {
      if (length !== 0) throw new NbdProtocolError(`${what}: payload of ${length} bytes`);
      if (!(flags & NBD_REPLY_FLAG_DONE)) throw new NbdProtocolError(`${what}: without NBD_REPLY_FLAG_DONE`);
    } else if (type === NBD_REPLY_TYPE.OFFSET_DATA || type === NBD_REPLY_TYPE.OFFSET_HOLE) {
      if (entry.type !== NBD_CMD.READ) throw new NbdProtocolError(`${what}: content chunk for a non-read`);
      let start: number;
      let size: number;
      if (type === NBD_REPLY_TYPE.OFFSET_DATA) {
        if (length < 9) throw new NbdProtocolError(`${what}: ${length}-byte data chunk`);
        start = Number(payload.readBigUInt64BE(0));
        size = length - 8;
      } else {
        if (length !== 12) throw new NbdProtocolError(`${what}: ${length}-byte hole chunk`);
        start = Number(payload.readBigUInt64BE(0));
        size = payload.readUInt32BE(8);
        if (size === 0) throw new NbdProtocolError(`${what}: empty hole`);
      }
      const end = start + size;
      if (start < entry.offset || end > entry.offset + entry.length) {
        throw new NbdProtocolError(`${what}: chunk [${start}, ${end}) outside the request`);
      }
      for (const [s, e] of entry.ranges) {
        if (start < e && s < end) throw new NbdProtocolError(`${what}: chunk [${start}, ${end}) overlaps [${s}, ${e})`);
      }
      entry.ranges.push([start, end]);
      // A hole needs no copy: the read buffer starts zeroed and chunks never overlap.
      if (type === NBD_REPLY_TYPE.OFFSET_DATA) payload.copy(entry.data!, start - entry.offset, 8);
    } else if (type === NBD_REPLY_TYPE.BLOCK_STATUS) {
      if (entry.type !== NBD_CMD.BLOCK_STATUS) throw new NbdProtocolError(`${what}: block status for another command`);
      if (length < 12 || (length - 4) % 8 !== 0) throw new NbdProtocolError(`${what}: bad length ${length}`);
      const id = payload.readUInt32BE(0);
      const extents: BlockStatusExtent[] = [];
      let total = 0;
      for (let at = 4; at < length; at += 8) {
        const extentLength = payload.readUInt32BE(at);
        if (extentLength === 0) throw new NbdProtocolError(`${what}: zero-length extent`);
        total += extentLength;
        extents.push({ length: extentLength, flags: payload.readUInt32BE(at + 4) });
      }
      // The spec lets the last extent run past the request only with extended headers; here it must not.
      if (total > entry.length) throw new NbdProtocolError(`${what}: extents cover ${total} bytes, more than asked`);
      entry.extents ??= new Map();
      if (entry.extents.has(id)) throw new NbdProtocolError(`${what}: second chunk for context id ${id}`);
      entry.extents.set(id, extents);
    } else {
      throw new NbdProtocolError(`${what}: unknown chunk type`);
    }

    if (flags & NBD_REPLY_FLAG_DONE) this.settle(entry);
  }
}

// ---------------------------------------------------------------------------
// Raw connections for bad-input tests

export interface RawSocketOptions extends NbdTarget, Partial<HandshakeOptions> {
  /**
   * How far to go before handing the socket over: 'connected' (nothing read),
   * 'greeted' (greeting read, client flags sent: option haggling), 'transmission'
   * (full handshake; needs exportName). Default: 'transmission' when exportName is
   * given, else 'connected'.
   */
  stage?: 'connected' | 'greeted' | 'transmission';
}

export type RawReply =
  | { kind: 'simple'; error: number; cookie: bigint }
  | { kind: 'structured'; flags: number; type: number; cookie: bigint; payload: Buffer };

/** A socket the test drives byte by byte. */
export class RawConnection {
  /** Set after a 'greeted' or 'transmission' stage. */
  handshakeFlags: number | null = null;
  /** Set after a 'transmission' stage. */
  negotiated: Negotiated | null = null;

  constructor(readonly socket: net.Socket) {
    readerFor(socket);
  }

  /** Exactly n bytes; rejects with ConnectionClosedError or on timeout. */
  read(n: number, timeoutMs: number): Promise<Buffer> {
    return readExact(this.socket, n, timeoutMs);
  }

  /** Resolves once the bytes are handed to the kernel; rejects if the socket is gone. */
  write(bytes: Buffer): Promise<void> {
    return new Promise((resolve, reject) => this.socket.write(bytes, (err) => (err ? reject(err) : resolve())));
  }

  sendRequest(req: RequestHeader, payload?: Buffer): Promise<void> {
    return this.write(payload ? Buffer.concat([encodeRequest(req), payload]) : encodeRequest(req));
  }

  sendOption(option: number, data?: Buffer): Promise<void> {
    return this.write(encodeOption(option, data));
  }

  readOptionReply(timeoutMs: number): Promise<OptionReply> {
    return readOptionReply(this.socket, timeoutMs);
  }

  /**
   * One reply header: a simple reply (any read payload after it is left for read()),
   * or one structured chunk with its payload.
   */
  async readReply(timeoutMs: number): Promise<RawReply> {
    const magic = (await this.read(4, timeoutMs)).readUInt32BE(0);
    if (magic === NBD_SIMPLE_REPLY_MAGIC) {
      const rest = await this.read(12, timeoutMs);
      return { kind: 'simple', error: rest.readUInt32BE(0), cookie: rest.readBigUInt64BE(4) };
    }
    if (magic === NBD_STRUCTURED_REPLY_MAGIC) {
      const rest = await this.read(16, timeoutMs);
      const payload = await this.read(rest.readUInt32BE(12), timeoutMs);
      return { kind: 'structured', flags: rest.readUInt16BE(0), type: rest.readUInt16BE(2), cookie: rest.readBigUInt64BE(4), payload };
    }
    throw new NbdProtocolError(`bad reply magic 0x${magic.toString(16)}`);
  }

  /** True once the peer has closed the connection (within timeoutMs). */
  waitClosed(timeoutMs: number): Promise<boolean> {
    return waitClosed(this.socket, timeoutMs);
  }

  get isClosed(): boolean {
    return readerFor(this.socket).isClosed;
  }

  destroy(): void {
    this.socket.destroy();
  }
}

/** Opens a connection and optionally performs (part of) the handshake. */
export async function rawSocket(opts: RawSocketOptions): Promise<RawConnection> {
  const stage = opts.stage ?? (opts.exportName !== undefined ? 'transmission' : 'connected');
  const timeoutMs = opts.timeoutMs ?? DEFAULT_TIMEOUT_MS;
  const socket = await openSocket(opts);
  const conn = new RawConnection(socket);
  try {
    if (stage === 'greeted') {
      conn.handshakeFlags = await greet(socket, timeoutMs);
    } else if (stage === 'transmission') {
      if (opts.exportName === undefined) throw new Error("rawSocket: stage 'transmission' needs exportName");
      conn.negotiated = await negotiate(socket, { ...opts, exportName: opts.exportName }, timeoutMs);
      conn.handshakeFlags = conn.negotiated.handshakeFlags;
    }
  } catch (err) {
    socket.destroy();
    throw err;
  }
  return conn;
}
