// The provisioning pipeline (issue "Provisioning done right"): an orchestra
// becomes `active` only after its database is proven to be its own. Every step
// is audited with its outcome, and any failure undoes everything done so far
// (database, role, pool assignment, record) before answering.

import { randomUUID } from 'node:crypto';
import pg from 'pg';
import type { Logger } from '../common/log.js';
import type { AuditLog } from './audit-log.js';
import type { CentralStore, OrchestraRow } from './central-store.js';
import type { EventSink } from './event-bus.js';
import { applyMigrations, existingTables, type MigrationSet } from './migrations.js';
import type { DatabasePool } from './database-pool.js';
import { TenantServer } from './tenant-server.js';
import { parseDatabaseUrl, readFingerprint, withClient, type ParsedDatabaseUrl } from './upstream-identity.js';
import { SUBDOMAIN_PATTERN } from '../common/internal-api.js';

export const RESERVED_SUBDOMAINS = new Set(['validate', 'import']);

export type StepName = 'validate' | 'record' | 'database' | 'lockdown' | 'identity' | 'schema' | 'marker' | 'health' | 'activate';

export class ProvisioningError extends Error {
  /** What the rollback could not undo (kept for the clean-up at the next start); empty when it finished. */
  leftovers: string[] = [];

  constructor(
    readonly step: StepName,
    readonly status: 400 | 409 | 422 | 503,
    message: string,
  ) {
    super(message);
  }
}

export interface StepReport {
  step: StepName;
  ok: boolean;
  ms: number;
  detail?: string;
}

export interface ProvisionRequest {
  subdomain: string;
  name: string;
  databaseUrl?: string;
}

export interface ProvisioningDeps {
  store: CentralStore;
  audit: AuditLog;
  bus: EventSink;
  log: Logger;
  tenant: TenantServer | null;
  /** DATABASE_URL_POOL_n entries, used before the tenant server when configured */
  databasePool: DatabasePool | null;
  /** stagedoor created the tenant server (dev): lock down its other databases too */
  managesTenantServer: boolean;
  orchestraSet: MigrationSet;
  centralSet: MigrationSet;
}

/** Work done so far, undone in reverse on failure. */
interface Undo {
  label: string;
  run: () => Promise<void>;
}

export class Provisioner {
  constructor(private readonly d: ProvisioningDeps) {}

  async provision(req: ProvisionRequest, onStep: (r: StepReport) => void = () => {}): Promise<OrchestraRow> {
    const undo: Undo[] = [];
    const id = randomUUID();
    const steps: StepReport[] = [];
    const run = async <T>(step: StepName, fn: () => Promise<T>): Promise<T> => {
      const t0 = Date.now();
      try {
        const v = await fn();
        const r = { step, ok: true, ms: Date.now() - t0 };
        steps.push(r);
        onStep(r);
        this.d.audit.record({ kind: 'provisioning.step', orchestraId: id, subdomain: req.subdomain, reason: `${step}: ok`, detail: { step, ok: true, ms: r.ms } });
        return v;
      } catch (e) {
        const err = e instanceof ProvisioningError ? e : new ProvisioningError(step, 422, (e as Error).message);
        const r = { step, ok: false, ms: Date.now() - t0, detail: err.message };
        steps.push(r);
        onStep(r);
        this.d.audit.record({ kind: 'provisioning.step', orchestraId: id, subdomain: req.subdomain, reason: `${step}: ${err.message}`, detail: { step, ok: false, ms: r.ms, error: err.message } });
        throw err;
      }
    };

    try {
      await run('validate', () => this.validateRequest(req));
      await run('record', async () => {
        try {
          await this.d.store.insert({ id, subdomain: req.subdomain, name: req.name, status: 'provisioning', source: req.databaseUrl ? 'attached' : 'provisioned' });
        } catch (e) {
          // Two requests for one subdomain can both pass `validate`; the unique index
          // decides, and the loser's answer is the same conflict as at `validate`.
          if ((e as { code?: string }).code === '23505') throw new ProvisioningError('record', 409, `subdomain "${req.subdomain}" is already taken`);
          throw e;
        }
        undo.push({ label: 'record', run: () => this.d.store.remove(id) });
      });
      const { upstream, source } = await run('database', () => this.obtainDatabase(id, req, undo));
      if (source === 'pool') await this.d.store.pool.query("UPDATE orchestras SET source = 'pool' WHERE id = $1", [id]);
      await run('lockdown', async () => {
        if (this.d.managesTenantServer && this.d.tenant && source === 'provisioned') await this.d.tenant.revokePublicConnectEverywhere();
      });
      const { canonicalAddress, fingerprint } = await run('identity', () => this.checkIdentity(id, upstream));
      await this.d.store.setUpstream(id, upstream, { fingerprint, ownsDatabase: source === 'provisioned' });
      await run('schema', () => applyMigrations(urlOf(upstream), this.d.orchestraSet, this.d.log));
      await run('marker', () => writeMarker(upstream, id, req.subdomain));
      // An attached or pool database outlives a failed provisioning: a marker left
      // naming this (rolled-back) orchestra would refuse it to every later one.
      if (source !== 'provisioned') undo.push({ label: 'marker', run: () => removeMarker(upstream, id) });
      await run('health', () => this.healthCheck(id, upstream, { canonicalAddress, fingerprint }));
      const row = await run('activate', () => this.d.store.update(id, { status: 'active' }));
      this.d.audit.record({ kind: 'provisioning.completed', orchestraId: id, subdomain: req.subdomain, detail: { steps } });
      this.d.bus.publish({ type: 'orchestra-changed', orchestraId: id, subdomain: req.subdomain });
      return row;
    } catch (e) {
      const leftovers = await this.rollback(undo);
      const err = e instanceof ProvisioningError ? e : new ProvisioningError('validate', 422, (e as Error).message);
      err.leftovers = leftovers;
      this.d.audit.record({
        kind: 'provisioning.failed',
        orchestraId: id,
        subdomain: req.subdomain,
        reason: `${err.step}: ${err.message}`,
        detail: { steps, rolledBack: undo.map((u) => u.label).reverse(), leftovers },
      });
      this.d.log.warn('provisioning failed and was rolled back', { subdomain: req.subdomain, step: err.step, error: err.message, leftovers });
      throw err;
    }
  }

  /** Pre-flight answers without changing anything. */
  async validate(subdomain: string): Promise<{ ok: boolean; checks: Array<{ name: string; ok: boolean; detail: string }> }> {
    const checks: Array<{ name: string; ok: boolean; detail: string }> = [];
    const valid = SUBDOMAIN_PATTERN.test(subdomain) && !RESERVED_SUBDOMAINS.has(subdomain);
    checks.push({ name: 'subdomain_valid', ok: valid, detail: valid ? 'ok' : 'must match ^[a-z][a-z0-9-]{1,62}$ and not be a reserved word' });
    const taken = valid ? await this.d.store.find(subdomain) : null;
    checks.push({ name: 'subdomain_free', ok: valid && !taken, detail: taken ? 'already used by an orchestra' : valid ? 'free' : 'not checked' });
    if (this.d.tenant) {
      try {
        const cap = await this.d.tenant.capacity();
        const room = cap.maxConnections - cap.reserved - cap.inUse;
        checks.push({ name: 'tenant_server_reachable', ok: true, detail: 'reachable' });
        checks.push({ name: 'tenant_server_room', ok: room >= 5, detail: `${room} connections free of ${cap.maxConnections}` });
      } catch (e) {
        checks.push({ name: 'tenant_server_reachable', ok: false, detail: `unreachable: ${(e as Error).message}` });
      }
    } else {
      checks.push({ name: 'tenant_server_reachable', ok: false, detail: 'no TENANT_SERVER_URL configured: only databaseUrl attachments are possible' });
    }
    if (this.d.databasePool) {
      const { total, free } = await this.d.databasePool.available();
      checks.push({ name: 'pool_databases_left', ok: free > 0 || this.d.tenant !== null, detail: `${free} of ${total} pool databases unassigned` });
    }
    const sharing = await this.existingSharing();
    checks.push({ name: 'no_existing_sharing', ok: sharing === 0, detail: sharing === 0 ? 'no orchestras share a database' : `${sharing} orchestra(s) share a database with another (see GET /v1/audits/isolation)` });
    return { ok: checks.every((c) => c.ok), checks };
  }

  private async existingSharing(): Promise<number> {
    const res = await this.d.store.pool.query<{ n: string }>(
      `SELECT count(*)::text AS n FROM orchestras a
        WHERE a.status <> 'deleted' AND EXISTS (
          SELECT 1 FROM orchestras b WHERE b.id <> a.id AND b.status <> 'deleted'
             AND ((a.canonical_address IS NOT NULL AND a.canonical_address = b.canonical_address)
               OR (a.fingerprint IS NOT NULL AND a.fingerprint = b.fingerprint)))`,
    );
    return Number(res.rows[0]?.n ?? 0);
  }

  private async validateRequest(req: ProvisionRequest): Promise<void> {
    if (!SUBDOMAIN_PATTERN.test(req.subdomain)) throw new ProvisioningError('validate', 400, 'subdomain must match ^[a-z][a-z0-9-]{1,62}$');
    if (RESERVED_SUBDOMAINS.has(req.subdomain)) throw new ProvisioningError('validate', 400, `"${req.subdomain}" is a reserved word`);
    if (await this.d.store.find(req.subdomain)) throw new ProvisioningError('validate', 409, `subdomain "${req.subdomain}" is already taken`);
    if (!req.databaseUrl && !this.d.tenant && !this.d.databasePool) {
      throw new ProvisioningError('validate', 422, 'no tenant server (TENANT_SERVER_URL) or pool (DATABASE_URL_POOL_n) configured: give a databaseUrl');
    }
  }

  private async obtainDatabase(id: string, req: ProvisionRequest, undo: Undo[]): Promise<{ upstream: ParsedDatabaseUrl; source: 'attached' | 'pool' | 'provisioned' }> {
    if (req.databaseUrl) {
      try {
        return { upstream: parseDatabaseUrl(req.databaseUrl), source: 'attached' };
      } catch (e) {
        throw new ProvisioningError('database', 400, `databaseUrl: ${(e as Error).message}`);
      }
    }
    const pool = this.d.databasePool;
    if (pool) {
      const taken = await pool.take(id);
      if (taken) {
        undo.push({ label: 'pool assignment', run: () => pool.giveBack(taken.key, id) });
        return { upstream: taken.upstream, source: 'pool' };
      }
      if (!this.d.tenant) throw new ProvisioningError('database', 422, 'no pool databases left (DATABASE_URL_POOL_n) and no tenant server configured');
    }
    const tenant = this.d.tenant!;
    const { role, database } = TenantServer.namesFor(req.subdomain);
    if (await tenant.roleExists(role)) throw new ProvisioningError('database', 409, `role ${role} already exists on the tenant server`);
    if (await tenant.databaseExists(database)) throw new ProvisioningError('database', 409, `database ${database} already exists on the tenant server`);
    // Each object is recorded as ours the moment it exists, so a crash between
    // two steps is cleaned up at the next start without guessing by name.
    const password = await tenant.createRole(role);
    undo.push({ label: 'role', run: () => tenant.dropRole(role) });
    await this.d.store.pool.query('UPDATE orchestras SET upstream_user = $2, owns_database = true WHERE id = $1', [id, role]);
    // Registered the moment CREATE DATABASE succeeds, not when createDatabase returns:
    // a failure in its later statements must drop the database too (else the
    // role cannot be dropped either, and nothing remembers them).
    await tenant.createDatabase(database, role, async () => {
      undo.push({ label: 'database', run: () => tenant.dropDatabase(database) });
      await this.d.store.pool.query('UPDATE orchestras SET upstream_database = $2 WHERE id = $1', [id, database]);
    });
    return { upstream: { host: tenant.admin.host, port: tenant.admin.port, database, user: role, password, sslmode: tenant.admin.sslmode }, source: 'provisioned' };
  }

  private async checkIdentity(id: string, upstream: ParsedDatabaseUrl): Promise<{ canonicalAddress: string; fingerprint: string }> {
    const canonicalAddress = await this.d.store.canonicalAddress(upstream);
    let fingerprint: string;
    try {
      fingerprint = await withClient(upstream, readFingerprint);
    } catch (e) {
      throw new ProvisioningError('identity', 422, `the database does not answer with its own credentials: ${(e as Error).message}`);
    }
    const conflicts = await this.d.store.conflicts({ canonicalAddress, fingerprint }, id);
    if (conflicts.length > 0) {
      const by = [...new Set(conflicts.map((c) => c.by))].join(' and ');
      throw new ProvisioningError('identity', 409, `this database is already assigned to another orchestra (same ${by})`);
    }
    return { canonicalAddress, fingerprint };
  }

  private async healthCheck(id: string, upstream: ParsedDatabaseUrl, identity: { canonicalAddress: string; fingerprint: string }): Promise<void> {
    const { fingerprint } = identity;
    await withClient(upstream, async (c) => {
      const expected = this.d.orchestraSet.tables;
      const present = await existingTables(c, expected);
      const absent = expected.filter((t) => !present.includes(t));
      if (absent.length) throw new ProvisioningError('health', 422, `orchestra tables missing: ${absent.join(', ')}`);
      const leaked = await existingTables(c, this.d.centralSet.tables);
      if (leaked.length) throw new ProvisioningError('health', 422, `central tables found in the orchestra database: ${leaked.join(', ')}`);
      const fp = await readFingerprint(c);
      if (fp !== fingerprint) throw new ProvisioningError('health', 422, 'the database identity changed during provisioning');
      const cross = await crossAccess(c, this.d.store, id, fingerprint);
      if (cross.length) throw new ProvisioningError('health', 409, `cross access: ${cross.join('; ')}`);
    });
    // Again at the end: another orchestra may have claimed this database meanwhile.
    const conflicts = await this.d.store.conflicts(identity, id);
    if (conflicts.length) throw new ProvisioningError('health', 409, 'this database is already assigned to another orchestra');
  }

  private async rollback(undo: Undo[]): Promise<string[]> {
    const leftovers: string[] = [];
    for (const u of [...undo].reverse()) {
      if (u.label === 'record' && leftovers.some((l) => l.startsWith('role:') || l.startsWith('database:'))) {
        // The record (status provisioning, upstream_user/upstream_database, owns_database)
        // is the only note of what could not be dropped: keep it, so that
        // cleanUpInterrupted drops them at the next start.
        leftovers.push('record: kept until the role and database are dropped at the next start');
        continue;
      }
      try {
        await u.run();
      } catch (e) {
        leftovers.push(`${u.label}: ${(e as Error).message}`);
        this.d.log.error('rollback step failed', { step: u.label, error: e });
      }
    }
    return leftovers;
  }

  /** Orchestras left in `provisioning` by a crash: undo what we can and remove the record. */
  async cleanUpInterrupted(): Promise<number> {
    const res = await this.d.store.pool.query<OrchestraRow>("SELECT * FROM orchestras WHERE status = 'provisioning'");
    let cleaned = 0;
    for (const row of res.rows) {
      try {
        if (this.d.tenant && row.owns_database) {
          if (row.upstream_database) await this.d.tenant.dropDatabase(row.upstream_database);
          if (row.upstream_user) await this.d.tenant.dropRole(row.upstream_user);
        }
      } catch (e) {
        // Keep the record: it is the only note of what to drop, so the next start retries.
        this.d.log.error('could not clean up an interrupted provisioning; will retry at next start', { subdomain: row.subdomain, error: e });
        continue;
      }
      await this.d.store.remove(row.id);
      cleaned++;
      this.d.audit.record({ kind: 'provisioning.cleaned_up', orchestraId: row.id, subdomain: row.subdomain, reason: 'interrupted provisioning removed at start' });
    }
    return cleaned;
  }
}


export function urlOf(u: ParsedDatabaseUrl): string {
  const host = u.host.includes(':') ? `[${u.host}]` : u.host;
  const ssl = u.sslmode === 'disable' || u.sslmode === 'prefer' || u.sslmode === 'allow' ? '' : `?sslmode=no-verify`;
  return `postgres://${encodeURIComponent(u.user)}:${encodeURIComponent(u.password)}@${host}:${u.port}/${encodeURIComponent(u.database)}${ssl}`;
}

/**
 * The marker says, inside the orchestra database itself, which orchestra it
 * belongs to. A marker naming another orchestra means this database is
 * already someone's, whatever the central database says.
 */
export async function writeMarker(u: ParsedDatabaseUrl, orchestraId: string, subdomain: string): Promise<void> {
  await withClient(u, async (c) => {
    await c.query(`CREATE TABLE IF NOT EXISTS stagedoor_marker (
      singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
      orchestra_id uuid NOT NULL, subdomain text NOT NULL, written_at timestamptz NOT NULL DEFAULT now())`);
    const existing = await c.query<{ orchestra_id: string }>('SELECT orchestra_id::text FROM stagedoor_marker');
    const owner = existing.rows[0]?.orchestra_id;
    if (owner && owner !== orchestraId) throw new ProvisioningError('marker', 409, 'the database is marked as belonging to another orchestra');
    await c.query(
      `INSERT INTO stagedoor_marker (orchestra_id, subdomain) VALUES ($1, $2)
       ON CONFLICT (singleton) DO UPDATE SET subdomain = EXCLUDED.subdomain, written_at = now()`,
      [orchestraId, subdomain],
    );
  });
}

/** Undoes writeMarker for an orchestra that was rolled back (a marker naming someone else is left alone). */
export async function removeMarker(u: ParsedDatabaseUrl, orchestraId: string): Promise<void> {
  await withClient(u, async (c) => {
    await c.query('DELETE FROM stagedoor_marker WHERE orchestra_id = $1', [orchestraId]);
  });
}

/**
 * Cross access on one server: can another orchestra's role connect to this
 * database, or this role to another orchestra's database? Only orchestras on
 * the same physical server (same system_identifier) can be reached at all.
 */
export async function crossAccess(c: pg.ClientBase, store: CentralStore, id: string, fingerprint: string): Promise<string[]> {
  const sysid = fingerprint.split('/')[0];
  const others = (await store.list()).filter((o) => o.id !== id && o.fingerprint?.split('/')[0] === sysid && o.upstream_user && o.upstream_database);
  const problems: string[] = [];
  const me = await c.query<{ rolsuper: boolean; db: string; usr: string }>(
    'SELECT r.rolsuper, pg_catalog.current_database() AS db, pg_catalog.current_user() AS usr FROM pg_catalog.pg_roles r WHERE r.rolname = pg_catalog.current_user()',
  );
  if (me.rows[0]?.rolsuper) problems.push('the orchestra role is a superuser and can connect to every database');
  for (const o of others) {
    const res = await c.query<{ them_to_me: boolean | null; me_to_them: boolean | null }>(
      `SELECT CASE WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = $1)
                   THEN pg_catalog.has_database_privilege($1, pg_catalog.current_database(), 'CONNECT') END AS them_to_me,
              CASE WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_database WHERE datname = $2)
                   THEN pg_catalog.has_database_privilege(pg_catalog.current_user(), $2, 'CONNECT') END AS me_to_them`,
      [o.upstream_user, o.upstream_database],
    );
    const r = res.rows[0];
    if (r?.them_to_me && o.upstream_user !== me.rows[0]?.usr) problems.push(`the role of orchestra ${o.subdomain} can connect to this database`);
    if (r?.me_to_them && o.upstream_database !== me.rows[0]?.db) problems.push(`this role can connect to the database of orchestra ${o.subdomain}`);
  }
  return problems;
}
