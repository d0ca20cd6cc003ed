// The incident, reproduced: a legacy central database in which two
// orchestras share one database URL and a third reaches the same database
// through another host name. After import all three are refused at connect
// (08004); the audit lists the sharing; the fix keeps the oldest.
// Run by test/integration/isolation.test.ts (embedded) and
// test/containers/incident.test.ts (containers).

import assert from 'node:assert/strict';
import { CentralSchemaLeak } from '../../control-plane/server.js';
import { runCli } from '../fixtures/cli.js';
import { defineSuite } from './registry.js';
import type { Target } from './target.js';
import { adminQuery, connect, refusalOf } from './wire.js';

const cliEnv = (t: Target): Record<string, string> => ({ CONTROL_PLANE_URL: t.apiUrl, ADMIN_TOKEN: t.adminToken });

export const incidentSuite = defineSuite<Target, Record<string, never>>({
  name: 'the incident: shared databases adopted, refused, audited and fixed',
  async setup(stack) {
    const t = stack.tenantServer;
    // The legacy world: one physical database, reached by three orchestras.
    await adminQuery(t.url('postgres'), "CREATE ROLE legacy LOGIN PASSWORD 'legacy-pw'");
    await adminQuery(t.url('postgres'), 'CREATE DATABASE shared_db OWNER legacy');
    await adminQuery(t.url('shared_db'), "CREATE TABLE musicians (name text); INSERT INTO musicians VALUES ('sco cellist'); ALTER TABLE musicians OWNER TO legacy");
    await adminQuery(t.url('postgres'), "CREATE ROLE solo LOGIN PASSWORD 'solo-pw'");
    await adminQuery(t.url('postgres'), 'CREATE DATABASE solo_db OWNER solo');
    // Without this each legacy role could connect to the other's database (cross_access).
    await adminQuery(t.url('postgres'), 'REVOKE CONNECT ON DATABASE shared_db FROM PUBLIC; REVOKE CONNECT ON DATABASE solo_db FROM PUBLIC');
    // The Prisma-era central database, on the central server.
    await adminQuery(stack.centralServer.url(), 'CREATE DATABASE legacy_central');
    // The URLs as the gateway reaches the tenant server (the same server under a second host name for `alias`).
    const shared = `postgres://legacy:legacy-pw@${t.gatewayAddress}/shared_db`;
    const alias = `postgres://legacy:legacy-pw@${t.gatewayAlias}/shared_db`;
    await adminQuery(
      stack.centralServer.url('legacy_central'),
      `CREATE TABLE "Orchestra" (id text PRIMARY KEY, name text, subdomain text UNIQUE, "databaseUrl" text, status text, "createdAt" timestamp(3));
       INSERT INTO "Orchestra" VALUES
         ('c1', 'Stockholm Chamber Orchestra', 'sco', '${shared}', 'active', '2025-01-01'),
         ('c2', 'SCO Sinfonietta', 'scoso', '${shared}', 'active', '2025-03-01'),
         ('c3', 'Alias Ensemble', 'alias', '${alias}?sslmode=disable', 'active', '2025-05-01'),
         ('c4', 'Solo Quartet', 'solo', 'postgres://solo:solo-pw@${t.gatewayAddress}/solo_db', 'active', '2025-06-01')`,
    );
    return {};
  },
  groups: [
    {
      name: 'adopting a legacy central database with shared databases',
      scenarios: [
        {
          name: 'import creates the same orchestras and flags the duplicates',
          async run(stack) {
            const r = await stack.api<{ imported: number; orchestras: Array<{ subdomain: string; result: string; violation: string | null }> }>('POST', '/v1/orchestras/import', {
              sourceUrl: stack.centralServer.gatewayUrl('legacy_central'),
            });
            assert.equal(r.status, 200, JSON.stringify(r.body));
            assert.equal(r.body.imported, 4);
            const by = new Map(r.body.orchestras.map((o) => [o.subdomain, o]));
            assert.match(by.get('sco')!.violation ?? '', /shared_upstream/);
            assert.match(by.get('scoso')!.violation ?? '', /shared_upstream/);
            assert.match(by.get('alias')!.violation ?? '', /shared_fingerprint/);
            assert.equal(by.get('solo')!.violation, null);
          },
        },
        {
          name: 're-running the import is idempotent',
          async run(stack) {
            const r = await runCli(['import', stack.centralServer.gatewayUrl('legacy_central'), '--json'], cliEnv(stack));
            assert.equal(r.code, 0, r.stderr);
            const body = JSON.parse(r.stdout) as { imported: number; unchanged: number };
            assert.deepEqual([body.imported, body.unchanged], [0, 4]);
            const list = await stack.api<{ orchestras: unknown[] }>('GET', '/v1/orchestras');
            assert.equal(list.body.orchestras.length, 4);
          },
        },
        {
          name: 'all three orchestras on the shared database are refused at connect with 08004; the clean one connects',
          async run(stack) {
            for (const sub of ['sco', 'scoso', 'alias']) {
              const t = await stack.issueToken(sub);
              assert.equal(await refusalOf(stack.clientConfig({ subdomain: sub, token: t.token })), '08004', sub);
            }
            const solo = await stack.issueToken('solo');
            assert.equal(await refusalOf(stack.clientConfig({ subdomain: 'solo', token: solo.token })), null);
          },
        },
        {
          name: 'the audit exits 1 listing shared_upstream and shared_fingerprint',
          async run(stack) {
            const r = await runCli(['audit'], cliEnv(stack));
            assert.equal(r.code, 1, r.stderr);
            assert.match(r.stdout, /shared_upstream\s+sco, scoso/);
            assert.match(r.stdout, /shared_fingerprint/);
            const json = await runCli(['audit', '--json'], cliEnv(stack));
            const report = JSON.parse(json.stdout) as { ok: boolean; violations: Array<{ kind: string; orchestras: string[] }> };
            assert.equal(report.ok, false);
            const fp = report.violations.find((v) => v.kind === 'shared_fingerprint');
            assert.ok(fp && fp.orchestras.includes('alias'));
          },
        },
        {
          name: 'a dry-run fix changes nothing; the real fix keeps the oldest and sets the others pending',
          async run(stack) {
            const dry = await runCli(['audit', '--fix', '--json'], cliEnv(stack));
            assert.equal(dry.code, 0, dry.stderr);
            const plan = JSON.parse(dry.stdout) as { dryRun: boolean; changes: Array<{ subdomain: string; keptOrchestra: string }> };
            assert.equal(plan.dryRun, true);
            assert.deepEqual(plan.changes.map((c) => c.subdomain).sort(), ['alias', 'scoso']);
            assert.ok(plan.changes.every((c) => c.keptOrchestra === 'sco'));
            assert.equal((await stack.api<{ status: string }>('GET', '/v1/orchestras/scoso')).body.status, 'active', 'dry run changed nothing');

            const real = await runCli(['audit', '--fix', '--yes'], cliEnv(stack));
            assert.equal(real.code, 0, real.stderr);
            for (const sub of ['scoso', 'alias']) {
              const o = await stack.api<{ status: string; upstream: unknown }>('GET', `/v1/orchestras/${sub}`);
              assert.equal(o.body.status, 'pending');
              assert.equal(o.body.upstream, null);
            }
          },
        },
        {
          name: 'after the fix the oldest connects and sees its data, the others are refused with 57P03, and the audit exits 0',
          async run(stack) {
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
            const audit = await runCli(['audit'], cliEnv(stack));
            assert.equal(audit.code, 0, audit.stdout + audit.stderr);
          },
        },
        {
          name: 'the audit log shows every refusal with its reason, and the fix',
          async run(stack) {
            type Entry = { kind: string; subdomain: string; sqlstate: string; reason: string };
            const r = await stack.api<{ entries: Entry[] }>('GET', '/v1/audit-log?kind=connection.refused&limit=100');
            assert.equal(r.status, 200);
            // flush the proxy's queue (SIGTERM path); the rest of the suite gets a fresh proxy
            await stack.replacePrimaryProxy();
            const after = await stack.api<{ entries: Entry[] }>('GET', '/v1/audit-log?kind=connection.refused&limit=100');
            const refusals = after.body.entries;
            for (const sub of ['sco', 'scoso', 'alias']) {
              assert.ok(refusals.some((e) => e.subdomain === sub && e.sqlstate === '08004' && /isolation_violation/.test(e.reason)), `08004 for ${sub}`);
            }
            assert.ok(refusals.some((e) => e.subdomain === 'scoso' && e.sqlstate === '57P03'));
            const fixes = await stack.api<{ entries: Array<{ subdomain: string }> }>('GET', '/v1/audit-log?kind=isolation.fix');
            assert.deepEqual(fixes.body.entries.map((e) => e.subdomain).sort(), ['alias', 'scoso']);
          },
        },
      ],
    },
    {
      name: 'the audit finds cross access and schema leaks',
      scenarios: [
        {
          name: 'one orchestra’s role granted CONNECT on another’s database is reported as cross_access',
          async run(stack) {
            await stack.createOrchestra('cross-a');
            await stack.createOrchestra('cross-b');
            await adminQuery(stack.tenantServer.url('postgres'), 'GRANT CONNECT ON DATABASE sd_cross_b TO sd_cross_a');
            try {
              const r = await stack.api<{ violations: Array<{ kind: string; orchestras: string[] }> }>('GET', '/v1/audits/isolation');
              assert.ok(r.body.violations.some((v) => v.kind === 'cross_access' && v.orchestras.includes('cross-b')), JSON.stringify(r.body));
            } finally {
              await adminQuery(stack.tenantServer.url('postgres'), 'REVOKE CONNECT ON DATABASE sd_cross_b FROM sd_cross_a');
            }
          },
        },
        {
          name: 'central tables inside an orchestra database are reported as orchestra_schema_leak',
          async run(stack) {
            await adminQuery(stack.tenantServer.url('sd_cross_a'), 'CREATE TABLE tokens (x int); ALTER TABLE tokens OWNER TO sd_cross_a');
            try {
              const r = await stack.api<{ violations: Array<{ kind: string; orchestras: string[] }> }>('GET', '/v1/audits/isolation');
              assert.ok(r.body.violations.some((v) => v.kind === 'orchestra_schema_leak' && v.orchestras.includes('cross-a')));
            } finally {
              await adminQuery(stack.tenantServer.url('sd_cross_a'), 'DROP TABLE tokens');
            }
          },
        },
        {
          name: 'orchestra tables in the central database are reported, and a control plane refuses to start on it',
          async run(stack) {
            await adminQuery(stack.centralServer.url(), 'CREATE TABLE musicians (id int)');
            try {
              const r = await stack.api<{ violations: Array<{ kind: string }> }>('GET', '/v1/audits/isolation');
              assert.ok(r.body.violations.some((v) => v.kind === 'central_schema_leak'));
              const cli = await runCli(['audit'], cliEnv(stack));
              assert.equal(cli.code, 1);
              await assert.rejects(stack.startAnotherControlPlane(), (e: Error) => e instanceof CentralSchemaLeak && /musicians/.test(e.message));
            } finally {
              await adminQuery(stack.centralServer.url(), 'DROP TABLE musicians');
            }
          },
        },
        {
          name: 'the audit exits 2 when it cannot run',
          async run() {
            const r = await runCli(['audit'], { CONTROL_PLANE_URL: 'http://127.0.0.1:1', ADMIN_TOKEN: 'x'.repeat(20) });
            assert.equal(r.code, 2);
          },
        },
      ],
    },
  ],
});
