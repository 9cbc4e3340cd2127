// The s3:// backend's fast path for whole-object GETs over plain http:// (an S3-compatible
// server on the host or the LAN: [aws] allow_http) with static credentials: one request
// signed here (SigV4, the headers the SDK signs for a GET), sent on a kept-alive socket
// whose reads land straight in the caller's body buffer (net.Socket `onread`). Through the
// SDK every socket read of a body is a fresh 64 KiB buffer, handed through a stream and
// copied once more: most of a cold read's garbage. Anything but a 200 with a
// Content-Length (a missing key, an error, a chunked body) is left to the SDK, which
// sends the request again and reads the answer as it always does.
import crypto from 'node:crypto';
import net from 'node:net';

/** SHA-256 of an empty payload: what a GET signs as its body hash. */
const EMPTY_SHA256 = 'e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855';
/** Bytes of a response head (status line and headers) read before giving up on it. */
const HEAD_BYTES = 16 * 1024;
/** Keys sent as they are in a path (no percent-encoding to get right). */
const PLAIN_PATH = /^[A-Za-z0-9._\-/]+$/;

export interface FastGetOptions {
  host: string;
  port: number;
  /** Path-style: `/{bucket}/`, which the key (with the store's prefix) follows. */
  pathPrefix: string;
  region: string;
  accessKeyId: string;
  secretAccessKey: string;
  requestTimeoutMs: number;
  connectTimeoutMs: number;
  /** Most sockets open at once; a GET beyond them goes through the SDK. */
  maxSockets: number;
}

/** What a fast GET found: the object, or 'sdk' when the SDK must answer this request. */
export type FastGetResult = { body: Buffer; etag: string; lastModified: Date } | 'sdk';

/** One socket and the response it is reading. */
interface Connection {
  socket: net.Socket;
  head: Buffer;
  headLength: number;
  /** The body being read: reads land in its rest. */
  body: Buffer | undefined;
  filled: number;
  /** The body read whole, for get() to hand over (reads go to `head` again meanwhile). */
  answer: Buffer | undefined;
  /** Settles the request in flight; undefined while the socket is idle in the pool. */
  done: ((err: Error | undefined) => void) | undefined;
  status: number;
  headers: Map<string, string>;
  /** Where the body of the response in flight goes (the caller's `into`). */
  into: ((length: number) => Buffer) | undefined;
  /** Not to be used again: it failed, or its answer was left unread. */
  broken: boolean;
  /** Counted in `open` until dropped. */
  counted: boolean;
}

export class S3FastGet {
  private readonly idle: Connection[] = [];
  private open = 0;
  private signingDay = '';
  private signingKey = Buffer.alloc(0);

  constructor(private readonly options: FastGetOptions) {}

  /** Whether this key can take the fast path. */
  handles(key: string): boolean {
    return PLAIN_PATH.test(key) && (this.idle.length > 0 || this.open < this.options.maxSockets);
  }

  /**
   * GET `key` into `into(length)` (or a new buffer). Throws an Error for a connection that
   * fails or times out (the caller's retries apply); 'sdk' for an answer that is not a 200
   * with a Content-Length.
   */
  async get(key: string, into: ((length: number) => Buffer) | undefined, signal: AbortSignal | undefined): Promise<FastGetResult> {
    const connection = this.idle.pop() ?? this.connect();
    const path = this.options.pathPrefix + key;
    const request = this.requestHead(path);
    let settled = false;
    const result = new Promise<void>((resolve, reject) => {
      connection.done = (err) => {
        if (settled) return;
        settled = true;
        connection.done = undefined;
        if (err) reject(err);
        else resolve();
      };
    });
    connection.status = 0;
    connection.headers = new Map();
    connection.headLength = 0;
    connection.body = undefined;
    connection.answer = undefined;
    connection.filled = 0;
    connection.into = into;
    const abort = () => this.fail(connection, Object.assign(new Error('the request was aborted'), { name: 'AbortError' }));
    signal?.addEventListener('abort', abort, { once: true });
    const timer = setTimeout(() => this.fail(connection, new Error(`no answer within ${this.options.requestTimeoutMs} ms`)), this.options.requestTimeoutMs);
    try {
      if (signal?.aborted) abort();
      else connection.socket.write(request, 'latin1');
      await result;
    } catch (err) {
      this.drop(connection);
      throw err;
    } finally {
      clearTimeout(timer);
      signal?.removeEventListener('abort', abort);
    }
    const body = connection.answer;
    connection.answer = undefined;
    connection.into = undefined;
    if (connection.status !== 200 || body === undefined) {
      // The SDK asks again and reads the answer (an error body, a chunked one) itself.
      this.drop(connection);
      return 'sdk';
    }
    if (connection.headers.get('connection')?.toLowerCase() === 'close' || connection.broken) this.drop(connection);
    else this.idle.push(connection);
    const modified = connection.headers.get('last-modified');
    return { body, etag: connection.headers.get('etag') ?? '', lastModified: modified === undefined ? new Date(0) : new Date(modified) };
  }

  /** Closes the idle sockets. */
  close(): void {
    for (const connection of this.idle.splice(0)) this.drop(connection);
  }

  private connect(): Connection {
    this.open++;
    const connection: Connection = {
      socket: undefined as unknown as net.Socket, head: Buffer.allocUnsafe(HEAD_BYTES), headLength: 0, body: undefined, filled: 0, answer: undefined, done: undefined, status: 0,
      headers: new Map(), into: undefined, broken: false, counted: true,
    };
    const socket = net.connect({
      host: this.options.host,
      port: this.options.port,
      noDelay: true,
      onread: {
        // The body's rest while one is read, else the head buffer's rest.
        buffer: () => (connection.body !== undefined ? connection.body.subarray(connection.filled) : connection.head.subarray(connection.headLength)),
        callback: (bytes: number) => {
          this.received(connection, bytes);
          return true;
        },
      },
    });
    connection.socket = socket;
    const connectTimer = setTimeout(() => this.fail(connection, new Error(`no connection within ${this.options.connectTimeoutMs} ms`)), this.options.connectTimeoutMs);
    socket.once('connect', () => clearTimeout(connectTimer));
    socket.on('error', (err) => {
      clearTimeout(connectTimer);
      this.fail(connection, err);
    });
    socket.on('close', () => {
      clearTimeout(connectTimer);
      this.fail(connection, new Error('the connection closed before the answer was read'));
    });
    socket.setTimeout(this.options.requestTimeoutMs, () => this.fail(connection, new Error(`the socket was idle for ${this.options.requestTimeoutMs} ms`)));
    return connection;
  }

  private received(connection: Connection, bytes: number): void {
    if (connection.done === undefined) {
      // Bytes nobody asked for: this socket is out of step with its requests.
      this.fail(connection, new Error('bytes arrived with no request in flight'));
      return;
    }
    if (connection.body !== undefined) {
      connection.filled += bytes;
      if (connection.filled === connection.body.length) this.complete(connection);
      return;
    }
    connection.headLength += bytes;
    const end = connection.head.subarray(0, connection.headLength).indexOf('\r\n\r\n', 0, 'latin1');
    if (end < 0) {
      if (connection.headLength === HEAD_BYTES) this.fail(connection, new Error(`a response head over ${HEAD_BYTES} bytes`));
      return;
    }
    const lines = connection.head.toString('latin1', 0, end).split('\r\n');
    const status = /^HTTP\/1\.[01] (\d{3}) /.exec(lines[0] + ' ');
    connection.status = status === null ? 0 : Number(status[1]);
    for (let i = 1; i < lines.length; i++) {
      const colon = lines[i].indexOf(':');
      if (colon > 0) connection.headers.set(lines[i].slice(0, colon).trim().toLowerCase(), lines[i].slice(colon + 1).trim());
    }
    const length = Number(connection.headers.get('content-length'));
    const rest = connection.headLength - (end + 4);
    if (connection.status !== 200 || !Number.isSafeInteger(length) || length < 0 || connection.headers.has('transfer-encoding') || rest > length) {
      connection.broken = true;
      connection.done(undefined); // not ours to read: the SDK answers
      return;
    }
    const body = connection.into?.(length) ?? Buffer.allocUnsafe(length);
    if (body.length !== length) {
      this.fail(connection, new Error(`a ${body.length}-byte buffer for a body of ${length} bytes`));
      return;
    }
    connection.head.copy(body, 0, end + 4, connection.headLength);
    connection.body = body;
    connection.filled = rest;
    if (rest === length) this.complete(connection);
  }

  /** The body is read whole: hand it over, and read into the head buffer again. */
  private complete(connection: Connection): void {
    connection.answer = connection.body;
    connection.body = undefined;
    connection.headLength = 0;
    connection.done!(undefined);
  }

  private fail(connection: Connection, err: Error): void {
    connection.broken = true;
    const done = connection.done;
    connection.done = undefined;
    connection.body = undefined;
    connection.answer = undefined;
    connection.into = undefined;
    if (done !== undefined) done(err);
    this.drop(connection);
  }

  private drop(connection: Connection): void {
    const at = this.idle.indexOf(connection);
    if (at >= 0) this.idle.splice(at, 1);
    connection.broken = true;
    connection.into = undefined;
    connection.body = undefined;
    if (connection.counted) {
      connection.counted = false;
      this.open--;
    }
    if (!connection.socket.destroyed) connection.socket.destroy();
  }

  /** The request head of a GET of `path`, signed with SigV4. */
  private requestHead(path: string): string {
    const { host, port, region, accessKeyId } = this.options;
    const hostHeader = port === 80 ? host : `${host}:${port}`;
    const amzDate = new Date().toISOString().replace(/[-:]/g, '').replace(/\.\d{3}/, '');
    const day = amzDate.slice(0, 8);
    if (day !== this.signingDay) {
      const hmac = (key: Buffer | string, text: string) => crypto.createHmac('sha256', key).update(text).digest();
      this.signingKey = hmac(hmac(hmac(hmac(`AWS4${this.options.secretAccessKey}`, day), region), 's3'), 'aws4_request');
      this.signingDay = day;
    }
    const signed = 'host;x-amz-content-sha256;x-amz-date';
    const canonical = `GET\n${path}\n\nhost:${hostHeader}\nx-amz-content-sha256:${EMPTY_SHA256}\nx-amz-date:${amzDate}\n\n${signed}\n${EMPTY_SHA256}`;
    const scope = `${day}/${region}/s3/aws4_request`;
    const toSign = `AWS4-HMAC-SHA256\n${amzDate}\n${scope}\n${crypto.createHash('sha256').update(canonical).digest('hex')}`;
    const signature = crypto.createHmac('sha256', this.signingKey).update(toSign).digest('hex');
    return (
      `GET ${path} HTTP/1.1\r\nHost: ${hostHeader}\r\nx-amz-content-sha256: ${EMPTY_SHA256}\r\nx-amz-date: ${amzDate}\r\n` +
      `Authorization: AWS4-HMAC-SHA256 Credential=${accessKeyId}/${scope}, SignedHeaders=${signed}, Signature=${signature}\r\n\r\n`
    );
  }
}
