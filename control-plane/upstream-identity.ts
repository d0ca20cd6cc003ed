// The physical identity of an upstream database: the server's
// system_identifier plus the database's OID and name. Two URLs that differ (a
// DNS alias, a pooler and a direct host) but reach one database have the same
// fingerprint. Read with schema-qualified pg_catalog calls so that no
// search_path or start-up option set by the URL can change the answer.

import pg from 'pg';

export async function readFingerprint(client: pg.ClientBase): Promise<string> {
  const res = await client.query<{ sysid: string; oid: string; datname: string }>(
    `SELECT (pg_catalog.pg_control_system()).system_identifier::text AS sysid,
            d.oid::text AS oid, d.datname::text AS datname
       FROM pg_catalog.pg_database d
      WHERE d.datname OPERATOR(pg_catalog.=) pg_catalog.current_database()`,
  );
  const row = res.rows[0];
  if (!row) throw new Error('could not read the database identity');
  return `${row.sysid}/${row.oid}/${row.datname}`;
}

export interface ParsedDatabaseUrl {
  host: string;
  port: number;
  database: string;
  user: string;
  password: string;
  sslmode: 'disable' | 'allow' | 'prefer' | 'require' | 'verify-ca' | 'verify-full';
}

const SSLMODES = new Set(['disable', 'allow', 'prefer', 'require', 'verify-ca', 'verify-full']);

/** postgres://user:password@host:port/database?sslmode=… — credentials and other options are not identity. */
export function parseDatabaseUrl(raw: string): ParsedDatabaseUrl {
  let u: URL;
  try {
    u = new URL(raw);
  } catch {
    throw new Error('not a valid postgres:// URL');
  }
  if (u.protocol !== 'postgres:' && u.protocol !== 'postgresql:') throw new Error('the URL must start with postgres:// or postgresql://');
  const database = decodeURIComponent(u.pathname.replace(/^\//, ''));
  if (!u.hostname) throw new Error('the URL has no host');
  if (!database) throw new Error('the URL has no database name');
  const sslmode = u.searchParams.get('sslmode') ?? 'prefer';
  if (!SSLMODES.has(sslmode)) throw new Error(`unsupported sslmode "${sslmode}"`);
  return {
    host: u.hostname.replace(/^\[(.*)\]$/, '$1'),
    port: u.port ? Number(u.port) : 5432,
    database,
    user: decodeURIComponent(u.username),
    password: decodeURIComponent(u.password),
    sslmode: sslmode as ParsedDatabaseUrl['sslmode'],
  };
}

export function formatDatabaseUrl(p: ParsedDatabaseUrl): string {
  const host = p.host.includes(':') ? `[${p.host}]` : p.host;
  return `postgres://${encodeURIComponent(p.user)}:${encodeURIComponent(p.password)}@${host}:${p.port}/${encodeURIComponent(p.database)}?sslmode=${p.sslmode}`;
}

/** pg client options for a parsed URL; `prefer` is tried as TLS-less because node-postgres cannot fall back. */
export function clientConfig(p: ParsedDatabaseUrl, connectTimeoutMs = 5_000): pg.ClientConfig {
  const ssl = p.sslmode === 'require' || p.sslmode === 'verify-ca' ? { rejectUnauthorized: false } : p.sslmode === 'verify-full' ? { rejectUnauthorized: true } : false;
  return { host: p.host, port: p.port, database: p.database, user: p.user, password: p.password, ssl, connectionTimeoutMillis: connectTimeoutMs };
}

/** Connects with a parsed URL, runs fn, always closes. */
export async function withClient<T>(u: ParsedDatabaseUrl, fn: (c: pg.Client) => Promise<T>): Promise<T> {
  const client = new pg.Client(clientConfig(u));
  client.on('error', () => {});
  await client.connect();
  try {
    return await fn(client);
  } finally {
    await client.end().catch(() => {});
  }
}
