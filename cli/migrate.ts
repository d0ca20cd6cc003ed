// `stagedoor migrate`: the central set on CENTRAL_DATABASE_URL;
// `--orchestras`: the orchestra set on every active orchestra database, each
// as the orchestra's own role, with a result per orchestra.

import pg from 'pg';
import { loadControlPlaneConfig, type Env } from '../common/config.js';
import { createLogger } from '../common/log.js';
import { CentralStore } from '../control-plane/central-store.js';
import { applyMigrations, migrationSet } from '../control-plane/migrations.js';
import { urlOf } from '../control-plane/provisioning.js';
import { SecretBox } from '../control-plane/secrets.js';
import { refuseOrchestraTablesInCentral } from '../control-plane/server.js';

export async function runMigrate(args: string[], env: Env): Promise<number> {
  const json = args.includes('--json');
  const config = loadControlPlaneConfig(env);
  const log = createLogger({ role: 'migrate' }, { level: 'warn' });
  const orchestraSet = migrationSet('orchestra', config.orchestraSchemaDir);
  if (!args.includes('--orchestras')) {
    const pool = new pg.Pool({ connectionString: config.centralDatabaseUrl, max: 1 });
    try {
      await refuseOrchestraTablesInCentral(pool, orchestraSet.tables);
      const ran = await applyMigrations(config.centralDatabaseUrl, migrationSet('central'), log);
      print(json, { applied: ran }, ran.length ? `applied: ${ran.join(', ')}` : 'central database is up to date');
      return 0;
    } finally {
      await pool.end();
    }
  }
  const pool = new pg.Pool({ connectionString: config.centralDatabaseUrl, max: 2 });
  const store = new CentralStore(pool, new SecretBox(config.encryptionKey));
  const results: Array<{ subdomain: string; ok: boolean; applied: string[]; error?: string }> = [];
  try {
    for (const row of (await store.list()).filter((o) => o.status === 'active' && o.upstream_host && o.upstream_database)) {
      try {
        const applied = await applyMigrations(urlOf(store.upstreamOf(row)!), orchestraSet, log);
        results.push({ subdomain: row.subdomain, ok: true, applied });
      } catch (e) {
        results.push({ subdomain: row.subdomain, ok: false, applied: [], error: (e as Error).message });
      }
    }
  } finally {
    await pool.end();
  }
  print(json, { results }, results.map((r) => `${r.ok ? 'ok    ' : 'FAILED'} ${r.subdomain}  ${r.ok ? (r.applied.join(', ') || 'up to date') : r.error}`).join('\n') || 'no active orchestras');
  return results.every((r) => r.ok) ? 0 : 1;
}

function print(json: boolean, data: unknown, text: string): void {
  process.stdout.write((json ? JSON.stringify(data, null, 2) : text) + '\n');
}
