// The isolation audit: the users' daily CI script, as a function the API, the
// CLI and the monitor share. It reads every orchestra, visits every upstream
// with the orchestra's own credentials (refreshing its fingerprint and
// checking its marker), and reports each violation kind of PRODUCT.md.

import type pg from 'pg';
import type { CentralStore, OrchestraRow } from './central-store.js';
import { existingTables, type MigrationSet } from './migrations.js';
import { crossAccess } from './provisioning.js';
import { readFingerprint, withClient } from './upstream-identity.js';

export type ViolationKind =
  | 'shared_upstream'
  | 'shared_fingerprint'
  | 'missing_database'
  | 'central_schema_leak'
  | 'orchestra_schema_leak'
  | 'cross_access'
  | 'marker_mismatch'
  | 'unreachable';

export interface Violation {
  kind: ViolationKind;
  /** subdomains, oldest assignment first */
  orchestras: string[];
  detail: string;
}

export interface AuditReport {
  ok: boolean;
  checkedAt: string;
  orchestrasChecked: number;
  violations: Violation[];
}

export interface AuditDeps {
  store: CentralStore;
  centralSet: MigrationSet;
  orchestraSet: MigrationSet;
}

const VISIT_CONCURRENCY = 8;

export async function runIsolationAudit(d: AuditDeps): Promise<AuditReport> {
  const violations: Violation[] = [];
  const central = await d.store.pool.connect();
  try {
    const leaked = await existingTables(central, d.orchestraSet.tables);
    if (leaked.length) violations.push({ kind: 'central_schema_leak', orchestras: [], detail: `orchestra tables in the central database: ${leaked.join(', ')}` });
  } finally {
    central.release();
  }

  let rows = await d.store.list();
  for (const r of rows) {
    if (r.status === 'active' && (r.upstream_host === null || r.upstream_database === null)) {
      violations.push({ kind: 'missing_database', orchestras: [r.subdomain], detail: 'active without a database' });
    }
  }

  // Visit upstreams first: fresh fingerprints make the sharing checks below exact.
  const visits = rows.filter((r) => d.store.upstreamOf(r) !== null);
  await forEachLimited(visits, VISIT_CONCURRENCY, async (r) => {
    violations.push(...(await visit(d, r)));
  });
  rows = await d.store.list();

  for (const group of groupBy(rows, (r) => r.canonical_address)) {
    violations.push({ kind: 'shared_upstream', orchestras: group.map((r) => r.subdomain), detail: `${group.length} orchestras use the database at ${group[0]!.canonical_address}` });
  }
  for (const group of groupBy(rows, (r) => r.fingerprint)) {
    const addresses = new Set(group.map((r) => r.canonical_address));
    if (addresses.size > 1) {
      violations.push({
        kind: 'shared_fingerprint',
        orchestras: group.map((r) => r.subdomain),
        detail: `${addresses.size} different addresses reach one physical database (${group[0]!.fingerprint})`,
      });
    }
  }
  return { ok: violations.length === 0, checkedAt: new Date().toISOString(), orchestrasChecked: rows.length, violations };
}

/** Checks made inside one orchestra's database, with its own credentials. */
async function visit(d: AuditDeps, r: OrchestraRow): Promise<Violation[]> {
  const found: Violation[] = [];
  const upstream = d.store.upstreamOf(r)!;
  try {
    await withClient(upstream, async (c: pg.Client) => {
      const fingerprint = await readFingerprint(c);
      const leaked = await existingTables(c, d.centralSet.tables);
      if (leaked.length) found.push({ kind: 'orchestra_schema_leak', orchestras: [r.subdomain], detail: `central tables in the orchestra database: ${leaked.join(', ')}` });
      const cross = await crossAccess(c, d.store, r.id, fingerprint);
      for (const problem of cross) found.push({ kind: 'cross_access', orchestras: [r.subdomain], detail: problem });
      const markerProblem = await readMarkerProblem(c, r);
      if (markerProblem) found.push({ kind: 'marker_mismatch', orchestras: [r.subdomain], detail: markerProblem });
      if (fingerprint !== r.fingerprint || markerProblem !== r.isolation_problem) {
        await d.store.update(r.id, { fingerprint, isolationProblem: markerProblem });
      }
    });
  } catch (e) {
    found.push({ kind: 'unreachable', orchestras: [r.subdomain], detail: `cannot connect with the orchestra's credentials: ${(e as Error).message}` });
  }
  return found;
}

async function readMarkerProblem(c: pg.ClientBase, r: OrchestraRow): Promise<string | null> {
  const exists = await c.query("SELECT 1 FROM pg_catalog.pg_tables WHERE tablename = 'stagedoor_marker'");
  if (exists.rowCount === 0) return null; // imported and attached databases may have none yet
  const m = await c.query<{ orchestra_id: string }>('SELECT orchestra_id::text FROM stagedoor_marker');
  const owner = m.rows[0]?.orchestra_id;
  return owner && owner !== r.id ? 'the database is marked as belonging to another orchestra' : null;
}

/** Groups of two or more rows sharing a non-null key, each ordered oldest first. */
export function groupBy(rows: OrchestraRow[], key: (r: OrchestraRow) => string | null): OrchestraRow[][] {
  const groups = new Map<string, OrchestraRow[]>();
  for (const r of rows) {
    const k = key(r);
    if (k === null) continue;
    const g = groups.get(k) ?? [];
    g.push(r);
    groups.set(k, g);
  }
  return [...groups.values()].filter((g) => g.length > 1).map((g) => g.sort(oldestFirst));
}

export function oldestFirst(a: OrchestraRow, b: OrchestraRow): number {
  return a.created_at.getTime() - b.created_at.getTime() || a.id.localeCompare(b.id);
}

async function forEachLimited<T>(items: T[], limit: number, fn: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  const workers = Array.from({ length: Math.min(limit, items.length) }, async () => {
    while (next < items.length) await fn(items[next++]!);
  });
  await Promise.all(workers);
}
