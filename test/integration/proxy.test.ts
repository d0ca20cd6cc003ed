// The walking skeleton, as a user meets it: real clients (psql and pg)
// through the proxy to real PostgreSQL, and every refusal with its SQLSTATE.

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import { keyOf, rawExchange, sendCancel } from '../fixtures/wire.js';
import { randomUUID } from 'node:crypto';
import pg from 'pg';
import { connect, refusalOf, startStack, type OrchestraHandle, type Stack } from '../fixtures/stack.js';
import { psql } from '../fixtures/psql.js';

let stack: Stack;
let alpha: OrchestraHandle;
let beta: OrchestraHandle;

before(async () => {
  stack = await startStack();
  alpha = await stack.createOrchestra('alpha');
  beta = await stack.createOrchestra('beta');
});
after(async () => {
  await stack?.stop();
});

describe('connecting', () => {
  test('psql connects with the handed-out connection string over TLS and lands in the orchestra database', async () => {
    assert.match(alpha.connectionString, /sslmode=require/);
    const r = await psql(alpha.connectionString, ['-Atc', 'select current_database(), current_user, (select ssl from pg_stat_ssl where pid = pg_backend_pid()) is not null']);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stdout.trim(), 'sd_alpha|sd_alpha|t');
    const ssl = await psql(alpha.connectionString, ['-Atc', 'select 1']);
    assert.equal(ssl.code, 0);
  });

  test('the session is encrypted between client and proxy when sslmode=require', async () => {
    const c = await connect(stack.clientConfig({ ...alpha, ssl: true }));
    try {
      const r = await c.query('select 1 as one');
      assert.equal(r.rows[0].one, 1);
      assert.ok((c as unknown as { connection: { stream: { encrypted?: boolean } } }).connection.stream.encrypted);
    } finally {
      await c.end();
    }
  });

  test('start-up parameters such as application_name and options reach the upstream', async () => {
    const c = await connect({ ...stack.clientConfig({ ...alpha, application_name: 'rehearsal-app' }), options: '-c search_path=pg_catalog,public' } as pg.ClientConfig);
    try {
      const r = await c.query("select current_setting('application_name') as app, current_setting('search_path') as sp");
      assert.equal(r.rows[0].app, 'rehearsal-app');
      assert.equal(r.rows[0].sp, 'pg_catalog,public');
    } finally {
      await c.end();
    }
  });

  test('the client sees the proxy’s own BackendKeyData, not the upstream pid', async () => {
    const c = await connect(stack.clientConfig(alpha));
    try {
      const pid = (await c.query('select pg_backend_pid() as pid')).rows[0].pid as number;
      assert.notEqual(keyOf(c).processId, pid);
    } finally {
      await c.end();
    }
  });
});

describe('the wire protocol through the proxy', () => {
  test('simple and extended protocol queries, and prepared statements, work', async () => {
    const c = await connect(stack.clientConfig(alpha));
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
  });

  test('a transaction commits and rolls back as upstream decides', async () => {
    const c = await connect(stack.clientConfig(alpha));
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
  });

  test('COPY in and out stream through', async () => {
    const r1 = await psql(alpha.connectionString, ['-c', 'create table copytest (id int, label text)', '-c', "\\copy copytest from stdin with (format csv)"], {
      input: Array.from({ length: 10_000 }, (_, i) => `${i},row ${i}`).join('\n') + '\n',
    });
    assert.equal(r1.code, 0, r1.stderr);
    const r2 = await psql(alpha.connectionString, ['-Atc', 'copy (select count(*), sum(id) from copytest) to stdout']);
    assert.equal(r2.stdout.trim(), `10000\t${(9999 * 10000) / 2}`);
    const r3 = await psql(alpha.connectionString, ['-Atc', 'copy copytest to stdout']);
    assert.equal(r3.stdout.trim().split('\n').length, 10_000);
  });

  test('LISTEN/NOTIFY delivers notifications through the proxy', async () => {
    const listener = await connect(stack.clientConfig(alpha));
    const notifier = await connect(stack.clientConfig(alpha));
    try {
      const got = new Promise<string>((resolve) => listener.on('notification', (n) => resolve(n.payload ?? '')));
      await listener.query('LISTEN rehearsal');
      await notifier.query("NOTIFY rehearsal, 'tutti at 19:00'");
      assert.equal(await got, 'tutti at 19:00');
    } finally {
      await listener.end();
      await notifier.end();
    }
  });

  test('a 100 MB result arrives whole', async () => {
    const c = await connect(stack.clientConfig(alpha));
    try {
      const r = await c.query("select sum(length(x))::bigint as total from (select repeat('x', 1024 * 1024) as x from generate_series(1, 100)) s");
      assert.equal(Number(r.rows[0].total), 100 * 1024 * 1024);
      const big = await c.query("select repeat('y', 1024 * 1024) as chunk from generate_series(1, 100)");
      assert.equal(big.rows.length, 100);
      assert.ok(big.rows.every((row: { chunk: string }) => row.chunk.length === 1024 * 1024));
    } finally {
      await c.end();
    }
  });

  test('a 200,000-row COPY FROM STDIN arrives whole', async () => {
    const c = await connect(stack.clientConfig(alpha));
    try {
      await c.query('create table bulk (n int)');
      const rows = 200_000;
      const r = await psql(alpha.connectionString, ['-c', '\\copy bulk from stdin'], { input: Array.from({ length: rows }, (_, i) => String(i)).join('\n') + '\n' });
      assert.equal(r.code, 0, r.stderr);
      assert.equal((await c.query('select count(*)::int as n, max(n) as m from bulk')).rows[0].n, rows);
    } finally {
      await c.end();
    }
  });
});

describe('cancel', () => {
  test('a CancelRequest with the proxy key stops pg_sleep within a second', async () => {
    const c = await connect(stack.clientConfig(alpha));
    try {
      const started = Date.now();
      const sleeping = c.query('select pg_sleep(30)');
      await new Promise((r) => setTimeout(r, 300));
      await sendCancel(stack.proxyPort, keyOf(c).processId, keyOf(c).secretKey);
      await assert.rejects(sleeping, (e: { code?: string }) => e.code === '57014');
      assert.ok(Date.now() - started < 1_300 + 300, `cancel took ${Date.now() - started} ms`);
    } finally {
      await c.end();
    }
  });

  test('Ctrl-C in psql cancels the running query', async () => {
    const started = Date.now();
    const r = await psql(alpha.connectionString, ['-c', 'select pg_sleep(30)'], {
      onSpawn: (p) => setTimeout(() => p.kill('SIGINT'), 700),
    });
    assert.notEqual(r.code, 0);
    assert.match(r.stderr, /canceling statement due to user request/);
    assert.ok(Date.now() - started < 5_000);
  });

  test('a key that is not the caller’s cancels nothing', async () => {
    const c = await connect(stack.clientConfig(alpha));
    try {
      const running = c.query('select pg_sleep(1.5) as done');
      await new Promise((r) => setTimeout(r, 200));
      await sendCancel(stack.proxyPort, keyOf(c).processId, (keyOf(c).secretKey ^ 1) | 0);
      await sendCancel(stack.proxyPort, 12345, 67890);
      const r = await running;
      assert.equal(r.rows.length, 1, 'the query ran to completion');
    } finally {
      await c.end();
    }
  });
});

describe('isolation between orchestras', () => {
  test('two orchestras cannot see each other’s tables', async () => {
    const a = await connect(stack.clientConfig(alpha));
    const b = await connect(stack.clientConfig(beta));
    try {
      await a.query("create table alpha_secret (v text); insert into alpha_secret values ('alpha only')");
      await assert.rejects(b.query('select * from alpha_secret'), (e: { code?: string }) => e.code === '42P01');
      const dbs = await b.query('select current_database() as db');
      assert.equal(dbs.rows[0].db, 'sd_beta');
    } finally {
      await a.end();
      await b.end();
    }
  });

  test('an orchestra’s own upstream role cannot connect to another orchestra’s database directly', async () => {
    // The role's password never leaves the control plane, so use the admin server to test the grant itself.
    const admin = new pg.Client({ connectionString: stack.tenant.url('postgres') });
    await admin.connect();
    try {
      const r = await admin.query("select has_database_privilege('sd_beta', 'sd_alpha', 'CONNECT') as b_to_a, has_database_privilege('sd_alpha', 'sd_beta', 'CONNECT') as a_to_b");
      assert.deepEqual(r.rows[0], { b_to_a: false, a_to_b: false });
    } finally {
      await admin.end();
    }
  });
});

describe('refusals (PRODUCT.md)', () => {
  test('a wrong token is refused with 28P01', async () => {
    assert.equal(await refusalOf(stack.clientConfig({ subdomain: 'alpha', token: 'not-a-token' })), '28P01');
    assert.equal(await refusalOf(stack.clientConfig({ subdomain: 'alpha', token: alpha.token.slice(0, -4) + 'AAAA' })), '28P01');
  });

  test('a token of another orchestra is refused with 28P01', async () => {
    assert.equal(await refusalOf(stack.clientConfig({ subdomain: 'alpha', token: beta.token })), '28P01');
  });

  test('an unknown orchestra is refused with 28000', async () => {
    assert.equal(await refusalOf(stack.clientConfig({ subdomain: 'nosuch', token: alpha.token })), '28000');
  });

  test('a database name other than the subdomain is refused with 3D000', async () => {
    assert.equal(await refusalOf(stack.clientConfig({ ...alpha, database: 'postgres' })), '3D000');
    assert.equal(await refusalOf(stack.clientConfig({ ...alpha, database: 'beta' })), '3D000');
  });

  test('a replication connection is refused with 28000', async () => {
    assert.equal(await refusalOf({ ...stack.clientConfig(alpha), replication: 'database' } as pg.ClientConfig), '28000');
  });

  test('a malformed start-up packet is refused with 08P01', async () => {
    const answer = await rawExchange(stack.proxyPort, Buffer.from([0, 0, 0, 9, 0, 2, 0, 0, 0]));
    assert.equal(answer[0], 0x45 /* E */);
    assert.match(answer.toString('latin1'), /08P01/);
  });

  test('a revoked token is refused with 28P01 and its live session ends with 57P01', async () => {
    const t = await stack.issueToken('alpha');
    const c = await connect(stack.clientConfig({ subdomain: 'alpha', token: t.token }));
    const ended = new Promise<string | undefined>((resolve) => c.on('error', (e: Error & { code?: string }) => resolve(e.code)));
    const revoked = await stack.api('DELETE', `/v1/tokens/${t.jti}`);
    assert.equal(revoked.status, 200);
    assert.equal(await ended, '57P01');
    assert.equal(await refusalOf(stack.clientConfig({ subdomain: 'alpha', token: t.token })), '28P01');
    assert.equal(await refusalOf(stack.clientConfig(alpha)), null, 'other tokens keep working');
  });

  test('a suspended orchestra is refused with 57P03, its live sessions end, and resuming lets it back', async () => {
    const g = await stack.createOrchestra('gamma');
    const c = await connect(stack.clientConfig(g));
    const ended = new Promise<string | undefined>((resolve) => c.on('error', (e: Error & { code?: string }) => resolve(e.code)));
    assert.equal((await stack.api('PATCH', '/v1/orchestras/gamma', { status: 'suspended' })).status, 200);
    assert.equal(await ended, '57P01');
    assert.equal(await refusalOf(stack.clientConfig(g)), '57P03');
    assert.equal((await stack.api('PATCH', '/v1/orchestras/gamma', { status: 'active' })).status, 200);
    assert.equal(await refusalOf(stack.clientConfig(g)), null);
  });

  test('a deleted orchestra is refused with 28000', async () => {
    const d = await stack.createOrchestra('delta');
    assert.equal((await stack.api('DELETE', '/v1/orchestras/delta?dropDatabase=true')).status, 200);
    assert.equal(await refusalOf(stack.clientConfig(d)), '28000');
  });

  test('the connection limit refuses the session over the cap with 53300', async () => {
    const e = await stack.createOrchestra('epsilon');
    assert.equal((await stack.api('PATCH', '/v1/orchestras/epsilon', { maxConnections: 1 })).status, 200);
    const first = await connect(stack.clientConfig(e));
    try {
      assert.equal(await refusalOf(stack.clientConfig(e)), '53300');
    } finally {
      await first.end();
    }
    // the slot is released when the session ends
    await waitFor(async () => (await refusalOf(stack.clientConfig(e))) === null);
  });

  test('an upstream that cannot be reached is refused with 08006', async () => {
    const id = randomUUID();
    const central = new pg.Client({ connectionString: stack.central.url('postgres') });
    await central.connect();
    try {
      // A row written behind the control plane's back, pointing at a closed port.
      await central.query(
        "insert into orchestras (id, subdomain, name, status, source, upstream_host, upstream_port, upstream_database, upstream_user, upstream_sslmode) values ($1, 'zeta', 'Zeta', 'active', 'attached', '127.0.0.1', 1, 'zeta', 'zeta', 'disable')",
        [id],
      );
    } finally {
      await central.end();
    }
    const t = await stack.issueToken('zeta');
    assert.equal(await refusalOf(stack.clientConfig({ subdomain: 'zeta', token: t.token })), '08006');
  });

  test('two orchestras mapped to one database are both refused with 08004', async () => {
    const eta = await stack.createOrchestra('eta');
    const central = new pg.Client({ connectionString: stack.central.url('postgres') });
    await central.connect();
    const id = randomUUID();
    try {
      // The incident: a second orchestra pointed at the same database URL.
      await central.query(
        `insert into orchestras (id, subdomain, name, status, source, upstream_host, upstream_port, upstream_database, upstream_user, upstream_sslmode)
         select $1, 'theta', 'Theta', 'active', 'attached', upper(upstream_host), upstream_port, upstream_database, upstream_user, upstream_sslmode from orchestras where subdomain = 'eta'`,
        [id],
      );
    } finally {
      await central.end();
    }
    stack.proxy.routes.invalidate();
    const t = await stack.issueToken('theta');
    assert.equal(await refusalOf(stack.clientConfig(eta)), '08004');
    assert.equal(await refusalOf(stack.clientConfig({ subdomain: 'theta', token: t.token })), '08004');
  });

  test('with the control plane unreachable, cached routes serve within ROUTE_MAX_STALE, then 57P03', async () => {
    // The proxy reaches the control plane through a TCP forwarder the test can cut.
    const forwarder = await startForwarder(new URL(stack.apiUrl).port);
    const { proxy, port } = await stack.startProxy({ CONTROL_PLANE_URL: `http://127.0.0.1:${forwarder.port}`, ROUTE_CACHE_TTL: '0.2', ROUTE_MAX_STALE: '1.5' });
    const via = (h: OrchestraHandle): pg.ClientConfig => ({ ...stack.clientConfig(h), port });
    try {
      assert.equal(await refusalOf(via(alpha)), null, 'first connect fills the cache');
      await forwarder.close();
      await new Promise((r) => setTimeout(r, 300)); // past the TTL: the route is now stale
      assert.equal(await refusalOf(via(alpha)), null, 'a stale route within the window still serves');
      assert.equal(await refusalOf(via(beta)), '57P03', 'nothing cached for beta: fail closed');
      await new Promise((r) => setTimeout(r, 1_500));
      assert.equal(await refusalOf(via(alpha)), '57P03', 'beyond ROUTE_MAX_STALE: fail closed');
    } finally {
      await proxy.stop(0);
      await forwarder.close();
    }
  });

  test('a proxy that cannot reach its control plane at all refuses with 57P03', async () => {
    const { ProxyServer } = await import('../../proxy/server.js');
    const { loadProxyConfig } = await import('../../common/config.js');
    const proxy = new ProxyServer({ config: loadProxyConfig({ ...stack.env, CONTROL_PLANE_URL: 'http://127.0.0.1:1' }), log: (await import('../../common/log.js')).silentLogger, serveMetrics: false });
    const address = await proxy.start();
    try {
      assert.equal(proxy.ready, false);
      assert.equal(await refusalOf({ ...stack.clientConfig(alpha), port: address.port }), '57P03');
    } finally {
      await proxy.stop(0);
    }
  });
});

/** A TCP forwarder to a local port, closable to simulate an outage. */
async function startForwarder(targetPort: string): Promise<{ port: number; close: () => Promise<void> }> {
  const sockets = new Set<net.Socket>();
  const server = net.createServer((inbound) => {
    const outbound = net.connect(Number(targetPort), '127.0.0.1');
    sockets.add(inbound).add(outbound);
    inbound.pipe(outbound).pipe(inbound);
    const done = (): void => {
      inbound.destroy();
      outbound.destroy();
    };
    inbound.on('error', done).on('close', done);
    outbound.on('error', done).on('close', done);
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  let closed = false;
  return {
    port: (server.address() as net.AddressInfo).port,
    close: async () => {
      if (closed) return;
      closed = true;
      for (const s of sockets) s.destroy();
      await new Promise((r) => server.close(r));
    },
  };
}



async function waitFor(cond: () => Promise<boolean>, timeoutMs = 5_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await cond())) {
    if (Date.now() > deadline) throw new Error('condition not met in time');
    await new Promise((r) => setTimeout(r, 50));
  }
}
