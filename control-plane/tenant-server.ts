// What the control plane does on a tenant server with its admin connection:
// create and drop an orchestra's role and database, lock databases down, and
// answer the pre-flight questions (reachable, room left).

import { randomBytes } from 'node:crypto';
import pg from 'pg';
import { parseDatabaseUrl, withClient, type ParsedDatabaseUrl } from './upstream-identity.js';

export interface CreatedDatabase {
  role: string;
  password: string;
  database: string;
}

/**
 * Two sessions changing one database's ACL at the same time make the second fail
 * with "tuple concurrently updated" (XX000), so simultaneous provisionings failed
 * each other's `lockdown` (and a new database's own REVOKE). Every database ACL
 * change made here holds this session-level advisory lock; it is released when
 * the admin connection ends.
 */
const DATABASE_ACL_LOCK = 'SELECT pg_catalog.pg_advisory_lock(7265391042)';

export class TenantServer {
  readonly admin: ParsedDatabaseUrl;

  constructor(adminUrl: string) {
    this.admin = parseDatabaseUrl(adminUrl);
  }

  withAdmin<T>(fn: (c: pg.Client) => Promise<T>, database = this.admin.database): Promise<T> {
    return withClient({ ...this.admin, database }, fn);
  }

  /** Names are derived from the subdomain so an operator can recognise them; the prefix keeps them apart from anything else on the server. */
  static namesFor(subdomain: string): { role: string; database: string } {
    const base = `sd_${subdomain.replace(/-/g, '_')}`;
    return { role: base, database: base };
  }

  async createRole(role: string): Promise<string> {
    // hex only: nothing in it needs quoting, and it is never logged
    const password = randomBytes(24).toString('hex');
    await this.withAdmin(async (c) => {
      await c.query(
        `CREATE ROLE ${pg.escapeIdentifier(role)} LOGIN PASSWORD ${pg.escapeLiteral(password)}
           NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS NOINHERIT`,
      );
    });
    return password;
  }

  /** `onCreated` runs as soon as the database exists, before anything else here can fail, so the caller can undo it. */
  async createDatabase(database: string, owner: string, onCreated: () => Promise<void> = async () => {}): Promise<void> {
    await this.withAdmin(async (c) => {
      await c.query(`CREATE DATABASE ${pg.escapeIdentifier(database)} OWNER ${pg.escapeIdentifier(owner)} TEMPLATE template0 ENCODING 'UTF8'`);
      await onCreated();
      await c.query(DATABASE_ACL_LOCK);
      // Only the owner may connect: PUBLIC holds CONNECT on every new database by default.
      await c.query(`REVOKE ALL ON DATABASE ${pg.escapeIdentifier(database)} FROM PUBLIC`);
      await c.query(`GRANT CONNECT, TEMPORARY ON DATABASE ${pg.escapeIdentifier(database)} TO ${pg.escapeIdentifier(owner)}`);
    });
    // A new database's public schema is usable by PUBLIC on old servers; keep it to the owner.
    await this.withAdmin(async (c) => {
      await c.query(`REVOKE CREATE ON SCHEMA public FROM PUBLIC`);
      await c.query(`ALTER SCHEMA public OWNER TO ${pg.escapeIdentifier(owner)}`);
    }, database);
  }

  /** When stagedoor manages the server (dev): no database but the templates stays open to PUBLIC. */
  async revokePublicConnectEverywhere(): Promise<string[]> {
    return this.withAdmin(async (c) => {
      // The admin database is closed too (it was skipped, leaving every orchestra role
      // able to log in to it). The admin keeps its way in: a superuser or the owner
      // needs no PUBLIC grant, and a REVOKE by anyone else revokes nothing.
      await c.query(DATABASE_ACL_LOCK); // before listing: what another lockdown closed meanwhile is not listed
      const res = await c.query<{ datname: string }>(
        `SELECT d.datname FROM pg_catalog.pg_database d
          WHERE NOT d.datistemplate
            AND pg_catalog.has_database_privilege('public', d.oid, 'CONNECT')`,
      );
      const closed: string[] = [];
      for (const r of res.rows) {
        try {
          await c.query(`REVOKE CONNECT ON DATABASE ${pg.escapeIdentifier(r.datname)} FROM PUBLIC`);
          closed.push(r.datname);
        } catch (e) {
          // Dropped by someone else since the listing: nothing left to close.
          if ((e as { code?: string }).code !== '3D000') throw e;
        }
      }
      return closed;
    });
  }

  async dropDatabase(database: string): Promise<void> {
    await this.withAdmin(async (c) => {
      // Sessions still connected would block the drop (Postgres 13+ can force it).
      await c.query(`DROP DATABASE IF EXISTS ${pg.escapeIdentifier(database)} WITH (FORCE)`);
    });
  }

  async dropRole(role: string): Promise<void> {
    await this.withAdmin(async (c) => {
      await c.query(`DROP ROLE IF EXISTS ${pg.escapeIdentifier(role)}`);
    });
  }

  async roleExists(role: string): Promise<boolean> {
    return this.withAdmin(async (c) => (await c.query('SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = $1', [role])).rowCount === 1);
  }

  async databaseExists(database: string): Promise<boolean> {
    return this.withAdmin(async (c) => (await c.query('SELECT 1 FROM pg_catalog.pg_database WHERE datname = $1', [database])).rowCount === 1);
  }

  /** Pre-flight facts: connections in use against max_connections (disk is not visible over SQL). */
  async capacity(): Promise<{ maxConnections: number; inUse: number; reserved: number }> {
    return this.withAdmin(async (c) => {
      const res = await c.query<{ max: string; used: string; reserved: string }>(
        `SELECT current_setting('max_connections') AS max,
                (SELECT count(*) FROM pg_catalog.pg_stat_activity)::text AS used,
                current_setting('superuser_reserved_connections') AS reserved`,
      );
      const r = res.rows[0]!;
      return { maxConnections: Number(r.max), inUse: Number(r.used), reserved: Number(r.reserved) };
    });
  }
}
