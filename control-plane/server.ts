// The control-plane role: central database (migrated at start), signing keys,
// provisioning, the HTTP API. Refuses to start when the central database holds
// tables of the orchestra set (the incident of the shared schema file).

import type { AddressInfo } from 'node:net';
import pg from 'pg';
import type { Redis } from 'ioredis';
import { Counter, Registry, collectDefaultMetrics } from 'prom-client';
import type { FastifyInstance } from 'fastify';
import type { ControlPlaneConfig } from '../common/config.js';
import type { Logger } from '../common/log.js';
import { AuditLog } from './audit-log.js';
import { CentralStore } from './central-store.js';
import { EventBus } from './event-bus.js';
import { buildApi } from './http/app.js';
import { IsolationMonitor } from './isolation-monitor.js';
import { Lifecycle } from './lifecycle.js';
import { DatabasePool } from './database-pool.js';
import { applyMigrations, existingTables, migrationSet } from './migrations.js';
import { Provisioner } from './provisioning.js';
import { SecretBox } from './secrets.js';
import { TokenSigner } from './signing-keys.js';
import { TenantServer } from './tenant-server.js';
import { RedisPublisher } from './redis-publisher.js';
import { connectRedis } from '../common/redis-bus.js';

export class CentralSchemaLeak extends Error {}

export class ControlPlane {
  private constructor(
    readonly app: FastifyInstance,
    readonly store: CentralStore,
    readonly audit: AuditLog,
    readonly events: EventBus,
    readonly provisioner: Provisioner,
    readonly monitor: IsolationMonitor,
    private readonly pool: pg.Pool,
    private readonly log: Logger,
    private readonly redis: Redis | null,
  ) {}

  static async start(config: ControlPlaneConfig, log: Logger): Promise<ControlPlane> {
    const pool = new pg.Pool({ connectionString: config.centralDatabaseUrl, max: 10, connectionTimeoutMillis: 5_000 });
    pool.on('error', (e) => log.warn('central database connection error', { error: e }));
    try {
      const central = migrationSet('central');
      const orchestra = migrationSet('orchestra', config.orchestraSchemaDir);
      await refuseOrchestraTablesInCentral(pool, orchestra.tables);
      const applied = await applyMigrations(config.centralDatabaseUrl, central, log);
      if (applied.length) log.info('central migrations applied', { migrations: applied });

      const registry = new Registry();
      collectDefaultMetrics({ register: registry, prefix: 'stagedoor_control_plane_' });
      const dropped = new Counter({ name: 'stagedoor_audit_dropped_total', help: 'Audit records dropped because the central database was unavailable too long', registers: [registry] });
      const box = new SecretBox(config.encryptionKey);
      const store = new CentralStore(pool, box);
      const audit = new AuditLog(pool, log, 100_000, 250, (n) => dropped.inc(n));
      const events = new EventBus();
      const redis = config.redisUrl ? connectRedis(config.redisUrl) : null;
      redis?.on('error', () => {});
      if (redis) events.addSink(new RedisPublisher(redis, log));
      const signer = await TokenSigner.load(pool, box, config.tokenSigningKey);
      const tenant = config.tenantServerUrl ? new TenantServer(config.tenantServerUrl) : null;
      const databasePool = config.poolUrls.length ? new DatabasePool(pool, box) : null;
      if (databasePool) log.info('pool databases registered', { added: await databasePool.register(config.poolUrls), configured: config.poolUrls.length });
      const provisioner = new Provisioner({ store, audit, bus: events, log, tenant, databasePool, managesTenantServer: config.managesTenantServer, orchestraSet: orchestra, centralSet: central });
      const cleaned = await provisioner.cleanUpInterrupted();
      if (cleaned) log.warn('removed orchestras left half-provisioned by an earlier crash', { count: cleaned });
      const lifecycle = new Lifecycle(store, audit, events, tenant, orchestra);
      const monitor = new IsolationMonitor({ store, centralSet: central, orchestraSet: orchestra }, audit, log, registry, config.alertWebhookUrl);

      const app = await buildApi({
        store,
        audit,
        bus: events,
        events,
        provisioner,
        lifecycle,
        monitor,
        signer,
        publicProxyAddress: config.publicProxyAddress,
        jwks: () => signer.jwks(),
        ready: async () => {
          try {
            await pool.query('SELECT 1');
            return true;
          } catch {
            return false;
          }
        },
        registry,
        adminToken: config.adminToken,
        proxyToken: config.proxyToken,
        log,
      });
      await app.listen({ host: config.listen.host, port: config.listen.port });
      monitor.start(config.auditIntervalMs);
      const cp = new ControlPlane(app, store, audit, events, provisioner, monitor, pool, log, redis);
      log.info('control plane listening', { address: cp.url, tenantServer: tenant ? `${tenant.admin.host}:${tenant.admin.port}` : null });
      return cp;
    } catch (e) {
      await pool.end().catch(() => {});
      throw e;
    }
  }

  get url(): string {
    const a = this.app.server.address() as AddressInfo;
    const host = a.family === 'IPv6' ? `[${a.address}]` : a.address;
    return `http://${host}:${a.port}`;
  }

  async stop(): Promise<void> {
    this.monitor.stop();
    // Close open event streams first, or close() waits for them forever.
    this.app.server.closeAllConnections?.();
    await this.app.close();
    await this.audit.close();
    await this.pool.end();
    this.redis?.disconnect();
    this.log.info('control plane stopped');
  }
}

/** The incident's guard: a central database holding orchestra tables is never started on, nor migrated. */
export async function refuseOrchestraTablesInCentral(pool: pg.Pool, orchestraTables: string[]): Promise<void> {
  const client = await pool.connect();
  try {
    const leaked = await existingTables(client, orchestraTables);
    if (leaked.length) {
      throw new CentralSchemaLeak(
        `refusing to start: the central database holds orchestra tables (${leaked.join(', ')}). ` +
          'Orchestra data never belongs in the central database; move or drop these tables, then start again.',
      );
    }
  } finally {
    client.release();
  }
}
