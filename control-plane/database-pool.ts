// DATABASE_URL_POOL_1…N: pre-made databases, each handed to one orchestra at
// most, never twice (the users' pooled setup, where a pool database assigned
// twice was one of the ways two orchestras ended up sharing data). The pool
// lives in the central database so concurrent provisionings cannot take the
// same entry, and a deleted orchestra's database is not handed out again.

import type pg from 'pg';
import type { SecretBox } from './secrets.js';
import { formatDatabaseUrl, parseDatabaseUrl, type ParsedDatabaseUrl } from './upstream-identity.js';

export class DatabasePool {
  /** Keys of the URLs configured now: an entry removed from the environment is never handed out. */
  private configured: string[] = [];

  constructor(
    private readonly pool: pg.Pool,
    private readonly box: SecretBox,
  ) {}

  /** Registers the configured URLs (idempotent: keyed by canonical address). */
  async register(urls: readonly string[]): Promise<number> {
    let added = 0;
    this.configured = [];
    for (const [i, raw] of urls.entries()) {
      let u: ParsedDatabaseUrl;
      try {
        u = parseDatabaseUrl(raw);
      } catch (e) {
        throw new Error(`DATABASE_URL_POOL_${i + 1}: ${(e as Error).message}`);
      }
      const key = (await this.pool.query<{ a: string }>('SELECT stagedoor_canonical_address($1, $2, $3, $4) AS a', [u.host, u.port, u.database, u.user])).rows[0]!.a;
      const res = await this.pool.query(
        'INSERT INTO pool_databases (pool_key, url_enc, canonical_address) VALUES ($1, $2, $1) ON CONFLICT (pool_key) DO NOTHING',
        [key, this.box.seal(formatDatabaseUrl(u), `pool:${key}`)],
      );
      added += res.rowCount ?? 0;
      this.configured.push(key);
    }
    return added;
  }

  async available(): Promise<{ total: number; free: number }> {
    const r = await this.pool.query<{ total: string; free: string }>(
      'SELECT count(*)::text AS total, count(*) FILTER (WHERE assigned_to IS NULL AND assigned_at IS NULL)::text AS free FROM pool_databases WHERE pool_key = ANY($1::text[])',
      [this.configured],
    );
    return { total: Number(r.rows[0]!.total), free: Number(r.rows[0]!.free) };
  }

  /** Takes a never-used entry for an orchestra, or null when none is left. */
  async take(orchestraId: string): Promise<{ key: string; upstream: ParsedDatabaseUrl } | null> {
    const r = await this.pool.query<{ pool_key: string; url_enc: string }>(
      `UPDATE pool_databases SET assigned_to = $1, assigned_at = now()
        WHERE pool_key = (SELECT pool_key FROM pool_databases WHERE assigned_to IS NULL AND assigned_at IS NULL
                             AND pool_key = ANY($2::text[])
                           ORDER BY pool_key LIMIT 1 FOR UPDATE SKIP LOCKED)
        RETURNING pool_key, url_enc`,
      [orchestraId, this.configured],
    );
    const row = r.rows[0];
    if (!row) return null;
    return { key: row.pool_key, upstream: parseDatabaseUrl(this.box.open(row.url_enc, `pool:${row.pool_key}`)) };
  }

  /** Undoes a take() whose provisioning failed: the database was never used, so it may be handed out again. */
  async giveBack(key: string, orchestraId: string): Promise<void> {
    await this.pool.query('UPDATE pool_databases SET assigned_to = NULL, assigned_at = NULL WHERE pool_key = $1 AND assigned_to = $2', [key, orchestraId]);
  }
}
