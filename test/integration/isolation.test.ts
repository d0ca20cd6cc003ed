// The incident, reproduced: a legacy central database in which two
// orchestras share one database URL and a third reaches the same database
// through another host name. After import all three are refused at connect
// (08004); the audit lists the sharing; the fix keeps the oldest.

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import pg from 'pg';
import { ControlPlane, CentralSchemaLeak } from '../../control-plane/server.js';
import { loadControlPlaneConfig } from '../../common/config.js';
import { silentLogger } from '../../common/log.js';
import { refusalOf, connect, startStack, type Stack } from '../fixtures/stack.js';
import { runCli } from '../fixtures/cli.js';

let stack: Stack;

async function adminQuery(url: string, sql: string, params: unknown[] = []): Promise<pg.QueryResult> {
  const c = new pg.Client({ connectionString: url });
  await c.connect();
  try {
    return await c.query(sql, params);
  } finally {
    await c.end();
  }
}

before(async () => {
  stack = await startStack();
  const t = stack.tenant;
  // The legacy world: one physical database, reached by three orchestras.
  await adminQuery(t.url('postgres'), "CREATE ROLE legacy LOGIN PASSWORD 'legacy-pw'");
  await adminQuery(t.url('postgres'), 'CREATE DATABASE shared_db OWNER legacy');
  await adminQuery(t.url('shared_db'), "CREATE TABLE musicians (name text); INSERT INTO musicians VALUES ('sco cellist'); ALTER TABLE musicians OWNER TO legacy");
  await adminQuery(t.url('postgres'), "CREATE ROLE solo LOGIN PASSWORD 'solo-pw'");
  await adminQuery(t.url('postgres'), 'CREATE DATABASE solo_db OWNER solo');
  // Without this each legacy role could connect to the other's database (cross_access).
  await adminQuery(t.url('postgres'), 'REVOKE CONNECT ON DATABASE shared_db FROM PUBLIC; REVOKE CONNECT ON DATABASE solo_db FROM PUBLIC');
  // The Prisma-era central database, on the central server.
  await adminQuery(stack.central.url('postgres'), 'CREATE DATABASE legacy_central');
  const shared = `postgres://legacy:legacy-pw@127.0.0.1:${t.port}/shared_db`;
  const alias = `postgres://legacy:legacy-pw@localhost:${t.port}/shared_db`;
  await adminQuery(
    stack.central.url('legacy_central'),
    `CREATE TABLE "Orchestra" (id text PRIMARY KEY, name text, subdomain text UNIQUE, "databaseUrl" text, status text, "createdAt" timestamp(3));
     INSERT INTO "Orchestra" VALUES
       ('c1', 'Stockholm Chamber Orchestra', 'sco', '${shared}', 'active', '2025-01-01'),
       ('c2', 'SCO Sinfonietta', 'scoso', '${shared}', 'active', '2025-03-01'),
       ('c3', 'Alias Ensemble', 'alias', '${alias}?sslmode=disable', 'active', '2025-05-01'),
       ('c4', 'Solo Quartet', 'solo', 'postgres://solo:solo-pw@127.0.0.1:${t.port}/solo_db', 'active', '2025-06-01')`,
  );
});
after(async () => {
  await stack?.stop();
});

const cliEnv = (): Record<string, string> => ({ CONTROL_PLANE_URL: stack.apiUrl, ADMIN_TOKEN: stack.adminToken });

describe('adopting a legacy central database with shared databases', () => {
  test('import creates the same orchestras and flags the duplicates', async () => {
    const r = await stack.api<{ imported: number; orchestras: Array<{ subdomain: string; result: string; violation: string | null }> }>('POST', '/v1/orchestras/import', {
      sourceUrl: stack.central.url('legacy_central'),
    });
    assert.equal(r.status, 200, JSON.stringify(r.body));
    assert.equal(r.body.imported, 4);
    const by = new Map(r.body.orchestras.map((o) => [o.subdomain, o]));
    assert.match(by.get('sco')!.violation ?? '', /shared_upstream/);
    assert.match(by.get('scoso')!.violation ?? '', /shared_upstream/);
    assert.match(by.get('alias')!.violation ?? '', /shared_fingerprint/);
    assert.equal(by.get('solo')!.violation, null);
  });

  test('re-running the import is idempotent', async () => {
    const r = await runCli(['import', stack.central.url('legacy_central'), '--json'], cliEnv());
    assert.equal(r.code, 0, r.stderr);
    const body = JSON.parse(r.stdout) as { imported: number; unchanged: number };
    assert.deepEqual([body.imported, body.unchanged], [0, 4]);
    const list = await stack.api<{ orchestras: unknown[] }>('GET', '/v1/orchestras');
    assert.equal(list.body.orchestras.length, 4);
  });

  test('all three orchestras on the shared database are refused at connect with 08004; the clean one connects', async () => {
    for (const sub of ['sco', 'scoso', 'alias']) {
      const t = await stack.issueToken(sub);
      assert.equal(await refusalOf(stack.clientConfig({ subdomain: sub, token: t.token })), '08004', sub);
    }
    const solo = await stack.issueToken('solo');
    assert.equal(await refusalOf(stack.clientConfig({ subdomain: 'solo', token: solo.token })), null);
  });

  test('the audit exits 1 listing shared_upstream and shared_fingerprint', async () => {
    const r = await runCli(['audit'], cliEnv());
    assert.equal(r.code, 1, r.stderr);
    assert.match(r.stdout, /shared_upstream\s+sco, scoso/);
    assert.match(r.stdout, /shared_fingerprint/);
    const json = await runCli(['audit', '--json'], cliEnv());
    const report = JSON.parse(json.stdout) as { ok: boolean; violations: Array<{ kind: string; orchestras: string[] }> };
    assert.equal(report.ok, false);
    const fp = report.violations.find((v) => v.kind === 'shared_fingerprint');
    assert.ok(fp && fp.orchestras.includes('alias'));
  });

  test('a dry-run fix changes nothing; the real fix keeps the oldest and sets the others pending', async () => {
    const dry = await runCli(['audit', '--fix', '--json'], cliEnv());
    assert.equal(dry.code, 0, dry.stderr);
    const plan = JSON.parse(dry.stdout) as { dryRun: boolean; changes: Array<{ subdomain: string; keptOrchestra: string }> };
    assert.equal(plan.dryRun, true);
    assert.deepEqual(plan.changes.map((c) => c.subdomain).sort(), ['alias', 'scoso']);
    assert.ok(plan.changes.every((c) => c.keptOrchestra === 'sco'));
    assert.equal((await stack.api<{ status: string }>('GET', '/v1/orchestras/scoso')).body.status, 'active', 'dry run changed nothing');

    const real = await runCli(['audit', '--fix', '--yes'], cliEnv());
    assert.equal(real.code, 0, real.stderr);
    for (const sub of ['scoso', 'alias']) {
      const o = await stack.api<{ status: string; upstream: unknown }>('GET', `/v1/orchestras/${sub}`);
      assert.equal(o.body.status, 'pending');
      assert.equal(o.body.upstream, null);
    }
  });

  test('after the fix the oldest connects and sees its data, the others are refused with 57P03, and the audit exits 0', async () => {
    const sco = await stack.issueToken('sco');
    const c = await connect(stack.clientConfig({ subdomain: 'sco', token: sco.token }));
    try {
      assert.deepEqual((await c.query('select name from musicians')).rows, [{ name: 'sco cellist' }]);
    } finally {
      await c.end();
    }
    for (const sub of ['scoso', 'alias']) {
      const t = await stack.issueToken(sub);
      assert.equal(await refusalOf(stack.clientConfig({ subdomain: sub, token: t.token })), '57P03', sub);
    }
    const audit = await runCli(['audit'], cliEnv());
    assert.equal(audit.code, 0, audit.stdout + audit.stderr);
  });

  test('the audit log shows every refusal with its reason, and the fix', async () => {
    const r = await stack.api<{ entries: Array<{ kind: string; subdomain: string; sqlstate: string; reason: string }> }>('GET', '/v1/audit-log?kind=connection.refused&limit=100');
    assert.equal(r.status, 200);
    await stack.proxy.stop(0).catch(() => {}); // flush the proxy's queue (SIGTERM path)
    const after = await stack.api<{ entries: Array<{ kind: string; subdomain: string; sqlstate: string; reason: string }> }>('GET', '/v1/audit-log?kind=connection.refused&limit=100');
    const refusals = after.body.entries;
    for (const sub of ['sco', 'scoso', 'alias']) {
      assert.ok(refusals.some((e) => e.subdomain === sub && e.sqlstate === '08004' && /isolation_violation/.test(e.reason)), `08004 for ${sub}`);
    }
    assert.ok(refusals.some((e) => e.subdomain === 'scoso' && e.sqlstate === '57P03'));
    const fixes = await stack.api<{ entries: Array<{ subdomain: string }> }>('GET', '/v1/audit-log?kind=isolation.fix');
    assert.deepEqual(fixes.body.entries.map((e) => e.subdomain).sort(), ['alias', 'scoso']);
    // give the rest of the file a proxy again
    const next = await stack.startProxy();
    stack.proxy = next.proxy;
    stack.proxyPort = next.port;
  });
});

describe('the audit finds cross access and schema leaks', () => {
  test('one orchestra’s role granted CONNECT on another’s database is reported as cross_access', async () => {
    await stack.createOrchestra('cross-a');
    await stack.createOrchestra('cross-b');
    await adminQuery(stack.tenant.url('postgres'), 'GRANT CONNECT ON DATABASE sd_cross_b TO sd_cross_a');
    try {
      const r = await stack.api<{ violations: Array<{ kind: string; orchestras: string[] }> }>('GET', '/v1/audits/isolation');
      assert.ok(r.body.violations.some((v) => v.kind === 'cross_access' && v.orchestras.includes('cross-b')), JSON.stringify(r.body));
    } finally {
      await adminQuery(stack.tenant.url('postgres'), 'REVOKE CONNECT ON DATABASE sd_cross_b FROM sd_cross_a');
    }
  });

  test('central tables inside an orchestra database are reported as orchestra_schema_leak', async () => {
    await adminQuery(stack.tenant.url('sd_cross_a'), 'CREATE TABLE tokens (x int); ALTER TABLE tokens OWNER TO sd_cross_a');
    try {
      const r = await stack.api<{ violations: Array<{ kind: string; orchestras: string[] }> }>('GET', '/v1/audits/isolation');
      assert.ok(r.body.violations.some((v) => v.kind === 'orchestra_schema_leak' && v.orchestras.includes('cross-a')));
    } finally {
      await adminQuery(stack.tenant.url('sd_cross_a'), 'DROP TABLE tokens');
    }
  });

  test('orchestra tables in the central database are reported, and a control plane refuses to start on it', async () => {
    await adminQuery(stack.central.url('postgres'), 'CREATE TABLE musicians (id int)');
    try {
      const r = await stack.api<{ violations: Array<{ kind: string }> }>('GET', '/v1/audits/isolation');
      assert.ok(r.body.violations.some((v) => v.kind === 'central_schema_leak'));
      const cli = await runCli(['audit'], cliEnv());
      assert.equal(cli.code, 1);
      await assert.rejects(
        ControlPlane.start(loadControlPlaneConfig({ ...stack.env, CONTROL_PLANE_LISTEN: '127.0.0.1:0' }), silentLogger),
        (e: Error) => e instanceof CentralSchemaLeak && /musicians/.test(e.message),
      );
    } finally {
      await adminQuery(stack.central.url('postgres'), 'DROP TABLE musicians');
    }
  });

  test('the audit exits 2 when it cannot run', async () => {
    const r = await runCli(['audit'], { CONTROL_PLANE_URL: 'http://127.0.0.1:1', ADMIN_TOKEN: 'x'.repeat(20) });
    assert.equal(r.code, 2);
  });
});
