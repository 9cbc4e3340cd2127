#!/usr/bin/env node
// flush-latency: time NBD FLUSH commands against one export, speaking just enough of the
// protocol (fixed newstyle handshake, NBD_OPT_GO, simple replies) that nothing but node
// is needed. Each figure is the time from writing the FLUSH request to reading its reply.
//
//   node flush-latency.mjs URI [--count N]
//     URI: nbd+unix:///EXPORT?socket=PATH  or  nbd://HOST[:PORT]/EXPORT
// Prints one line: the N flush latencies in milliseconds, space-separated (the first is
// the one that pays for whatever was dirty; later ones show an idle flush).
import net from 'node:net';

const NBDMAGIC = 0x4e42444d41474943n;
const IHAVEOPT = 0x49484156454f5054n;
const OPTION_REPLY_MAGIC = 0x0003e889045565a9n;
const REQUEST_MAGIC = 0x25609513;
const SIMPLE_REPLY_MAGIC = 0x67446698;
const FLAG_FIXED_NEWSTYLE = 1, FLAG_NO_ZEROES = 2;
const OPT_GO = 7, REP_ACK = 1, REP_INFO = 3, INFO_EXPORT = 0;
const TFLAG_SEND_FLUSH = 1 << 2;
const CMD_DISC = 2, CMD_FLUSH = 3;

function usage(msg) {
  process.stderr.write(`flush-latency: ${msg}\nusage: node flush-latency.mjs URI [--count N]\n`);
  process.exit(2);
}

const args = process.argv.slice(2);
let uri, count = 1;
for (let i = 0; i < args.length; i++) {
  if (args[i] === '--count') count = Number(args[++i]);
  else if (uri === undefined) uri = args[i];
  else usage(`unexpected argument ${args[i]}`);
}
if (!uri) usage('URI is required');
if (!Number.isInteger(count) || count < 1) usage('--count must be a whole number >= 1');

function target(text) {
  const u = new URL(text);
  const name = decodeURIComponent(u.pathname.replace(/^\//, ''));
  if (u.protocol === 'nbd+unix:') {
    const socket = u.searchParams.get('socket');
    if (!socket) usage(`${text}: no ?socket=`);
    return { connect: { path: socket }, name };
  }
  if (u.protocol === 'nbd:') return { connect: { host: u.hostname, port: Number(u.port || 10809) }, name };
  usage(`${text}: only nbd+unix:// and nbd:// URIs are supported`);
}

/** A socket with "read exactly n bytes". */
class Conn {
  constructor(sock) {
    this.sock = sock;
    this.chunks = [];
    this.length = 0;
    this.waiter = undefined;
    this.error = undefined;
    sock.on('data', (c) => { this.chunks.push(c); this.length += c.length; this.wake(); });
    sock.on('error', (e) => { this.error = e; this.wake(); });
    sock.on('close', () => { this.error ??= new Error('server closed the connection'); this.wake(); });
  }
  wake() { const w = this.waiter; if (w) { this.waiter = undefined; w(); } }
  async read(n) {
    while (this.length < n) {
      if (this.error) throw this.error;
      await new Promise((resolve) => (this.waiter = resolve));
    }
    const all = this.chunks.length === 1 ? this.chunks[0] : Buffer.concat(this.chunks);
    const out = all.subarray(0, n);
    const rest = all.subarray(n);
    this.chunks = rest.length ? [rest] : [];
    this.length = rest.length;
    return out;
  }
  write(buf) { this.sock.write(buf); }
}

const { connect, name } = target(uri);
const sock = net.connect(connect);
sock.setNoDelay?.(true);
await new Promise((resolve, reject) => { sock.once('connect', resolve); sock.once('error', reject); });
const conn = new Conn(sock);

// Greeting.
const greeting = await conn.read(18);
if (greeting.readBigUInt64BE(0) !== NBDMAGIC || greeting.readBigUInt64BE(8) !== IHAVEOPT) {
  throw new Error('not a newstyle NBD server');
}
const serverFlags = greeting.readUInt16BE(16);
if (!(serverFlags & FLAG_FIXED_NEWSTYLE)) throw new Error('server does not do fixed newstyle');
const noZeroes = serverFlags & FLAG_NO_ZEROES;
const clientFlags = Buffer.alloc(4);
clientFlags.writeUInt32BE(FLAG_FIXED_NEWSTYLE | noZeroes);
conn.write(clientFlags);

// NBD_OPT_GO with the export name and no info requests.
const nameBytes = Buffer.from(name, 'utf8');
const opt = Buffer.alloc(16 + 4 + nameBytes.length + 2);
opt.writeBigUInt64BE(IHAVEOPT, 0);
opt.writeUInt32BE(OPT_GO, 8);
opt.writeUInt32BE(4 + nameBytes.length + 2, 12);
opt.writeUInt32BE(nameBytes.length, 16);
nameBytes.copy(opt, 20);
opt.writeUInt16BE(0, 20 + nameBytes.length);
conn.write(opt);

let exportSize, transmissionFlags;
for (;;) {
  const h = await conn.read(20);
  if (h.readBigUInt64BE(0) !== OPTION_REPLY_MAGIC) throw new Error('bad option reply magic');
  const type = h.readUInt32BE(12);
  const len = h.readUInt32BE(16);
  const data = await conn.read(len);
  if (type === REP_ACK) break;
  if (type & 0x80000000) {
    throw new Error(`NBD_OPT_GO for export ${JSON.stringify(name)} refused (reply 0x${type.toString(16)}): ${data.toString('utf8')}`);
  }
  if (type === REP_INFO && len >= 12 && data.readUInt16BE(0) === INFO_EXPORT) {
    exportSize = data.readBigUInt64BE(2);
    transmissionFlags = data.readUInt16BE(10);
  }
}
if (transmissionFlags === undefined) throw new Error('server sent no NBD_INFO_EXPORT');
if (!(transmissionFlags & TFLAG_SEND_FLUSH)) throw new Error(`export ${name} does not support FLUSH`);

function request(type, cookie) {
  const r = Buffer.alloc(28);
  r.writeUInt32BE(REQUEST_MAGIC, 0);
  r.writeUInt16BE(0, 4); // flags
  r.writeUInt16BE(type, 6);
  r.writeBigUInt64BE(cookie, 8);
  // offset 0, length 0
  return r;
}

const results = [];
for (let i = 0; i < count; i++) {
  const cookie = BigInt(i + 1);
  const t0 = process.hrtime.bigint();
  conn.write(request(CMD_FLUSH, cookie));
  const reply = await conn.read(16);
  const t1 = process.hrtime.bigint();
  if (reply.readUInt32BE(0) !== SIMPLE_REPLY_MAGIC) throw new Error('bad reply magic (structured reply?)');
  const error = reply.readUInt32BE(4);
  if (reply.readBigUInt64BE(8) !== cookie) throw new Error('reply for another cookie');
  if (error !== 0) throw new Error(`FLUSH failed with NBD error ${error}`);
  results.push(Number(t1 - t0) / 1e6);
}
conn.write(request(CMD_DISC, 0n));
sock.end();
process.stdout.write(results.map((ms) => ms.toFixed(3)).join(' ') + '\n');
process.stderr.write(`flush-latency: export ${JSON.stringify(name)} (${exportSize} bytes): ${results.map((ms) => ms.toFixed(3)).join(' ')} ms\n`);
process.exit(0);
