// The users' fix script as a safe API: for every database shared by several
// orchestras (same address or same fingerprint, transitively), keep the
// oldest assignment, clear the newer ones and set them `pending`. A dry run
// answers the same plan without changing anything; a real run logs every
// change and tells the proxies at once.

import type { AuditLog } from './audit-log.js';
import type { CentralStore, OrchestraRow } from './central-store.js';
import type { EventSink } from './event-bus.js';
import { oldestFirst } from './isolation-audit.js';

export interface FixChange {
  action: 'cleared';
  orchestraId: string;
  subdomain: string;
  keptOrchestra: string;
  detail: string;
}

export async function fixSharedUpstreams(store: CentralStore, audit: AuditLog, bus: EventSink, dryRun: boolean): Promise<{ dryRun: boolean; changes: FixChange[] }> {
  const rows = (await store.list()).filter((r) => r.canonical_address !== null || r.fingerprint !== null);
  const changes: FixChange[] = [];
  for (const group of sharingGroups(rows)) {
    const [keep, ...clear] = group.sort(oldestFirst);
    for (const r of clear) {
      changes.push({
        action: 'cleared',
        orchestraId: r.id,
        subdomain: r.subdomain,
        keptOrchestra: keep!.subdomain,
        detail: `shared its database with ${keep!.subdomain} (older); database cleared, status pending`,
      });
    }
  }
  if (dryRun) return { dryRun, changes };
  for (const c of changes) {
    await store.setUpstream(c.orchestraId, null, { fingerprint: null, ownsDatabase: false });
    await store.update(c.orchestraId, { status: 'pending', isolationProblem: null });
    audit.record({ kind: 'isolation.fix', orchestraId: c.orchestraId, subdomain: c.subdomain, reason: c.detail, detail: { keptOrchestra: c.keptOrchestra } });
    bus.publish({ type: 'orchestra-changed', orchestraId: c.orchestraId, subdomain: c.subdomain });
  }
  // The kept ones may now pass the connect-time check: drop cached verdicts everywhere.
  if (changes.length) bus.publish({ type: 'all-changed' });
  return { dryRun, changes };
}

/** Connected components of "shares an address or a fingerprint with". */
function sharingGroups(rows: OrchestraRow[]): OrchestraRow[][] {
  const parent = new Map<string, string>(rows.map((r) => [r.id, r.id]));
  const find = (x: string): string => {
    while (parent.get(x) !== x) x = parent.get(x)!;
    return x;
  };
  const union = (a: string, b: string): void => parent.set(find(a), find(b)) as unknown as void;
  const firstBy = new Map<string, string>();
  for (const r of rows) {
    for (const key of [r.canonical_address && `a:${r.canonical_address}`, r.fingerprint && `f:${r.fingerprint}`]) {
      if (!key) continue;
      const seen = firstBy.get(key);
      if (seen) union(r.id, seen);
      else firstBy.set(key, r.id);
    }
  }
  const groups = new Map<string, OrchestraRow[]>();
  for (const r of rows) {
    const root = find(r.id);
    groups.set(root, [...(groups.get(root) ?? []), r]);
  }
  return [...groups.values()].filter((g) => g.length > 1);
}
