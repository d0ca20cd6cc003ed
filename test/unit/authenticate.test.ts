import { randomUUID } from 'node:crypto';
import { once } from 'node:events';
import { createServer, connect as netConnect, type AddressInfo, type Socket } from 'node:net';
import { before, describe, test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { SignJWT, exportJWK, generateKeyPair, type CryptoKey, type JSONWebKeySet } from 'jose';
import { TOKEN_AUDIENCE, TOKEN_ISSUER, type RouteAnswer } from '../../common/internal-api.js';
import { authenticate, checkStartupParameters, type AuthorizedSession } from '../../proxy/authenticate.js';
import { ClientReader } from '../../proxy/client-reader.js';
import { ControlPlaneUnavailable, type RouteLookup } from '../../proxy/control-plane-client.js';
import { Refusal } from '../../proxy/refusals.js';
import { RouteCache } from '../../proxy/route-cache.js';
import { TokenVerifier } from '../../proxy/token-verifier.js';
import { Inbox } from '../fixtures/inbox.js';

const QUICK = { timeout: 5_000 };
const SUBDOMAIN = 'acme-films';

// ---------------------------------------------------------------- keys and tokens

let privateKey: CryptoKey;
let jwks: JSONWebKeySet;
const KID = randomUUID();

before(async () => {
  const pair = await generateKeyPair('EdDSA', { crv: 'Ed25519', extractable: true });
  privateKey = pair.privateKey;
  jwks = { keys: [{ ...(await exportJWK(pair.publicKey)), kid: KID, alg: 'EdDSA', use: 'sig' }] };
});

async function issueToken(orchestraId: string, jti: string = randomUUID()): Promise<string> {
  const now = Math.floor(Date.now() / 1000);
  return new SignJWT({ sdm: SUBDOMAIN })
    .setProtectedHeader({ alg: 'EdDSA', kid: KID, typ: 'JWT' })
    .setSubject(orchestraId)
    .setJti(jti)
    .setIssuer(TOKEN_ISSUER)
    .setAudience(TOKEN_AUDIENCE)
    .setIssuedAt(now)
    .setExpirationTime(now + 3600)
    .sign(privateKey);
}

function routeAnswer(patch: Partial<RouteAnswer> = {}): RouteAnswer {
  return {
    orchestraId: randomUUID(),
    subdomain: SUBDOMAIN,
    status: 'active',
    maxConnections: null,
    upstream: { host: '127.0.0.1', port: 1, database: 'x', user: 'u', password: 'p', sslmode: 'disable' },
    upstreamAddress: '127.0.0.1:1',
    isolationOk: true,
    isolationDetail: null,
    revokedJtis: [],
    ...patch,
  };
}

// ---------------------------------------------------------------- wire helpers

function int32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeInt32BE(n, 0);
  return b;
}

function passwordMessage(password: string): Buffer {
  const body = Buffer.from(`${password}\0`, 'utf8');
  return Buffer.concat([Buffer.from('p', 'latin1'), int32(4 + body.length), body]);
}

const AUTH_CLEARTEXT = Buffer.concat([Buffer.from('R', 'latin1'), int32(8), int32(3)]);


// ---------------------------------------------------------------- loopback harness

interface Scenario {
  /** what the control plane answers for the subdomain (or throws) */
  lookup: RouteLookup | ControlPlaneUnavailable;
  params?: Record<string, string>;
  subdomain?: string;
}

interface Running {
  client: Socket;
  inbox: Inbox;
  result: Promise<AuthorizedSession>;
  routeFetches: () => number;
}

async function start(t: TestContext, s: Scenario): Promise<Running> {
  let fetches = 0;
  const routes = new RouteCache(
    async () => {
      fetches++;
      if (s.lookup instanceof ControlPlaneUnavailable) throw s.lookup;
      return s.lookup;
    },
    { ttlMs: 10_000, maxStaleMs: 60_000 },
  );
  const verifier = new TokenVerifier(() => Promise.resolve(jwks));
  const params = new Map(Object.entries(s.params ?? { user: SUBDOMAIN, database: SUBDOMAIN }));

  const server = createServer();
  const sockets: Socket[] = [];
  // Boxed: resolving with the bare promise would adopt it and wait for authentication to finish.
  let resolveResult!: (box: { result: Promise<AuthorizedSession> }) => void;
  const started = new Promise<{ result: Promise<AuthorizedSession> }>((r) => (resolveResult = r));
  server.on('connection', (socket) => {
    sockets.push(socket);
    const reader = new ClientReader(socket, 128 * 1024);
    const result = authenticate(reader, params, s.subdomain ?? SUBDOMAIN, { verifier, routes });
    result.catch(() => {}); // asserted by the tests
    resolveResult({ result });
  });
  t.after(async () => {
    for (const sock of sockets) sock.destroy();
    if (server.listening) {
      server.close();
      await once(server, 'close');
    }
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const client = netConnect((server.address() as AddressInfo).port, '127.0.0.1');
  sockets.push(client);
  client.on('error', () => {});
  await once(client, 'connect');
  const inbox = new Inbox(client);
  return { client, inbox, result: (await started).result, routeFetches: () => fetches };
}

/** Reads AuthenticationCleartextPassword, then sends `answer` (a password or raw bytes). */
async function login(t: TestContext, s: Scenario, answer: string | Buffer): Promise<Running> {
  const run = await start(t, s);
  assert.deepEqual(await run.inbox.read(9), AUTH_CLEARTEXT, 'AuthenticationCleartextPassword: R, int32 8, int32 3');
  run.client.write(typeof answer === 'string' ? passwordMessage(answer) : answer);
  return run;
}

function refusal(sqlstate: string, reason?: string): (e: unknown) => boolean {
  return (e: unknown) => {
    assert.ok(e instanceof Refusal, `expected a Refusal, got ${String(e)}`);
    assert.equal(e.sqlstate, sqlstate);
    if (reason !== undefined) assert.equal(e.reason, reason);
    return true;
  };
}

// ================================================================ checkStartupParameters

describe('checkStartupParameters', () => {
  test('the user parameter is the subdomain', () => {
    assert.deepEqual(checkStartupParameters(new Map([['user', SUBDOMAIN]])), { subdomain: SUBDOMAIN });
  });

  test('a start-up packet without user is refused with 28000 missing_user', () => {
    assert.throws(() => checkStartupParameters(new Map([['database', SUBDOMAIN]])), refusal('28000', 'missing_user'));
    assert.throws(() => checkStartupParameters(new Map([['user', '']])), refusal('28000', 'missing_user'));
  });

  test('replication=database is refused with 28000 replication_refused', () => {
    const p = new Map([
      ['user', SUBDOMAIN],
      ['replication', 'database'],
    ]);
    assert.throws(() => checkStartupParameters(p), refusal('28000', 'replication_refused'));
  });

  test('replication=true (physical replication) is refused with 28000 replication_refused', () => {
    for (const value of ['true', 'on', 'yes', '1']) {
      const p = new Map([
        ['user', SUBDOMAIN],
        ['replication', value],
      ]);
      assert.throws(() => checkStartupParameters(p), refusal('28000', 'replication_refused'), `replication=${value}`);
    }
  });

  test('replication=false is allowed', () => {
    for (const value of ['false', 'off', 'no', '0']) {
      const p = new Map([
        ['user', SUBDOMAIN],
        ['replication', value],
      ]);
      assert.deepEqual(checkStartupParameters(p), { subdomain: SUBDOMAIN }, `replication=${value}`);
    }
  });
});

// ================================================================ authenticate

describe('authenticate', () => {
  test('a valid token for the orchestra behind the subdomain is authorised with its subdomain and token', QUICK, async (t) => {
    const route = routeAnswer();
    const jti = randomUUID();
    const token = await issueToken(route.orchestraId, jti);
    const run = await login(t, { lookup: { found: true, route } }, token);
    const session = await run.result;
    assert.equal(session.subdomain, SUBDOMAIN);
    assert.equal(session.token.orchestraId, route.orchestraId);
    assert.equal(session.token.jti, jti);
    assert.deepEqual(session.route, route);
  });

  test('a start-up packet without database defaults the database to the subdomain', QUICK, async (t) => {
    const route = routeAnswer();
    const run = await login(t, { lookup: { found: true, route }, params: { user: SUBDOMAIN } }, await issueToken(route.orchestraId));
    assert.equal((await run.result).subdomain, SUBDOMAIN);
  });

  test("a token of another orchestra is refused with 28P01 token_other_orchestra", QUICK, async (t) => {
    const route = routeAnswer();
    const run = await login(t, { lookup: { found: true, route } }, await issueToken(randomUUID()));
    await assert.rejects(run.result, refusal('28P01', 'token_other_orchestra'));
  });

  test('a revoked token is refused with 28P01 token_revoked', QUICK, async (t) => {
    const jti = randomUUID();
    const route = routeAnswer({ revokedJtis: [randomUUID(), jti] });
    const run = await login(t, { lookup: { found: true, route } }, await issueToken(route.orchestraId, jti));
    await assert.rejects(run.result, refusal('28P01', 'token_revoked'));
  });

  test('a database parameter other than the subdomain is refused with 3D000', QUICK, async (t) => {
    const route = routeAnswer();
    const run = await login(t, { lookup: { found: true, route }, params: { user: SUBDOMAIN, database: 'postgres' } }, await issueToken(route.orchestraId));
    await assert.rejects(run.result, refusal('3D000', 'wrong_database'));
  });

  test('a suspended orchestra is refused with 57P03', QUICK, async (t) => {
    const route = routeAnswer({ status: 'suspended' });
    const run = await login(t, { lookup: { found: true, route } }, await issueToken(route.orchestraId));
    await assert.rejects(run.result, refusal('57P03', 'orchestra_not_active'));
  });

  test('a deleted orchestra is refused with 28000', QUICK, async (t) => {
    const route = routeAnswer({ status: 'deleted' });
    const run = await login(t, { lookup: { found: true, route } }, await issueToken(route.orchestraId));
    await assert.rejects(run.result, refusal('28000', 'orchestra_deleted'));
  });

  test('an orchestra whose isolation check failed is refused with 08004', QUICK, async (t) => {
    const route = routeAnswer({ isolationOk: false, isolationDetail: 'shares 10.0.0.5:5432/db with another orchestra' });
    const run = await login(t, { lookup: { found: true, route } }, await issueToken(route.orchestraId));
    await assert.rejects(run.result, (e: unknown) => {
      refusal('08004', 'isolation_violation')(e);
      assert.doesNotMatch((e as Refusal).message, /10\.0\.0\.5/, 'the detail is for the audit log, not the client');
      return true;
    });
  });

  test('an orchestra without an upstream is not authorised', QUICK, async (t) => {
    const route = routeAnswer({ status: 'active', upstream: null, upstreamAddress: null });
    const run = await login(t, { lookup: { found: true, route } }, await issueToken(route.orchestraId));
    await assert.rejects(run.result, refusal('57P03', 'orchestra_not_active'));
  });

  test('an unknown orchestra (control plane says not found) is refused with 28000 unknown_orchestra', QUICK, async (t) => {
    const run = await login(t, { lookup: { found: false } }, await issueToken(randomUUID()));
    await assert.rejects(run.result, refusal('28000', 'unknown_orchestra'));
  });

  test('a control plane that is down with nothing cached is refused with 57P03 control_plane_unavailable', QUICK, async (t) => {
    const run = await login(t, { lookup: new ControlPlaneUnavailable('control plane unreachable') }, await issueToken(randomUUID()));
    await assert.rejects(run.result, refusal('57P03', 'control_plane_unavailable'));
  });

  test('an invalid token is refused with 28P01 before any route is looked up', QUICK, async (t) => {
    const route = routeAnswer();
    const run = await login(t, { lookup: { found: true, route } }, 'hunter2');
    await assert.rejects(run.result, refusal('28P01', 'token_invalid'));
    assert.equal(run.routeFetches(), 0, 'an unauthenticated client learns nothing about which orchestras exist');
  });

  test('an empty password is refused with 28P01 token_missing', QUICK, async (t) => {
    const run = await login(t, { lookup: { found: false } }, '');
    await assert.rejects(run.result, refusal('28P01', 'token_missing'));
  });
});

describe('the password message', () => {
  test('a password message of length 1,000,000 is refused with 08P01 without reading it', QUICK, async (t) => {
    // Only the header is sent: a server that waited for the body would hang.
    const run = await login(t, { lookup: { found: false } }, Buffer.concat([Buffer.from('p', 'latin1'), int32(1_000_000)]));
    await assert.rejects(run.result, refusal('08P01', 'password_packet_invalid'));
  });

  test('a password message whose type byte is not p is refused with 08P01', QUICK, async (t) => {
    const route = routeAnswer();
    const body = Buffer.from(`${await issueToken(route.orchestraId)}\0`, 'utf8');
    const run = await login(t, { lookup: { found: true, route } }, Buffer.concat([Buffer.from('Q', 'latin1'), int32(4 + body.length), body]));
    await assert.rejects(run.result, refusal('08P01', 'password_packet_invalid'));
  });

  test('a password without its NUL terminator is refused with 08P01', QUICK, async (t) => {
    const route = routeAnswer();
    const body = Buffer.from(await issueToken(route.orchestraId), 'utf8');
    const run = await login(t, { lookup: { found: true, route } }, Buffer.concat([Buffer.from('p', 'latin1'), int32(4 + body.length), body]));
    await assert.rejects(run.result, refusal('08P01', 'password_packet_invalid'));
  });

  test('a password with a NUL inside it is refused with 08P01', QUICK, async (t) => {
    const route = routeAnswer();
    const token = await issueToken(route.orchestraId);
    const body = Buffer.from(`${token}\0junk\0`, 'utf8');
    const run = await login(t, { lookup: { found: true, route } }, Buffer.concat([Buffer.from('p', 'latin1'), int32(4 + body.length), body]));
    await assert.rejects(run.result, refusal('08P01', 'password_packet_invalid'));
  });

  test('a password message with a length below 5 is refused with 08P01', QUICK, async (t) => {
    const run = await login(t, { lookup: { found: false } }, Buffer.concat([Buffer.from('p', 'latin1'), int32(4)]));
    await assert.rejects(run.result, refusal('08P01', 'password_packet_invalid'));
  });
});

describe('REQUIRE_TLS exemption', () => {
  test('only loopback addresses may connect without TLS', async () => {
    const { isLoopback } = await import('../../proxy/session.js');
    for (const a of ['127.0.0.1', '127.8.9.10', '::1', '::ffff:127.0.0.1']) assert.equal(isLoopback(a), true, a);
    for (const a of ['10.0.0.1', '192.168.1.2', '::ffff:10.0.0.1', 'fe80::1', '128.0.0.1', 'unknown']) assert.equal(isLoopback(a), false, a);
  });
});
