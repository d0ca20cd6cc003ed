// The walking skeleton, as a user meets it: real clients (psql and pg)
// through the proxy to real PostgreSQL, and every refusal with its SQLSTATE.
// Run by test/integration/proxy.test.ts (embedded) and
// test/containers/gateway.test.ts (containers).

import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import type pg from 'pg';
import { psql } from '../fixtures/psql.js';
import { defineSuite, delay, waitFor } from './registry.js';
import type { OrchestraHandle, Target } from './target.js';
import { adminQuery, connect, keyOf, rawExchange, refusalOf, sendCancel } from './wire.js';

export interface GatewayContext {
  alpha: OrchestraHandle;
  beta: OrchestraHandle;
}

export const gatewaySuite = defineSuite<Target, GatewayContext>({
  name: 'the gateway: connecting, the wire protocol, cancel, isolation and refusals',
  async setup(t) {
    return { alpha: await t.createOrchestra('alpha'), beta: await t.createOrchestra('beta') };
  },
  groups: [
    {
      name: 'connecting',
      scenarios: [
        {
          name: 'psql connects with the handed-out connection string over TLS and lands in the orchestra database',
          async run(_t, { alpha }) {
            assert.match(alpha.connectionString, /sslmode=require/);
            const r = await psql(alpha.connectionString, ['-Atc', 'select current_database(), current_user, (select ssl from pg_stat_ssl where pid = pg_backend_pid()) is not null']);
            assert.equal(r.code, 0, r.stderr);
            assert.equal(r.stdout.trim(), 'sd_alpha|sd_alpha|t');
            const ssl = await psql(alpha.connectionString, ['-Atc', 'select 1']);
            assert.equal(ssl.code, 0);
          },
        },
        {
          name: 'the session is encrypted between client and proxy when sslmode=require',
          async run(t, { alpha }) {
            const c = await connect(t.clientConfig({ ...alpha, ssl: true }));
            try {
              const r = await c.query('select 1 as one');
              assert.equal(r.rows[0].one, 1);
              assert.ok((c as unknown as { connection: { stream: { encrypted?: boolean } } }).connection.stream.encrypted);
            } finally {
              await c.end();
            }
          },
        },
        {
          name: 'start-up parameters such as application_name and options reach the upstream',
          async run(t, { alpha }) {
            const c = await connect({ ...t.clientConfig({ ...alpha, application_name: 'rehearsal-app' }), options: '-c search_path=pg_catalog,public' } as pg.ClientConfig);
            try {
              const r = await c.query("select current_setting('application_name') as app, current_setting('search_path') as sp");
              assert.equal(r.rows[0].app, 'rehearsal-app');
              assert.equal(r.rows[0].sp, 'pg_catalog,public');
            } finally {
              await c.end();
            }
          },
        },
        {
          name: 'the client sees the proxy’s own BackendKeyData, not the upstream pid',
          async run(t, { alpha }) {
            const c = await connect(t.clientConfig(alpha));
            try {
              const pid = (await c.query('select pg_backend_pid() as pid')).rows[0].pid as number;
              assert.notEqual(keyOf(c).processId, pid);
            } finally {
              await c.end();
            }
          },
        },
      ],
    },
    {
      name: 'the wire protocol through the proxy',
      scenarios: [
        {
          name: 'simple and extended protocol queries, and prepared statements, work',
          async run(t, { alpha }) {
            const c = await connect(t.clientConfig(alpha));
            try {
              assert.equal((await c.query('select 1 + 1 as two')).rows[0].two, 2);
              assert.equal((await c.query('select $1::int * 3 as x', [7])).rows[0].x, 21);
              for (let i = 0; i < 5; i++) {
                const r = await c.query({ name: 'by-id', text: 'select $1::text as v', values: [`n${i}`] });
                assert.equal(r.rows[0].v, `n${i}`);
              }
            } finally {
              await c.end();
            }
          },
        },
        {
          name: 'a transaction commits and rolls back as upstream decides',
          async run(t, { alpha }) {
            const c = await connect(t.clientConfig(alpha));
            try {
              await c.query('BEGIN');
              await c.query("insert into instruments (name, section) values ('oboe', 'woodwinds')");
              await c.query('ROLLBACK');
              assert.equal((await c.query("select count(*)::int as n from instruments where name = 'oboe'")).rows[0].n, 0);
              await c.query('BEGIN');
              await c.query("insert into instruments (name, section) values ('viola', 'strings')");
              await c.query('COMMIT');
              assert.equal((await c.query("select count(*)::int as n from instruments where name = 'viola'")).rows[0].n, 1);
              await assert.rejects(c.query('select * from no_such_table'), (e: { code?: string }) => e.code === '42P01');
              assert.equal((await c.query('select 1 as ok')).rows[0].ok, 1, 'the session survives an error');
            } finally {
              await c.end();
            }
          },
        },
        {
          name: 'COPY in and out stream through',
          async run(_t, { alpha }) {
            const r1 = await psql(alpha.connectionString, ['-c', 'create table copytest (id int, label text)', '-c', '\\copy copytest from stdin with (format csv)'], {
              input: Array.from({ length: 10_000 }, (_, i) => `${i},row ${i}`).join('\n') + '\n',
            });
            assert.equal(r1.code, 0, r1.stderr);
            const r2 = await psql(alpha.connectionString, ['-Atc', 'copy (select count(*), sum(id) from copytest) to stdout']);
            assert.equal(r2.stdout.trim(), `10000\t${(9999 * 10000) / 2}`);
            const r3 = await psql(alpha.connectionString, ['-Atc', 'copy copytest to stdout']);
            assert.equal(r3.stdout.trim().split('\n').length, 10_000);
          },
        },
        {
          name: 'LISTEN/NOTIFY delivers notifications through the proxy',
          async run(t, { alpha }) {
            const listener = await connect(t.clientConfig(alpha));
            const notifier = await connect(t.clientConfig(alpha));
            try {
              const got = new Promise<string>((resolve) => listener.on('notification', (n) => resolve(n.payload ?? '')));
              await listener.query('LISTEN rehearsal');
              await notifier.query("NOTIFY rehearsal, 'tutti at 19:00'");
              assert.equal(await got, 'tutti at 19:00');
            } finally {
              await listener.end();
              await notifier.end();
            }
          },
        },
        {
          name: 'a 100 MB result arrives whole',
          async run(t, { alpha }) {
            const c = await connect(t.clientConfig(alpha));
            try {
              const r = await c.query("select sum(length(x))::bigint as total from (select repeat('x', 1024 * 1024) as x from generate_series(1, 100)) s");
              assert.equal(Number(r.rows[0].total), 100 * 1024 * 1024);
              const big = await c.query("select repeat('y', 1024 * 1024) as chunk from generate_series(1, 100)");
              assert.equal(big.rows.length, 100);
              assert.ok(big.rows.every((row: { chunk: string }) => row.chunk.length === 1024 * 1024));
            } finally {
              await c.end();
            }
          },
        },
        {
          name: 'a 200,000-row COPY FROM STDIN arrives whole',
          async run(t, { alpha }) {
            const c = await connect(t.clientConfig(alpha));
            try {
              await c.query('create table bulk (n int)');
              const rows = 200_000;
              const r = await psql(alpha.connectionString, ['-c', '\\copy bulk from stdin'], { input: Array.from({ length: rows }, (_, i) => String(i)).join('\n') + '\n' });
              assert.equal(r.code, 0, r.stderr);
              assert.equal((await c.query('select count(*)::int as n, max(n) as m from bulk')).rows[0].n, rows);
            } finally {
              await c.end();
            }
          },
        },
      ],
    },
    {
      name: 'cancel',
      scenarios: [
        {
          name: 'a CancelRequest with the proxy key stops pg_sleep within a second',
          async run(t, { alpha }) {
            const c = await connect(t.clientConfig(alpha));
            try {
              const started = Date.now();
              const sleeping = c.query('select pg_sleep(30)');
              await delay(300);
              await sendCancel(t.proxyHost, t.proxyPort, keyOf(c).processId, keyOf(c).secretKey);
              await assert.rejects(sleeping, (e: { code?: string }) => e.code === '57014');
              assert.ok(Date.now() - started < 1_300 + 300, `cancel took ${Date.now() - started} ms`);
            } finally {
              await c.end();
            }
          },
        },
        {
          name: 'Ctrl-C in psql cancels the running query',
          async run(_t, { alpha }) {
            const started = Date.now();
            const r = await psql(alpha.connectionString, ['-c', 'select pg_sleep(30)'], {
              onSpawn: (p) => setTimeout(() => p.kill('SIGINT'), 700),
            });
            assert.notEqual(r.code, 0);
            assert.match(r.stderr, /canceling statement due to user request/);
            assert.ok(Date.now() - started < 5_000);
          },
        },
        {
          name: 'a key that is not the caller’s cancels nothing',
          async run(t, { alpha }) {
            const c = await connect(t.clientConfig(alpha));
            try {
              const running = c.query('select pg_sleep(1.5) as done');
              await delay(200);
              await sendCancel(t.proxyHost, t.proxyPort, keyOf(c).processId, (keyOf(c).secretKey ^ 1) | 0);
              await sendCancel(t.proxyHost, t.proxyPort, 12345, 67890);
              const r = await running;
              assert.equal(r.rows.length, 1, 'the query ran to completion');
            } finally {
              await c.end();
            }
          },
        },
      ],
    },
    {
      name: 'isolation between orchestras',
      scenarios: [
        {
          name: 'two orchestras cannot see each other’s tables',
          async run(t, { alpha, beta }) {
            const a = await connect(t.clientConfig(alpha));
            const b = await connect(t.clientConfig(beta));
            try {
              await a.query("create table alpha_secret (v text); insert into alpha_secret values ('alpha only')");
              await assert.rejects(b.query('select * from alpha_secret'), (e: { code?: string }) => e.code === '42P01');
              const dbs = await b.query('select current_database() as db');
              assert.equal(dbs.rows[0].db, 'sd_beta');
            } finally {
              await a.end();
              await b.end();
            }
          },
        },
        {
          name: 'an orchestra’s own upstream role cannot connect to another orchestra’s database directly',
          async run(t) {
            // The role's password never leaves the control plane, so use the admin server to test the grant itself.
            const r = await adminQuery(
              t.tenantServer.url('postgres'),
              "select has_database_privilege('sd_beta', 'sd_alpha', 'CONNECT') as b_to_a, has_database_privilege('sd_alpha', 'sd_beta', 'CONNECT') as a_to_b",
            );
            assert.deepEqual(r.rows[0], { b_to_a: false, a_to_b: false });
          },
        },
      ],
    },
    {
      name: 'refusals (PRODUCT.md)',
      scenarios: [
        {
          name: 'a wrong token is refused with 28P01',
          async run(t, { alpha }) {
            assert.equal(await refusalOf(t.clientConfig({ subdomain: 'alpha', token: 'not-a-token' })), '28P01');
            assert.equal(await refusalOf(t.clientConfig({ subdomain: 'alpha', token: alpha.token.slice(0, -4) + 'AAAA' })), '28P01');
          },
        },
        {
          name: 'a token of another orchestra is refused with 28P01',
          async run(t, { beta }) {
            assert.equal(await refusalOf(t.clientConfig({ subdomain: 'alpha', token: beta.token })), '28P01');
          },
        },
        {
          name: 'an unknown orchestra is refused with 28000',
          async run(t, { alpha }) {
            assert.equal(await refusalOf(t.clientConfig({ subdomain: 'nosuch', token: alpha.token })), '28000');
          },
        },
        {
          name: 'a database name other than the subdomain is refused with 3D000',
          async run(t, { alpha }) {
            assert.equal(await refusalOf(t.clientConfig({ ...alpha, database: 'postgres' })), '3D000');
            assert.equal(await refusalOf(t.clientConfig({ ...alpha, database: 'beta' })), '3D000');
          },
        },
        {
          name: 'a replication connection is refused with 28000',
          async run(t, { alpha }) {
            assert.equal(await refusalOf({ ...t.clientConfig(alpha), replication: 'database' } as pg.ClientConfig), '28000');
          },
        },
        {
          name: 'a malformed start-up packet is refused with 08P01',
          async run(t) {
            const answer = await rawExchange(t.proxyHost, t.proxyPort, Buffer.from([0, 0, 0, 9, 0, 2, 0, 0, 0]));
            assert.equal(answer[0], 0x45 /* E */);
            assert.match(answer.toString('latin1'), /08P01/);
          },
        },
        {
          name: 'a revoked token is refused with 28P01 and its live session ends with 57P01',
          async run(t, { alpha }) {
            const tok = await t.issueToken('alpha');
            const c = await connect(t.clientConfig({ subdomain: 'alpha', token: tok.token }));
            const ended = new Promise<string | undefined>((resolve) => c.on('error', (e: Error & { code?: string }) => resolve(e.code)));
            const revoked = await t.api('DELETE', `/v1/tokens/${tok.jti}`);
            assert.equal(revoked.status, 200);
            assert.equal(await ended, '57P01');
            assert.equal(await refusalOf(t.clientConfig({ subdomain: 'alpha', token: tok.token })), '28P01');
            assert.equal(await refusalOf(t.clientConfig(alpha)), null, 'other tokens keep working');
          },
        },
        {
          name: 'a suspended orchestra is refused with 57P03, its live sessions end, and resuming lets it back',
          async run(t) {
            const g = await t.createOrchestra('gamma');
            const c = await connect(t.clientConfig(g));
            const ended = new Promise<string | undefined>((resolve) => c.on('error', (e: Error & { code?: string }) => resolve(e.code)));
            assert.equal((await t.api('PATCH', '/v1/orchestras/gamma', { status: 'suspended' })).status, 200);
            assert.equal(await ended, '57P01');
            assert.equal(await refusalOf(t.clientConfig(g)), '57P03');
            assert.equal((await t.api('PATCH', '/v1/orchestras/gamma', { status: 'active' })).status, 200);
            assert.equal(await refusalOf(t.clientConfig(g)), null);
          },
        },
        {
          name: 'a deleted orchestra is refused with 28000',
          async run(t) {
            const d = await t.createOrchestra('delta');
            assert.equal((await t.api('DELETE', '/v1/orchestras/delta?dropDatabase=true')).status, 200);
            assert.equal(await refusalOf(t.clientConfig(d)), '28000');
          },
        },
        {
          name: 'the connection limit refuses the session over the cap with 53300',
          async run(t) {
            const e = await t.createOrchestra('epsilon');
            assert.equal((await t.api('PATCH', '/v1/orchestras/epsilon', { maxConnections: 1 })).status, 200);
            const first = await connect(t.clientConfig(e));
            try {
              assert.equal(await refusalOf(t.clientConfig(e)), '53300');
            } finally {
              await first.end();
            }
            // the slot is released when the session ends
            await waitFor(async () => (await refusalOf(t.clientConfig(e))) === null);
          },
        },
        {
          name: 'an upstream that cannot be reached is refused with 08006',
          async run(t) {
            const id = randomUUID();
            // A row written behind the control plane's back, pointing at a closed port.
            await adminQuery(
              t.centralServer.url(),
              "insert into orchestras (id, subdomain, name, status, source, upstream_host, upstream_port, upstream_database, upstream_user, upstream_sslmode) values ($1, 'zeta', 'Zeta', 'active', 'attached', '127.0.0.1', 1, 'zeta', 'zeta', 'disable')",
              [id],
            );
            const tok = await t.issueToken('zeta');
            assert.equal(await refusalOf(t.clientConfig({ subdomain: 'zeta', token: tok.token })), '08006');
          },
        },
        {
          name: 'two orchestras mapped to one database are both refused with 08004',
          async run(t) {
            const eta = await t.createOrchestra('eta');
            const id = randomUUID();
            // The incident: a second orchestra pointed at the same database URL.
            await adminQuery(
              t.centralServer.url(),
              `insert into orchestras (id, subdomain, name, status, source, upstream_host, upstream_port, upstream_database, upstream_user, upstream_sslmode)
               select $1, 'theta', 'Theta', 'active', 'attached', upper(upstream_host), upstream_port, upstream_database, upstream_user, upstream_sslmode from orchestras where subdomain = 'eta'`,
              [id],
            );
            await t.invalidateRoutes();
            const tok = await t.issueToken('theta');
            assert.equal(await refusalOf(t.clientConfig(eta)), '08004');
            assert.equal(await refusalOf(t.clientConfig({ subdomain: 'theta', token: tok.token })), '08004');
          },
        },
        {
          name: 'with the control plane unreachable, cached routes serve within ROUTE_MAX_STALE, then 57P03',
          async run(t, { alpha, beta }) {
            // Containers: stopping the link takes a Docker round trip, so the stale window is wider there.
            const maxStale = t.backend === 'embedded' ? 1.5 : 5;
            const { proxy, cut } = await t.startProxyBehindCuttableLink({ ROUTE_CACHE_TTL: '0.2', ROUTE_MAX_STALE: String(maxStale) });
            const via = (h: OrchestraHandle): pg.ClientConfig => ({ ...t.clientConfig(h), host: proxy.host, port: proxy.port });
            try {
              assert.equal(await refusalOf(via(alpha)), null, 'first connect fills the cache');
              await cut();
              await delay(300); // past the TTL: the route is now stale
              assert.equal(await refusalOf(via(alpha)), null, 'a stale route within the window still serves');
              assert.equal(await refusalOf(via(beta)), '57P03', 'nothing cached for beta: fail closed');
              await delay(maxStale * 1_000);
              assert.equal(await refusalOf(via(alpha)), '57P03', 'beyond ROUTE_MAX_STALE: fail closed');
            } finally {
              await proxy.stop();
              await cut();
            }
          },
        },
        {
          name: 'a proxy that cannot reach its control plane at all refuses with 57P03',
          async run(t, { alpha }) {
            const proxy = await t.startProxy({ CONTROL_PLANE_URL: 'http://127.0.0.1:1' }, { waitReady: false });
            try {
              assert.equal(await proxy.ready(), false);
              assert.equal(await refusalOf({ ...t.clientConfig(alpha), host: proxy.host, port: proxy.port }), '57P03');
            } finally {
              await proxy.stop();
            }
          },
        },
      ],
    },
  ],
});
