// After provisioning: suspend, resume, cap, move to another database, delete.
// Every change is audited and published, so proxies drop their caches and end
// sessions that may no longer exist (suspended → 57P03 for new, 57P01 for live).

import type { OrchestraStatus } from '../common/internal-api.js';
import type { AuditLog } from './audit-log.js';
import type { CentralStore, OrchestraRow } from './central-store.js';
import type { EventSink } from './event-bus.js';
import { ApiError } from './http/errors.js';
import { applyMigrations, type MigrationSet } from './migrations.js';
import { crossAccess, urlOf, writeMarker } from './provisioning.js';
import { TenantServer } from './tenant-server.js';
import { parseDatabaseUrl, readFingerprint, withClient } from './upstream-identity.js';

export interface PatchRequest {
  status?: 'active' | 'suspended';
  maxConnections?: number | null;
  name?: string;
  databaseUrl?: string;
}

export class Lifecycle {
  constructor(
    private readonly store: CentralStore,
    private readonly audit: AuditLog,
    private readonly bus: EventSink,
    private readonly tenant: TenantServer | null,
    private readonly orchestraSet: MigrationSet,
  ) {}

  async patch(row: OrchestraRow, p: PatchRequest): Promise<OrchestraRow> {
    let current = row;
    if (p.databaseUrl !== undefined) current = await this.reassign(current, p.databaseUrl);
    const fields: { status?: OrchestraStatus; maxConnections?: number | null; name?: string } = {};
    if (p.status !== undefined) {
      if (p.status === 'active' && (current.upstream_host === null || current.upstream_database === null)) {
        throw new ApiError(422, 'no_upstream', 'an orchestra without a database cannot be active: give a databaseUrl');
      }
      if (p.status === 'active' && current.status === 'active') delete p.status;
      else fields.status = p.status;
    }
    if (p.maxConnections !== undefined) fields.maxConnections = p.maxConnections;
    if (p.name !== undefined) fields.name = p.name;
    if (Object.keys(fields).length > 0) current = await this.store.update(current.id, fields);
    this.audit.record({ kind: 'orchestra.updated', orchestraId: current.id, subdomain: current.subdomain, detail: { ...p, databaseUrl: p.databaseUrl ? '(changed)' : undefined } });
    this.bus.publish({ type: 'orchestra-changed', orchestraId: current.id, subdomain: current.subdomain });
    return current;
  }

  private async reassign(row: OrchestraRow, databaseUrl: string): Promise<OrchestraRow> {
    let u;
    try {
      u = parseDatabaseUrl(databaseUrl);
    } catch (e) {
      throw new ApiError(400, 'invalid_database_url', `databaseUrl: ${(e as Error).message}`);
    }
    let fingerprint: string;
    try {
      fingerprint = await withClient(u, readFingerprint);
    } catch (e) {
      throw new ApiError(422, 'upstream_unreachable', `the database does not answer with the given credentials: ${(e as Error).message}`);
    }
    const conflicts = await this.store.conflicts({ canonicalAddress: await this.store.canonicalAddress(u), fingerprint }, row.id);
    if (conflicts.length) throw new ApiError(409, 'database_shared', 'this database is already assigned to another orchestra');
    try {
      await applyMigrations(urlOf(u), this.orchestraSet);
      await writeMarker(u, row.id, row.subdomain);
      const cross = await withClient(u, (c) => crossAccess(c, this.store, row.id, fingerprint));
      if (cross.length) throw new ApiError(409, 'cross_access', `cross access: ${cross.join('; ')}`);
    } catch (e) {
      if (e instanceof ApiError) throw e;
      throw new ApiError(422, 'schema_failed', (e as Error).message);
    }
    const updated = await this.store.setUpstream(row.id, u, { fingerprint, ownsDatabase: false });
    // The old database keeps its data and is not dropped; say where it is so an operator can.
    this.audit.record({
      kind: 'orchestra.reassigned',
      orchestraId: row.id,
      subdomain: row.subdomain,
      detail: { address: updated.canonical_address, previousAddress: row.canonical_address, previousCreatedByStagedoor: row.owns_database, previousRole: row.owns_database ? row.upstream_user : undefined },
    });
    return updated;
  }

  async remove(row: OrchestraRow, dropDatabase: boolean): Promise<OrchestraRow> {
    if (dropDatabase && !row.owns_database) {
      throw new ApiError(422, 'not_owned', 'stagedoor did not create this database, so it will not drop it');
    }
    if (dropDatabase && !this.tenant) throw new ApiError(422, 'no_tenant_server', 'no tenant server configured to drop the database on');
    if (dropDatabase && this.tenant && (row.upstream_host !== this.tenant.admin.host || (row.upstream_port ?? 5432) !== this.tenant.admin.port)) {
      // Drops go by name: only on the server the database really lives on.
      throw new ApiError(422, 'other_server', 'the database is not on the configured tenant server; drop it there by hand');
    }
    const deleted = await this.store.update(row.id, { status: 'deleted' });
    // Proxies end live sessions before the database disappears under them.
    this.bus.publish({ type: 'orchestra-changed', orchestraId: row.id, subdomain: row.subdomain });
    if (dropDatabase && this.tenant) {
      const names = TenantServer.namesFor(row.subdomain);
      await this.tenant.dropDatabase(row.upstream_database ?? names.database);
      await this.tenant.dropRole(row.upstream_user ?? names.role);
    }
    this.audit.record({ kind: 'orchestra.deleted', orchestraId: row.id, subdomain: row.subdomain, detail: { dropDatabase } });
    return deleted;
  }
}
