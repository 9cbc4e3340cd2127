// A TCP proxy between daemons and an S3 endpoint (MinIO) that holds or cuts chosen
// requests, so a test can put a store fault at an exact step: a lease PUT that answers
// late, a manifest PUT whose connection dies without an answer. A request is matched by
// its request line ("PUT /bucket/prefix/volumes/v/lease?x-id=PutObject HTTP/1.1").

import net from 'node:net';

export interface ProxyRule {
  /** Tested against the request line. */
  match: RegExp;
  /** Called when the rule applies: the request is forwarded once the promise settles (the connection's later bytes wait behind it). */
  hold?: () => Promise<void>;
  /** Drop both sides of the connection instead of forwarding: the request gets no answer. */
  reset?: boolean;
  /** Forward the request, then drop both sides as its answer arrives: it is carried out, and the client never hears so. */
  answerLost?: boolean;
  /** How many requests the rule applies to (default 1). */
  times?: number;
  /** Resolves when the rule first applies. */
  seen?: () => void;
}

export interface StoreProxy {
  /** http://127.0.0.1:PORT */
  endpoint: string;
  /** Adds a rule; the first rule that matches a request line applies. */
  add(rule: ProxyRule): void;
  close(): Promise<void>;
}

const REQUEST_LINE = /^(GET|PUT|HEAD|POST|DELETE) \S+ HTTP\/1\.1/;
/** Bytes a held connection may queue before the test has a bug (a request body is at most a pack). */
const MAX_QUEUED_BYTES = 64 << 20;

export async function startStoreProxy(upstream: { host: string; port: number }): Promise<StoreProxy> {
  const rules: Array<ProxyRule & { left: number }> = [];
  const sockets = new Set<net.Socket>();
  const server = net.createServer((client) => {
    const server = net.connect(upstream.port, upstream.host);
    sockets.add(client).add(server);
    const closeBoth = () => {
      client.destroy();
      server.destroy();
      sockets.delete(client);
      sockets.delete(server);
    };
    client.on('error', closeBoth).on('close', closeBoth);
    server.on('error', closeBoth).on('close', closeBoth);
    let answerLost = false;
    server.on('data', (chunk) => {
      if (answerLost) closeBoth();
      else client.write(chunk);
    });
    // Bytes from the client go up in order; a held request holds what follows it.
    let gate: Promise<void> = Promise.resolve();
    let queued = 0;
    client.on('data', (chunk: Buffer) => {
      const line = REQUEST_LINE.exec(chunk.subarray(0, 512).toString('latin1'))?.[0];
      const rule = line === undefined ? undefined : rules.find((r) => r.left > 0 && r.match.test(line));
      if (rule) {
        rule.left--;
        rule.seen?.();
        if (rule.reset) {
          closeBoth();
          return;
        }
        if (rule.answerLost) answerLost = true;
        if (rule.hold) {
          const held = rule.hold();
          gate = gate.then(() => held);
        }
      }
      queued += chunk.length;
      if (queued > MAX_QUEUED_BYTES) throw new Error(`store proxy: more than ${MAX_QUEUED_BYTES} bytes queued on one held connection`);
      gate = gate.then(() => {
        queued -= chunk.length;
        if (!server.destroyed) server.write(chunk);
      });
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const address = server.address() as net.AddressInfo;
  return {
    endpoint: `http://127.0.0.1:${address.port}`,
    add(rule) {
      rules.push({ ...rule, left: rule.times ?? 1 });
    },
    async close() {
      for (const s of sockets) s.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}
