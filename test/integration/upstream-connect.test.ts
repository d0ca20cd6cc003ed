import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { createServer, connect as netConnect, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { TLSSocket, createSecureContext, type SecureContext } from 'node:tls';
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import pg from 'pg';
import { serialize } from 'pg-protocol';
import type { BackendMessage, DataRowMessage, DatabaseError, ParameterStatusMessage } from 'pg-protocol/dist/messages.js';
import { Parser } from 'pg-protocol/dist/parser.js';
import { startTestPostgres, type TestPostgres } from '../fixtures/postgres.js';
import { clearScramKeyCache, scramKeyCacheStats } from '../../proxy/scram.js';
import {
  UpstreamError,
  connectUpstream,
  sendUpstreamCancel,
  type UpstreamFailureKind,
  type UpstreamSession,
  type UpstreamTarget,
} from '../../proxy/upstream-connect.js';

let server: TestPostgres;

const ROLES = {
  scram: { user: 'sd_scram', password: 'scram-secret' },
  md5: { user: 'sd_md5', password: 'md5-secret' },
  password: { user: 'sd_plain', password: 'plain-secret' },
  trust: { user: 'sd_trust', password: '' },
};

before(async () => {
  const hba = (user: string, method: string): string[] => [`host all ${user} 127.0.0.1/32 ${method}`, `host all ${user} ::1/128 ${method}`];
  server = await startTestPostgres({
    authMethod: 'scram-sha-256',
    extraHba: [...hba(ROLES.md5.user, 'md5'), ...hba(ROLES.password.user, 'password'), ...hba(ROLES.trust.user, 'trust')],
  });
  const admin = new pg.Client({ connectionString: server.url() });
  admin.on('notice', () => {}); // PG 18 warns that md5 passwords are deprecated
  await admin.connect();
  try {
    for (const { user } of Object.values(ROLES)) await admin.query(`drop role if exists ${user}`);
    await admin.query(`set password_encryption = 'md5'`);
    await admin.query(`create role ${ROLES.md5.user} login password '${ROLES.md5.password}'`);
    await admin.query(`reset password_encryption`);
    await admin.query(`create role ${ROLES.scram.user} login password '${ROLES.scram.password}'`);
    await admin.query(`create role ${ROLES.password.user} login password '${ROLES.password.password}'`);
    await admin.query(`create role ${ROLES.trust.user} login`);
  } finally {
    await admin.end();
  }
});

after(async () => {
  await server?.stop();
});

function targetFor(role: keyof typeof ROLES, overrides: Partial<UpstreamTarget> = {}): UpstreamTarget {
  return { host: server.host, port: server.port, database: 'postgres', ...ROLES[role], sslmode: 'disable', ...overrides };
}

const NO_PARAMS: ReadonlyMap<string, string> = new Map();

/** Writes one simple Query and reads to ReadyForQuery, the way the relay will see the socket. */
async function simpleQuery(session: UpstreamSession, sql: string): Promise<{ rows: (string | null)[][]; error: DatabaseError | null }> {
  const { socket } = session;
  const parser = new Parser();
  const rows: (string | null)[][] = [];
  let error: DatabaseError | null = null;
  return new Promise((resolve, reject) => {
    const onMessage = (m: BackendMessage): void => {
      if (m.name === 'dataRow') rows.push((m as DataRowMessage).fields as (string | null)[]);
      else if (m.name === 'error') error = m as DatabaseError;
      else if (m.name === 'readyForQuery') {
        socket.pause();
        socket.removeListener('data', onData);
        socket.removeListener('error', reject);
        resolve({ rows, error });
      }
    };
    const onData = (chunk: Buffer): void => parser.parse(chunk, onMessage);
    socket.on('error', reject);
    socket.on('data', onData);
    if (session.rest.length > 0) parser.parse(session.rest, onMessage);
    socket.write(serialize.query(sql));
    // Explicitly paused by connectUpstream: adding a 'data' listener alone does not resume it.
    socket.resume();
  });
}

function close(session: UpstreamSession): void {
  session.socket.on('error', () => {});
  session.socket.end(serialize.end());
  session.socket.destroy();
}

async function expectFailure(p: Promise<unknown>, kind: UpstreamFailureKind, check?: (e: UpstreamError) => void): Promise<UpstreamError> {
  let caught: unknown;
  await p.then(
    (s) => {
      close(s as UpstreamSession);
      assert.fail(`expected an UpstreamError of kind ${kind}, but the connect succeeded`);
    },
    (e: unknown) => {
      caught = e;
    },
  );
  assert.ok(caught instanceof UpstreamError, `expected UpstreamError, got ${String(caught)}`);
  assert.equal(caught.kind, kind, caught.message);
  check?.(caught);
  return caught;
}

async function freePort(): Promise<number> {
  const s = createServer();
  await new Promise<void>((r) => s.listen(0, '127.0.0.1', r));
  const { port } = s.address() as { port: number };
  await new Promise<void>((r) => s.close(() => r()));
  return port;
}

/** A TCP server under test control; records whether each accepted socket was closed by the peer. */
interface FakeUpstream {
  port: number;
  /** Settles when the first accepted connection has been closed. */
  closed: Promise<void>;
  server: Server;
  sockets: Set<Socket>;
}
async function fakeUpstream(onConnection: (sock: Socket) => void): Promise<FakeUpstream> {
  let sawClose!: () => void;
  const closed = new Promise<void>((r) => (sawClose = r));
  const sockets = new Set<Socket>();
  const srv = createServer((sock) => {
    sockets.add(sock);
    sock.on('error', () => {});
    sock.on('close', () => {
      sockets.delete(sock);
      sawClose();
    });
    onConnection(sock);
    // Keep reading even when the handler does not, or the peer's FIN is never seen.
    sock.resume();
  });
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
  return { port: (srv.address() as { port: number }).port, closed, server: srv, sockets };
}

async function stopServer(fake: FakeUpstream): Promise<void> {
  for (const s of fake.sockets) s.destroy();
  await new Promise<void>((r) => fake.server.close(() => r()));
}

test('a SCRAM role connects and the handed-over socket answers select 1', async () => {
  const session = await connectUpstream(targetFor('scram'), NO_PARAMS);
  try {
    assert.equal(session.authMethod, 'scram-sha-256');
    assert.equal(session.tls, false);
    assert.equal(session.rest.length, 0);
    assert.ok(session.backendKey.processId > 0);
    assert.ok(session.parameters.get('server_version'));
    assert.equal(session.socket.listenerCount('data'), 0);
    assert.equal(session.socket.listenerCount('error'), 0);
    assert.equal(session.socket.isPaused(), true);
    const { rows, error } = await simpleQuery(session, 'select 1');
    assert.equal(error, null);
    assert.deepEqual(rows, [['1']]);
  } finally {
    close(session);
  }
});

test('the handoff holds the server\'s ParameterStatus messages verbatim, matching the parsed parameters', async () => {
  const session = await connectUpstream(targetFor('scram'), NO_PARAMS);
  close(session);
  const seen = new Map<string, string>();
  const names = new Set<string>();
  new Parser().parse(session.handoff, (m) => {
    names.add(m.name);
    if (m.name === 'parameterStatus') seen.set((m as ParameterStatusMessage).parameterName, (m as ParameterStatusMessage).parameterValue);
  });
  assert.deepEqual([...names].filter((n) => n !== 'notice'), ['parameterStatus']);
  assert.deepEqual(seen, session.parameters);
  assert.equal(session.handoff[0], 0x53);
});

test('an md5 role connects with the md5 challenge', async () => {
  const session = await connectUpstream(targetFor('md5'), NO_PARAMS);
  try {
    assert.equal(session.authMethod, 'md5');
    assert.deepEqual((await simpleQuery(session, 'select current_user')).rows, [[ROLES.md5.user]]);
  } finally {
    close(session);
  }
});

test('a cleartext-password role connects with the password challenge', async () => {
  const session = await connectUpstream(targetFor('password'), NO_PARAMS);
  try {
    assert.equal(session.authMethod, 'password');
    assert.deepEqual((await simpleQuery(session, 'select current_user')).rows, [[ROLES.password.user]]);
  } finally {
    close(session);
  }
});

test('a trust role connects without any challenge', async () => {
  const session = await connectUpstream(targetFor('trust'), NO_PARAMS);
  try {
    assert.equal(session.authMethod, 'trust');
  } finally {
    close(session);
  }
});

test('a wrong password fails as auth with SQLSTATE 28P01', async () => {
  for (const role of ['scram', 'md5', 'password'] as const) {
    await expectFailure(connectUpstream(targetFor(role, { password: 'wrong' }), NO_PARAMS), 'auth', (e) => {
      assert.equal(e.sqlstate, '28P01');
      assert.match(e.serverMessage ?? '', /password authentication failed/);
    });
  }
});

test('a database that does not exist fails as server with SQLSTATE 3D000', async () => {
  await expectFailure(connectUpstream(targetFor('scram', { database: 'no_such_database' }), NO_PARAMS), 'server', (e) => {
    assert.equal(e.sqlstate, '3D000');
  });
});

test('a closed port fails as unreachable', async () => {
  const port = await freePort();
  await expectFailure(connectUpstream(targetFor('scram', { host: '127.0.0.1', port }), NO_PARAMS), 'unreachable');
});

test('a host name that does not resolve fails as unreachable', async () => {
  await expectFailure(connectUpstream(targetFor('scram', { host: 'no-such-host.invalid' }), NO_PARAMS), 'unreachable');
});

test('a listener that accepts and never answers times out within the timeout and the socket is closed', async () => {
  for (const sslmode of ['disable', 'prefer'] as const) {
    const fake = await fakeUpstream(() => {});
    try {
      const started = performance.now();
      await expectFailure(connectUpstream(targetFor('scram', { host: '127.0.0.1', port: fake.port, sslmode }), NO_PARAMS, { timeoutMs: 300 }), 'timeout');
      const elapsed = performance.now() - started;
      assert.ok(elapsed >= 290 && elapsed < 800, `timed out after ${elapsed} ms`);
      await fake.closed; // our side destroyed the socket
    } finally {
      await stopServer(fake);
    }
  }
});

test('aborting the signal rejects at once and closes the socket', async () => {
  const fake = await fakeUpstream(() => {});
  try {
    const ac = new AbortController();
    const p = connectUpstream(targetFor('scram', { host: '127.0.0.1', port: fake.port }), NO_PARAMS, { signal: ac.signal });
    setTimeout(() => ac.abort(new Error('client went away')), 50);
    const e = await expectFailure(p, 'timeout');
    assert.match(String((e.cause as Error).message), /client went away/);
    await fake.closed;
  } finally {
    await stopServer(fake);
  }
});

test('application_name and options reach the server, while user, database and replication cannot be overridden', async () => {
  const params = new Map([
    ['application_name', 'stagedoor-test'],
    ['options', '-c search_path=foo'],
    ['user', 'postgres'],
    ['database', 'template1'],
    ['replication', 'database'],
    ['_pq_.compression', 'on'],
  ]);
  const session = await connectUpstream(targetFor('scram'), params);
  try {
    assert.equal(session.parameters.get('application_name'), 'stagedoor-test');
    const { rows, error } = await simpleQuery(
      session,
      `select current_setting('application_name'), current_setting('search_path'), current_user, current_database()`,
    );
    assert.equal(error, null);
    assert.deepEqual(rows, [['stagedoor-test', 'foo', ROLES.scram.user, 'postgres']]);
    // A replication connection would refuse plain SQL with a different error; and we got the normal backend.
    assert.equal((await simpleQuery(session, 'select pg_is_in_recovery()')).error, null);
  } finally {
    close(session);
  }
});

test('a start-up parameter with a NUL byte is refused before connecting, so it cannot smuggle a database', async () => {
  await expectFailure(connectUpstream(targetFor('scram'), new Map([['application_name', 'x\0database\0template1']])), 'protocol');
});

test('sendUpstreamCancel stops a running pg_sleep(30) within a second', async () => {
  const session = await connectUpstream(targetFor('scram'), NO_PARAMS);
  try {
    const running = simpleQuery(session, 'select pg_sleep(30)');
    await new Promise((r) => setTimeout(r, 100));
    const started = performance.now();
    assert.equal(await sendUpstreamCancel(targetFor('scram'), session.backendKey), true);
    const { error } = await running;
    const elapsed = performance.now() - started;
    assert.equal(error?.code, '57014');
    assert.ok(elapsed < 1000, `cancel took ${elapsed} ms`);
  } finally {
    close(session);
  }
});

test('sendUpstreamCancel returns false instead of throwing when the server is unreachable', async () => {
  const port = await freePort();
  assert.equal(await sendUpstreamCancel({ host: '127.0.0.1', port, sslmode: 'disable' }, { processId: 1, secretKey: 2 }), false);
  assert.equal(await sendUpstreamCancel({ host: '127.0.0.1', port, sslmode: 'disable' }, { processId: 1, secretKey: 2 ** 40 }), false);
});

test('the SCRAM key cache makes a second connect with the same credential skip PBKDF2', async () => {
  clearScramKeyCache();
  close(await connectUpstream(targetFor('scram'), NO_PARAMS));
  assert.equal(scramKeyCacheStats().derivations, 1);
  close(await connectUpstream(targetFor('scram'), NO_PARAMS));
  assert.deepEqual(scramKeyCacheStats(), { derivations: 1, hits: 1, size: 1 });
  // A wrong password is its own cache entry and never poisons the good one.
  await expectFailure(connectUpstream(targetFor('scram', { password: 'nope' }), NO_PARAMS), 'auth');
  close(await connectUpstream(targetFor('scram'), NO_PARAMS));
  assert.equal(scramKeyCacheStats().derivations, 2);
});

// ---- hostile or broken upstreams, simulated ----

function backendMessage(type: string, body: Buffer): Buffer {
  const out = Buffer.alloc(5 + body.length);
  out.write(type, 0, 'latin1');
  out.writeInt32BE(4 + body.length, 1);
  body.copy(out, 5);
  return out;
}
function authRequest(code: number, extra: Buffer = Buffer.alloc(0)): Buffer {
  const b = Buffer.alloc(4 + extra.length);
  b.writeInt32BE(code, 0);
  extra.copy(b, 4);
  return backendMessage('R', b);
}

test('bytes after the S answer to SSLRequest are refused as an injection', async () => {
  const fake = await fakeUpstream((sock) => sock.once('data', () => sock.write(Buffer.concat([Buffer.from('S'), authRequest(0)]))));
  try {
    await expectFailure(connectUpstream(targetFor('scram', { host: '127.0.0.1', port: fake.port, sslmode: 'require' }), NO_PARAMS), 'protocol', (e) =>
      assert.match(e.message, /instead of one/),
    );
    await fake.closed;
  } finally {
    await stopServer(fake);
  }
});

test('a server that declines TLS fails require but falls back to plain under prefer', async () => {
  const fake = await fakeUpstream((sock) => {
    sock.once('data', () => {
      sock.write('N');
      sock.once('data', () => sock.write(Buffer.concat([authRequest(0), backendMessage('K', Buffer.alloc(8, 1)), backendMessage('Z', Buffer.from('I'))])));
    });
  });
  try {
    await expectFailure(connectUpstream(targetFor('trust', { host: '127.0.0.1', port: fake.port, sslmode: 'require' }), NO_PARAMS), 'tls');
    const session = await connectUpstream(targetFor('trust', { host: '127.0.0.1', port: fake.port, sslmode: 'prefer' }), NO_PARAMS);
    assert.equal(session.tls, false);
    assert.deepEqual(session.backendKey, { processId: 0x01010101, secretKey: 0x01010101 });
    close(session);
  } finally {
    await stopServer(fake);
  }
});

test('AuthenticationOk in the middle of SCRAM is refused: the server never proved it knows the password', async () => {
  const fake = await fakeUpstream((sock) => {
    sock.once('data', () => {
      sock.write(authRequest(10, Buffer.from('SCRAM-SHA-256\0\0')));
      sock.once('data', () => sock.write(Buffer.concat([authRequest(0), backendMessage('Z', Buffer.from('I'))])));
    });
  });
  try {
    await expectFailure(connectUpstream(targetFor('scram', { host: '127.0.0.1', port: fake.port }), NO_PARAMS), 'auth', (e) =>
      assert.match(e.message, /before completing SCRAM/),
    );
  } finally {
    await stopServer(fake);
  }
});

test('GSSAPI, SSPI and channel-binding-only SASL are refused as auth failures', async () => {
  for (const request of [authRequest(7), authRequest(9), authRequest(2), authRequest(10, Buffer.from('SCRAM-SHA-256-PLUS\0\0'))]) {
    const fake = await fakeUpstream((sock) => sock.once('data', () => sock.write(request)));
    try {
      await expectFailure(connectUpstream(targetFor('scram', { host: '127.0.0.1', port: fake.port }), NO_PARAMS), 'auth');
      await fake.closed;
    } finally {
      await stopServer(fake);
    }
  }
});

test('an oversized start-up message is refused from its header, without waiting for the body', async () => {
  const fake = await fakeUpstream((sock) => {
    sock.once('data', () => {
      const header = Buffer.alloc(5);
      header.write('S', 0, 'latin1');
      header.writeUInt32BE(64 * 1024 * 1024, 1);
      sock.write(Buffer.concat([authRequest(0), header]));
    });
  });
  try {
    await expectFailure(connectUpstream(targetFor('trust', { host: '127.0.0.1', port: fake.port }), NO_PARAMS, { timeoutMs: 2000 }), 'protocol', (e) =>
      assert.match(e.message, /limit/),
    );
  } finally {
    await stopServer(fake);
  }
});

test('messages split across many TCP reads and bytes after ReadyForQuery are handled', async () => {
  const greeting = Buffer.concat([
    authRequest(0),
    backendMessage('S', Buffer.from('server_version\x0099.0\x00')),
    backendMessage('N', Buffer.from('SNOTICE\0Mhello\0\0')),
    backendMessage('S', Buffer.from(`big\0${'x'.repeat(200_000)}\0`)),
    backendMessage('K', Buffer.from([0, 0, 0, 42, 0xff, 0xff, 0xff, 0xfe])),
    backendMessage('Z', Buffer.from('I')),
    Buffer.from('EXTRA'),
  ]);
  const fake = await fakeUpstream((sock) => {
    sock.setNoDelay(true);
    sock.once('data', async () => {
      for (let i = 0; i < greeting.length; i += 7919) {
        sock.write(greeting.subarray(i, i + 7919));
        await new Promise((r) => setImmediate(r));
      }
    });
  });
  try {
    const session = await connectUpstream(targetFor('trust', { host: '127.0.0.1', port: fake.port }), NO_PARAMS);
    close(session);
    assert.equal(session.parameters.get('server_version'), '99.0');
    assert.equal(session.parameters.get('big')?.length, 200_000);
    assert.deepEqual(session.backendKey, { processId: 42, secretKey: -2 });
    const zAt = greeting.length - 5 - 6;
    assert.deepEqual(session.handoff, greeting.subarray(authRequest(0).length, zAt - 13));
    // EXTRA may arrive with ReadyForQuery (then it is in rest) or after (then it waits in the paused socket).
    assert.ok(session.rest.length === 0 || session.rest.toString() === 'EXTRA');
  } finally {
    await stopServer(fake);
  }
});

// ---- TLS, through a TLS-terminating relay in front of the real server ----

let tlsMaterial: { cert: string; context: SecureContext } | null = null;
function tlsAvailable(): boolean {
  if (tlsMaterial !== null) return true;
  const dir = mkdtempSync(join(tmpdir(), 'stagedoor-tls-'));
  try {
    execFileSync(
      'openssl',
      ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-days', '1', '-subj', '/CN=localhost',
        '-addext', 'subjectAltName=DNS:localhost', '-keyout', join(dir, 'key.pem'), '-out', join(dir, 'cert.pem')],
      { stdio: 'ignore' },
    );
    const cert = readFileSync(join(dir, 'cert.pem'), 'utf8');
    tlsMaterial = { cert, context: createSecureContext({ cert, key: readFileSync(join(dir, 'key.pem'), 'utf8') }) };
    return true;
  } catch {
    return false;
  } finally {
    // Kept in memory only, so an interrupted run leaves no key on disk.
    rmSync(dir, { recursive: true, force: true });
  }
}

/** Answers SSLRequest with S, terminates TLS, and relays the plaintext to the real server (cancel requests included). */
async function tlsRelay(): Promise<FakeUpstream> {
  const relay = await fakeUpstream((sock) => {
    sock.once('data', (first) => {
      const upstream = netConnect({ host: server.host, port: server.port });
      upstream.on('error', () => sock.destroy());
      upstream.on('close', () => sock.destroy());
      sock.on('close', () => upstream.destroy());
      if (first.length === 8 && first.readInt32BE(4) === 80877103) {
        sock.write('S');
        const secure = new TLSSocket(sock, { isServer: true, secureContext: tlsMaterial!.context });
        secure.on('error', () => upstream.destroy());
        secure.pipe(upstream).pipe(secure);
      } else {
        upstream.write(first);
        sock.pipe(upstream).pipe(sock);
      }
    });
  });
  return relay;
}

test('sslmode require, verify-ca and verify-full negotiate TLS and the session works over it', { skip: !tlsAvailable() && 'openssl not available' }, async () => {
  const relay = await tlsRelay();
  try {
    const cases: Partial<UpstreamTarget>[] = [
      { host: '127.0.0.1', sslmode: 'require' },
      { host: '127.0.0.1', sslmode: 'verify-ca', sslrootcert: tlsMaterial!.cert },
      { host: 'localhost', sslmode: 'verify-full', sslrootcert: tlsMaterial!.cert },
    ];
    for (const c of cases) {
      const session = await connectUpstream(targetFor('scram', { port: relay.port, ...c }), NO_PARAMS);
      try {
        assert.equal(session.tls, true, c.sslmode);
        assert.deepEqual((await simpleQuery(session, 'select 1')).rows, [['1']]);
      } finally {
        close(session);
      }
    }
  } finally {
    await stopServer(relay);
  }
});

test('certificate verification failures are reported as tls', { skip: !tlsAvailable() && 'openssl not available' }, async () => {
  const relay = await tlsRelay();
  try {
    // Self-signed, not in Node's CA bundle.
    await expectFailure(connectUpstream(targetFor('scram', { host: 'localhost', port: relay.port, sslmode: 'verify-ca' }), NO_PARAMS), 'tls');
    // The certificate names localhost, not 127.0.0.1.
    await expectFailure(
      connectUpstream(targetFor('scram', { host: '127.0.0.1', port: relay.port, sslmode: 'verify-full', sslrootcert: tlsMaterial!.cert }), NO_PARAMS),
      'tls',
    );
    // require with a root certificate verifies the chain, as in libpq.
    await expectFailure(
      connectUpstream(targetFor('scram', { host: '127.0.0.1', port: relay.port, sslmode: 'require', sslrootcert: '-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n' }), NO_PARAMS),
      'tls',
    );
  } finally {
    await stopServer(relay);
  }
});

test('sendUpstreamCancel goes over TLS when sslmode requires it', { skip: !tlsAvailable() && 'openssl not available' }, async () => {
  const relay = await tlsRelay();
  try {
    const target = targetFor('scram', { host: 'localhost', port: relay.port, sslmode: 'verify-full', sslrootcert: tlsMaterial!.cert });
    const session = await connectUpstream(target, NO_PARAMS);
    try {
      const running = simpleQuery(session, 'select pg_sleep(30)');
      await new Promise((r) => setTimeout(r, 100));
      assert.equal(await sendUpstreamCancel(target, session.backendKey), true);
      assert.equal((await running).error?.code, '57014');
    } finally {
      close(session);
    }
  } finally {
    await stopServer(relay);
  }
});
