// `stagedoor dev` (= `npm start`): everything on one machine. Embedded
// PostgreSQL for the central database and a tenant server, the control plane
// and the proxy, all stopped together on SIGTERM/SIGINT.

import { mkdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import pg from 'pg';
import { ConfigError, loadControlPlaneConfig, loadProxyConfig, type Env } from '../common/config.js';
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

/** Another `stagedoor dev` already runs on the data directory: nothing was started. */
export class DevAlreadyRunning extends Error {}

export async function startDev(env: Env, opts: { banner?: boolean } = {}): Promise<DevHandle> {
  const log = createLogger({ role: 'dev' });
  const dataDir = resolve(env.STAGEDOOR_DATA_DIR ?? './.stagedoor');
  refuseUnreachableDataDir(dataDir);
  // Searchable by others: embedded Postgres runs as the postgres user below it (as loadDevState makes it).
  mkdirSync(dataDir, { recursive: true, mode: 0o755 });
  // Before anything else: a second dev on the same directory must not touch the first one's servers or state.
  const releaseLock = acquireDevLock(dataDir);
  const stops: Array<() => Promise<void>> = [async () => releaseLock()];
  const stopAll = async (): Promise<void> => {
    for (const s of stops.reverse()) await s().catch((e: unknown) => log.error('stop failed', { error: e }));
    stops.length = 0;
  };

  try {
    const state = await loadDevState(dataDir);
    const pgLog = createLogger({ role: 'postgres' }, { level: 'warn' });
    const startServer = async (name: 'central' | 'tenant', password: string, port: number | undefined): Promise<EmbeddedServer> => {
      const server = await startEmbeddedPostgres({
        dataDir: join(dataDir, name),
        port,
        password,
        settings: { max_connections: '300' },
        log: (line) => pgLog.debug(line.trim(), { server: name }),
      }).catch((e: unknown) => {
        const m = /is in use by a running postgres \(pid (\d+)\)/.exec((e as Error).message);
        if (m) throw new DevAlreadyRunning(`${join(dataDir, name)} is in use by a running postgres (pid ${m[1]}): stop whatever runs on STAGEDOOR_DATA_DIR=${dataDir} first, or use another directory`);
        throw e;
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

/**
 * Takes <dataDir>/dev.lock for this process, or throws DevAlreadyRunning when
 * a live `stagedoor dev` holds it. A lock left by a process that is gone (or
 * whose pid now belongs to another program) is taken over. Returns release().
 */
function acquireDevLock(dataDir: string): () => void {
  const file = join(dataDir, 'dev.lock');
  const mine = JSON.stringify({ pid: process.pid, cmdline: cmdlineOf('self') ?? process.argv.join(' ') });
  for (let attempt = 0; attempt < 3; attempt++) {
    try {
      writeFileSync(file, mine + '\n', { flag: 'wx', mode: 0o600 });
      return () => {
        try {
          if (readFileSync(file, 'utf8').trim() === mine) rmSync(file, { force: true });
        } catch {
          // already gone
        }
      };
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
    }
    let holder: { pid?: unknown; cmdline?: unknown } = {};
    try {
      holder = JSON.parse(readFileSync(file, 'utf8')) as typeof holder;
    } catch {
      // unreadable or half-written: treated as stale below unless its writer is alive
    }
    if (typeof holder.pid === 'number' && holderAlive(holder.pid, holder.cmdline)) {
      throw new DevAlreadyRunning(
        `another "stagedoor dev" (pid ${holder.pid}) is already running on ${dataDir}: stop it first (Ctrl-C), or give this one its own STAGEDOOR_DATA_DIR`,
      );
    }
    rmSync(file, { force: true }); // stale: its process is gone
  }
  throw new DevAlreadyRunning(`could not take ${file}: another "stagedoor dev" is starting on ${dataDir}`);
}

function holderAlive(pid: number, cmdline: unknown): boolean {
  try {
    process.kill(pid, 0);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'EPERM') return false;
  }
  // a recycled pid runs another program: where /proc tells, the command line must match
  const now = cmdlineOf(String(pid));
  return now === undefined || typeof cmdline !== 'string' || now === cmdline;
}

function cmdlineOf(pid: string): string | undefined {
  try {
    return readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0').filter(Boolean).join(' ');
  } catch {
    return undefined;
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

/**
 * As root, the embedded servers run as the `postgres` user (Postgres refuses
 * root), so every parent of the data dir must be searchable by others — a
 * checkout under /root is not. Say so before anything starts.
 */
function refuseUnreachableDataDir(dataDir: string): void {
  if (process.getuid?.() !== 0) return;
  for (let dir = dirname(dataDir); ; dir = dirname(dir)) {
    let mode: number;
    try {
      mode = statSync(dir).mode;
    } catch {
      mode = 0o755; // not created yet: mkdir makes it searchable
    }
    if ((mode & 0o001) === 0) {
      throw new ConfigError(
        `running as root, the embedded PostgreSQL runs as the "postgres" user, which cannot enter ${dir} (mode ${(mode & 0o777).toString(8)}). ` +
          'Run stagedoor as an ordinary user, or set STAGEDOOR_DATA_DIR to a directory under a searchable path (e.g. /var/lib/stagedoor), or chmod o+x the directory.',
      );
    }
    if (dir === dirname(dir)) return;
  }
}
