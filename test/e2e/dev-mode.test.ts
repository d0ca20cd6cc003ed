// README's quickstart, followed as a user would: `stagedoor dev` in a process
// of its own (a fresh STAGEDOOR_DATA_DIR, free ports), the admin token read
// from its banner, the README's request bodies, the handed-out connection
// string used with the real psql; then stop with SIGTERM or Ctrl-C, nothing
// left running, and a restart that keeps orchestras, tokens and data.

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { chmodSync, existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { freePort } from '../../cli/embedded-postgres.js';
import { CLI } from '../fixtures/cli.js';
import { psql } from '../fixtures/psql.js';

const START_TIMEOUT_MS = 120_000;
const STOP_TIMEOUT_MS = 60_000;
/** variables a developer's shell may hold that would change what `dev` does: the quickstart starts without them */
const STAGEDOOR_VARIABLES = [
  'ADMIN_TOKEN', 'PROXY_TOKEN', 'ENCRYPTION_KEY', 'TOKEN_SIGNING_KEY', 'CENTRAL_DATABASE_URL', 'TENANT_SERVER_URL', 'CONTROL_PLANE_URL',
  'TLS_CERT_FILE', 'TLS_KEY_FILE', 'REDIS_URL', 'PUBLIC_PROXY_ADDRESS', 'REQUIRE_TLS', 'STAGEDOOR_MANAGES_TENANT_SERVER',
];

interface Ports {
  proxy: number;
  api: number;
  metrics: number;
}

interface DevProcess {
  child: ChildProcess;
  adminToken: string;
  apiUrl: string;
  proxyAddress: string;
  output(): string;
  /** sends the signal and resolves with the exit code (null: killed by a signal) */
  stop(signal: NodeJS.Signals): Promise<number | null>;
}

function devEnv(dataDir: string, ports: Ports): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = { ...process.env, STAGEDOOR_DATA_DIR: dataDir };
  for (const name of STAGEDOOR_VARIABLES) delete env[name];
  return {
    ...env,
    PROXY_LISTEN: `127.0.0.1:${ports.proxy}`,
    CONTROL_PLANE_LISTEN: `127.0.0.1:${ports.api}`,
    METRICS_LISTEN: `127.0.0.1:${ports.metrics}`,
    LOG_LEVEL: 'warn',
  };
}

const running = new Set<ChildProcess>();

/** Spawns `stagedoor dev` and resolves once its banner is out (or rejects with its output when it exits first). */
function spawnDev(dataDir: string, ports: Ports): { child: ChildProcess; started: Promise<DevProcess>; exited: Promise<number | null>; output: () => string } {
  const child = spawn(process.execPath, [CLI, 'dev'], { env: devEnv(dataDir, ports), stdio: ['ignore', 'pipe', 'pipe'] });
  running.add(child);
  let out = '';
  const exited = new Promise<number | null>((resolve) =>
    child.once('exit', (code) => {
      running.delete(child);
      resolve(code);
    }),
  );
  const started = new Promise<DevProcess>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no banner within ${START_TIMEOUT_MS / 1000} s:\n${out}`)), START_TIMEOUT_MS);
    const onData = (d: Buffer): void => {
      out += d.toString();
      const token = /^ {2}admin token +(\S+)$/m.exec(out);
      const api = /^ {2}control plane +(\S+)$/m.exec(out);
      const proxy = /^ {2}proxy +(\S+)/m.exec(out);
      if (token && api && proxy && /Stop with Ctrl-C/.test(out)) {
        clearTimeout(timer);
        resolve({
          child,
          adminToken: token[1]!,
          apiUrl: api[1]!,
          proxyAddress: proxy[1]!,
          output: () => out,
          stop: async (signal) => {
            child.kill(signal);
            const killer = setTimeout(() => child.kill('SIGKILL'), STOP_TIMEOUT_MS);
            const code = await exited;
            clearTimeout(killer);
            return code;
          },
        });
      }
    };
    child.stderr!.on('data', onData);
    child.stdout!.on('data', onData);
    void exited.then((code) => {
      clearTimeout(timer);
      reject(new Error(`stagedoor dev exited (${code}) before its banner:\n${out}`));
    });
  });
  return { child, started, exited, output: () => out };
}

/** Processes whose command line names the data directory (the embedded postgres servers, …). */
function processesUsing(dir: string): Promise<string[]> {
  return new Promise((resolve, reject) => {
    execFile('pgrep', ['-a', '-f', dir], (err, stdout) => {
      if (err && (err as { code?: number }).code === 1) return resolve([]); // none matched
      if (err) return reject(err);
      resolve(stdout.trim().split('\n').filter(Boolean));
    });
  });
}

async function api<T = Record<string, any>>(dev: DevProcess, method: string, path: string, body?: unknown): Promise<{ status: number; body: T }> {
  const res = await fetch(dev.apiUrl + path, {
    method,
    headers: { authorization: `Bearer ${dev.adminToken}`, ...(body !== undefined ? { 'content-type': 'application/json' } : {}) },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  return { status: res.status, body: (await res.json()) as T };
}

describe('stagedoor dev, as README’s quickstart has a user run it', () => {
  let root: string;
  let dataDir: string;
  let ports: Ports;
  let dev: DevProcess | undefined;
  let adminToken: string;
  let connectionString: string;

  before(async () => {
    root = mkdtempSync(join(tmpdir(), 'stagedoor-e2e-'));
    // a project directory as users have one: searchable by others (as root, the embedded servers run as `postgres`)
    chmodSync(root, 0o755);
    dataDir = join(root, '.stagedoor');
    ports = { proxy: await freePort(), api: await freePort(), metrics: await freePort() };
  });
  after(async () => {
    for (const child of running) {
      child.kill('SIGTERM');
      await new Promise((r) => child.once('exit', r));
    }
    // last resort, by pid: servers a failed test left behind (the assertions above report it)
    for (const line of await processesUsing(dataDir).catch(() => [])) {
      const pid = Number(line.split(' ')[0]);
      if (pid > 0) {
        try {
          process.kill(pid, 'SIGKILL');
        } catch {
          // already gone
        }
      }
    }
    rmSync(root, { recursive: true, force: true });
  });

  test('it starts on a fresh data directory and its banner gives the proxy, the API and an admin token', async () => {
    dev = await spawnDev(dataDir, ports).started;
    adminToken = dev.adminToken;
    assert.equal(dev.proxyAddress, `127.0.0.1:${ports.proxy}`);
    assert.equal(dev.apiUrl, `http://127.0.0.1:${ports.api}`);
    assert.match(adminToken, /^sd_admin_\S{20,}$/);
    assert.match(dev.output(), new RegExp(`data in ${dataDir.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}`));
    assert.match(dev.output(), /export ADMIN_TOKEN=sd_admin_/);
  });

  test('the README’s request creates an orchestra, and the token answer carries a ready connection string', async () => {
    // README step 1, the same JSON body as its curl
    const created = await api(dev!, 'POST', '/v1/orchestras', JSON.parse('{"subdomain":"sco","name":"Stockholm Chamber Orchestra"}'));
    assert.equal(created.status, 201, JSON.stringify(created.body));
    assert.equal(created.body.status, 'active');
    assert.equal(created.body.name, 'Stockholm Chamber Orchestra');
    // README step 2
    const token = await api<{ token: string; connectionString: string }>(dev!, 'POST', '/v1/orchestras/sco/tokens', JSON.parse('{"name":"laptop"}'));
    assert.equal(token.status, 201, JSON.stringify(token.body));
    connectionString = token.body.connectionString;
    assert.equal(connectionString, `postgres://sco:${token.body.token}@127.0.0.1:${ports.proxy}/sco?sslmode=require`);
  });

  test('psql with that connection string (TLS required, the token as password) lands in the orchestra’s database', async () => {
    const r = await psql(connectionString, [
      '-Atc', 'select current_database(), current_user',
      '-c', "create table rehearsals (id int primary key, piece text); insert into rehearsals values (1, 'Sibelius 5'), (2, 'Nielsen 4')",
      '-c', 'select piece from rehearsals order by id',
    ]);
    assert.equal(r.code, 0, r.stderr);
    assert.deepEqual(r.stdout.trim().split('\n'), ['sd_sco|sd_sco', 'CREATE TABLE', 'INSERT 0 2', 'Sibelius 5', 'Nielsen 4']);
    const plain = await psql(connectionString.replace('sslmode=require', 'sslmode=disable'), ['-Atc', 'select 1']);
    assert.equal(plain.code, 0, 'loopback clients may connect without TLS (REQUIRE_TLS exempts loopback)');
  });

  test('a second dev on the same data directory fails with a clear message and leaves the first one running', async () => {
    const other: Ports = { proxy: await freePort(), api: await freePort(), metrics: await freePort() };
    const second = spawnDev(dataDir, other);
    second.started.catch(() => {}); // it is expected never to print a banner
    const code = await second.exited;
    assert.equal(code, 2, second.output());
    assert.match(second.output(), new RegExp(`another "stagedoor dev" \\(pid ${dev!.child.pid}\\) is already running on ${dataDir.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}`));
    assert.doesNotMatch(second.output(), /^\s+at /m, 'a message, not a stack trace');
    const r = await psql(connectionString, ['-Atc', 'select count(*) from rehearsals']);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stdout.trim(), '2');
  });

  test('SIGTERM stops it: exit code 0, and no process is left using the data directory', async () => {
    assert.ok((await processesUsing(dataDir)).length >= 2, 'the embedded servers run while dev runs');
    const code = await dev!.stop('SIGTERM');
    dev = undefined;
    assert.equal(code, 0);
    assert.deepEqual(await processesUsing(dataDir), []);
  });

  test('started again on the same data directory, the orchestra, the token (the same connection string) and the data are still there', async () => {
    assert.equal(existsSync(join(dataDir, 'dev.lock')), false, 'a clean stop releases the lock');
    // as if a dev had been killed: its lock names a process that is gone, and must not block this start
    const gone = spawn(process.execPath, ['-e', '']);
    await new Promise((r) => gone.once('exit', r));
    writeFileSync(join(dataDir, 'dev.lock'), JSON.stringify({ pid: gone.pid, cmdline: `${process.execPath} ${CLI} dev` }) + '\n');
    dev = await spawnDev(dataDir, ports).started;
    assert.equal(dev.adminToken, adminToken, 'the same admin token');
    const o = await api(dev, 'GET', '/v1/orchestras/sco');
    assert.equal(o.status, 200);
    assert.equal(o.body.status, 'active');
    const tokens = await api<{ tokens: Array<{ name: string; revokedAt: string | null }> }>(dev, 'GET', '/v1/orchestras/sco/tokens');
    assert.deepEqual(tokens.body.tokens.map((t) => [t.name, t.revokedAt]), [['laptop', null]]);
    const r = await psql(connectionString, ['-Atc', 'select piece from rehearsals order by id']);
    assert.equal(r.code, 0, r.stderr);
    assert.deepEqual(r.stdout.trim().split('\n'), ['Sibelius 5', 'Nielsen 4']);
  });

  test('Ctrl-C (SIGINT) stops it cleanly too: exit code 0, nothing left running', async () => {
    const code = await dev!.stop('SIGINT');
    dev = undefined;
    assert.equal(code, 0);
    assert.deepEqual(await processesUsing(dataDir), []);
  });
});
