// Adopting a legacy central database: the Prisma-era "Orchestra" table
// (id, name, subdomain, "databaseUrl", status, "createdAt"). Orchestras are
// created with the same upstreams as they are, duplicates included: the data
// exists, so the proxy refuses the duplicates at connect time and the audit
// reports them until an operator (or the fix) resolves them. Re-running is
// idempotent: rows already imported (by legacy id) are left alone.

import { randomUUID } from 'node:crypto';
import pg from 'pg';
import type { OrchestraStatus } from '../common/internal-api.js';
import type { AuditLog } from './audit-log.js';
import type { CentralStore } from './central-store.js';
import type { EventSink } from './event-bus.js';
import { SUBDOMAIN_PATTERN } from '../common/internal-api.js';
import { RESERVED_SUBDOMAINS } from './provisioning.js';
import { parseDatabaseUrl, readFingerprint, withClient } from './upstream-identity.js';

export interface ImportedRow {
  legacyId: string;
  subdomain: string;
  result: 'imported' | 'unchanged' | 'skipped';
  status: OrchestraStatus | null;
  violation: string | null;
  detail: string | null;
}

export interface ImportReport {
  imported: number;
  unchanged: number;
  skipped: number;
  orchestras: ImportedRow[];
}

interface LegacyRow {
  id: string;
  name: string | null;
  subdomain: string | null;
  databaseUrl: string | null;
  status: string | null;
  createdAt: Date | null;
}

export class ImportSourceError extends Error {}

export async function importLegacy(sourceUrl: string, store: CentralStore, audit: AuditLog, bus: EventSink): Promise<ImportReport> {
  const legacy = await readLegacy(sourceUrl);
  const rows: ImportedRow[] = [];
  for (const l of legacy.sort((a, b) => (a.createdAt?.getTime() ?? 0) - (b.createdAt?.getTime() ?? 0))) {
    rows.push(await importOne(l, store, audit));
  }
  // Sharing is judged after every row is in, so each duplicate names its partners.
  for (const r of rows) {
    if (r.result === 'skipped') continue;
    const row = await store.find(r.subdomain);
    if (!row) continue;
    const conflicts = await store.conflicts({ canonicalAddress: row.canonical_address, fingerprint: row.fingerprint }, row.id);
    if (conflicts.length) {
      const by = [...new Set(conflicts.map((c) => c.by))].join(' and ');
      r.violation = `${by === 'address' ? 'shared_upstream' : by === 'fingerprint' ? 'shared_fingerprint' : 'shared_upstream, shared_fingerprint'}: shares its database with ${conflicts.map((c) => c.subdomain).join(', ')}`;
    }
  }
  bus.publish({ type: 'all-changed' });
  const report = {
    imported: rows.filter((r) => r.result === 'imported').length,
    unchanged: rows.filter((r) => r.result === 'unchanged').length,
    skipped: rows.filter((r) => r.result === 'skipped').length,
    orchestras: rows,
  };
  audit.record({ kind: 'import.completed', detail: { imported: report.imported, unchanged: report.unchanged, skipped: report.skipped, violations: rows.filter((r) => r.violation).map((r) => r.subdomain) } });
  return report;
}

async function readLegacy(sourceUrl: string): Promise<LegacyRow[]> {
  const client = new pg.Client({ connectionString: sourceUrl, connectionTimeoutMillis: 5_000 });
  client.on('error', () => {});
  try {
    await client.connect();
  } catch (e) {
    throw new ImportSourceError(`cannot connect to the legacy database: ${(e as Error).message}`);
  }
  try {
    const res = await client.query<LegacyRow>('SELECT id::text AS id, name, subdomain, "databaseUrl", status::text AS status, "createdAt" FROM "Orchestra"');
    return res.rows;
  } catch (e) {
    throw new ImportSourceError(`the legacy database has no readable "Orchestra" table: ${(e as Error).message}`);
  } finally {
    await client.end().catch(() => {});
  }
}

async function importOne(l: LegacyRow, store: CentralStore, audit: AuditLog): Promise<ImportedRow> {
  const subdomain = (l.subdomain ?? '').trim().toLowerCase();
  const base = { legacyId: l.id, subdomain, violation: null };
  const existing = await store.pool.query<{ subdomain: string; status: OrchestraStatus }>('SELECT subdomain, status FROM orchestras WHERE legacy_id = $1', [l.id]);
  if (existing.rows[0]) return { ...base, subdomain: existing.rows[0].subdomain, result: 'unchanged', status: existing.rows[0].status, detail: 'imported before' };
  if (!SUBDOMAIN_PATTERN.test(subdomain) || RESERVED_SUBDOMAINS.has(subdomain)) {
    return { ...base, result: 'skipped', status: null, detail: `subdomain "${l.subdomain}" is not valid here (^[a-z][a-z0-9-]{1,62}$)` };
  }
  if (await store.find(subdomain)) return { ...base, result: 'skipped', status: null, detail: 'an orchestra with this subdomain already exists' };

  let upstream = null;
  let detail: string | null = null;
  if (l.databaseUrl) {
    try {
      upstream = parseDatabaseUrl(l.databaseUrl);
    } catch (e) {
      detail = `databaseUrl not usable (${(e as Error).message}); imported without a database`;
    }
  }
  const status: OrchestraStatus = !upstream ? 'pending' : (l.status ?? 'active').toLowerCase() === 'active' ? 'active' : (l.status ?? '').toLowerCase() === 'pending' ? 'pending' : 'suspended';
  const id = randomUUID();
  await store.insert({ id, subdomain, name: l.name ?? subdomain, status, source: 'imported', legacyId: l.id, createdAt: l.createdAt ?? undefined });
  let fingerprint: string | null = null;
  if (upstream) {
    try {
      fingerprint = await withClient(upstream, readFingerprint);
    } catch (e) {
      detail = `database not reachable at import (${(e as Error).message}); fingerprint unknown until the monitor reaches it`;
    }
    await store.setUpstream(id, upstream, { fingerprint, ownsDatabase: false });
  }
  audit.record({ kind: 'import.orchestra', orchestraId: id, subdomain, reason: detail, detail: { legacyId: l.id, status } });
  return { ...base, result: 'imported', status, detail };
}
