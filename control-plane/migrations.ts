// The two migration sets, kept apart (the incident: one schema file created
// tenant tables in the central database). Each set has its own directory and
// its own bookkeeping table, and each knows the tables it creates so the other
// side can be checked for leaks.

import { readdirSync, readFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { runner } from 'node-pg-migrate';
import pg from 'pg';
import { silentLogger, type Logger } from '../common/log.js';

const REPO_ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');
export const CENTRAL_SCHEMA_DIR = join(REPO_ROOT, 'schemas', 'central');
export const DEFAULT_ORCHESTRA_SCHEMA_DIR = join(REPO_ROOT, 'schemas', 'orchestra');
export const CENTRAL_MIGRATIONS_TABLE = 'stagedoor_central_migrations';
export const ORCHESTRA_MIGRATIONS_TABLE = 'stagedoor_orchestra_migrations';

export interface MigrationSet {
  dir: string;
  table: string;
  /** tables this set creates (lower-case, unqualified) */
  tables: string[];
}

export function migrationSet(kind: 'central' | 'orchestra', orchestraDir?: string): MigrationSet {
  const dir = kind === 'central' ? CENTRAL_SCHEMA_DIR : (orchestraDir ?? DEFAULT_ORCHESTRA_SCHEMA_DIR);
  return { dir, table: kind === 'central' ? CENTRAL_MIGRATIONS_TABLE : ORCHESTRA_MIGRATIONS_TABLE, tables: tablesCreatedIn(dir) };
}

/** Table names from `CREATE TABLE` statements of a set's .sql files. */
export function tablesCreatedIn(dir: string): string[] {
  const names = new Set<string>();
  for (const file of readdirSync(dir).filter((f) => f.endsWith('.sql')).sort()) {
    const up = readFileSync(join(dir, file), 'utf8').split(/^--\s*Down Migration/im)[0] ?? '';
    for (const m of up.matchAll(/CREATE\s+(?:UNLOGGED\s+)?TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?(?:"?public"?\.)?"?([A-Za-z_][A-Za-z0-9_]*)"?/gi)) {
      names.add(m[1]!.toLowerCase());
    }
  }
  return [...names].sort();
}

/** Applies a set to one database; serialised per database by node-pg-migrate's advisory lock. */
export async function applyMigrations(databaseUrl: string, set: MigrationSet, log: Logger = silentLogger): Promise<string[]> {
  const ran = await runner({
    databaseUrl,
    dir: set.dir,
    migrationsTable: set.table,
    direction: 'up',
    checkOrder: true,
    singleTransaction: true,
    advisoryLockMode: 'wait',
    logger: { debug: () => {}, info: (m: string) => log.debug(m), warn: (m: string) => log.warn(m), error: (m: string) => log.error(m) },
  });
  return ran.map((m) => m.name);
}

/** Which of `tables` exist in the connected database (public schema or any other). */
export async function existingTables(client: pg.ClientBase, tables: readonly string[]): Promise<string[]> {
  if (tables.length === 0) return [];
  const res = await client.query<{ relname: string }>(
    `SELECT DISTINCT c.relname FROM pg_catalog.pg_class c
       JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
      WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
        AND c.relname = ANY($1::text[])`,
    [tables],
  );
  return res.rows.map((r) => r.relname).sort();
}
