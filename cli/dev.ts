// `stagedoor dev` (= `npm start`): everything on one machine. Embedded
// PostgreSQL for the central database and a tenant server, the control plane
// and the proxy, all stopped together on SIGTERM/SIGINT.

import { resolve, join } from 'node:path';
import pg from 'pg';
import { loadControlPlaneConfig, loadProxyConfig, type Env } from '../common/config.js';
import { formatListenAddress } from '../common/listen-address.js';
import { createLogger } from '../common/log.js';
import { ControlPlane } from '../control-plane/server.js';
import { ProxyServer } from '../proxy/server.js';
import { startEmbeddedPostgres, type EmbeddedServer } from './embedded-postgres.js';
import { ensureDevCertificate, loadDevState, saveDevState } from './dev-secrets.js';

export interface DevHandle {
  proxyAddress: string;
  apiUrl: string;
  adminToken: string;
  stop(): Promise<void>;
}

const CENTRAL_DATABASE = 'stagedoor';

export async function startDev(env: Env, opts: { banner?: boolean } = {}): Promise<DevHandle> {
  const log = createLogger({ role: 'dev' });
  const dataDir = resolve(env.STAGEDOOR_DATA_DIR ?? './.stagedoor');
  const state = await loadDevState(dataDir);
  const stops: Array<() => Promise<void>> = [];
  const stopAll = async (): Promise<void> => {
    for (const s of stops.reverse()) await s().catch((e: unknown) => log.error('stop failed', { error: e }));
    stops.length = 0;
  };

  try {
    const pgLog = createLogger({ role: 'postgres' }, { level: 'warn' });
    const startServer = async (name: 'central' | 'tenant', password: string, port: number | undefined): Promise<EmbeddedServer> => {
      const server = await startEmbeddedPostgres({
        dataDir: join(dataDir, name),
        port,
        password,
        settings: { max_connections: '300' },
        log: (line) => pgLog.debug(line.trim(), { server: name }),
      });
      stops.push(() => server.stop());
      return server;
    };
    const [central, tenant] = await Promise.all([
      startServer('central', state.centralPassword, state.centralPort),
      startServer('tenant', state.tenantPassword, state.tenantPort),
    ]);
    if (state.centralPort !== central.port || state.tenantPort !== tenant.port) {
      saveDevState(dataDir, { ...state, centralPort: central.port, tenantPort: tenant.port });
    }
    await ensureDatabase(central.url('postgres'), CENTRAL_DATABASE);

    const certificate = env.TLS_CERT_FILE ? null : await ensureDevCertificate(dataDir);
    const adminToken = env.ADMIN_TOKEN ?? state.adminToken;
    const roleEnv: Env = {
      ...env,
      ADMIN_TOKEN: adminToken,
      ENCRYPTION_KEY: env.ENCRYPTION_KEY ?? state.encryptionKey,
      TOKEN_SIGNING_KEY: env.TOKEN_SIGNING_KEY ?? state.tokenSigningKey,
      CENTRAL_DATABASE_URL: env.CENTRAL_DATABASE_URL ?? central.url(CENTRAL_DATABASE),
      TENANT_SERVER_URL: env.TENANT_SERVER_URL ?? tenant.url('postgres'),
      STAGEDOOR_MANAGES_TENANT_SERVER: env.TENANT_SERVER_URL ? 'false' : 'true',
      TLS_CERT_FILE: env.TLS_CERT_FILE ?? certificate?.cert,
      TLS_KEY_FILE: env.TLS_KEY_FILE ?? certificate?.key,
    };
    const cpConfig = loadControlPlaneConfig(roleEnv);
    const cp = await ControlPlane.start(cpConfig, createLogger({ role: 'control-plane' }));
    stops.push(() => cp.stop());

    const proxyConfig = loadProxyConfig({ ...roleEnv, CONTROL_PLANE_URL: env.CONTROL_PLANE_URL ?? cp.url });
    const proxy = new ProxyServer({ config: proxyConfig, log: createLogger({ role: 'proxy' }) });
    const address = await proxy.start();
    stops.push(() => proxy.stop(0));
    const proxyAddress = formatListenAddress({ host: address.address, port: address.port });

    if (opts.banner !== false) printBanner(proxyAddress, cp.url, adminToken, dataDir);
    return { proxyAddress, apiUrl: cp.url, adminToken, stop: stopAll };
  } catch (e) {
    await stopAll();
    throw e;
  }
}

async function ensureDatabase(adminUrl: string, name: string): Promise<void> {
  const c = new pg.Client({ connectionString: adminUrl });
  await c.connect();
  try {
    const exists = await c.query('SELECT 1 FROM pg_database WHERE datname = $1', [name]);
    if (exists.rowCount === 0) await c.query(`CREATE DATABASE ${pg.escapeIdentifier(name)}`);
  } finally {
    await c.end();
  }
}

function printBanner(proxy: string, api: string, adminToken: string, dataDir: string): void {
  const lines = [
    '',
    '  stagedoor is running (dev: embedded PostgreSQL, data in ' + dataDir + ')',
    '',
    `  proxy         ${proxy}   (Postgres wire, TLS available, token as password)`,
    `  control plane ${api}`,
    `  admin token   ${adminToken}`,
    '',
    '  Create your first orchestra, then a token (copy-paste):',
    '',
    `    export ADMIN_TOKEN=${adminToken}`,
    `    curl -s -X POST ${api}/v1/orchestras -H "Authorization: Bearer $ADMIN_TOKEN" \\`,
    `         -H 'content-type: application/json' -d '{"subdomain":"sco","name":"Stockholm Chamber Orchestra"}'`,
    `    curl -s -X POST ${api}/v1/orchestras/sco/tokens -H "Authorization: Bearer $ADMIN_TOKEN" \\`,
    `         -H 'content-type: application/json' -d '{"name":"laptop"}'`,
    '',
    '  then: psql "<connectionString from the answer>"',
    '  Stop with Ctrl-C (data is kept for the next start).',
    '',
  ];
  process.stderr.write(lines.join('\n') + '\n');
}
