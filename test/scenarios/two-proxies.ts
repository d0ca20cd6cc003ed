// Scale out: two proxies (processes or containers), one control plane, a real
// Redis. Run by test/integration/multi-instance.test.ts (embedded) and
// test/containers/two-proxies.test.ts (containers).

import assert from 'node:assert/strict';
import type pg from 'pg';
import { defineSuite, delay } from './registry.js';
import type { OrchestraHandle, ProxyHandle, TwoProxyTarget } from './target.js';
import { connect, keyOf, refusalOf, sendCancel } from './wire.js';

const via = (t: TwoProxyTarget, p: ProxyHandle, o: { subdomain: string; token: string }): pg.ClientConfig => ({ ...t.clientConfig(o), host: p.host, port: p.port });

export const twoProxiesSuite = defineSuite<TwoProxyTarget, { orch: OrchestraHandle }>({
  name: 'two proxy instances on one control plane and one Redis',
  async setup(t) {
    return { orch: await t.createOrchestra('tutti') };
  },
  groups: [
    {
      name: 'two proxy instances act as one',
      scenarios: [
        {
          name: 'a cancel sent to the other instance stops the query',
          async run(t, { orch }) {
            const [p1, p2] = t.proxies;
            const c = await connect(via(t, p1, orch));
            try {
              const sleeping = c.query('select pg_sleep(30)');
              await delay(300);
              const started = Date.now();
              await sendCancel(p2.host, p2.port, keyOf(c).processId, keyOf(c).secretKey);
              await assert.rejects(sleeping, (e: { code?: string }) => e.code === '57014');
              assert.ok(Date.now() - started < 2_000, `took ${Date.now() - started} ms`);
            } finally {
              await c.end();
            }
          },
        },
        {
          name: 'a stale or foreign key sent to the other instance cancels nothing',
          async run(t, { orch }) {
            const [p1, p2] = t.proxies;
            const c = await connect(via(t, p1, orch));
            try {
              const running = c.query('select pg_sleep(1) as done');
              await delay(150);
              await sendCancel(p2.host, p2.port, keyOf(c).processId, 42);
              assert.equal((await running).rows.length, 1);
            } finally {
              await c.end();
            }
          },
        },
        {
          name: 'revoking a token ends its session on the other instance within a second, and the token no longer connects',
          async run(t) {
            const [p1, p2] = t.proxies;
            const tok = await t.issueToken('tutti');
            const c = await connect(via(t, p2, { subdomain: 'tutti', token: tok.token }));
            const ended = new Promise<{ code?: string; at: number }>((resolve) => c.on('error', (e: Error & { code?: string }) => resolve({ code: e.code, at: Date.now() })));
            const revokedAt = Date.now();
            assert.equal((await t.api('DELETE', `/v1/tokens/${tok.jti}`)).status, 200);
            const e = await ended;
            assert.equal(e.code, '57P01');
            assert.ok(e.at - revokedAt < 1_000, `ended after ${e.at - revokedAt} ms`);
            assert.equal(await refusalOf(via(t, p1, { subdomain: 'tutti', token: tok.token })), '28P01');
            assert.equal(await refusalOf(via(t, p2, { subdomain: 'tutti', token: tok.token })), '28P01');
          },
        },
        {
          name: 'a cap of 2 refuses the third session across both instances with 53300',
          async run(t) {
            const [p1, p2] = t.proxies;
            const capped = await t.createOrchestra('capped');
            assert.equal((await t.api('PATCH', '/v1/orchestras/capped', { maxConnections: 2 })).status, 200);
            const a = await connect(via(t, p1, capped));
            const b = await connect(via(t, p2, capped));
            try {
              assert.equal(await refusalOf(via(t, p1, capped)), '53300');
              assert.equal(await refusalOf(via(t, p2, capped)), '53300');
            } finally {
              await a.end();
            }
            // a slot freed on one instance is usable on the other
            const deadline = Date.now() + 5_000;
            while ((await refusalOf(via(t, p2, capped))) !== null) {
              assert.ok(Date.now() < deadline, 'the released lease was not reused');
              await delay(50);
            }
            await b.end();
          },
        },
        {
          name: '/metrics shows per-orchestra series',
          async run(t, { orch }) {
            const [p1] = t.proxies;
            const c = await connect(via(t, p1, orch));
            await c.query('select 1');
            await c.end();
            const text = await (await fetch(`${p1.metricsUrl}/metrics`)).text();
            assert.match(text, /stagedoor_sessions_total\{orchestra="tutti",result="accepted"\} \d+/);
            assert.match(text, /stagedoor_bytes_total\{orchestra="tutti",direction="to_client"\} \d+/);
            assert.match(text, /stagedoor_refusals_total\{sqlstate="53300",reason="connection_limit"\} \d+/);
            assert.match(text, /stagedoor_bus_connected\{bus="redis"\} 1/);
            assert.match(text, /stagedoor_route_cache_total\{decision="(hit|miss)"\}/);
          },
        },
        {
          name: 'killing Redis leaves new sessions working, and revocation still reaches both instances',
          async run(t, { orch }) {
            await t.stopRedis();
            for (const p of t.proxies) {
              const c = await connect(via(t, p, orch));
              assert.equal((await c.query('select 1 as ok')).rows[0].ok, 1);
              await c.end();
            }
            const tok = await t.issueToken('tutti');
            const c = await connect(via(t, t.proxies[1], { subdomain: 'tutti', token: tok.token }));
            const ended = new Promise<string | undefined>((resolve) => c.on('error', (e: Error & { code?: string }) => resolve(e.code)));
            await t.api('DELETE', `/v1/tokens/${tok.jti}`);
            assert.equal(await ended, '57P01');
          },
        },
        {
          name: 'SIGTERM drains a proxy: /readyz turns false, live sessions end with 57P01 after DRAIN_TIMEOUT, exit code 0',
          async run(t, { orch }) {
            const p3 = await t.startProxyProcess({ DRAIN_TIMEOUT: '1' });
            const c = await connect(via(t, p3, orch));
            const ended = new Promise<string | undefined>((resolve) => c.on('error', (e: Error & { code?: string }) => resolve(e.code)));
            const stopping = p3.stop();
            await delay(200);
            const ready = await fetch(`${p3.metricsUrl}/readyz`).then((r) => r.status).catch(() => 'closed');
            assert.ok(ready === 503 || ready === 'closed', `readyz ${ready}`);
            assert.equal(await ended, '57P01');
            assert.equal(await stopping, 0);
          },
        },
      ],
    },
  ],
});
