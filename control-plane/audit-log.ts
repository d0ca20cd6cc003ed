// The audit log in the central database. Writers never wait for it: records
// are queued and inserted in batches. While the central database is down the
// queue holds up to `maxQueued` records; beyond that the oldest are dropped and
// counted in stagedoor_audit_dropped_total, never silently. close() flushes
// (SIGTERM), so nothing queued is lost on an orderly stop.

import type pg from 'pg';
import { BatchQueue } from '../common/batch-queue.js';
import type { Logger } from '../common/log.js';

export interface AuditRecord {
  at?: string;
  kind: string;
  orchestraId?: string | null;
  subdomain?: string | null;
  jti?: string | null;
  clientAddress?: string | null;
  sqlstate?: string | null;
  reason?: string | null;
  detail?: Record<string, unknown> | null;
}

export interface AuditQuery {
  orchestraId?: string;
  subdomain?: string;
  kind?: string;
  since?: Date;
  /** id of the last record of the previous page */
  before?: number;
  limit: number;
}

export interface AuditEntry extends Required<Omit<AuditRecord, 'at'>> {
  id: number;
  at: string;
}

export class AuditLog {
  private readonly queue: BatchQueue<AuditRecord>;

  constructor(
    private readonly pool: pg.Pool,
    log: Logger,
    maxQueued = 100_000,
    intervalMs = 250,
    onDropped: (n: number) => void = () => {},
  ) {
    this.queue = new BatchQueue({
      send: (batch) => this.insert(batch),
      onDropped: (n, when) => {
        onDropped(n);
        if (when === 'overflow') log.error('audit records dropped: central database unavailable and queue full', { dropped: n });
        else log.error('audit records lost at shutdown: central database unavailable', { lost: n });
      },
      onSendFailed: (error, queued) => log.warn('audit log write failed; records kept for retry', { queued, error }),
      maxQueued,
      batchSize: 1_000,
      intervalMs,
    });
  }

  record(r: AuditRecord): void {
    this.queue.push({ ...r, at: r.at ?? new Date().toISOString() });
  }

  get pending(): number {
    return this.queue.pending;
  }

  get dropped(): number {
    return this.queue.dropped;
  }

  flush(): Promise<void> {
    return this.queue.flush();
  }

  close(timeoutMs = 10_000): Promise<void> {
    return this.queue.close(timeoutMs);
  }

  async query(q: AuditQuery): Promise<AuditEntry[]> {
    const where: string[] = [];
    const values: unknown[] = [];
    const add = (sql: string, v: unknown): void => {
      values.push(v);
      where.push(sql.replace('?', `$${values.length}`));
    };
    if (q.orchestraId) add('orchestra_id = ?::uuid', q.orchestraId);
    if (q.subdomain) add('subdomain = ?', q.subdomain);
    if (q.kind) add(q.kind.endsWith('*') || !q.kind.includes('.') ? "kind LIKE ? || '%'" : 'kind = ?', q.kind.replace(/\*$/, ''));
    if (q.since) add('at >= ?', q.since);
    if (q.before) add('id < ?', q.before);
    values.push(q.limit);
    const res = await this.pool.query<{ id: string; at: Date; kind: string; orchestra_id: string | null; subdomain: string | null; jti: string | null; client_address: string | null; sqlstate: string | null; reason: string | null; detail: Record<string, unknown> | null }>(
      `SELECT * FROM audit_log ${where.length ? 'WHERE ' + where.join(' AND ') : ''} ORDER BY id DESC LIMIT $${values.length}`,
      values,
    );
    return res.rows.map((r) => ({
      id: Number(r.id),
      at: r.at.toISOString(),
      kind: r.kind,
      orchestraId: r.orchestra_id,
      subdomain: r.subdomain,
      jti: r.jti,
      clientAddress: r.client_address,
      sqlstate: r.sqlstate,
      reason: r.reason,
      detail: r.detail,
    }));
  }

  private async insert(batch: AuditRecord[]): Promise<void> {
    await this.pool.query(
      `INSERT INTO audit_log (at, kind, orchestra_id, subdomain, jti, client_address, sqlstate, reason, detail)
       SELECT * FROM unnest($1::timestamptz[], $2::text[], $3::uuid[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[], $9::jsonb[])`,
      [
        batch.map((r) => r.at),
        batch.map((r) => r.kind),
        batch.map((r) => r.orchestraId ?? null),
        batch.map((r) => r.subdomain ?? null),
        batch.map((r) => r.jti ?? null),
        batch.map((r) => r.clientAddress ?? null),
        batch.map((r) => r.sqlstate ?? null),
        batch.map((r) => r.reason ?? null),
        batch.map((r) => (r.detail ? JSON.stringify(r.detail) : null)),
      ],
    );
  }
}
