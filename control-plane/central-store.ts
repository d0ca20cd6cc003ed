// The control plane's reads and writes of the central database. SQL lives here
// and nowhere else; callers get typed rows and never see a sealed secret.

import pg from 'pg';
import type { OrchestraStatus, RouteAnswer, UpstreamRoute } from '../common/internal-api.js';
import type { SecretBox } from './secrets.js';
import type { ParsedDatabaseUrl } from './upstream-identity.js';

export type OrchestraSource = 'provisioned' | 'attached' | 'pool' | 'imported';

export interface OrchestraRow {
  id: string;
  subdomain: string;
  name: string;
  status: OrchestraStatus;
  source: OrchestraSource;
  upstream_host: string | null;
  upstream_port: number | null;
  upstream_database: string | null;
  upstream_user: string | null;
  upstream_password_enc: string | null;
  upstream_sslmode: string;
  canonical_address: string | null;
  fingerprint: string | null;
  owns_database: boolean;
  max_connections: number | null;
  legacy_id: string | null;
  isolation_problem: string | null;
  created_at: Date;
  updated_at: Date;
}

/** What the API shows of an orchestra: never a user name or password of the upstream. */
export interface OrchestraView {
  id: string;
  subdomain: string;
  name: string;
  status: OrchestraStatus;
  source: OrchestraSource;
  upstream: { host: string; port: number; database: string } | null;
  canonicalAddress: string | null;
  fingerprint: string | null;
  maxConnections: number | null;
  createdAt: string;
  updatedAt: string;
}

export function toView(r: OrchestraRow): OrchestraView {
  return {
    id: r.id,
    subdomain: r.subdomain,
    name: r.name,
    status: r.status,
    source: r.source,
    upstream: r.upstream_host && r.upstream_database ? { host: r.upstream_host, port: r.upstream_port ?? 5432, database: r.upstream_database } : null,
    canonicalAddress: r.canonical_address,
    fingerprint: r.fingerprint,
    maxConnections: r.max_connections,
    createdAt: r.created_at.toISOString(),
    updatedAt: r.updated_at.toISOString(),
  };
}

export interface Conflict {
  id: string;
  subdomain: string;
  by: 'address' | 'fingerprint';
}

export const UUID_PATTERN = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

export class CentralStore {
  constructor(
    readonly pool: pg.Pool,
    private readonly box: SecretBox,
  ) {}

  /** Seals an upstream password bound to its orchestra row. */
  sealPassword(orchestraId: string, password: string): string {
    return this.box.seal(password, `upstream:${orchestraId}`);
  }

  openPassword(row: Pick<OrchestraRow, 'id' | 'upstream_password_enc'>): string {
    return row.upstream_password_enc ? this.box.open(row.upstream_password_enc, `upstream:${row.id}`) : '';
  }

  /** The upstream of a row with its password opened, or null when it has none. */
  upstreamOf(row: OrchestraRow): ParsedDatabaseUrl | null {
    if (row.upstream_host === null || row.upstream_database === null) return null;
    return {
      host: row.upstream_host,
      port: row.upstream_port ?? 5432,
      database: row.upstream_database,
      user: row.upstream_user ?? '',
      password: this.openPassword(row),
      sslmode: row.upstream_sslmode as ParsedDatabaseUrl['sslmode'],
    };
  }

  /** By id or subdomain; a live orchestra wins over deleted ones of the same subdomain. */
  async find(idOrSubdomain: string, opts: { includeDeleted?: boolean } = {}): Promise<OrchestraRow | null> {
    const byId = UUID_PATTERN.test(idOrSubdomain);
    const res = await this.pool.query<OrchestraRow>(
      `SELECT * FROM orchestras WHERE ${byId ? 'id = $1::uuid' : 'subdomain = $1'} ${opts.includeDeleted ? '' : "AND status <> 'deleted'"}
        ORDER BY (status = 'deleted'), created_at DESC LIMIT 1`,
      [idOrSubdomain],
    );
    return res.rows[0] ?? null;
  }

  async list(): Promise<OrchestraRow[]> {
    return (await this.pool.query<OrchestraRow>("SELECT * FROM orchestras WHERE status <> 'deleted' ORDER BY created_at, id")).rows;
  }

  async insert(o: {
    id: string;
    subdomain: string;
    name: string;
    status: OrchestraStatus;
    source: OrchestraSource;
    legacyId?: string | null;
    createdAt?: Date;
  }): Promise<OrchestraRow> {
    const res = await this.pool.query<OrchestraRow>(
      `INSERT INTO orchestras (id, subdomain, name, status, source, legacy_id, created_at)
       VALUES ($1, $2, $3, $4, $5, $6, coalesce($7, now())) RETURNING *`,
      [o.id, o.subdomain, o.name, o.status, o.source, o.legacyId ?? null, o.createdAt ?? null],
    );
    return res.rows[0]!;
  }

  async setUpstream(id: string, u: ParsedDatabaseUrl | null, extra: { fingerprint?: string | null; ownsDatabase?: boolean } = {}): Promise<OrchestraRow> {
    const res = await this.pool.query<OrchestraRow>(
      `UPDATE orchestras SET upstream_host = $2, upstream_port = $3, upstream_database = $4, upstream_user = $5,
              upstream_password_enc = $6, upstream_sslmode = $7, fingerprint = $8,
              owns_database = coalesce($9, owns_database), updated_at = now()
        WHERE id = $1 RETURNING *`,
      [
        id,
        u?.host ?? null,
        u?.port ?? null,
        u?.database ?? null,
        u?.user ?? null,
        u ? this.sealPassword(id, u.password) : null,
        u?.sslmode ?? 'prefer',
        extra.fingerprint ?? null,
        extra.ownsDatabase ?? null,
      ],
    );
    if (!res.rows[0]) throw new Error(`orchestra ${id} vanished`);
    return res.rows[0];
  }

  async update(
    id: string,
    fields: { status?: OrchestraStatus; maxConnections?: number | null; name?: string; fingerprint?: string | null; isolationProblem?: string | null },
  ): Promise<OrchestraRow> {
    const sets: string[] = [];
    const values: unknown[] = [id];
    const add = (col: string, v: unknown): void => {
      values.push(v);
      sets.push(`${col} = $${values.length}`);
    };
    if (fields.status !== undefined) add('status', fields.status);
    if (fields.maxConnections !== undefined) add('max_connections', fields.maxConnections);
    if (fields.name !== undefined) add('name', fields.name);
    if (fields.fingerprint !== undefined) add('fingerprint', fields.fingerprint);
    if (fields.isolationProblem !== undefined) add('isolation_problem', fields.isolationProblem);
    if (fields.status === 'deleted') sets.push('deleted_at = now()');
    sets.push('updated_at = now()');
    const res = await this.pool.query<OrchestraRow>(`UPDATE orchestras SET ${sets.join(', ')} WHERE id = $1 RETURNING *`, values);
    if (!res.rows[0]) throw new Error(`orchestra ${id} vanished`);
    return res.rows[0];
  }

  async remove(id: string): Promise<void> {
    await this.pool.query('DELETE FROM orchestras WHERE id = $1', [id]);
  }

  /** The canonical address the database computes for an upstream (one implementation, in SQL). */
  async canonicalAddress(u: Pick<ParsedDatabaseUrl, 'host' | 'port' | 'database' | 'user'>): Promise<string> {
    const res = await this.pool.query<{ a: string }>('SELECT stagedoor_canonical_address($1, $2, $3, $4) AS a', [u.host, u.port, u.database, u.user]);
    return res.rows[0]!.a;
  }

  /** Other live orchestras sharing an address or a fingerprint with the given identity. */
  async conflicts(identity: { canonicalAddress: string | null; fingerprint: string | null }, exceptId: string | null): Promise<Conflict[]> {
    const res = await this.pool.query<{ id: string; subdomain: string; by: 'address' | 'fingerprint' }>(
      `SELECT id, subdomain, CASE WHEN canonical_address = $1 THEN 'address' ELSE 'fingerprint' END AS by
         FROM orchestras
        WHERE status <> 'deleted' AND ($3::uuid IS NULL OR id <> $3::uuid)
          AND ((canonical_address IS NOT NULL AND canonical_address = $1) OR (fingerprint IS NOT NULL AND fingerprint = $2))
        ORDER BY created_at`,
      [identity.canonicalAddress, identity.fingerprint, exceptId],
    );
    return res.rows;
  }

  async route(subdomain: string): Promise<RouteAnswer | null> {
    const row = await this.find(subdomain, { includeDeleted: true });
    if (!row) return null;
    const conflicts = row.status === 'deleted' ? [] : await this.conflicts({ canonicalAddress: row.canonical_address, fingerprint: row.fingerprint }, row.id);
    const revoked = await this.pool.query<{ jti: string }>(
      'SELECT jti::text FROM tokens WHERE orchestra_id = $1 AND revoked_at IS NOT NULL AND expires_at > now()',
      [row.id],
    );
    const hasUpstream = row.upstream_host !== null && row.upstream_database !== null;
    return {
      orchestraId: row.id,
      subdomain: row.subdomain,
      status: row.status,
      maxConnections: row.max_connections,
      upstream: hasUpstream
        ? {
            host: row.upstream_host!,
            port: row.upstream_port ?? 5432,
            database: row.upstream_database!,
            user: row.upstream_user ?? '',
            password: this.openPassword(row),
            sslmode: row.upstream_sslmode as UpstreamRoute['sslmode'],
          }
        : null,
      upstreamAddress: row.canonical_address,
      isolationOk: conflicts.length === 0 && row.isolation_problem === null,
      isolationDetail: conflicts.length
        ? `shares its database (${[...new Set(conflicts.map((c) => c.by))].join(', ')}) with ${conflicts.length} other orchestra(s)`
        : row.isolation_problem,
      revokedJtis: revoked.rows.map((r) => r.jti),
    };
  }

  // Tokens

  async insertToken(t: { jti: string; orchestraId: string; name: string; expiresAt: Date }): Promise<void> {
    await this.pool.query('INSERT INTO tokens (jti, orchestra_id, name, expires_at) VALUES ($1, $2, $3, $4)', [t.jti, t.orchestraId, t.name, t.expiresAt]);
  }

  async listTokens(orchestraId: string): Promise<Array<{ jti: string; name: string; createdAt: string; expiresAt: string; revokedAt: string | null }>> {
    const res = await this.pool.query<{ jti: string; name: string; created_at: Date; expires_at: Date; revoked_at: Date | null }>(
      'SELECT jti::text, name, created_at, expires_at, revoked_at FROM tokens WHERE orchestra_id = $1 ORDER BY created_at',
      [orchestraId],
    );
    return res.rows.map((r) => ({
      jti: r.jti,
      name: r.name,
      createdAt: r.created_at.toISOString(),
      expiresAt: r.expires_at.toISOString(),
      revokedAt: r.revoked_at?.toISOString() ?? null,
    }));
  }

  /** Marks a token revoked; returns its orchestra, or null when there is no such token. */
  async revokeToken(jti: string): Promise<{ orchestraId: string; alreadyRevoked: boolean } | null> {
    if (!UUID_PATTERN.test(jti)) return null;
    const res = await this.pool.query<{ orchestra_id: string; was: Date | null }>(
      `UPDATE tokens t SET revoked_at = coalesce(t.revoked_at, now())
         FROM tokens old WHERE t.jti = $1 AND old.jti = t.jti
       RETURNING t.orchestra_id, old.revoked_at AS was`,
      [jti],
    );
    const r = res.rows[0];
    return r ? { orchestraId: r.orchestra_id, alreadyRevoked: r.was !== null } : null;
  }
}
