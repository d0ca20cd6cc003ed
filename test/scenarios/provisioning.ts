// Provisioning as an operator meets it through the API: the steps, the
// guarantees about the new database, refusals that change nothing, and the
// NDJSON answer that shows each step the moment it completes.
// Run by test/integration/proxy.test.ts (embedded, on the same stack as the
// gateway suite) and test/containers/gateway.test.ts (containers).

import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import pg from 'pg';
import { defineSuite } from './registry.js';
import { ndjsonLines } from './ndjson.js';
import type { ServerView, Target } from './target.js';
import { adminQuery, refusalOf } from './wire.js';

export const PROVISIONING_STEPS = ['validate', 'record', 'database', 'lockdown', 'identity', 'schema', 'marker', 'health', 'activate'];
const ORCHESTRA_TABLES = ['instruments', 'musicians', 'positions', 'projects', 'rankings', 'requests'];
const CENTRAL_TABLES = ['audit_log', 'orchestras', 'pool_databases', 'signing_keys', 'tokens'];

interface StepLine {
  step: { step: string; ok: boolean; ms: number; detail?: string };
}
interface OutcomeLine {
  status: number;
  orchestra?: Record<string, unknown> & { steps: Array<StepLine['step']> };
  error?: { code: string; message: string };
}
type Line = Partial<StepLine> & Partial<OutcomeLine>;

/**
 * Makes provisioning wait inside its `lockdown` step until release(): a fresh
 * database still open to PUBLIC has its pg_database row locked, so the
 * lockdown's REVOKE CONNECT on it blocks. The steps before it have completed
 * by then; the ones after cannot have. (Needs STAGEDOOR_MANAGES_TENANT_SERVER.)
 * dispose() drops that database: only once the provisioning has finished, as
 * the lockdown may still be about to revoke on it.
 */
export async function holdProvisioningAtLockdown(tenant: ServerView): Promise<{ release(): Promise<void>; dispose(): Promise<void> }> {
  const db = `hold_${randomBytes(4).toString('hex')}`;
  await adminQuery(tenant.url('postgres'), `CREATE DATABASE ${db}`);
  const c = new pg.Client({ connectionString: tenant.url('postgres') });
  c.on('error', () => {});
  await c.connect();
  await c.query('BEGIN');
  await c.query('SELECT 1 FROM pg_database WHERE datname = $1 FOR UPDATE', [db]);
  let released: Promise<void> | undefined;
  let disposed: Promise<void> | undefined;
  const release = (): Promise<void> => {
    released ??= c.query('COMMIT').then(() => c.end());
    return released;
  };
  return {
    release,
    dispose() {
      disposed ??= release().then(async () => {
        await adminQuery(tenant.url('postgres'), `DROP DATABASE IF EXISTS ${db} WITH (FORCE)`);
      });
      return disposed;
    },
  };
}

function postOrchestra(t: Target, body: unknown, accept: string): Promise<Response> {
  return fetch(`${t.apiUrl}/v1/orchestras`, {
    method: 'POST',
    headers: { authorization: `Bearer ${t.adminToken}`, 'content-type': 'application/json', accept },
    body: JSON.stringify(body),
  });
}

export const provisioningSuite = defineSuite<Target, Record<string, never>>({
  name: 'provisioning through the API',
  async setup() {
    return {};
  },
  groups: [
    {
      name: 'provisioning an orchestra',
      scenarios: [
        {
          name: 'creating an orchestra answers 201 with every step in order, all ok, and the orchestra active',
          async run(t) {
            const r = await t.api<{ subdomain: string; status: string; source: string; steps: Array<{ step: string; ok: boolean; ms: number }> }>('POST', '/v1/orchestras', {
              subdomain: 'prov-one',
              name: 'Provisioned One',
            });
            assert.equal(r.status, 201, JSON.stringify(r.body));
            assert.deepEqual(r.body.steps.map((s) => s.step), PROVISIONING_STEPS);
            assert.ok(r.body.steps.every((s) => s.ok && Number.isInteger(s.ms) && s.ms >= 0), JSON.stringify(r.body.steps));
            assert.equal(r.body.status, 'active');
            assert.equal(r.body.source, 'provisioned');
            assert.doesNotMatch(JSON.stringify(r.body), /password/i, 'no upstream secret in the answer');
          },
        },
        {
          name: 'the new database is the orchestra’s own: owned by an unprivileged role of its own, closed to PUBLIC, with the orchestra tables and no central ones',
          async run(t) {
            const tenant = t.tenantServer;
            const role = await adminQuery(
              tenant.url('postgres'),
              `select r.rolname, r.rolsuper, r.rolcreatedb, r.rolcreaterole, r.rolreplication, r.rolbypassrls,
                      pg_get_userbyid(d.datdba) as owner, has_database_privilege('public', d.oid, 'CONNECT') as public_connect
                 from pg_database d, pg_roles r where d.datname = 'sd_prov_one' and r.rolname = 'sd_prov_one'`,
            );
            assert.deepEqual(role.rows, [
              { rolname: 'sd_prov_one', rolsuper: false, rolcreatedb: false, rolcreaterole: false, rolreplication: false, rolbypassrls: false, owner: 'sd_prov_one', public_connect: false },
            ]);
            const tables = await adminQuery(tenant.url('sd_prov_one'), "select tablename from pg_tables where schemaname = 'public' order by 1");
            const names = tables.rows.map((x: { tablename: string }) => x.tablename);
            for (const table of ORCHESTRA_TABLES) assert.ok(names.includes(table), `${table} in ${names.join(', ')}`);
            for (const table of CENTRAL_TABLES) assert.ok(!names.includes(table), `central table ${table} must not be in an orchestra database`);
          },
        },
        {
          name: 'a subdomain that is already taken is refused with 409 at the validate step, and nothing changes',
          async run(t) {
            const before = await t.api<{ orchestras: unknown[] }>('GET', '/v1/orchestras');
            const r = await t.api<{ error: { code: string; message: string } }>('POST', '/v1/orchestras', { subdomain: 'prov-one', name: 'Impostor' });
            assert.equal(r.status, 409);
            assert.equal(r.body.error.code, 'provisioning_failed_at_validate');
            assert.match(r.body.error.message, /already taken/);
            const after = await t.api<{ orchestras: unknown[] }>('GET', '/v1/orchestras');
            assert.deepEqual(after.body, before.body);
            assert.equal((await t.api<{ name: string }>('GET', '/v1/orchestras/prov-one')).body.name, 'Provisioned One');
          },
        },
        {
          name: 'a subdomain that is not a valid name is refused with 400 at the validate step',
          async run(t) {
            for (const subdomain of ['Upper', '9starts-with-digit', 'x', 'validate']) {
              const r = await t.api<{ error: { code: string } }>('POST', '/v1/orchestras', { subdomain, name: 'Bad' });
              assert.equal(r.status, 400, subdomain);
              assert.equal(r.body.error.code, 'provisioning_failed_at_validate', subdomain);
            }
          },
        },
        {
          name: 'attaching a database that another orchestra already uses (under another host name) is refused with 409 at the identity step and rolled back',
          async run(t) {
            const tenant = t.tenantServer;
            await adminQuery(tenant.url('postgres'), "CREATE ROLE attached_owner LOGIN PASSWORD 'attached-pw'");
            await adminQuery(tenant.url('postgres'), 'CREATE DATABASE attached_db OWNER attached_owner');
            // as provisioning does for its own databases: no other role may connect
            await adminQuery(tenant.url('postgres'), 'REVOKE CONNECT ON DATABASE attached_db FROM PUBLIC');
            const first = await t.api<{ status: string; source: string }>('POST', '/v1/orchestras', {
              subdomain: 'attach-one',
              name: 'Attached One',
              databaseUrl: `postgres://attached_owner:attached-pw@${tenant.gatewayAddress}/attached_db`,
            });
            assert.equal(first.status, 201, JSON.stringify(first.body));
            assert.deepEqual([first.body.status, first.body.source], ['active', 'attached']);
            const second = await t.api<{ error: { code: string; message: string } }>('POST', '/v1/orchestras', {
              subdomain: 'attach-two',
              name: 'Attached Two',
              databaseUrl: `postgres://attached_owner:attached-pw@${tenant.gatewayAlias}/attached_db`,
            });
            assert.equal(second.status, 409, JSON.stringify(second.body));
            assert.equal(second.body.error.code, 'provisioning_failed_at_identity');
            assert.match(second.body.error.message, /rolled back/);
            assert.equal((await t.api('GET', '/v1/orchestras/attach-two')).status, 404, 'the record was rolled back');
            const tok = await t.issueToken('attach-one');
            assert.equal(await refusalOf(t.clientConfig({ subdomain: 'attach-one', token: tok.token })), null, 'the first one keeps working');
          },
        },
      ],
    },
    {
      name: 'provisioning as a stream (Accept: application/x-ndjson)',
      scenarios: [
        {
          name: 'each step is streamed the moment it completes, then the orchestra with status 201',
          async run(t) {
            const hold = await holdProvisioningAtLockdown(t.tenantServer);
            try {
              const res = await postOrchestra(t, { subdomain: 'streamed', name: 'Streamed Live' }, 'application/x-ndjson');
              assert.equal(res.status, 200);
              assert.match(res.headers.get('content-type') ?? '', /^application\/x-ndjson/);
              const lines: Line[] = [];
              const it = ndjsonLines<Line>(res);
              // next() by hand: leaving a for-await loop would close the stream
              for (let n = await it.next(); !n.done; n = await it.next()) {
                lines.push(n.value);
                if (n.value.step?.step === 'database') break;
              }
              assert.deepEqual(lines.map((l) => l.step?.step), ['validate', 'record', 'database']);
              // provisioning is blocked in `lockdown`: what arrived was sent while it was still running
              const meanwhile = await t.api<{ status: string }>('GET', '/v1/orchestras/streamed');
              assert.equal(meanwhile.body.status, 'provisioning');
              await hold.release();
              for await (const line of it) lines.push(line);
              const steps = lines.slice(0, -1);
              const outcome = lines[lines.length - 1]!;
              assert.deepEqual(steps.map((l) => l.step?.step), PROVISIONING_STEPS);
              assert.ok(steps.every((l) => l.step?.ok === true));
              assert.equal(outcome.status, 201);
              assert.equal(outcome.orchestra?.subdomain, 'streamed');
              assert.equal(outcome.orchestra?.status, 'active');
              assert.deepEqual(outcome.orchestra?.steps, steps.map((l) => l.step));
              assert.equal((await t.api<{ status: string }>('GET', '/v1/orchestras/streamed')).body.status, 'active');
            } finally {
              await hold.dispose();
            }
          },
        },
        {
          name: 'a failure is the last line, with the status and error the JSON answer would have had',
          async run(t) {
            const res = await postOrchestra(t, { subdomain: 'streamed', name: 'Streamed Again' }, 'application/x-ndjson');
            assert.equal(res.status, 200);
            const lines: Line[] = [];
            for await (const line of ndjsonLines<Line>(res)) lines.push(line);
            assert.equal(lines.length, 2, JSON.stringify(lines));
            assert.equal(lines[0]!.step?.step, 'validate');
            assert.equal(lines[0]!.step?.ok, false);
            assert.match(lines[0]!.step?.detail ?? '', /already taken/);
            assert.equal(lines[1]!.status, 409);
            assert.equal(lines[1]!.error?.code, 'provisioning_failed_at_validate');
            const json = await postOrchestra(t, { subdomain: 'streamed', name: 'Streamed Again' }, 'application/json');
            assert.equal(json.status, 409);
            assert.deepEqual(await json.json(), { error: lines[1]!.error });
          },
        },
        {
          name: 'a request the schema refuses is still answered 400 in JSON',
          async run(t) {
            const res = await postOrchestra(t, { subdomain: 'streamed-bad', name: 'Bad', colour: 'red' }, 'application/x-ndjson');
            assert.equal(res.status, 400);
            assert.match(res.headers.get('content-type') ?? '', /^application\/json/);
            assert.equal(((await res.json()) as { error: { code: string } }).error.code, 'invalid_request');
          },
        },
        {
          name: 'without the NDJSON Accept header the answer is the single JSON document it always was',
          async run(t) {
            for (const [subdomain, accept] of [
              ['plain-json', 'application/json'],
              ['plain-any', '*/*'],
            ] as const) {
              const res = await postOrchestra(t, { subdomain, name: `Plain ${accept}` }, accept);
              assert.equal(res.status, 201);
              assert.match(res.headers.get('content-type') ?? '', /^application\/json/);
              const body = (await res.json()) as Record<string, unknown> & { steps: Array<{ step: string }> };
              assert.deepEqual(Object.keys(body).sort(), [
                'canonicalAddress', 'createdAt', 'fingerprint', 'id', 'maxConnections', 'name', 'source', 'status', 'steps', 'subdomain', 'updatedAt', 'upstream',
              ]);
              assert.equal(body.subdomain, subdomain);
              assert.equal(body.status, 'active');
              assert.deepEqual(body.steps.map((s) => s.step), PROVISIONING_STEPS);
            }
          },
        },
      ],
    },
  ],
});
