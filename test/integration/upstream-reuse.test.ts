// Upstream reuse: a client that leaves its upstream idle hands it, reset, to
// the next client of the same orchestra with the same start-up parameters —
// and to nobody else.

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import pg from 'pg';
import { connect, startStack, type OrchestraHandle, type Stack } from '../fixtures/stack.js';

let stack: Stack;
let viola: OrchestraHandle;
let cello: OrchestraHandle;

before(async () => {
  stack = await startStack({ proxyEnv: { UPSTREAM_IDLE_MAX: '2', UPSTREAM_IDLE_TIMEOUT: '30' } });
  viola = await stack.createOrchestra('viola');
  cello = await stack.createOrchestra('cello');
});
after(async () => {
  await stack?.stop();
});

async function backendPid(config: pg.ClientConfig, before?: (c: pg.Client) => Promise<void>): Promise<number> {
  const c = await connect(config);
  try {
    const pid = (await c.query('select pg_backend_pid() as pid')).rows[0].pid as number;
    await before?.(c);
    return pid;
  } finally {
    await c.end();
  }
}

/** Waits until the proxy has reset and parked what the last client left. */
async function settled(): Promise<void> {
  const deadline = Date.now() + 3_000;
  while (stack.proxy.upstreamPool.idleCount === 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
}

describe('upstream reuse', () => {
  test('the next client of the same orchestra gets the same backend, reset: no temp table, no prepared statement, no LISTEN, settings back to defaults', async () => {
    const first = await backendPid(stack.clientConfig(viola), async (c) => {
      await c.query('create temp table scratch (x int)');
      await c.query("prepare p1 as select 1");
      await c.query('listen rehearsal');
      await c.query('set search_path = pg_catalog');
      await c.query("select pg_advisory_lock(42)");
    });
    await settled();
    const c = await connect(stack.clientConfig(viola));
    try {
      assert.equal((await c.query('select pg_backend_pid() as pid')).rows[0].pid, first, 'the backend was reused');
      assert.equal((await c.query("select count(*)::int as n from pg_class where relname = 'scratch' and relpersistence = 't'")).rows[0].n, 0);
      assert.equal((await c.query('select count(*)::int as n from pg_prepared_statements')).rows[0].n, 0);
      assert.equal((await c.query('select count(*)::int as n from pg_listening_channels()')).rows[0].n, 0);
      assert.equal((await c.query("select current_setting('search_path') as sp")).rows[0].sp, '"$user", public');
      assert.equal((await c.query("select count(*)::int as n from pg_locks where locktype = 'advisory' and pid = pg_backend_pid()")).rows[0].n, 0);
    } finally {
      await c.end();
    }
    const text = await stack.proxy.metrics.registry.getSingleMetricAsString('stagedoor_upstream_reused_total');
    assert.match(text, /stagedoor_upstream_reused_total [1-9]/);
  });

  test('different start-up parameters never share a backend (options do not leak)', async () => {
    const plain = await backendPid(stack.clientConfig(viola));
    await settled();
    const withOptions = await backendPid({ ...stack.clientConfig(viola), options: '-c statement_timeout=1234' } as pg.ClientConfig);
    assert.notEqual(withOptions, plain);
    await settled();
    const c = await connect(stack.clientConfig(viola));
    try {
      assert.equal((await c.query("select current_setting('statement_timeout') as t")).rows[0].t, '0', 'a plain client never sees another client’s options');
    } finally {
      await c.end();
    }
  });

  test('a backend is never handed to another orchestra', async () => {
    const violaPid = await backendPid(stack.clientConfig(viola));
    await settled();
    const c = await connect(stack.clientConfig(cello));
    try {
      const r = (await c.query('select pg_backend_pid() as pid, current_database() as db')).rows[0];
      assert.notEqual(r.pid, violaPid);
      assert.equal(r.db, 'sd_cello');
    } finally {
      await c.end();
    }
  });

  test('a client that leaves inside a transaction does not hand its backend on', async () => {
    const c = await connect(stack.clientConfig(cello));
    const pid = (await c.query('select pg_backend_pid() as pid')).rows[0].pid as number;
    await c.query('begin');
    await c.query('create table half_done (x int)');
    await c.end();
    await new Promise((r) => setTimeout(r, 100));
    const c2 = await connect(stack.clientConfig(cello));
    try {
      assert.notEqual((await c2.query('select pg_backend_pid() as pid')).rows[0].pid, pid);
      assert.equal((await c2.query("select to_regclass('half_done') is null as gone")).rows[0].gone, true);
    } finally {
      await c2.end();
    }
  });

  test('suspending an orchestra closes its kept upstream connections', async () => {
    await backendPid(stack.clientConfig(viola));
    await settled();
    assert.ok(stack.proxy.upstreamPool.idleCount > 0);
    assert.equal((await stack.api('PATCH', '/v1/orchestras/viola', { status: 'suspended' })).status, 200);
    const admin = new pg.Client({ connectionString: stack.tenant.url('postgres') });
    await admin.connect();
    try {
      const deadline = Date.now() + 3_000;
      let n = -1;
      while (Date.now() < deadline) {
        n = (await admin.query("select count(*)::int as n from pg_stat_activity where datname = 'sd_viola'")).rows[0].n;
        if (n === 0) break;
        await new Promise((r) => setTimeout(r, 50));
      }
      assert.equal(n, 0);
    } finally {
      await admin.end();
      await stack.api('PATCH', '/v1/orchestras/viola', { status: 'active' });
    }
  });

  test('at most UPSTREAM_IDLE_MAX connections per orchestra are kept', async () => {
    const clients = await Promise.all([1, 2, 3, 4].map(() => connect(stack.clientConfig(cello))));
    await Promise.all(clients.map((c) => c.query('select 1')));
    await Promise.all(clients.map((c) => c.end()));
    await new Promise((r) => setTimeout(r, 300));
    assert.ok(stack.proxy.upstreamPool.idleCount <= 2 + 2, `idle ${stack.proxy.upstreamPool.idleCount}`);
    const admin = new pg.Client({ connectionString: stack.tenant.url('postgres') });
    await admin.connect();
    try {
      const n = (await admin.query("select count(*)::int as n from pg_stat_activity where datname = 'sd_cello'")).rows[0].n;
      assert.ok(n <= 2, `cello backends kept: ${n}`);
    } finally {
      await admin.end();
    }
  });
});
