// Adversarial: faults around the proxy. An upstream backend killed mid-query,
// a control-plane process that dies (SIGKILL) with its keys already loaded,
// Redis killed under a capped orchestra, the central database down while
// connections come and go (the audit log must buffer and lose nothing), and
// finally the tenant server stopped entirely.
//
// The stack is assembled here (as test/fixtures/stack.ts does) because the
// central database must be stopped and started again on the same data
// directory and port: TestPostgres.stop() deletes its data directory.

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import pg from 'pg';
import { loadControlPlaneConfig, loadProxyConfig, type Env } from '../../common/config.js';
import { createLogger } from '../../common/log.js';
import { ControlPlane } from '../../control-plane/server.js';
import { ProxyServer } from '../../proxy/server.js';
import { freePort, startEmbeddedPostgres, type EmbeddedServer } from '../../cli/embedded-postgres.js';
import { apiCaller, connect, makeCertificate, refusalOf, stackEnv } from '../fixtures/stack.js';
import { startTestPostgres, type TestPostgres } from '../fixtures/postgres.js';
import { startRedis, type TestRedis } from '../fixtures/redis.js';
import { CLI } from '../fixtures/cli.js';
import { waitUntil } from '../fixtures/wait.js';

const log = createLogger({ role: 'test' }, { level: process.env.STAGEDOOR_TEST_LOG ? 'debug' : 'error', write: process.env.STAGEDOOR_TEST_LOG ? undefined : () => {} });
// the fixture's admin password: the embedded initdb template is shared with the other tests
const CENTRAL_PASSWORD = 'stagedoor-test-admin';
const FAST = { fsync: 'off', synchronous_commit: 'off', full_page_writes: 'off' };

interface Orchestra {
  id: string;
  subdomain: string;
  token: string;
  jti: string;
}

let centralDir: string;
let centralPort: number;
let central: EmbeddedServer;
let tenant: TestPostgres;
let certDir: string;
let env: Env;
let controlPlane: ControlPlane;
let apiUrl: string;
let adminToken: string;
let proxy: ProxyServer;
let proxyPort: number;
const proxies: ProxyServer[] = [];
const children: ChildProcess[] = [];
let redis: TestRedis | undefined;

async function startCentral(): Promise<EmbeddedServer> {
  return startEmbeddedPostgres({ dataDir: centralDir, port: centralPort, password: CENTRAL_PASSWORD, settings: FAST });
}

async function startProxy(extra: Env = {}): Promise<{ proxy: ProxyServer; port: number }> {
  const p = new ProxyServer({ config: loadProxyConfig({ ...env, CONTROL_PLANE_URL: apiUrl, ...extra }), log: log.child({ role: 'proxy' }), serveMetrics: false });
  const address = await p.start();
  proxies.push(p);
  const deadline = Date.now() + 10_000;
  while (!p.ready) {
    assert.ok(Date.now() < deadline, 'proxy did not load its keys');
    await new Promise((r) => setTimeout(r, 10));
  }
  return { proxy: p, port: address.port };
}

function api<T = Record<string, unknown>>(method: string, path: string, body?: unknown): Promise<{ status: number; body: T }> {
  return apiCaller(apiUrl, adminToken)<T>(method, path, body);
}

async function issueToken(subdomain: string): Promise<{ token: string; jti: string }> {
  const t = await api<{ token: string; jti: string }>('POST', `/v1/orchestras/${subdomain}/tokens`, { name: 'faults' });
  assert.equal(t.status, 201, JSON.stringify(t.body));
  return t.body;
}

async function createOrchestra(subdomain: string, maxConnections?: number): Promise<Orchestra> {
  const created = await api<{ id: string }>('POST', '/v1/orchestras', { subdomain, name: `Orchestra ${subdomain}` });
  assert.equal(created.status, 201, JSON.stringify(created.body));
  if (maxConnections !== undefined) assert.equal((await api('PATCH', `/v1/orchestras/${subdomain}`, { maxConnections })).status, 200);
  return { id: created.body.id, subdomain, ...(await issueToken(subdomain)) };
}

function clientConfig(o: { subdomain: string; token: string }, port = proxyPort): pg.ClientConfig {
  return { host: '127.0.0.1', port, user: o.subdomain, password: o.token, database: o.subdomain, ssl: false, connectionTimeoutMillis: 15_000 };
}

async function upstreamBackends(database: string): Promise<Array<{ pid: number; query: string }>> {
  const admin = new pg.Client({ connectionString: tenant.url('postgres') });
  admin.on('error', () => {});
  await admin.connect();
  try {
    return (await admin.query<{ pid: number; query: string }>("select pid, query from pg_stat_activity where datname = $1 and backend_type = 'client backend'", [database])).rows;
  } finally {
    await admin.end();
  }
}


before(async () => {
  centralDir = mkdtempSync(join(tmpdir(), 'stagedoor-adv-central-'));
  centralPort = await freePort();
  [central, tenant] = await Promise.all([startCentral(), startTestPostgres()]);
  certDir = mkdtempSync(join(tmpdir(), 'stagedoor-adv-cert-'));
  const { cert, key } = makeCertificate(certDir);
  adminToken = `test_admin_${randomBytes(16).toString('hex')}`;
  env = stackEnv({ centralUrl: central.url('postgres'), tenantUrl: tenant.url('postgres'), cert, key, adminToken });
  controlPlane = await ControlPlane.start(loadControlPlaneConfig(env), log.child({ role: 'control-plane' }));
  apiUrl = controlPlane.url;
  ({ proxy, port: proxyPort } = await startProxy());
});

after(async () => {
  for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
  for (const p of proxies) await p.stop(0).catch(() => {});
  await controlPlane?.stop().catch(() => {});
  await redis?.stop().catch(() => {});
  await central?.stop().catch(() => {});
  await tenant?.stop().catch(() => {});
  if (centralDir) rmSync(centralDir, { recursive: true, force: true });
  if (certDir) rmSync(certDir, { recursive: true, force: true });
});

describe('faults around the proxy', () => {
  test('an upstream backend killed mid-query: the client gets an error, the proxy lives on, and the cap of 1 is released for the next session', { timeout: 30_000 }, async (t) => {
    const o = await createOrchestra('killed', 1);
    const c = await connect(clientConfig(o));
    const ended = new Promise<string | undefined>((resolve) => c.on('error', (e: Error & { code?: string }) => resolve(e.code)));
    const database = (await c.query('select current_database() as db')).rows[0].db as string;
    const sleeping = c.query('select pg_sleep(30)').then(
      () => 'finished',
      (e: Error & { code?: string }) => e.code ?? e.message,
    );
    let pid: number | undefined;
    assert.ok(await waitUntil(async () => (pid = (await upstreamBackends(database)).find((b) => b.query.includes('pg_sleep'))?.pid) !== undefined, 5_000), 'the query runs upstream');
    const admin = new pg.Client({ connectionString: tenant.url('postgres') });
    await admin.connect();
    const killedAt = Date.now();
    try {
      assert.equal((await admin.query('select pg_terminate_backend($1) as ok', [pid])).rows[0].ok, true);
    } finally {
      await admin.end();
    }
    const outcome = await sleeping;
    t.diagnostic(`query outcome ${outcome} after ${Date.now() - killedAt} ms; connection error ${await Promise.race([ended, new Promise((r) => setTimeout(() => r('none'), 500))])}`);
    assert.notEqual(outcome, 'finished', 'the query does not pretend to succeed');
    assert.equal(outcome, '57P01', "the upstream's own FATAL reaches the client");
    // the session's slot is released: with maxConnections 1 a new session gets in
    let code: string | null = 'not tried';
    assert.ok(await waitUntil(async () => (code = await refusalOf(clientConfig(o))) === null, 3_000), `a new session is refused with ${code}`);
    const again = await connect(clientConfig(o));
    assert.equal((await again.query('select 1 as ok')).rows[0].ok, 1);
    await again.end();
    await c.end().catch(() => {});
    assert.ok(await waitUntil(() => proxy.live.size === 0, 3_000), 'no session left on the proxy');
  });

  test('the control-plane process dies (SIGKILL) after the JWKS was loaded: a token never seen before still verifies from the cached keys, its cached orchestra connects within ROUTE_MAX_STALE, an orchestra never looked up gets 57P03, then everything 57P03 beyond ROUTE_MAX_STALE', { timeout: 60_000 }, async (t) => {
    const alpha = await createOrchestra('cp-alpha');
    const beta = await createOrchestra('cp-beta');
    // a second control plane, in a process of its own, on the same central database (same signing key)
    const cpPort = await freePort();
    const child = spawn(process.execPath, [CLI, 'control-plane'], {
      env: { ...process.env, ...env, CONTROL_PLANE_LISTEN: `127.0.0.1:${cpPort}`, LOG_LEVEL: 'error' } as NodeJS.ProcessEnv,
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    children.push(child);
    let stderr = '';
    child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
    const exited = new Promise<void>((r) => child.once('exit', () => r()));
    const cpUrl = `http://127.0.0.1:${cpPort}`;
    assert.ok(await waitUntil(async () => (await fetch(`${cpUrl}/readyz`).then((r) => r.status, () => 0)) === 200, 20_000, 100), `second control plane did not start: ${stderr}`);

    const { proxy: p, port } = await startProxy({ CONTROL_PLANE_URL: cpUrl, ROUTE_CACHE_TTL: '0.2', ROUTE_MAX_STALE: '3' });
    // Tokens this proxy has never seen (issued by the first control plane: same key).
    const fresh = await issueToken('cp-alpha');
    const freshBeta = await issueToken('cp-beta');
    assert.equal(await refusalOf(clientConfig(alpha, port)), null, 'route of cp-alpha cached while the control plane is up');
    child.kill('SIGKILL');
    await exited;
    const killedAt = Date.now();
    assert.equal(await fetch(`${cpUrl}/readyz`).then(() => 'up', () => 'gone'), 'gone');

    const results = {
      freshTokenCachedRoute: await refusalOf(clientConfig({ subdomain: 'cp-alpha', token: fresh.token }, port)),
      freshTokenUncachedOrchestra: await refusalOf(clientConfig({ subdomain: 'cp-beta', token: freshBeta.token }, port)),
      garbageTokenUncachedOrchestra: await refusalOf(clientConfig({ subdomain: 'cp-beta', token: 'not-a-token' }, port)),
      forgedTokenCachedRoute: await refusalOf(clientConfig({ subdomain: 'cp-alpha', token: beta.token }, port)),
    };
    const withinStaleMs = Date.now() - killedAt;
    t.diagnostic(`control plane gone, within ${withinStaleMs} ms: ${JSON.stringify(results)}`);
    assert.ok(withinStaleMs < 2_500, 'checks ran inside the stale window');
    assert.deepEqual(results, {
      freshTokenCachedRoute: null,
      freshTokenUncachedOrchestra: '57P03',
      garbageTokenUncachedOrchestra: '28P01',
      forgedTokenCachedRoute: '28P01',
    });
    await new Promise((r) => setTimeout(r, 3_200 - (Date.now() - killedAt)));
    assert.equal(await refusalOf(clientConfig({ subdomain: 'cp-alpha', token: fresh.token }, port)), '57P03', 'beyond ROUTE_MAX_STALE even a cached orchestra fails closed');
    assert.equal(await refusalOf(clientConfig(alpha, port)), '57P03');
    await p.stop(0);
  });

  test('Redis killed under a proxy with REDIS_URL: new sessions still connect, and the cap falls back to this instance’s own count', { timeout: 60_000 }, async (t) => {
    redis = await startRedis();
    const { proxy: p, port } = await startProxy({ REDIS_URL: redis.url });
    assert.ok(await waitUntil(() => p.bus?.connected === true, 5_000), 'the proxy is on the Redis bus');
    const o = await createOrchestra('redis-capped', 2);
    const held: pg.Client[] = [];
    try {
      held.push(await connect(clientConfig(o, port)));
      assert.equal(await refusalOf(clientConfig(o, port)), null, 'a second session fits under the cap (and leaves)');
      await redis.stop();
      assert.ok(await waitUntil(() => p.bus?.connected === false, 5_000), 'the proxy noticed Redis is gone');
      const started = Date.now();
      held.push(await connect(clientConfig(o, port)));
      const latency = Date.now() - started;
      assert.equal((await held[1]!.query('select 1 as ok')).rows[0].ok, 1);
      t.diagnostic(`with Redis down a new session connected in ${latency} ms`);
      assert.ok(latency < 2_000, `connect took ${latency} ms with Redis down`);
      const third = await refusalOf(clientConfig(o, port));
      t.diagnostic(`cap 2, two sessions held (one leased in Redis before it died, one after): a third gets ${third ?? 'in'}`);
      // The fallback counts every session this instance holds, including those leased in Redis before it died.
      assert.equal(third, '53300', "the third session exceeds the cap: the fallback must count this instance's existing sessions");
    } finally {
      await Promise.all(held.map((c) => c.end().catch(() => {})));
      await p.stop(0);
    }
  });

  test('the central database down while connections come and go: all 20 connection events (10 accepted, 10 refused) reach GET /v1/audit-log after it restarts on the same data directory', { timeout: 90_000 }, async (t) => {
    const o = await createOrchestra('audited');
    const tokens = await Promise.all(Array.from({ length: 10 }, () => issueToken('audited')));
    // warm the route (the proxy serves it from cache while the central database is down)
    assert.equal(await refusalOf(clientConfig(o)), null);
    const before = new Date(Date.now() - 1_000).toISOString();
    await central.stop();
    const stoppedAt = Date.now();
    const refusedAs: Array<string | null> = [];
    const acceptedAs: Array<string | null> = [];
    for (let i = 0; i < 10; i++) {
      acceptedAs.push(await refusalOf(clientConfig({ subdomain: 'audited', token: tokens[i]!.token })));
      refusedAs.push(await refusalOf(clientConfig({ subdomain: `ghost-${i}`, token: `not-a-token-${i}` })));
    }
    t.diagnostic(`central down: accepted ${JSON.stringify(acceptedAs)}; refused ${JSON.stringify(refusedAs)} in ${Date.now() - stoppedAt} ms`);
    assert.deepEqual(acceptedAs, Array(10).fill(null), 'cached route and keys serve while the central database is down');
    assert.deepEqual(refusedAs, Array(10).fill('28P01'));
    // the events are in the control plane's buffer; its writes fail meanwhile
    assert.ok(await waitUntil(() => controlPlane.audit.pending >= 20, 5_000), `control plane buffers the events (pending ${controlPlane.audit.pending})`);
    await new Promise((r) => setTimeout(r, 1_000)); // a few failed flushes
    central = await startCentral();
    const restartedAt = Date.now();

    let entries: Array<{ kind: string; jti: string | null; subdomain: string | null; sqlstate: string | null; reason: string | null }> = [];
    const complete = await waitUntil(
      async () => {
        const r = await api<{ entries: typeof entries }>('GET', `/v1/audit-log?kind=connection&since=${encodeURIComponent(before)}&limit=1000`);
        if (r.status !== 200) return false;
        entries = r.body.entries;
        const accepted = new Set(entries.filter((e) => e.kind === 'connection.accepted').map((e) => e.jti));
        const refused = new Set(entries.filter((e) => e.kind === 'connection.refused').map((e) => e.subdomain));
        return tokens.every((tk) => accepted.has(tk.jti)) && Array.from({ length: 10 }, (_, i) => `ghost-${i}`).every((s) => refused.has(s));
      },
      20_000,
      250,
    );
    t.diagnostic(`after restart: ${entries.length} connection records visible within ${Date.now() - restartedAt} ms; dropped ${controlPlane.audit.dropped}`);
    const acceptedJtis = new Set(entries.filter((e) => e.kind === 'connection.accepted').map((e) => e.jti));
    const closedJtis = new Set(entries.filter((e) => e.kind === 'connection.closed').map((e) => e.jti));
    assert.deepEqual(tokens.filter((tk) => !acceptedJtis.has(tk.jti)).map((tk) => tk.jti), [], 'every accepted connection is in the audit log');
    assert.deepEqual(tokens.filter((tk) => !closedJtis.has(tk.jti)).map((tk) => tk.jti), [], 'and its close');
    const refused = entries.filter((e) => e.kind === 'connection.refused' && e.subdomain?.startsWith('ghost-'));
    assert.deepEqual(refused.map((e) => e.subdomain).sort(), Array.from({ length: 10 }, (_, i) => `ghost-${i}`), 'every refusal is in the audit log, once');
    for (const e of refused) assert.equal(e.sqlstate, '28P01');
    assert.ok(complete);
    assert.equal(controlPlane.audit.dropped, 0, 'nothing dropped');
  });

  test('the tenant server stopped entirely: live sessions end, new sessions get 08006 quickly (well under AUTH_TIMEOUT), and the proxy stays up', { timeout: 60_000 }, async (t) => {
    const o = await createOrchestra('doomed');
    const live = await connect(clientConfig(o));
    const liveEnded = new Promise<string>((resolve) => live.on('error', (e: Error & { code?: string }) => resolve(e.code ?? e.message)));
    const pending = live.query('select pg_sleep(30)').then(
      () => 'finished',
      (e: Error & { code?: string }) => e.code ?? e.message,
    );
    await new Promise((r) => setTimeout(r, 200));
    await tenant.stop();
    const outcome = await Promise.race([pending, new Promise<string>((r) => setTimeout(() => r('still running'), 10_000))]);
    t.diagnostic(`live session: query ${outcome}, connection ${await Promise.race([liveEnded, new Promise<string>((r) => setTimeout(() => r('no error event'), 500))])}`);
    assert.notEqual(outcome, 'finished');
    assert.notEqual(outcome, 'still running');

    const timings: number[] = [];
    for (const sub of ['doomed', 'killed', 'audited']) {
      const tk = sub === 'doomed' ? o : { subdomain: sub, token: (await issueToken(sub)).token };
      const started = Date.now();
      assert.equal(await refusalOf(clientConfig(tk)), '08006', `${sub}: upstream unreachable`);
      timings.push(Date.now() - started);
    }
    t.diagnostic(`08006 after ${timings.join(', ')} ms (AUTH_TIMEOUT 10 s)`);
    for (const ms of timings) assert.ok(ms < 2_000, `refusal took ${ms} ms`);
    assert.ok(await waitUntil(() => proxy.live.size === 0, 3_000), 'the dead session left the proxy');
    assert.equal(proxy.ready, true, 'the proxy is still ready');
  });
});
