#!/usr/bin/env node
// The `stagedoor` command. Roles (dev, proxy, control-plane, migrate) run
// here; API client commands live in cli/commands/.

import { ConfigError, loadControlPlaneConfig, loadProxyConfig } from '../common/config.js';
import { createLogger } from '../common/log.js';
import { CentralSchemaLeak, ControlPlane } from '../control-plane/server.js';
import { ProxyServer } from '../proxy/server.js';
import { DevAlreadyRunning, startDev } from './dev.js';
import { runClientCommand, CLIENT_COMMANDS_HELP } from './client-commands.js';
import { runMigrate } from './migrate.js';

const HELP = `stagedoor — a PostgreSQL gateway that enforces database-per-tenant isolation

Usage: stagedoor <command> [options]

Roles:
  dev                      everything on one machine (embedded PostgreSQL); = npm start
  proxy                    the Postgres-wire proxy (configured by environment)
  control-plane            the HTTP API, provisioning, tokens, audits
  migrate [--orchestras]   apply schemas/central to CENTRAL_DATABASE_URL
                           (--orchestras: bring every active orchestra database to the latest orchestra set)

${CLIENT_COMMANDS_HELP}
Exit codes: 0 success; 1 failure or (audit) violations found; 2 could not run (bad usage, unreachable).
Environment: see README.md ("Configuration").
`;

async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  if (!command || command === '--help' || command === '-h' || command === 'help') {
    process.stdout.write(HELP);
    return command ? 0 : 2;
  }
  switch (command) {
    case 'dev':
      return runUntilSignal(async () => {
        const dev = await startDev(process.env);
        return () => dev.stop();
      });
    case 'proxy':
      return runUntilSignal(async () => {
        const config = loadProxyConfig(process.env);
        const proxy = new ProxyServer({ config, log: createLogger({ role: 'proxy' }) });
        await proxy.start();
        return () => proxy.stop(config.drainTimeoutMs);
      });
    case 'control-plane':
      return runUntilSignal(async () => {
        const cp = await ControlPlane.start(loadControlPlaneConfig(process.env), createLogger({ role: 'control-plane' }));
        return () => cp.stop();
      });
    case 'migrate':
      return runMigrate(rest, process.env);
    default:
      return runClientCommand(command, rest, process.env);
  }
}

/** Starts a long-running role and stops it cleanly on SIGTERM/SIGINT. */
async function runUntilSignal(start: () => Promise<() => Promise<void>>): Promise<number> {
  const stop = await start();
  await new Promise<void>((resolve) => {
    const onSignal = (): void => {
      process.off('SIGTERM', onSignal);
      process.off('SIGINT', onSignal);
      resolve();
    };
    process.on('SIGTERM', onSignal);
    process.on('SIGINT', onSignal);
  });
  await stop();
  return 0;
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (e: unknown) => {
    if (e instanceof ConfigError || e instanceof CentralSchemaLeak || e instanceof DevAlreadyRunning) {
      process.stderr.write(`stagedoor: ${e.message}\n`);
      process.exit(2);
    }
    process.stderr.write(`stagedoor: ${(e as Error)?.stack ?? String(e)}\n`);
    process.exit(1);
  },
);
