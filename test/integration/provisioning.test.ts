// Provisioning done right: the pre-flight, the pipeline and its audit trail,
// the rollback of every step, the clean-up of a crash, attached and pool
// databases, the life cycle, isolation between orchestras on one server,
// `stagedoor migrate`, and secrets. Real PostgreSQL only: to make a step fail
// a test changes the real world (a stopped server, a pg_hba rule, a role that
// already exists, a broken migration, a trigger in the central database, a
// network path that goes down) and then looks at what is left behind.

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import { cpSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import pg from 'pg';
import { loadControlPlaneConfig, type Env } from '../../common/config.js';
import { createLogger, silentLogger, type Logger } from '../../common/log.js';
import { ControlPlane } from '../../control-plane/server.js';
import { DEFAULT_ORCHESTRA_SCHEMA_DIR, migrationSet } from '../../control-plane/migrations.js';
import { ProvisioningError } from '../../control-plane/provisioning.js';
import type { ParsedDatabaseUrl } from '../../control-plane/upstream-identity.js';
import { refusalOf, startStack, type ApiAnswer, type Stack } from '../fixtures/stack.js';
import { startTestPostgres, type TestPostgres } from '../fixtures/postgres.js';
import { runCli } from '../fixtures/cli.js';

// API answers and query rows are `any`: each test checks the fields it cares about.
type Api = <T = any>(method: string, path: string, body?: unknown) => Promise<ApiAnswer<T>>;

const STEPS = ['validate', 'record', 'database', 'lockdown', 'identity', 'schema', 'marker', 'health', 'activate'];
/** What TenantServer.createRole generates: 24 random bytes in hex. */
const GENERATED_PASSWORD = /(?<![0-9a-f])[0-9a-f]{48}(?![0-9a-f])/;

let stack: Stack;
const controlPlanes = new Set<ControlPlane>();
const tempDirs: string[] = [];

before(async () => {
  stack = await startStack();
  // A database that is neither an orchestra's nor a template: a managed tenant
  // server must close it to PUBLIC at the next provisioning.
  await sql(stack.tenant.url(), 'CREATE DATABASE bystander');
});
after(async () => {
  for (const cp of controlPlanes) await cp.stop().catch(() => {});
  await stack?.stop();
  for (const d of tempDirs) rmSync(d, { recursive: true, force: true });
});

// ---------------------------------------------------------------------------------------------
// helpers

async function sql(url: string, text: string, params: unknown[] = []): Promise<pg.QueryResult<any>> {
  const c = new pg.Client({ connectionString: url });
  c.on('error', () => {});
  await c.connect();
  try {
    return await c.query(text, params);
  } finally {
    await c.end();
  }
}

const central = (text: string, params: unknown[] = []): Promise<pg.QueryResult<any>> => sql(stack.central.url(), text, params);
const tenant = (text: string, params: unknown[] = [], database = 'postgres'): Promise<pg.QueryResult<any>> => sql(stack.tenant.url(database), text, params);
const namesOf = (subdomain: string): string => `sd_${subdomain.replace(/-/g, '_')}`;

function apiAt(baseUrl: string): Api {
  return async (method, path, body) => {
    const res = await fetch(baseUrl + path, {
      method,
      headers: { authorization: `Bearer ${stack.adminToken}`, ...(body !== undefined ? { 'content-type': 'application/json' } : {}) },
      body: body !== undefined ? JSON.stringify(body) : undefined,
    });
    const text = await res.text();
    return { status: res.status, body: text ? JSON.parse(text) : {} };
  };
}

/** Another control plane on the stack's central database (the stack's env, overridden by `env`). */
async function startControlPlane(env: Env = {}, log: Logger = silentLogger): Promise<{ cp: ControlPlane; api: Api }> {
  const cp = await ControlPlane.start(loadControlPlaneConfig({ ...stack.env, CONTROL_PLANE_LISTEN: '127.0.0.1:0', ...env }), log);
  controlPlanes.add(cp);
  return { cp, api: apiAt(cp.url) };
}

async function stopControlPlane(cp: ControlPlane | undefined): Promise<void> {
  if (!cp || !controlPlanes.delete(cp)) return;
  await cp.stop();
}

const provision = (api: Api, subdomain: string, extra: Record<string, unknown> = {}): Promise<ApiAnswer<any>> =>
  api('POST', '/v1/orchestras', { subdomain, name: `Orchestra ${subdomain}`, ...extra });

function assertCreated(res: ApiAnswer<any>, source = 'provisioned'): void {
  assert.equal(res.status, 201, JSON.stringify(res.body));
  assert.equal(res.body.status, 'active');
  assert.equal(res.body.source, source);
}

function assertFailedAt(res: ApiAnswer<any>, status: number, step: string, message?: RegExp): void {
  assert.equal(res.status, status, JSON.stringify(res.body));
  assert.equal(res.body.error?.code, `provisioning_failed_at_${step}`, JSON.stringify(res.body));
  if (message) assert.match(res.body.error.message, message);
}

async function onServer(server: TestPostgres, name: string): Promise<{ role: boolean; database: boolean }> {
  const r = await sql(
    server.url(),
    'SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1) AS role, EXISTS (SELECT 1 FROM pg_database WHERE datname = $1) AS database',
    [name],
  );
  return { role: r.rows[0].role, database: r.rows[0].database };
}

async function recordsOf(subdomain: string): Promise<Array<{ status: string }>> {
  return (await central('SELECT status FROM orchestras WHERE subdomain = $1', [subdomain])).rows;
}

/** The contract of every failure: no database, no role on the tenant server, no record in the central database. */
async function assertNothingLeft(subdomain: string, server: TestPostgres = stack.tenant): Promise<void> {
  assert.deepEqual(await onServer(server, namesOf(subdomain)), { role: false, database: false }, `role or database of ${subdomain} left on the tenant server`);
  assert.deepEqual(await recordsOf(subdomain), [], `record of ${subdomain} left in the central orchestras table`);
}

/** The audit trail of a failed provisioning, read through the control plane that ran it (its GET flushes its queue). */
async function assertAuditedFailure(api: Api, subdomain: string, step: string): Promise<void> {
  const res = await api<{ entries: any[] }>('GET', `/v1/audit-log?kind=provisioning&orchestra=${subdomain}&limit=100`);
  assert.equal(res.status, 200);
  const failedStep = res.body.entries.find((e) => e.kind === 'provisioning.step' && e.detail?.step === step);
  assert.ok(failedStep, `step ${step} audited`);
  assert.equal(failedStep.detail.ok, false);
  const failed = res.body.entries.find((e) => e.kind === 'provisioning.failed');
  assert.ok(failed, 'provisioning.failed audited');
  assert.match(failed.reason, new RegExp(`^${step}: `));
  assert.deepEqual(failed.detail.leftovers, [], 'the rollback left nothing behind');
}

/** A database with a login role of its own on the stack's tenant server, as a user would bring one. */
async function makeDatabase(name: string, opts: { closed?: boolean } = {}): Promise<{ url: string; alias: string; role: string; password: string; name: string }> {
  const role = `${name}_owner`;
  const password = randomBytes(12).toString('hex');
  await tenant(`CREATE ROLE ${role} LOGIN PASSWORD '${password}'`);
  await tenant(`CREATE DATABASE ${name} OWNER ${role}`);
  if (opts.closed) await tenant(`REVOKE CONNECT ON DATABASE ${name} FROM PUBLIC`);
  const at = (host: string): string => `postgres://${role}:${password}@${host}:${stack.tenant.port}/${name}`;
  return { url: at('127.0.0.1'), alias: at('localhost'), role, password, name };
}

/** The decrypted upstream of an orchestra, for tests only (the API never shows it). */
async function upstreamOf(subdomain: string): Promise<ParsedDatabaseUrl> {
  const row = await stack.controlPlane.store.find(subdomain);
  assert.ok(row, `orchestra ${subdomain} exists`);
  const u = stack.controlPlane.store.upstreamOf(row);
  assert.ok(u, `orchestra ${subdomain} has an upstream`);
  return u;
}

/** SQLSTATE of a direct login (not through the proxy), or null when it connects. */
async function directLogin(u: Pick<ParsedDatabaseUrl, 'user' | 'password'>, database: string): Promise<string | null> {
  return refusalOf({ host: stack.tenant.host, port: stack.tenant.port, user: u.user, password: u.password, database, connectionTimeoutMillis: 5_000 });
}

function tempDir(prefix: string): string {
  const d = mkdtempSync(join(tmpdir(), prefix));
  tempDirs.push(d);
  return d;
}

/** A copy of schemas/orchestra plus one more migration. */
function schemaDirWith(file: string, body: string): string {
  const dir = tempDir('stagedoor-schema-');
  cpSync(DEFAULT_ORCHESTRA_SCHEMA_DIR, dir, { recursive: true });
  writeFileSync(join(dir, file), body);
  return dir;
}

/**
 * A TCP path to a server that can be cut at any moment, synchronously: a
 * network partition between the control plane and its tenant server.
 */
class NetworkPath {
  private down = false;
  private readonly sockets = new Set<net.Socket>();

  private constructor(
    private readonly server: net.Server,
    readonly port: number,
  ) {}

  static async to(targetPort: number): Promise<NetworkPath> {
    let path: NetworkPath | undefined;
    const server = net.createServer((client) => path?.accept(client, targetPort));
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    path = new NetworkPath(server, (server.address() as net.AddressInfo).port);
    return path;
  }

  private accept(client: net.Socket, targetPort: number): void {
    if (this.down) {
      client.destroy();
      return;
    }
    const upstream = net.connect(targetPort, '127.0.0.1');
    for (const s of [client, upstream]) {
      this.sockets.add(s);
      s.on('error', () => {});
      s.on('close', () => {
        this.sockets.delete(s);
        client.destroy();
        upstream.destroy();
      });
    }
    client.pipe(upstream);
    upstream.pipe(client);
  }

  cut(): void {
    this.down = true;
    for (const s of this.sockets) s.destroy();
  }

  restore(): void {
    this.down = false;
  }

  async close(): Promise<void> {
    this.cut();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }
}

/** Recursively, every key of an API answer. */
function keysOf(v: unknown, out: string[] = []): string[] {
  if (Array.isArray(v)) for (const x of v) keysOf(x, out);
  else if (v && typeof v === 'object') {
    for (const [k, x] of Object.entries(v)) {
      out.push(k);
      keysOf(x, out);
    }
  }
  return out;
}

/** For what only another process (or server) can change: asks again every 50 ms, for at most `timeoutMs`. */
async function eventually(cond: () => Promise<boolean>, timeoutMs = 5_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await cond())) {
    if (Date.now() > deadline) throw new Error(`condition not met within ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = Math.floor(s.length / 2);
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

// ---------------------------------------------------------------------------------------------

describe('pre-flight: POST /v1/orchestras/validate', () => {
  test('a valid, free subdomain passes every check: tenant server reachable with room, no sharing', async () => {
    const res = await stack.api<any>('POST', '/v1/orchestras/validate', { subdomain: 'allegro' });
    assert.equal(res.status, 200);
    assert.equal(res.body.ok, true, JSON.stringify(res.body));
    assert.deepEqual(
      res.body.checks.map((c: any) => c.name),
      ['subdomain_valid', 'subdomain_free', 'tenant_server_reachable', 'tenant_server_room', 'no_existing_sharing'],
    );
    for (const c of res.body.checks) {
      assert.equal(c.ok, true, `${c.name}: ${c.detail}`);
      assert.equal(typeof c.detail, 'string');
    }
    assert.match(res.body.checks.find((c: any) => c.name === 'tenant_server_room').detail, /connections free of \d+/);
  });

  test('reserved words and malformed subdomains fail subdomain_valid', async () => {
    for (const subdomain of ['validate', 'import', 'Bad_Name', 'x', '1st-violin', 'with space']) {
      const res = await stack.api<any>('POST', '/v1/orchestras/validate', { subdomain });
      assert.equal(res.status, 200, subdomain);
      assert.equal(res.body.ok, false, subdomain);
      assert.equal(res.body.checks.find((c: any) => c.name === 'subdomain_valid').ok, false, subdomain);
    }
  });

  test('a subdomain in use fails subdomain_free', async () => {
    assertCreated(await provision(stack.api, 'pf-taken'));
    const res = await stack.api<any>('POST', '/v1/orchestras/validate', { subdomain: 'pf-taken' });
    assert.equal(res.body.ok, false);
    const free = res.body.checks.find((c: any) => c.name === 'subdomain_free');
    assert.equal(free.ok, false);
    assert.match(free.detail, /already used/);
  });

  test('orchestras already sharing a database are reported by no_existing_sharing', async () => {
    // Two rows written behind the control plane's back, as a legacy import could leave them.
    await central(
      `INSERT INTO orchestras (id, subdomain, name, status, source, upstream_host, upstream_port, upstream_database, upstream_user)
       VALUES (gen_random_uuid(), 'pf-share-1', 'Share 1', 'suspended', 'attached', '127.0.0.1', 1, 'legacy', 'legacy'),
              (gen_random_uuid(), 'pf-share-2', 'Share 2', 'suspended', 'attached', 'LOCALHOST.', 1, 'legacy', 'legacy'),
              (gen_random_uuid(), 'pf-share-3', 'Share 3', 'suspended', 'attached', '127.0.0.1', 1, 'legacy', 'legacy')`,
    );
    try {
      const res = await stack.api<any>('POST', '/v1/orchestras/validate', { subdomain: 'allegro' });
      assert.equal(res.body.ok, false);
      const sharing = res.body.checks.find((c: any) => c.name === 'no_existing_sharing');
      assert.equal(sharing.ok, false);
      assert.match(sharing.detail, /^2 orchestra\(s\) share a database/);
    } finally {
      await central("DELETE FROM orchestras WHERE subdomain LIKE 'pf-share-%'");
    }
  });

  test('the pre-flight changes nothing: no record, role, database, privilege, pool entry or audit entry', async () => {
    const snapshot = async (): Promise<unknown> => {
      await stack.api('GET', '/v1/audit-log?limit=1'); // flushes queued audit records first
      return {
        orchestras: (await central('SELECT * FROM orchestras ORDER BY id')).rows,
        pool: (await central('SELECT * FROM pool_databases ORDER BY pool_key')).rows,
        audit: (await central('SELECT count(*)::int AS n, max(id)::text AS last FROM audit_log')).rows,
        roles: (await tenant('SELECT rolname FROM pg_roles ORDER BY 1')).rows,
        databases: (await tenant('SELECT datname, datacl::text FROM pg_database ORDER BY 1')).rows,
      };
    };
    const before = await snapshot();
    for (const subdomain of ['allegro', 'pf-taken', 'validate', 'Bad_Name']) {
      assert.equal((await stack.api('POST', '/v1/orchestras/validate', { subdomain })).status, 200);
    }
    assert.deepEqual(await snapshot(), before);
  });
});

describe('the pipeline: POST /v1/orchestras', () => {
  let created: ApiAnswer<any>;
  let vivace: ParsedDatabaseUrl;

  before(async () => {
    created = await provision(stack.api, 'vivace');
    vivace = await upstreamOf('vivace');
  });

  test('answers 201 with the orchestra active, source provisioned, and every step in order with its outcome', () => {
    assertCreated(created);
    assert.deepEqual(
      created.body.steps.map((s: any) => s.step),
      STEPS,
    );
    for (const s of created.body.steps) {
      assert.equal(s.ok, true, s.step);
      assert.equal(typeof s.ms, 'number');
    }
    assert.deepEqual(created.body.upstream, { host: stack.tenant.host, port: stack.tenant.port, database: 'sd_vivace' });
  });

  test('the orchestra logs in with a role of its own: random password, no superuser, createdb, createrole, replication or bypassrls', async () => {
    assert.equal(vivace.user, 'sd_vivace');
    assert.match(vivace.password, /^[0-9a-f]{48}$/);
    const r = await tenant('SELECT * FROM pg_roles WHERE rolname = $1', ['sd_vivace']);
    assert.equal(r.rowCount, 1);
    const role = r.rows[0];
    assert.equal(role.rolcanlogin, true);
    assert.equal(role.rolsuper, false);
    assert.equal(role.rolcreatedb, false);
    assert.equal(role.rolcreaterole, false);
    assert.equal(role.rolreplication, false);
    assert.equal(role.rolbypassrls, false);
    assert.equal(await directLogin(vivace, 'sd_vivace'), null, 'the stored password logs in');
    // another orchestra's password is another random one
    assertCreated(await provision(stack.api, 'vivace-bis'));
    const bis = await upstreamOf('vivace-bis');
    assert.notEqual(bis.password, vivace.password);
  });

  test('its database is owned by its role, and PUBLIC cannot connect to it', async () => {
    const r = await tenant(
      `SELECT pg_get_userbyid(datdba) AS owner, has_database_privilege('public', oid, 'CONNECT') AS public_connect
         FROM pg_database WHERE datname = 'sd_vivace'`,
    );
    assert.deepEqual(r.rows, [{ owner: 'sd_vivace', public_connect: false }]);
  });

  test('on a tenant server stagedoor manages, PUBLIC loses CONNECT on every other non-template database', async () => {
    const r = await tenant(`SELECT datname FROM pg_database WHERE NOT datistemplate AND has_database_privilege('public', oid, 'CONNECT') ORDER BY 1`);
    assert.deepEqual(r.rows.map((x) => x.datname), []);
  });

  test('simultaneous provisionings on a managed tenant server all succeed: their lockdowns do not trip over each other', async () => {
    // A database still open to PUBLIC, its pg_database row held so that every
    // lockdown waits to close it, then all go at once.
    await tenant('CREATE DATABASE latecomer');
    const holder = new pg.Client({ connectionString: stack.tenant.url() });
    await holder.connect();
    let answers: Array<ApiAnswer<any>>;
    try {
      await holder.query('BEGIN');
      await holder.query("SELECT 1 FROM pg_database WHERE datname = 'latecomer' FOR UPDATE");
      const pending = Promise.all(['tutti-1', 'tutti-2', 'tutti-3'].map((s) => provision(stack.api, s)));
      await eventually(async () => (await tenant("SELECT count(*)::int AS n FROM pg_stat_activity WHERE wait_event_type = 'Lock'")).rows[0].n === 3, 20_000);
      await holder.query('COMMIT');
      answers = await pending;
    } finally {
      await holder.end();
    }
    for (const a of answers) assertCreated(a);
    const open = await tenant("SELECT has_database_privilege('public', 'latecomer', 'CONNECT') AS open");
    assert.equal(open.rows[0].open, false);
    await tenant('DROP DATABASE latecomer');
  });

  test('on a tenant server stagedoor does not manage, only the new database is closed: the others keep their privileges', async () => {
    await tenant('CREATE DATABASE neighbour');
    const { cp, api } = await startControlPlane({ STAGEDOOR_MANAGES_TENANT_SERVER: 'false' });
    try {
      assertCreated(await provision(api, 'unmanaged'));
      const r = await tenant(
        `SELECT datname, has_database_privilege('public', oid, 'CONNECT') AS public_connect FROM pg_database WHERE datname IN ('neighbour', 'sd_unmanaged') ORDER BY 1`,
      );
      assert.deepEqual(r.rows, [
        { datname: 'neighbour', public_connect: true },
        { datname: 'sd_unmanaged', public_connect: false },
      ]);
    } finally {
      await stopControlPlane(cp);
      await tenant('DROP DATABASE neighbour');
    }
  });

  test('schemas/orchestra is applied as the orchestra role: every table it creates is owned by that role', async () => {
    const expected = migrationSet('orchestra').tables;
    assert.ok(expected.length > 0);
    const r = await tenant(`SELECT tablename, tableowner FROM pg_tables WHERE schemaname = 'public' ORDER BY 1`, [], 'sd_vivace');
    const owners = new Map(r.rows.map((x) => [x.tablename, x.tableowner]));
    for (const t of [...expected, 'stagedoor_orchestra_migrations', 'stagedoor_marker']) assert.equal(owners.get(t), 'sd_vivace', t);
    const marker = await tenant('SELECT orchestra_id::text AS id, subdomain FROM stagedoor_marker', [], 'sd_vivace');
    assert.deepEqual(marker.rows, [{ id: created.body.id, subdomain: 'vivace' }]);
  });

  test('every step is in the audit log with its outcome, followed by provisioning.completed', async () => {
    const res = await stack.api<{ entries: any[] }>('GET', `/v1/audit-log?kind=provisioning&orchestra=${created.body.id}&limit=100`);
    assert.equal(res.status, 200);
    const entries = [...res.body.entries].reverse(); // oldest first
    const steps = entries.filter((e) => e.kind === 'provisioning.step');
    assert.deepEqual(steps.map((e) => [e.detail.step, e.detail.ok]), STEPS.map((s) => [s, true]));
    assert.equal(entries.at(-1).kind, 'provisioning.completed');
    assert.equal(entries.at(-1).subdomain, 'vivace');
  });

  test('once active it is served through the proxy, in its own database as its own role', async () => {
    const t = await stack.issueToken('vivace');
    const c = new pg.Client(stack.clientConfig({ subdomain: 'vivace', token: t.token }));
    await c.connect();
    try {
      const r = await c.query('SELECT current_database() AS db, current_user AS usr');
      assert.deepEqual(r.rows[0], { db: 'sd_vivace', usr: 'sd_vivace' });
    } finally {
      await c.end();
    }
  });
});

describe('any failure rolls everything back and names the failed step', () => {
  test('an invalid subdomain or a reserved word is a 400 at validate, and nothing is recorded', async () => {
    for (const subdomain of ['Bad_Name', 'x', 'validate', 'import', '-dash']) {
      const res = await provision(stack.api, subdomain);
      assertFailedAt(res, 400, 'validate');
      assert.deepEqual(await recordsOf(subdomain), []);
    }
  });

  test('a taken subdomain is a 409 at validate, and the orchestra that has it is untouched', async () => {
    const before = (await central("SELECT * FROM orchestras WHERE subdomain = 'vivace'")).rows;
    assertFailedAt(await provision(stack.api, 'vivace'), 409, 'validate', /already taken/);
    assert.deepEqual((await central("SELECT * FROM orchestras WHERE subdomain = 'vivace'")).rows, before);
    assert.deepEqual(await onServer(stack.tenant, 'sd_vivace'), { role: true, database: true });
  });

  test('simultaneous requests for one subdomain: one orchestra is created, every other request is a 409 conflict', async () => {
    // Hold every INSERT into orchestras until all four requests have passed `validate`
    // (reads are not blocked), so that the unique index, not timing, decides.
    const lock = new pg.Client({ connectionString: stack.central.url() });
    await lock.connect();
    let answers: Array<ApiAnswer<any>>;
    try {
      await lock.query('BEGIN');
      await lock.query('LOCK TABLE orchestras IN EXCLUSIVE MODE');
      const pending = Promise.all([1, 2, 3, 4].map(() => provision(stack.api, 'crowded')));
      await eventually(
        async () =>
          (await central("SELECT count(*)::int AS n FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE 'INSERT INTO orchestras %'")).rows[0].n === 4,
      );
      await lock.query('COMMIT');
      answers = await pending;
    } finally {
      await lock.end();
    }
    const statuses = answers.map((a) => a.status).sort();
    assert.deepEqual(statuses, [201, 409, 409, 409], JSON.stringify(answers.map((a) => a.body)));
    for (const a of answers.filter((x) => x.status !== 201)) assertFailedAt(a, 409, 'record', /already taken/);
    assert.deepEqual(await recordsOf('crowded'), [{ status: 'active' }]);
    assert.deepEqual(await onServer(stack.tenant, 'sd_crowded'), { role: true, database: true });
  });

  test('a central database that refuses the record fails at record with 422', async () => {
    await central(`CREATE FUNCTION test_refuse_record() RETURNS trigger LANGUAGE plpgsql AS $$
      BEGIN IF NEW.subdomain = 'never-recorded' THEN RAISE EXCEPTION 'record refused by the test'; END IF; RETURN NEW; END $$;
      CREATE TRIGGER test_refuse_record BEFORE INSERT ON orchestras FOR EACH ROW EXECUTE FUNCTION test_refuse_record()`);
    try {
      assertFailedAt(await provision(stack.api, 'never-recorded'), 422, 'record', /record refused by the test/);
    } finally {
      await central('DROP TRIGGER test_refuse_record ON orchestras; DROP FUNCTION test_refuse_record()');
    }
    await assertNothingLeft('never-recorded');
    await assertAuditedFailure(stack.api, 'never-recorded', 'record');
  });

  test('a role sd_<subdomain> that already exists is a 409 at database, and the rollback leaves that role alone', async () => {
    await tenant('CREATE ROLE sd_squatted LOGIN');
    assertFailedAt(await provision(stack.api, 'squatted'), 409, 'database', /role sd_squatted already exists/);
    assert.deepEqual(await onServer(stack.tenant, 'sd_squatted'), { role: true, database: false });
    assert.deepEqual(await recordsOf('squatted'), []);
    await assertAuditedFailure(stack.api, 'squatted', 'database');
    await tenant('DROP ROLE sd_squatted');
  });

  test('a database sd_<subdomain> that already exists is a 409 at database, and the rollback leaves it alone', async () => {
    await tenant('CREATE DATABASE sd_occupied');
    assertFailedAt(await provision(stack.api, 'occupied'), 409, 'database', /database sd_occupied already exists/);
    assert.deepEqual(await onServer(stack.tenant, 'sd_occupied'), { role: false, database: true });
    assert.deepEqual(await recordsOf('occupied'), []);
    await tenant('DROP DATABASE sd_occupied');
  });

  test('a tenant admin that may not create roles fails at database with 422 and leaves nothing', async () => {
    await tenant("CREATE ROLE cannot_create_roles LOGIN CREATEDB PASSWORD 'admin-without-createrole'; GRANT CONNECT ON DATABASE postgres TO cannot_create_roles");
    const { cp, api } = await startControlPlane({ TENANT_SERVER_URL: `postgres://cannot_create_roles:admin-without-createrole@127.0.0.1:${stack.tenant.port}/postgres` });
    try {
      assertFailedAt(await provision(api, 'no-roles'), 422, 'database', /permission denied to create role/);
      await assertNothingLeft('no-roles');
      await assertAuditedFailure(api, 'no-roles', 'database');
    } finally {
      await stopControlPlane(cp);
    }
  });

  test('a tenant admin that may create roles but not databases: the role it had just created is dropped again', async () => {
    await tenant("CREATE ROLE cannot_create_dbs LOGIN CREATEROLE PASSWORD 'admin-without-createdb'; GRANT CONNECT ON DATABASE postgres TO cannot_create_dbs");
    const { cp, api } = await startControlPlane({ TENANT_SERVER_URL: `postgres://cannot_create_dbs:admin-without-createdb@127.0.0.1:${stack.tenant.port}/postgres` });
    try {
      assertFailedAt(await provision(api, 'no-dbs'), 422, 'database', /permission denied to create database/);
      await assertNothingLeft('no-dbs');
      await assertAuditedFailure(api, 'no-dbs', 'database');
    } finally {
      await stopControlPlane(cp);
    }
  });

  test('a migration that fails half-way fails at schema with 422; database, role and record are gone', async () => {
    const dir = schemaDirWith('1700000000001_half-way.sql', '-- Up Migration\nCREATE TABLE half_done (id integer);\nSELECT 1 / 0;\n\n-- Down Migration\nDROP TABLE half_done;\n');
    const { cp, api } = await startControlPlane({ ORCHESTRA_SCHEMA_DIR: dir });
    try {
      assertFailedAt(await provision(api, 'broken-score'), 422, 'schema', /division by zero/);
      await assertNothingLeft('broken-score');
      await assertAuditedFailure(api, 'broken-score', 'schema');
    } finally {
      await stopControlPlane(cp);
    }
  });

  test('a database another orchestra uses, reached under another host name, is a 409 at identity (same fingerprint)', async () => {
    const vivace = await upstreamOf('vivace');
    const alias = `postgres://${vivace.user}:${vivace.password}@localhost:${vivace.port}/${vivace.database}`;
    assertFailedAt(await provision(stack.api, 'vivace-twin', { databaseUrl: alias }), 409, 'identity', /fingerprint/);
    assert.deepEqual(await recordsOf('vivace-twin'), []);
    await assertAuditedFailure(stack.api, 'vivace-twin', 'identity');
    // the orchestra that owns it is untouched: its database, its role and its marker
    assert.deepEqual(await onServer(stack.tenant, 'sd_vivace'), { role: true, database: true });
    const marker = await tenant('SELECT subdomain FROM stagedoor_marker', [], 'sd_vivace');
    assert.deepEqual(marker.rows, [{ subdomain: 'vivace' }]);
  });

  test('the same database URL as another orchestra is a 409 at identity (same address)', async () => {
    const vivace = await upstreamOf('vivace');
    const same = `postgres://${vivace.user}:${vivace.password}@127.0.0.1:${vivace.port}/${vivace.database}`;
    assertFailedAt(await provision(stack.api, 'vivace-copy', { databaseUrl: same }), 409, 'identity', /address/);
    assert.deepEqual(await recordsOf('vivace-copy'), []);
  });

  test('an attached database that does not answer with the given credentials fails at identity with 422', async () => {
    const db = await makeDatabase('wrong_password', { closed: true });
    assertFailedAt(await provision(stack.api, 'wrong-password', { databaseUrl: db.url.replace(db.password, 'not-the-password') }), 422, 'identity', /password authentication failed/);
    assert.deepEqual(await recordsOf('wrong-password'), []);
    assert.deepEqual(await onServer(stack.tenant, 'wrong_password'), { role: false, database: true }, 'the attached database is never dropped');
  });

  test('an attached database marked as another orchestra’s fails at marker with 409, and its marker is kept', async () => {
    const db = await makeDatabase('marked_elsewhere', { closed: true });
    const owner = '00000000-0000-4000-8000-000000000001';
    await sql(
      db.url,
      `CREATE TABLE stagedoor_marker (singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton), orchestra_id uuid NOT NULL, subdomain text NOT NULL, written_at timestamptz NOT NULL DEFAULT now());
       INSERT INTO stagedoor_marker (orchestra_id, subdomain) VALUES ('${owner}', 'elsewhere')`,
    );
    assertFailedAt(await provision(stack.api, 'marked', { databaseUrl: db.url }), 409, 'marker', /another orchestra/);
    assert.deepEqual(await recordsOf('marked'), []);
    assert.deepEqual((await sql(db.url, 'SELECT orchestra_id::text AS id FROM stagedoor_marker')).rows, [{ id: owner }]);
    await assertAuditedFailure(stack.api, 'marked', 'marker');
  });

  test('an attached database every role may connect to fails at health with 409 (cross access), and can be attached once closed', async () => {
    const db = await makeDatabase('open_door'); // PUBLIC keeps CONNECT
    assertFailedAt(await provision(stack.api, 'open-door', { databaseUrl: db.url }), 409, 'health', /cross access/);
    assert.deepEqual(await recordsOf('open-door'), []);
    assert.deepEqual(await onServer(stack.tenant, 'open_door'), { role: false, database: true }, 'the attached database is never dropped');
    await assertAuditedFailure(stack.api, 'open-door', 'health');
    // Once the owner closes it, the same database attaches: the refused attempt left no claim on it.
    await tenant('REVOKE CONNECT ON DATABASE open_door FROM PUBLIC');
    assertCreated(await provision(stack.api, 'open-door', { databaseUrl: db.url }), 'attached');
  });

  test('a central database that refuses activation fails at activate, and database, role and record are gone', async () => {
    await central(`CREATE FUNCTION test_refuse_activation() RETURNS trigger LANGUAGE plpgsql AS $$
      BEGIN IF NEW.subdomain = 'never-active' AND NEW.status = 'active' THEN RAISE EXCEPTION 'activation refused by the test'; END IF; RETURN NEW; END $$;
      CREATE TRIGGER test_refuse_activation BEFORE UPDATE ON orchestras FOR EACH ROW EXECUTE FUNCTION test_refuse_activation()`);
    try {
      assertFailedAt(await provision(stack.api, 'never-active'), 422, 'activate', /activation refused by the test/);
    } finally {
      await central('DROP TRIGGER test_refuse_activation ON orchestras; DROP FUNCTION test_refuse_activation()');
    }
    await assertNothingLeft('never-active');
    await assertAuditedFailure(stack.api, 'never-active', 'activate');
  });
});

describe('a tenant server that refuses or goes away', () => {
  let other: TestPostgres;
  let cp: ControlPlane | undefined;
  let api: Api;

  before(async () => {
    // A second tenant server whose pg_hba.conf refuses every connection to one database name.
    other = await startTestPostgres({ extraHba: ['host sd_hba_refused all 127.0.0.1/32 reject', 'host sd_hba_refused all ::1/128 reject'] });
    ({ cp, api } = await startControlPlane({ TENANT_SERVER_URL: other.url() }));
  });
  after(async () => {
    await stopControlPlane(cp);
    await other?.stop();
  });

  test('a new database the admin cannot connect to fails at database, and the database, role and record are gone', async () => {
    assertFailedAt(await provision(api, 'hba-refused'), 422, 'database', /pg_hba\.conf rejects connection/);
    await assertNothingLeft('hba-refused', other);
    await assertAuditedFailure(api, 'hba-refused', 'database');
  });

  test('a stopped tenant server: the pre-flight says unreachable, and provisioning fails at database with 422 and records nothing', async () => {
    await other.stop();
    const pre = await api<any>('POST', '/v1/orchestras/validate', { subdomain: 'nowhere' });
    assert.equal(pre.body.ok, false);
    const reachable = pre.body.checks.find((c: any) => c.name === 'tenant_server_reachable');
    assert.equal(reachable.ok, false);
    assert.match(reachable.detail, /^unreachable/);
    assertFailedAt(await provision(api, 'nowhere'), 422, 'database', /ECONNREFUSED/);
    assert.deepEqual(await recordsOf('nowhere'), []);
    await assertAuditedFailure(api, 'nowhere', 'database');
  });

  test('the network to the tenant server failing half-way: what could not be dropped stays recorded, and the next start drops it', async () => {
    const path = await NetworkPath.to(stack.tenant.port);
    const env = { TENANT_SERVER_URL: `postgres://${stack.tenant.adminUser}:${stack.tenant.adminPassword}@127.0.0.1:${path.port}/postgres` };
    let first: ControlPlane | undefined;
    try {
      first = (await startControlPlane(env)).cp;
      // The network goes down right after the database step succeeded.
      await assert.rejects(
        first.provisioner.provision({ subdomain: 'cut-off', name: 'Cut Off' }, (s) => {
          if (s.step === 'database' && s.ok) path.cut();
        }),
        (e: unknown) => e instanceof ProvisioningError && e.step === 'lockdown' && e.status === 422,
      );
      await stopControlPlane(first);
      // The rollback could not reach the server: role and database are still there…
      assert.deepEqual(await onServer(stack.tenant, 'sd_cut_off'), { role: true, database: true });
      // …so the record that names them must be kept, or nothing would ever drop them.
      const kept = (await central("SELECT status, owns_database, upstream_user, upstream_database FROM orchestras WHERE subdomain = 'cut-off'")).rows;
      assert.deepEqual(kept, [{ status: 'provisioning', owns_database: true, upstream_user: 'sd_cut_off', upstream_database: 'sd_cut_off' }]);
      const failed = (await central("SELECT detail FROM audit_log WHERE kind = 'provisioning.failed' AND subdomain = 'cut-off'")).rows;
      assert.equal(failed.length, 1);
      assert.ok(failed[0].detail.leftovers.length >= 2, 'the audit entry lists what was left');
      // The network is back; the next start finishes the rollback.
      path.restore();
      await stopControlPlane((await startControlPlane(env)).cp);
      await assertNothingLeft('cut-off');
    } finally {
      await stopControlPlane(first);
      await path.close();
    }
  });
});

describe('a crash half-way is cleaned up at the next start', () => {
  test('orchestras left in provisioning lose their record, and the role and database stagedoor created, but never an attached database', async () => {
    // What a crash leaves: objects on the tenant server and a row in status provisioning naming them.
    await tenant("CREATE ROLE sd_crashed LOGIN PASSWORD 'x'; CREATE ROLE sd_half_crashed LOGIN PASSWORD 'x'");
    await tenant('CREATE DATABASE sd_crashed OWNER sd_crashed');
    const attached = await makeDatabase('crash_attached', { closed: true });
    await central(
      `INSERT INTO orchestras (id, subdomain, name, status, source, owns_database, upstream_user, upstream_database) VALUES
         (gen_random_uuid(), 'crashed', 'Crashed', 'provisioning', 'provisioned', true, 'sd_crashed', 'sd_crashed'),
         (gen_random_uuid(), 'half-crashed', 'Half Crashed', 'provisioning', 'provisioned', true, 'sd_half_crashed', NULL)`,
    );
    await central(
      `INSERT INTO orchestras (id, subdomain, name, status, source, owns_database, upstream_host, upstream_port, upstream_user, upstream_database)
       VALUES (gen_random_uuid(), 'crash-attached', 'Crash Attached', 'provisioning', 'attached', false, '127.0.0.1', $1, $2, 'crash_attached')`,
      [stack.tenant.port, attached.role],
    );
    const { cp } = await startControlPlane();
    await stopControlPlane(cp); // flushes its audit records
    await assertNothingLeft('crashed');
    await assertNothingLeft('half-crashed');
    assert.deepEqual(await recordsOf('crash-attached'), []);
    assert.deepEqual(await onServer(stack.tenant, 'crash_attached'), { role: false, database: true }, 'an attached database is not stagedoor’s to drop');
    assert.deepEqual(await onServer(stack.tenant, attached.role), { role: true, database: false });
    const audited = await central(
      "SELECT subdomain FROM audit_log WHERE kind = 'provisioning.cleaned_up' AND subdomain IN ('crashed', 'half-crashed', 'crash-attached') ORDER BY subdomain",
    );
    assert.deepEqual(audited.rows.map((r) => r.subdomain), ['crash-attached', 'crashed', 'half-crashed']);
  });
});

describe('attaching an existing database with databaseUrl', () => {
  test('the database is attached after the identity checks: source attached, schema applied as its own role, nothing of it dropped on delete', async () => {
    const db = await makeDatabase('brought_along', { closed: true });
    const res = await provision(stack.api, 'brought', { databaseUrl: db.url });
    assertCreated(res, 'attached');
    assert.deepEqual(res.body.steps.map((s: any) => s.step), STEPS);
    assert.deepEqual(res.body.upstream, { host: '127.0.0.1', port: stack.tenant.port, database: 'brought_along' });
    const owners = await sql(db.url, "SELECT DISTINCT tableowner FROM pg_tables WHERE schemaname = 'public'");
    assert.deepEqual(owners.rows, [{ tableowner: db.role }]);
    // the same database by address or by fingerprint, for another orchestra: 409
    assertFailedAt(await provision(stack.api, 'brought-again', { databaseUrl: db.url }), 409, 'identity', /address/);
    assertFailedAt(await provision(stack.api, 'brought-alias', { databaseUrl: db.alias }), 409, 'identity', /fingerprint/);
    // stagedoor did not create it, so it will not drop it
    const refused = await stack.api<any>('DELETE', '/v1/orchestras/brought?dropDatabase=true');
    assert.equal(refused.status, 422);
    assert.equal(refused.body.error.code, 'not_owned');
    assert.deepEqual(await onServer(stack.tenant, 'brought_along'), { role: false, database: true });
    assert.deepEqual(await recordsOf('brought'), [{ status: 'active' }], 'a refused delete deletes nothing');
    assert.equal((await stack.api('DELETE', '/v1/orchestras/brought')).status, 200);
    assert.deepEqual(await onServer(stack.tenant, 'brought_along'), { role: false, database: true });
    assert.equal(await directLogin({ user: db.role, password: db.password }, 'brought_along'), null);
  });
});

describe('pool databases (DATABASE_URL_POOL_n)', () => {
  let poolA: Awaited<ReturnType<typeof makeDatabase>>;
  let poolB: Awaited<ReturnType<typeof makeDatabase>>;
  let withTenant: { cp: ControlPlane; api: Api } | undefined;
  const poolEnv = (): Env => ({ DATABASE_URL_POOL_1: poolA.url, DATABASE_URL_POOL_2: poolB.url });
  const poolRows = async (): Promise<Array<{ db: string; subdomain: string | null; status: string | null }>> =>
    (
      await central(
        `SELECT split_part(p.pool_key, '/', 2) AS db, o.subdomain, o.status FROM pool_databases p LEFT JOIN orchestras o ON o.id = p.assigned_to
          WHERE p.pool_key LIKE '%/pool_%' ORDER BY 1`,
      )
    ).rows;

  before(async () => {
    poolA = await makeDatabase('pool_a', { closed: true });
    poolB = await makeDatabase('pool_b', { closed: true });
    // pool_a holds a table of the central set: whoever takes it first fails the health check.
    await tenant('CREATE TABLE signing_keys (kid text)', [], 'pool_a');
    withTenant = await startControlPlane(poolEnv());
  });
  after(async () => {
    await stopControlPlane(withTenant?.cp);
  });

  test('the pre-flight counts the pool databases left', async () => {
    const res = await withTenant!.api<any>('POST', '/v1/orchestras/validate', { subdomain: 'pool-one' });
    const left = res.body.checks.find((c: any) => c.name === 'pool_databases_left');
    assert.deepEqual({ ok: left.ok, detail: left.detail }, { ok: true, detail: '2 of 2 pool databases unassigned' });
  });

  test('a failed provisioning gives its pool database back, and the next orchestra is handed it', async () => {
    assertFailedAt(await provision(withTenant!.api, 'pool-sick'), 422, 'health', /central tables found.*signing_keys/);
    assert.deepEqual(await recordsOf('pool-sick'), []);
    assert.deepEqual(await poolRows(), [{ db: 'pool_a', subdomain: null, status: null }, { db: 'pool_b', subdomain: null, status: null }]);
    assert.deepEqual(await onServer(stack.tenant, 'pool_a'), { role: false, database: true }, 'a pool database is never dropped');
    await assertAuditedFailure(withTenant!.api, 'pool-sick', 'health');
    await tenant('DROP TABLE signing_keys', [], 'pool_a');
    const res = await provision(withTenant!.api, 'pool-one');
    assertCreated(res, 'pool');
    assert.equal(res.body.upstream.database, 'pool_a');
  });

  test('each pool database goes to one orchestra, and once none is left the tenant server is used', async () => {
    const two = await provision(withTenant!.api, 'pool-two');
    assertCreated(two, 'pool');
    assert.equal(two.body.upstream.database, 'pool_b');
    const three = await provision(withTenant!.api, 'pool-three');
    assertCreated(three, 'provisioned');
    assert.equal(three.body.upstream.database, 'sd_pool_three');
    assert.deepEqual(await poolRows(), [
      { db: 'pool_a', subdomain: 'pool-one', status: 'active' },
      { db: 'pool_b', subdomain: 'pool-two', status: 'active' },
    ]);
    const res = await withTenant!.api<any>('POST', '/v1/orchestras/validate', { subdomain: 'pool-four' });
    const left = res.body.checks.find((c: any) => c.name === 'pool_databases_left');
    assert.deepEqual({ ok: left.ok, detail: left.detail }, { ok: true, detail: '0 of 2 pool databases unassigned' });
  });

  test('deleting an orchestra does not give its pool database back, and a pool database is not stagedoor’s to drop', async () => {
    const refused = await withTenant!.api<any>('DELETE', '/v1/orchestras/pool-one?dropDatabase=true');
    assert.equal(refused.status, 422);
    assert.equal(refused.body.error.code, 'not_owned');
    assert.equal((await withTenant!.api('DELETE', '/v1/orchestras/pool-one')).status, 200);
    assert.deepEqual(await onServer(stack.tenant, 'pool_a'), { role: false, database: true });
    assert.deepEqual((await poolRows())[0], { db: 'pool_a', subdomain: 'pool-one', status: 'deleted' });
    const four = await provision(withTenant!.api, 'pool-four');
    assertCreated(four, 'provisioned');
    assert.equal(four.body.upstream.database, 'sd_pool_four');
  });

  test('without a tenant server, no pool database left is a 422 at database that says so', async () => {
    const { cp, api } = await startControlPlane({ ...poolEnv(), TENANT_SERVER_URL: '' });
    try {
      const pre = await api<any>('POST', '/v1/orchestras/validate', { subdomain: 'pool-none' });
      assert.equal(pre.body.ok, false);
      assert.equal(pre.body.checks.find((c: any) => c.name === 'pool_databases_left').ok, false);
      assertFailedAt(await provision(api, 'pool-none'), 422, 'database', /no pool databases left/);
      assert.deepEqual(await recordsOf('pool-none'), []);
    } finally {
      await stopControlPlane(cp);
    }
  });

  test('simultaneous provisionings never take one pool database twice', async () => {
    const c = await makeDatabase('pool_c', { closed: true });
    const d = await makeDatabase('pool_d', { closed: true });
    const { cp, api } = await startControlPlane({ TENANT_SERVER_URL: '', DATABASE_URL_POOL_1: c.url, DATABASE_URL_POOL_2: d.url });
    try {
      const answers = await Promise.all(['rush-1', 'rush-2', 'rush-3', 'rush-4'].map((s) => provision(api, s)));
      const won = answers.filter((a) => a.status === 201);
      assert.deepEqual(won.map((a) => a.body.upstream.database).sort(), ['pool_c', 'pool_d'], JSON.stringify(answers.map((a) => a.body)));
      for (const a of answers.filter((x) => x.status !== 201)) assertFailedAt(a, 422, 'database', /no pool databases left/);
    } finally {
      await stopControlPlane(cp);
    }
  });
});

describe('life cycle: PATCH and DELETE /v1/orchestras/:ref', () => {
  test('suspending refuses new sessions with 57P03, resuming lets them in again', async () => {
    assertCreated(await provision(stack.api, 'adagio'));
    const t = await stack.issueToken('adagio');
    const suspended = await stack.api<any>('PATCH', '/v1/orchestras/adagio', { status: 'suspended' });
    assert.equal(suspended.status, 200);
    assert.equal(suspended.body.status, 'suspended');
    assert.equal(await refusalOf(stack.clientConfig({ subdomain: 'adagio', token: t.token })), '57P03');
    const resumed = await stack.api<any>('PATCH', '/v1/orchestras/adagio', { status: 'active' });
    assert.equal(resumed.body.status, 'active');
    // The proxy learns of the change over its event stream, a connection of its own
    // that may deliver it just after this answer: the refusal above may still be cached.
    await eventually(async () => (await refusalOf(stack.clientConfig({ subdomain: 'adagio', token: t.token }))) === null);
  });

  test('maxConnections is set and cleared', async () => {
    assert.equal((await stack.api<any>('PATCH', '/v1/orchestras/adagio', { maxConnections: 3 })).body.maxConnections, 3);
    assert.equal((await stack.api<any>('GET', '/v1/orchestras/adagio')).body.maxConnections, 3);
    assert.equal((await stack.api<any>('PATCH', '/v1/orchestras/adagio', { maxConnections: null })).body.maxConnections, null);
    assert.equal((await stack.api<any>('PATCH', '/v1/orchestras/adagio', { maxConnections: 0 })).status, 400);
  });

  test('databaseUrl moves the orchestra after the same identity checks, and another orchestra’s database is a 409', async () => {
    const vivace = await upstreamOf('vivace');
    const before = (await central("SELECT * FROM orchestras WHERE subdomain = 'adagio'")).rows;
    for (const host of ['127.0.0.1', 'localhost']) {
      const shared = await stack.api<any>('PATCH', '/v1/orchestras/adagio', { databaseUrl: `postgres://${vivace.user}:${vivace.password}@${host}:${vivace.port}/${vivace.database}` });
      assert.equal(shared.status, 409, host);
      assert.equal(shared.body.error.code, 'database_shared');
    }
    assert.deepEqual((await central("SELECT * FROM orchestras WHERE subdomain = 'adagio'")).rows, before, 'a refused move changes nothing');
    const target = await makeDatabase('adagio_moved', { closed: true });
    const moved = await stack.api<any>('PATCH', '/v1/orchestras/adagio', { databaseUrl: target.url });
    assert.equal(moved.status, 200, JSON.stringify(moved.body));
    assert.deepEqual(moved.body.upstream, { host: '127.0.0.1', port: stack.tenant.port, database: 'adagio_moved' });
    const marker = await sql(target.url, 'SELECT subdomain FROM stagedoor_marker');
    assert.deepEqual(marker.rows, [{ subdomain: 'adagio' }]);
    // the moved orchestra's database is not stagedoor's any more: delete with dropDatabase is refused
    const refused = await stack.api<any>('DELETE', '/v1/orchestras/adagio?dropDatabase=true');
    assert.equal(refused.status, 422);
    assert.deepEqual(await onServer(stack.tenant, 'adagio_moved'), { role: false, database: true });
  });

  test('DELETE with dropDatabase=true drops the database and the role stagedoor created', async () => {
    assertCreated(await provision(stack.api, 'fine'));
    assert.deepEqual(await onServer(stack.tenant, 'sd_fine'), { role: true, database: true });
    const deleted = await stack.api<any>('DELETE', '/v1/orchestras/fine?dropDatabase=true');
    assert.equal(deleted.status, 200);
    assert.equal(deleted.body.status, 'deleted');
    assert.deepEqual(await onServer(stack.tenant, 'sd_fine'), { role: false, database: false });
    assert.equal((await stack.api('GET', '/v1/orchestras/fine')).status, 404);
  });
});

describe('two orchestras on one tenant server cannot reach each other', () => {
  let a: ParsedDatabaseUrl;
  let b: ParsedDatabaseUrl;

  before(async () => {
    assertCreated(await provision(stack.api, 'iso-a'));
    assertCreated(await provision(stack.api, 'iso-b'));
    a = await upstreamOf('iso-a');
    b = await upstreamOf('iso-b');
  });

  test('with its own upstream credentials, each role connects to its database and to no other (42501)', async () => {
    assert.equal(await directLogin(a, a.database), null);
    assert.equal(await directLogin(b, b.database), null);
    assert.equal(await directLogin(a, b.database), '42501');
    assert.equal(await directLogin(b, a.database), '42501');
    for (const other of ['bystander', 'postgres']) assert.equal(await directLogin(a, other), '42501', other);
  });

  test('through the proxy, a token of one orchestra opens nothing of the other', async () => {
    const ta = await stack.issueToken('iso-a');
    assert.equal(await refusalOf(stack.clientConfig({ subdomain: 'iso-a', token: ta.token, database: 'iso-b' })), '3D000');
    assert.equal(await refusalOf(stack.clientConfig({ subdomain: 'iso-a', token: ta.token, database: b.database })), '3D000');
    assert.equal(await refusalOf(stack.clientConfig({ subdomain: 'iso-b', token: ta.token })), '28P01');
    assert.equal(await refusalOf(stack.clientConfig({ subdomain: 'iso-a', token: ta.token })), null);
  });
});

describe('secrets', () => {
  const lines: string[] = [];
  let cp: ControlPlane | undefined;
  let api: Api;

  before(async () => {
    const log = createLogger({ role: 'control-plane' }, { level: 'debug', write: (line) => lines.push(line) });
    ({ cp, api } = await startControlPlane({}, log));
  });
  after(async () => {
    await stopControlPlane(cp);
  });

  test('no orchestra answer of the API carries an upstream user name or password', async () => {
    const attach = await makeDatabase('secret_attached', { closed: true });
    const answers: Array<ApiAnswer<any>> = [];
    answers.push(await provision(api, 'secretive'));
    answers.push(await provision(api, 'secret-attached', { databaseUrl: attach.url }));
    assertCreated(answers[0]!);
    assertCreated(answers[1]!, 'attached');
    const secretive = await upstreamOf('secretive');
    answers.push(await api('GET', '/v1/orchestras'));
    answers.push(await api('GET', '/v1/orchestras/secretive'));
    answers.push(await api('GET', '/v1/orchestras/secret-attached'));
    answers.push(await api('PATCH', '/v1/orchestras/secretive', { maxConnections: 5 }));
    answers.push(await api('POST', '/v1/orchestras/secretive/tokens', { name: 'probe' }));
    answers.push(await api('POST', '/v1/orchestras/validate', { subdomain: 'secretive' }));
    answers.push(await api('DELETE', '/v1/orchestras/secret-attached'));
    answers.push(await api('DELETE', '/v1/orchestras/secretive?dropDatabase=true'));
    for (const a of answers) {
      assert.ok(a.status < 300, JSON.stringify(a.body));
      const text = JSON.stringify(a.body);
      for (const secret of [secretive.password, attach.password]) assert.ok(!text.includes(secret), `a password in ${text}`);
      assert.ok(!text.includes(attach.role), `the attached user name in ${text}`);
      assert.doesNotMatch(text, GENERATED_PASSWORD);
      for (const k of keysOf(a.body)) assert.doesNotMatch(k, /user|password|secret|credential/i, `key ${k}`);
    }
    // every row of the list, of every orchestra in the central database
    const list = await api<any>('GET', '/v1/orchestras');
    assert.ok(list.body.orchestras.length > 5);
    for (const o of list.body.orchestras) assert.deepEqual(Object.keys(o.upstream ?? {}).sort(), o.upstream ? ['database', 'host', 'port'] : []);
  });

  test('no log line and no audit entry contains a generated role password, not even of a failed provisioning', async () => {
    // a provisioning that creates a role with a password, and then fails and is rolled back
    await central(`CREATE FUNCTION test_refuse_secret() RETURNS trigger LANGUAGE plpgsql AS $$
      BEGIN IF NEW.subdomain = 'secret-fails' AND NEW.status = 'active' THEN RAISE EXCEPTION 'refused by the test'; END IF; RETURN NEW; END $$;
      CREATE TRIGGER test_refuse_secret BEFORE UPDATE ON orchestras FOR EACH ROW EXECUTE FUNCTION test_refuse_secret()`);
    try {
      assertFailedAt(await provision(api, 'secret-fails'), 422, 'activate');
    } finally {
      await central('DROP TRIGGER test_refuse_secret ON orchestras; DROP FUNCTION test_refuse_secret()');
    }
    assertCreated(await provision(api, 'secret-kept'));
    const kept = await upstreamOf('secret-kept');
    await api('GET', '/v1/audit-log?limit=1'); // flush
    assert.ok(lines.length > 0, 'the logger captured lines');
    assert.ok(lines.some((l) => l.includes('provisioning failed and was rolled back')), 'the failure was logged');
    for (const line of lines) {
      assert.ok(!line.includes(kept.password), `password in log line ${line}`);
      assert.doesNotMatch(line, GENERATED_PASSWORD, `a generated password in log line ${line}`);
    }
    const audit = await central('SELECT * FROM audit_log');
    assert.ok(audit.rows.length > 0);
    for (const row of audit.rows) {
      const text = JSON.stringify(row);
      assert.ok(!text.includes(kept.password), `password in audit entry ${text}`);
      assert.doesNotMatch(text, GENERATED_PASSWORD, `a generated password in audit entry ${text}`);
    }
  });
});

describe('stagedoor migrate', () => {
  const env = (dir?: string): Record<string, string | undefined> => ({
    CENTRAL_DATABASE_URL: stack.env.CENTRAL_DATABASE_URL,
    ENCRYPTION_KEY: stack.env.ENCRYPTION_KEY,
    ADMIN_TOKEN: stack.env.ADMIN_TOKEN,
    ORCHESTRA_SCHEMA_DIR: dir,
  });

  test('--orchestras brings every active orchestra database to the latest orchestra set, as its own role, with a result for each', async () => {
    assertCreated(await provision(stack.api, 'resting'));
    assert.equal((await stack.api('PATCH', '/v1/orchestras/resting', { status: 'suspended' })).status, 200);
    const dir = schemaDirWith('1700000000001_venues.sql', '-- Up Migration\nCREATE TABLE venues (id serial PRIMARY KEY, name text NOT NULL);\n\n-- Down Migration\nDROP TABLE venues;\n');
    const active = (await central("SELECT subdomain FROM orchestras WHERE status = 'active' AND upstream_host IS NOT NULL ORDER BY subdomain")).rows.map((r) => r.subdomain as string);
    assert.ok(active.length >= 5);

    const run = await runCli(['migrate', '--orchestras', '--json'], env(dir));
    assert.equal(run.code, 0, run.stderr + run.stdout);
    const results = JSON.parse(run.stdout).results as Array<{ subdomain: string; ok: boolean; applied: string[]; error?: string }>;
    assert.deepEqual(results.map((r) => r.subdomain).sort(), active);
    for (const r of results) assert.deepEqual({ ...r }, { subdomain: r.subdomain, ok: true, applied: ['1700000000001_venues'] });
    for (const subdomain of active) {
      const u = await upstreamOf(subdomain);
      const owner = await sql(stack.tenant.url(u.database), "SELECT tableowner FROM pg_tables WHERE tablename = 'venues'");
      assert.deepEqual(owner.rows, [{ tableowner: u.user }], subdomain);
    }
    const resting = await sql(stack.tenant.url('sd_resting'), "SELECT count(*)::int AS n FROM pg_tables WHERE tablename = 'venues'");
    assert.equal(resting.rows[0].n, 0, 'a suspended orchestra is left alone');

    const again = await runCli(['migrate', '--orchestras', '--json'], env(dir));
    assert.equal(again.code, 0, again.stderr);
    for (const r of JSON.parse(again.stdout).results) assert.deepEqual(r.applied, [], r.subdomain);
  });

  test('without --orchestras it applies the central set, and an up-to-date central database exits 0', async () => {
    const run = await runCli(['migrate'], env());
    assert.equal(run.code, 0, run.stderr);
    assert.match(run.stdout, /central database is up to date/);
  });
});

describe('what a provisioning costs', () => {
  test('ten provisionings in a row, timed end to end through the API', async () => {
    const ms: number[] = [];
    const perStep = new Map<string, number[]>();
    for (let i = 0; i < 10; i++) {
      const t0 = performance.now();
      const res = await provision(stack.api, `tempo-${i}`);
      ms.push(performance.now() - t0);
      assertCreated(res);
      for (const s of res.body.steps) perStep.set(s.step, [...(perStep.get(s.step) ?? []), s.ms]);
    }
    const m = Math.round(median(ms));
    console.log(`provisioning median ms: ${m}`);
    console.log(`provisioning median ms per step: ${[...perStep].map(([s, xs]) => `${s}=${median(xs)}`).join(' ')}`);
    assert.ok(m > 0);
  });
});
