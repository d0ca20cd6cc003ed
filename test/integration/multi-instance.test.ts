// Scale out: two proxy processes, one control plane, a real redis-server.

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { keyOf, sendCancel } from '../fixtures/wire.js';
import pg from 'pg';
import { connect, refusalOf, startStack, type OrchestraHandle, type Stack } from '../fixtures/stack.js';
import { startRedis, type TestRedis } from '../fixtures/redis.js';
import { startProxyProcess, type ProxyProcess } from '../fixtures/proxy-process.js';

let redis: TestRedis;
let stack: Stack;
let p1: ProxyProcess;
let p2: ProxyProcess;
let orch: OrchestraHandle;

before(async () => {
  redis = await startRedis();
  stack = await startStack({ controlPlaneEnv: { REDIS_URL: redis.url } });
  orch = await stack.createOrchestra('tutti');
  const env = {
    CONTROL_PLANE_URL: stack.apiUrl,
    PROXY_TOKEN: stack.adminToken,
    REDIS_URL: redis.url,
    TLS_CERT_FILE: stack.env.TLS_CERT_FILE,
    TLS_KEY_FILE: stack.env.TLS_KEY_FILE,
  };
  [p1, p2] = await Promise.all([startProxyProcess(env), startProxyProcess(env)]);
});
after(async () => {
  await p1?.stop();
  await p2?.stop();
  await stack?.stop();
  await redis?.stop();
});

const via = (p: ProxyProcess, o: { subdomain: string; token: string }): pg.ClientConfig => ({ ...stack.clientConfig(o), port: p.port });

describe('two proxy instances act as one', () => {
  test('a cancel sent to the other instance stops the query', async () => {
    const c = await connect(via(p1, orch));
    try {
      const sleeping = c.query('select pg_sleep(30)');
      await new Promise((r) => setTimeout(r, 300));
      const started = Date.now();
      await sendCancel(p2.port, keyOf(c).processId, keyOf(c).secretKey);
      await assert.rejects(sleeping, (e: { code?: string }) => e.code === '57014');
      assert.ok(Date.now() - started < 2_000, `took ${Date.now() - started} ms`);
    } finally {
      await c.end();
    }
  });

  test('a stale or foreign key sent to the other instance cancels nothing', async () => {
    const c = await connect(via(p1, orch));
    try {
      const running = c.query('select pg_sleep(1) as done');
      await new Promise((r) => setTimeout(r, 150));
      await sendCancel(p2.port, keyOf(c).processId, 42);
      assert.equal((await running).rows.length, 1);
    } finally {
      await c.end();
    }
  });

  test('revoking a token ends its session on the other instance within a second, and the token no longer connects', async () => {
    const t = await stack.issueToken('tutti');
    const c = await connect(via(p2, { subdomain: 'tutti', token: t.token }));
    const ended = new Promise<{ code?: string; at: number }>((resolve) => c.on('error', (e: Error & { code?: string }) => resolve({ code: e.code, at: Date.now() })));
    const revokedAt = Date.now();
    assert.equal((await stack.api('DELETE', `/v1/tokens/${t.jti}`)).status, 200);
    const e = await ended;
    assert.equal(e.code, '57P01');
    assert.ok(e.at - revokedAt < 1_000, `ended after ${e.at - revokedAt} ms`);
    assert.equal(await refusalOf(via(p1, { subdomain: 'tutti', token: t.token })), '28P01');
    assert.equal(await refusalOf(via(p2, { subdomain: 'tutti', token: t.token })), '28P01');
  });

  test('a cap of 2 refuses the third session across both instances with 53300', async () => {
    const capped = await stack.createOrchestra('capped');
    assert.equal((await stack.api('PATCH', '/v1/orchestras/capped', { maxConnections: 2 })).status, 200);
    const a = await connect(via(p1, capped));
    const b = await connect(via(p2, capped));
    try {
      assert.equal(await refusalOf(via(p1, capped)), '53300');
      assert.equal(await refusalOf(via(p2, capped)), '53300');
    } finally {
      await a.end();
    }
    // a slot freed on one instance is usable on the other
    const deadline = Date.now() + 5_000;
    while ((await refusalOf(via(p2, capped))) !== null) {
      assert.ok(Date.now() < deadline, 'the released lease was not reused');
      await new Promise((r) => setTimeout(r, 50));
    }
    await b.end();
  });

  test('/metrics shows per-orchestra series', async () => {
    const c = await connect(via(p1, orch));
    await c.query('select 1');
    await c.end();
    const text = await (await fetch(`http://127.0.0.1:${p1.metricsPort}/metrics`)).text();
    assert.match(text, /stagedoor_sessions_total\{orchestra="tutti",result="accepted"\} \d+/);
    assert.match(text, /stagedoor_bytes_total\{orchestra="tutti",direction="to_client"\} \d+/);
    assert.match(text, /stagedoor_refusals_total\{sqlstate="53300",reason="connection_limit"\} \d+/);
    assert.match(text, /stagedoor_bus_connected\{bus="redis"\} 1/);
    assert.match(text, /stagedoor_route_cache_total\{decision="(hit|miss)"\}/);
  });

  test('killing Redis leaves new sessions working, and revocation still reaches both instances', async () => {
    await redis.stop();
    for (const p of [p1, p2]) {
      const c = await connect(via(p, orch));
      assert.equal((await c.query('select 1 as ok')).rows[0].ok, 1);
      await c.end();
    }
    const t = await stack.issueToken('tutti');
    const c = await connect(via(p2, { subdomain: 'tutti', token: t.token }));
    const ended = new Promise<string | undefined>((resolve) => c.on('error', (e: Error & { code?: string }) => resolve(e.code)));
    await stack.api('DELETE', `/v1/tokens/${t.jti}`);
    assert.equal(await ended, '57P01');
  });

  test('SIGTERM drains a proxy: /readyz turns false, live sessions end with 57P01 after DRAIN_TIMEOUT, exit code 0', async () => {
    const p3 = await startProxyProcess({ CONTROL_PLANE_URL: stack.apiUrl, PROXY_TOKEN: stack.adminToken, DRAIN_TIMEOUT: '1' });
    const c = await connect(via(p3, orch));
    const ended = new Promise<string | undefined>((resolve) => c.on('error', (e: Error & { code?: string }) => resolve(e.code)));
    const stopping = p3.stop();
    await new Promise((r) => setTimeout(r, 200));
    const ready = await fetch(`http://127.0.0.1:${p3.metricsPort}/readyz`).then((r) => r.status).catch(() => 'closed');
    assert.ok(ready === 503 || ready === 'closed', `readyz ${ready}`);
    assert.equal(await ended, '57P01');
    assert.equal(await stopping, 0);
  });
});
