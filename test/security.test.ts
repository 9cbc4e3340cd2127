// Locking down the daemon, through real clients: the HTTP API's bearer token (fetch and
// the `updraft` CLI), the refusal to serve the API on a non-loopback address without
// one, NBD over TLS with a certificate made here by openssl (nbdinfo, nbdcopy, qemu-img
// and the raw test client speaking NBD_OPT_STARTTLS), plaintext clients refused when
// TLS is required, and the unix socket's permissions.

import assert from 'node:assert/strict';
import { once } from 'node:events';
import { randomBytes } from 'node:crypto';
import { mkdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import tls from 'node:tls';
import { after, before, describe, test } from 'node:test';
import { stringify } from 'smol-toml';
import { DAEMON_MAIN, freePort, removeDir, scratchDir, startDaemon, type Daemon, type TomlTable } from './harness/daemon.js';
import { withLogs } from './harness/cluster.js';
import {
  NBD_INFO,
  NBD_OPT,
  NBD_REP,
  NBD_REP_ERR,
  RawConnection,
  encodeInfoRequest,
  encodeMetaContextRequest,
  encodeOption,
  optionReplyName,
  rawSocket,
  type OptionReply,
} from './harness/nbd-client.js';
import { TOOLS, requireTools, run, runOk, which } from './harness/tools.js';

const MiB = 1024 * 1024;
const TOOL_TIMEOUT_MS = 60_000;
const TEST_TIMEOUT_MS = 120_000;
const T = 5000;
const TOKEN = `token-${randomBytes(18).toString('base64url')}`;

let dir: string;
/** What openssl made: a CA, a server certificate it signed for 127.0.0.1 and localhost, and its key. */
let certs: { caCert: string; caKey: string; serverCert: string; serverKey: string; clientDir: string };

/** A CA and a server certificate signed by it, as an operator would make them. */
async function makeCertificates(where: string): Promise<typeof certs> {
  mkdirSync(where, { recursive: true });
  const file = (name: string) => path.join(where, name);
  const openssl = (args: string[]) => runOk('openssl', args, { timeoutMs: TOOL_TIMEOUT_MS, cwd: where });
  await openssl(['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', 'ca-key.pem', '-out', 'ca-cert.pem', '-days', '2',
    '-subj', '/CN=updraft test CA', '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign,cRLSign']);
  await openssl(['req', '-newkey', 'rsa:2048', '-nodes', '-keyout', 'server-key.pem', '-out', 'server.csr', '-subj', '/CN=localhost']);
  writeFileSync(file('server.ext'), 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature,keyEncipherment\n');
  await openssl(['x509', '-req', '-in', 'server.csr', '-CA', 'ca-cert.pem', '-CAkey', 'ca-key.pem', '-set_serial', '2', '-days', '2',
    '-extfile', 'server.ext', '-out', 'server-cert.pem']);
  // libnbd (and qemu's tls-creds-x509) read the CA that vouches for the server as DIR/ca-cert.pem.
  const clientDir = file('client');
  mkdirSync(clientDir);
  writeFileSync(path.join(clientDir, 'ca-cert.pem'), readFileSync(file('ca-cert.pem')));
  return { caCert: file('ca-cert.pem'), caKey: file('ca-key.pem'), serverCert: file('server-cert.pem'), serverKey: file('server-key.pem'), clientDir };
}

before(async () => {
  dir = await scratchDir('updraft-security-');
  if (which('openssl')) certs = await makeCertificates(path.join(dir, 'certs'));
});
after(async () => {
  if (dir && !process.env.UPDRAFT_KEEP_TEST_DIRS) await removeDir(dir);
});


/** `updraft ARGS` as a user runs it; resolves with its exit code and output. */
function updraft(args: string[], env: NodeJS.ProcessEnv = {}) {
  return run(process.execPath, [DAEMON_MAIN, ...args], { timeoutMs: 30_000, env: { ...process.env, ...env } });
}

/** A complete config in a fresh folder under `dir`, with `overrides` merged in; returns its path. */
async function writeConfig(name: string, overrides: TomlTable): Promise<string> {
  const where = path.join(dir, name);
  mkdirSync(where);
  const http = await freePort();
  const config: TomlTable = {
    cache: { dir: path.join(where, 'cache'), disk_size_gb: 1, memory_size_gb: 0.1 },
    storage: { url: `file://${path.join(where, 'store')}` },
    servers: { nbd: { unix_socket: path.join(where, 'nbd.sock'), ...(overrides.nbd as TomlTable) }, http: { address: `127.0.0.1:${http}`, ...(overrides.http as TomlTable) } },
  };
  const file = path.join(where, 'updraft.toml');
  writeFileSync(file, stringify(config) + '\n');
  return file;
}

// ---------------------------------------------------------------------------
// HTTP API token

describe('the HTTP API with a token', { timeout: TEST_TIMEOUT_MS }, () => {
  let daemon: Daemon;
  before(async () => {
    // Every interface, which is allowed only because a token is set (from the environment).
    const port = await freePort();
    daemon = await startDaemon({
      toml: { servers: { http: { address: `0.0.0.0:${port}`, token: '${UPDRAFT_TEST_TOKEN}' } } },
      env: { UPDRAFT_TEST_TOKEN: TOKEN },
      apiToken: TOKEN,
    });
  });
  after(async () => {
    await daemon?.cleanup();
  });

  const url = () => daemon.httpUrl.replace('0.0.0.0', '127.0.0.1');
  const request = async (method: string, route: string, authorization?: string, body?: unknown) => {
    const headers: Record<string, string> = {};
    if (authorization !== undefined) headers.authorization = authorization;
    if (body !== undefined) headers['content-type'] = 'application/json';
    const response = await fetch(url() + route, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
    const text = await response.text();
    let json: any = null;
    try {
      json = JSON.parse(text);
    } catch {
      json = null;
    }
    return { status: response.status, json, text, challenge: response.headers.get('www-authenticate') };
  };

  // Every kind of route, including the probes a monitor would use and one that does not exist.
  const routes: Array<[string, string, unknown?]> = [
    ['GET', '/healthz'],
    ['GET', '/metrics'],
    ['GET', '/api/exports'],
    ['GET', '/api/exports/secret-vol'],
    ['GET', '/api/dashboard'],
    ['GET', '/api/host'],
    ['PUT', '/api/exports/secret-vol', { size_gb: 0.0625 }],
    ['POST', '/api/exports/secret-vol/drain'],
    ['DELETE', '/api/exports/secret-vol?force=true'],
    ['GET', '/no/such/route'],
  ];

  test('a request without a token, with a wrong one or with another scheme is 401 with a JSON error and a Bearer challenge, on every route', async () => {
    await withLogs([daemon], async () => {
      const wrong: Array<[string, string | undefined]> = [
        ['no Authorization header', undefined],
        ['an empty bearer token', 'Bearer '],
        ['another token', `Bearer ${TOKEN.slice(0, -1)}${TOKEN.endsWith('x') ? 'y' : 'x'}`],
        ['a prefix of the token', `Bearer ${TOKEN.slice(0, 10)}`],
        ['the token with more after it', `Bearer ${TOKEN}x`],
        ['the token as Basic credentials', `Basic ${Buffer.from(`user:${TOKEN}`).toString('base64')}`],
        ['the bare token', TOKEN],
      ];
      const problems: string[] = [];
      for (const [method, route, body] of routes) {
        for (const [what, authorization] of wrong) {
          const r = await request(method, route, authorization, body);
          if (r.status !== 401 || typeof r.json?.error !== 'string' || !r.challenge?.startsWith('Bearer realm="updraft"')) {
            problems.push(`${method} ${route} with ${what}: ${r.status} ${r.text.slice(0, 120)} challenge=${r.challenge}`);
          }
          if (authorization !== undefined && !r.challenge?.includes('error="invalid_token"')) problems.push(`${method} ${route} with ${what}: challenge ${r.challenge} lacks invalid_token`);
        }
      }
      assert.deepEqual(problems, []);
      // Nothing was done by the refused requests.
      const list = await request('GET', '/api/exports', `Bearer ${TOKEN}`);
      assert.equal(list.status, 200, list.text);
      assert.deepEqual(list.json, [], 'a refused PUT created a volume');
    });
  });

  test("the dashboard's static files need no token and hold no volume data; what they fetch does", async () => {
    assert.equal((await request('PUT', '/api/exports/page-probe-vol', `Bearer ${TOKEN}`, { size_gb: 0.0625 })).status, 201);
    for (const route of ['/dashboard/', '/dashboard/app.js', '/dashboard/style.css', '/dashboard/uPlot.iife.min.js', '/dashboard/uPlot.min.css']) {
      const r = await request('GET', route);
      assert.equal(r.status, 200, `GET ${route} without a token: ${r.status} ${r.text.slice(0, 200)}`);
      assert.ok(!r.text.includes('page-probe-vol'), `GET ${route} shows a volume name`);
    }
    assert.match((await request('GET', '/api/dashboard', `Bearer ${TOKEN}`)).text, /page-probe-vol/);
    assert.equal((await request('DELETE', '/api/exports/page-probe-vol', `Bearer ${TOKEN}`)).status, 200);
    // With a query or another method it is not a page file: the token is asked for.
    assert.equal((await request('GET', '/dashboard/app.js?x=1')).status, 401);
    assert.equal((await request('POST', '/dashboard/')).status, 401);
    const redirect = await fetch(url() + '/', { redirect: 'manual' });
    assert.equal(redirect.status, 302);
    assert.equal(redirect.headers.get('location'), '/dashboard/');
  });

  test('the right token is 200 on the API, /healthz and /metrics; the scheme is case-insensitive', async () => {
    await withLogs([daemon], async () => {
      for (const auth of [`Bearer ${TOKEN}`, `bearer ${TOKEN}`]) {
        const health = await request('GET', '/healthz', auth);
        assert.equal(health.status, 200, health.text);
        assert.equal(health.json.status, 'ok');
      }
      const metrics = await request('GET', '/metrics', `Bearer ${TOKEN}`);
      assert.equal(metrics.status, 200);
      assert.match(metrics.text, /^updraft_volumes /m);
      const created = await request('PUT', '/api/exports/authorized', `Bearer ${TOKEN}`, { size_gb: 0.0625 });
      assert.equal(created.status, 201, created.text);
      assert.equal((await request('GET', '/api/exports/authorized', `Bearer ${TOKEN}`)).json.size, 64 * MiB);
    });
  });

  test('the CLI sends the token from the config: checkpoint list works with it and is refused with a wrong one', async () => {
    await withLogs([daemon], async () => {
      assert.equal((await daemon.api('PUT', '/api/exports/cli-vol', { size_gb: 0.0625 })).status, 201);
      const ok = await updraft(['checkpoint', 'list', 'cli-vol', '-c', daemon.configPath], { UPDRAFT_TEST_TOKEN: TOKEN });
      assert.equal(ok.code, 0, ok.stderr);
      assert.deepEqual(JSON.parse(ok.stdout), []);
      const refused = await updraft(['checkpoint', 'list', 'cli-vol', '-c', daemon.configPath], { UPDRAFT_TEST_TOKEN: 'not-the-token-at-all' });
      assert.equal(refused.code, 1, refused.stdout);
      assert.match(refused.stderr, /401 the bearer token is wrong/);
    });
  });

  test('the unix socket is created with mode 0660 by default', () => {
    assert.equal((statSync(daemon.socket).mode & 0o777).toString(8), '660');
  });
});

describe('start-up refuses an open API and bad TLS files, naming the setting', { timeout: TEST_TIMEOUT_MS }, () => {
  test('an HTTP address that is not loopback without a token: exit 2, naming servers.http.token, nothing listens', async () => {
    const port = await freePort();
    const file = await writeConfig('open-api', { http: { address: `0.0.0.0:${port}` } });
    const result = await updraft(['run', '-c', file]);
    assert.equal(result.code, 2, result.stderr);
    assert.match(result.stderr, new RegExp(`servers\\.http\\.address = "0\\.0\\.0\\.0:${port}" is not a loopback address, so servers\\.http\\.token must be set`));
    await assert.rejects(fetch(`http://127.0.0.1:${port}/healthz`), 'something answers on the refused port');
  });

  test('a TLS certificate that cannot be read, or a key that is not its key: exit 1, naming the setting and the file', async (t) => {
    if (!requireTools(t, [TOOLS.openssl])) return;
    const missing = path.join(dir, 'no-such-cert.pem');
    const unreadable = await writeConfig('missing-cert', { nbd: { tls: 'require', tls_cert: missing, tls_key: certs.serverKey } });
    const r1 = await updraft(['run', '-c', unreadable]);
    assert.equal(r1.code, 1, r1.stderr);
    assert.match(r1.stderr, new RegExp(`\\[servers\\.nbd\\] tls_cert ${missing.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}: cannot read it: ENOENT`));

    const mismatched = await writeConfig('wrong-key', { nbd: { tls: 'on', tls_cert: certs.serverCert, tls_key: certs.caKey } });
    const r2 = await updraft(['run', '-c', mismatched]);
    assert.equal(r2.code, 1, r2.stderr);
    assert.match(r2.stderr, /\[servers\.nbd\] tls_cert \S+server-cert\.pem and tls_key \S+ca-key\.pem are not a usable PEM certificate and key/);

    const notPem = path.join(dir, 'not-a-cert.pem');
    writeFileSync(notPem, 'this is not a certificate\n');
    const garbage = await writeConfig('not-pem', { nbd: { tls: 'require', tls_cert: notPem, tls_key: certs.serverKey } });
    const r3 = await updraft(['run', '-c', garbage]);
    assert.equal(r3.code, 1, r3.stderr);
    assert.match(r3.stderr, /not-a-cert\.pem and tls_key \S+ are not a usable PEM certificate and key/);
  });
});

// ---------------------------------------------------------------------------
// NBD over TLS

/** nbds:// URI of an export on the daemon's TCP address, with the folder holding ca-cert.pem. */
const tlsUri = (daemon: Daemon, name: string) => `nbds://${daemon.tcp.host}:${daemon.tcp.port}/${name}?tls-certificates=${encodeURIComponent(certs.clientDir)}`;

function tlsToml(mode: 'on' | 'require', extra: TomlTable = {}): TomlTable {
  return { servers: { nbd: { tls: mode, tls_cert: certs.serverCert, tls_key: certs.serverKey, auto_create_size_gb: 0.25, ...extra } } };
}

async function expectOptionReply(conn: RawConnection, option: number, type: number, what: string): Promise<OptionReply> {
  const reply = await conn.readOptionReply(T);
  assert.equal(reply.option, option, `${what}: reply is for option ${reply.option}`);
  assert.equal(reply.type, type, `${what}: got ${optionReplyName(reply.type)} (${reply.data.toString('utf8')}), want ${optionReplyName(type)}`);
  return reply;
}

/** NBD_OPT_STARTTLS, then the TLS handshake as a client trusting the test CA; the connection from there on. */
async function startTls(conn: RawConnection): Promise<RawConnection> {
  await conn.sendOption(NBD_OPT.STARTTLS);
  await expectOptionReply(conn, NBD_OPT.STARTTLS, NBD_REP.ACK, 'NBD_OPT_STARTTLS');
  const secure = tls.connect({ socket: conn.socket, ca: readFileSync(certs.caCert), servername: 'localhost' });
  await once(secure, 'secureConnect');
  return new RawConnection(secure);
}

/** NBD_OPT_GO for `name`, replies up to the ACK; the export size from NBD_INFO_EXPORT. */
async function go(conn: RawConnection, name: string): Promise<number> {
  await conn.sendOption(NBD_OPT.GO, encodeInfoRequest(name, [NBD_INFO.BLOCK_SIZE]));
  let size = -1;
  for (;;) {
    const reply = await conn.readOptionReply(T);
    assert.ok(reply.type < 2 ** 31, `NBD_OPT_GO failed: ${optionReplyName(reply.type)} ${reply.data.toString('utf8')}`);
    if (reply.type === NBD_REP.ACK) return size;
    if (reply.data.readUInt16BE(0) === NBD_INFO.EXPORT) size = Number(reply.data.readBigUInt64BE(2));
  }
}

describe('NBD with tls = "require"', { timeout: TEST_TIMEOUT_MS }, () => {
  let daemon: Daemon;
  before(async () => {
    if (!which('openssl')) return;
    daemon = await startDaemon({ toml: tlsToml('require', { socket_mode: '0600' }) });
  });
  after(async () => {
    await daemon?.cleanup();
  });

  test('nbdinfo over TLS with the CA the certificate was signed by reports TLS and the export', async (t) => {
    if (!requireTools(t, [TOOLS.nbdinfo, TOOLS.openssl])) return;
    await withLogs([daemon], async () => {
      const result = await runOk('nbdinfo', ['--json', tlsUri(daemon, 'tls-info')], { timeoutMs: TOOL_TIMEOUT_MS });
      const info = JSON.parse(result.stdout);
      assert.equal(info.TLS, true, result.stdout);
      assert.equal(info.structured, true, 'structured replies negotiated after STARTTLS');
      assert.equal(info.exports[0]['export-size'], 256 * MiB);
    });
  });

  test('nbdcopy writes and reads back 24 MiB over TLS byte for byte, and qemu-img compares the export over TLS equal to the file', async (t) => {
    if (!requireTools(t, [TOOLS.nbdcopy, TOOLS.qemuImg, TOOLS.openssl])) return;
    await withLogs([daemon], async () => {
      const source = path.join(daemon.dir, 'tls-source.img');
      const back = path.join(daemon.dir, 'tls-back.img');
      writeFileSync(source, randomBytes(24 * MiB));
      await runOk('nbdcopy', [source, tlsUri(daemon, 'tls-copy')], { timeoutMs: TOOL_TIMEOUT_MS });
      await runOk('nbdcopy', [tlsUri(daemon, 'tls-copy'), back], { timeoutMs: TOOL_TIMEOUT_MS });
      const read = readFileSync(back);
      assert.equal(read.length, 256 * MiB);
      assert.ok(read.subarray(0, 24 * MiB).equals(readFileSync(source)), 'the data read back over TLS differs from what was written');
      assert.ok(read.subarray(24 * MiB).every((b) => b === 0), 'past the written data the export is not zero');
      // qemu's own TLS client (tls-creds-x509 reads ca-cert.pem from the same folder).
      const compare = await run('qemu-img', [
        'compare', '--object', `tls-creds-x509,id=tls0,endpoint=client,dir=${certs.clientDir}`, '--image-opts',
        `driver=raw,file.driver=file,file.filename=${source}`,
        `driver=nbd,host=${daemon.tcp.host},port=${daemon.tcp.port},export=tls-copy,tls-creds=tls0`,
      ], { timeoutMs: TOOL_TIMEOUT_MS });
      assert.equal(compare.code, 0, `qemu-img compare over TLS: ${compare.stdout} ${compare.stderr}`);
      assert.match(compare.stdout, /Images are identical/);
    });
  });

  test('plaintext nbdinfo over TCP is refused and creates nothing', async (t) => {
    if (!requireTools(t, [TOOLS.nbdinfo, TOOLS.openssl])) return;
    await withLogs([daemon], async () => {
      const result = await run('nbdinfo', [daemon.tcpUri('plain-refused')], { timeoutMs: TOOL_TIMEOUT_MS });
      assert.notEqual(result.code, 0, `plaintext nbdinfo succeeded: ${result.stdout}`);
      assert.equal((await daemon.api('GET', '/api/exports/plain-refused')).status, 404, 'a refused plaintext client created its export');
    });
  });

  test('before TLS every option but STARTTLS and ABORT gets NBD_REP_ERR_TLS_REQD, STARTTLS with data NBD_REP_ERR_INVALID; after TLS, a second STARTTLS is NBD_REP_ERR_INVALID and GO works', async (t) => {
    if (!requireTools(t, [TOOLS.openssl])) return;
    await withLogs([daemon], async () => {
      const conn = await rawSocket({ ...daemon.tcp, stage: 'greeted' });
      try {
        const refused: Array<[number, Buffer | undefined]> = [
          [NBD_OPT.LIST, undefined],
          [NBD_OPT.STRUCTURED_REPLY, undefined],
          [NBD_OPT.INFO, encodeInfoRequest('raw-tls', [])],
          [NBD_OPT.GO, encodeInfoRequest('raw-tls', [])],
          [NBD_OPT.SET_META_CONTEXT, encodeMetaContextRequest('raw-tls', ['base:allocation'])],
          [NBD_OPT.EXTENDED_HEADERS, undefined],
          [99, Buffer.from('unknown option')],
        ];
        for (const [option, data] of refused) {
          await conn.sendOption(option, data);
          await expectOptionReply(conn, option, NBD_REP_ERR.TLS_REQD, `option ${option} before TLS`);
        }
        await conn.sendOption(NBD_OPT.STARTTLS, Buffer.from('x'));
        await expectOptionReply(conn, NBD_OPT.STARTTLS, NBD_REP_ERR.INVALID, 'NBD_OPT_STARTTLS with data');
        const secure = await startTls(conn);
        await secure.sendOption(NBD_OPT.STARTTLS);
        await expectOptionReply(secure, NBD_OPT.STARTTLS, NBD_REP_ERR.INVALID, 'a second NBD_OPT_STARTTLS');
        await secure.sendOption(NBD_OPT.LIST);
        for (let reply = await secure.readOptionReply(T); reply.type !== NBD_REP.ACK; reply = await secure.readOptionReply(T)) {
          assert.equal(reply.type, NBD_REP.SERVER, `NBD_OPT_LIST over TLS: ${optionReplyName(reply.type)} ${reply.data.toString('utf8')}`);
        }
        assert.equal(await go(secure, 'raw-tls'), 256 * MiB);
      } finally {
        conn.destroy();
      }
      assert.equal((await daemon.api('GET', '/api/exports/raw-tls')).status, 200, 'GO over TLS did not open the export');
    });
  });

  test('NBD_OPT_EXPORT_NAME before TLS, and a client without fixed newstyle, are disconnected; NBD_OPT_ABORT is answered', async (t) => {
    if (!requireTools(t, [TOOLS.openssl])) return;
    await withLogs([daemon], async () => {
      const exportName = await rawSocket({ ...daemon.tcp, stage: 'greeted' });
      await exportName.sendOption(NBD_OPT.EXPORT_NAME, Buffer.from('export-name-plain'));
      assert.ok(await exportName.waitClosed(3000), 'NBD_OPT_EXPORT_NAME before TLS did not close the connection');
      exportName.destroy();

      const oldClient = await rawSocket({ ...daemon.tcp, stage: 'connected' });
      await oldClient.read(18, T);
      await oldClient.write(Buffer.alloc(4)); // client flags without NBD_FLAG_C_FIXED_NEWSTYLE
      assert.ok(await oldClient.waitClosed(3000), 'a client that cannot do TLS was not disconnected');
      oldClient.destroy();

      const abort = await rawSocket({ ...daemon.tcp, stage: 'greeted' });
      await abort.sendOption(NBD_OPT.ABORT);
      await expectOptionReply(abort, NBD_OPT.ABORT, NBD_REP.ACK, 'NBD_OPT_ABORT before TLS');
      abort.destroy();

      assert.equal((await daemon.api('GET', '/api/exports/export-name-plain')).status, 404, 'NBD_OPT_EXPORT_NAME before TLS created its export');
      assert.match(daemon.log(), /NBD_OPT_EXPORT_NAME before NBD_OPT_STARTTLS/);
      assert.match(daemon.log(), /did not set NBD_FLAG_C_FIXED_NEWSTYLE/);
    });
  });

  test('a client that does not do TLS after the ACK, or sends options before it, is disconnected and the daemon serves on', async (t) => {
    if (!requireTools(t, [TOOLS.nbdinfo, TOOLS.openssl])) return;
    await withLogs([daemon], async () => {
      const garbage = await rawSocket({ ...daemon.tcp, stage: 'greeted' });
      await garbage.sendOption(NBD_OPT.STARTTLS);
      await expectOptionReply(garbage, NBD_OPT.STARTTLS, NBD_REP.ACK, 'NBD_OPT_STARTTLS');
      await garbage.write(Buffer.from('this is not a TLS ClientHello, it is plaintext\r\n'));
      assert.ok(await garbage.waitClosed(3000), 'a failed TLS handshake did not close the connection');
      garbage.destroy();

      // STARTTLS and GO in one write: the GO would be read as a TLS record.
      const eager = await rawSocket({ ...daemon.tcp, stage: 'greeted' });
      await eager.write(Buffer.concat([encodeOption(NBD_OPT.STARTTLS), encodeOption(NBD_OPT.GO, encodeInfoRequest('eager', []))]));
      assert.ok(await eager.waitClosed(3000), 'options sent ahead of the STARTTLS reply did not close the connection');
      eager.destroy();

      assert.match(daemon.log(), /TLS handshake failed/);
      assert.match(daemon.log(), /bytes after NBD_OPT_STARTTLS without waiting for its reply/);
      const info = JSON.parse((await runOk('nbdinfo', ['--json', tlsUri(daemon, 'after-bad-tls')], { timeoutMs: TOOL_TIMEOUT_MS })).stdout);
      assert.equal(info.TLS, true);
    });
  });

  test('the unix socket, guarded by its mode (socket_mode = "0600" here), serves plaintext and TLS alike', async (t) => {
    if (!requireTools(t, [TOOLS.nbdinfo, TOOLS.openssl])) return;
    await withLogs([daemon], async () => {
      assert.equal((statSync(daemon.socket).mode & 0o777).toString(8), '600');
      const plain = JSON.parse((await runOk('nbdinfo', ['--json', daemon.uri('unix-vol')], { timeoutMs: TOOL_TIMEOUT_MS })).stdout);
      assert.equal(plain.TLS, false);
      const secureUri = `nbds+unix:///unix-vol?socket=${encodeURIComponent(daemon.socket)}&tls-certificates=${encodeURIComponent(certs.clientDir)}`;
      const secure = JSON.parse((await runOk('nbdinfo', ['--json', secureUri], { timeoutMs: TOOL_TIMEOUT_MS })).stdout);
      assert.equal(secure.TLS, true);
    });
  });
});

describe('NBD with tls = "on"', { timeout: TEST_TIMEOUT_MS }, () => {
  let daemon: Daemon;
  before(async () => {
    if (!which('openssl')) return;
    daemon = await startDaemon({ toml: tlsToml('on') });
  });
  after(async () => {
    await daemon?.cleanup();
  });

  test('nbdinfo is served over TCP both in plaintext and over TLS', async (t) => {
    if (!requireTools(t, [TOOLS.nbdinfo, TOOLS.openssl])) return;
    await withLogs([daemon], async () => {
      const plain = JSON.parse((await runOk('nbdinfo', ['--json', daemon.tcpUri('both')], { timeoutMs: TOOL_TIMEOUT_MS })).stdout);
      assert.equal(plain.TLS, false);
      assert.equal(plain.exports[0]['export-size'], 256 * MiB);
      const secure = JSON.parse((await runOk('nbdinfo', ['--json', tlsUri(daemon, 'both')], { timeoutMs: TOOL_TIMEOUT_MS })).stdout);
      assert.equal(secure.TLS, true);
      assert.equal(secure.exports[0]['export-size'], 256 * MiB);
    });
  });

  test('options negotiated before STARTTLS are forgotten after it, as the spec requires: structured replies must be asked for again', async (t) => {
    if (!requireTools(t, [TOOLS.openssl])) return;
    await withLogs([daemon], async () => {
      const conn = await rawSocket({ ...daemon.tcp, stage: 'greeted' });
      try {
        await conn.sendOption(NBD_OPT.STRUCTURED_REPLY);
        await expectOptionReply(conn, NBD_OPT.STRUCTURED_REPLY, NBD_REP.ACK, 'NBD_OPT_STRUCTURED_REPLY in plaintext');
        const secure = await startTls(conn);
        const query = encodeMetaContextRequest('forgotten', ['base:allocation']);
        await secure.sendOption(NBD_OPT.SET_META_CONTEXT, query);
        await expectOptionReply(secure, NBD_OPT.SET_META_CONTEXT, NBD_REP_ERR.INVALID, 'NBD_OPT_SET_META_CONTEXT after STARTTLS without STRUCTURED_REPLY again');
        await secure.sendOption(NBD_OPT.STRUCTURED_REPLY);
        await expectOptionReply(secure, NBD_OPT.STRUCTURED_REPLY, NBD_REP.ACK, 'NBD_OPT_STRUCTURED_REPLY over TLS');
        await secure.sendOption(NBD_OPT.SET_META_CONTEXT, query);
        await expectOptionReply(secure, NBD_OPT.SET_META_CONTEXT, NBD_REP.META_CONTEXT, 'NBD_OPT_SET_META_CONTEXT over TLS');
        await expectOptionReply(secure, NBD_OPT.SET_META_CONTEXT, NBD_REP.ACK, 'NBD_OPT_SET_META_CONTEXT over TLS');
      } finally {
        conn.destroy();
      }
    });
  });
});
