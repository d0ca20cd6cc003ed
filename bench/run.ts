// `npm run bench [-- --quick]`: stagedoor against a direct connection and
// PgBouncer (session mode) on the same PostgreSQL server, with pgbench, psql
// \copy and idle sessions. Prints a Markdown table on stdout, progress on
// stderr, and writes bench/results/latest.{md,json}. See bench/README.md.
//
// Everything it starts (the `stagedoor dev` child, PgBouncer, the tenant
// PostgreSQL server, pgbench/psql runs, temp dirs) is stopped in a `finally`
// and on SIGINT/SIGTERM.

import { execFile, spawn, type ChildProcess, type SpawnOptions } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { createWriteStream, existsSync, readdirSync, readFileSync, type WriteStream } from 'node:fs';
import { chmod, chown, mkdir, mkdtemp, rm, stat, writeFile } from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import pg from 'pg';
import { freePort, startEmbeddedPostgres } from '../cli/embedded-postgres.js';

const execFileP = promisify(execFile);

// ---------------------------------------------------------------------------------------------
// options

interface Options {
  quick: boolean;
  rounds: number;
  seconds: number;
  idleSessions: number;
  copyRows: number;
  pgbouncer: boolean;
  logLevel: string;
}

const USAGE = `usage: npm run bench -- [--quick] [--rounds N] [-T SECONDS] [--idle N] [--copy-rows N] [--no-pgbouncer] [--log-level L]
  --quick          development profile: 1 round, -T 4
  --rounds N       rounds of A B C (direct, stagedoor, pgbouncer) per test (full: 3)
  -T, --time S     pgbench duration per run in seconds (full: 10)
  --idle N         idle sessions opened for the RSS measurement (default 1000)
  --copy-rows N    rows for the COPY test (default 2000000)
  --no-pgbouncer   skip the PgBouncer column
  --log-level L    LOG_LEVEL of the stagedoor child (default warn: only problems are logged)
`;

function parseArgs(argv: string[]): Options {
  const o: Options = { quick: false, rounds: 0, seconds: 0, idleSessions: 1000, copyRows: 2_000_000, pgbouncer: true, logLevel: 'warn' };
  const int = (v: string | undefined, name: string): number => {
    const n = Number(v);
    if (!Number.isInteger(n) || n <= 0) throw new UsageError(`${name} needs a positive integer, got ${JSON.stringify(v)}`);
    return n;
  };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    switch (a) {
      case '--quick': o.quick = true; break;
      case '--rounds': o.rounds = int(argv[++i], a); break;
      case '-T': case '--time': o.seconds = int(argv[++i], a); break;
      case '--idle': o.idleSessions = int(argv[++i], a); break;
      case '--copy-rows': o.copyRows = int(argv[++i], a); break;
      case '--no-pgbouncer': o.pgbouncer = false; break;
      case '--log-level': o.logLevel = argv[++i] ?? 'warn'; break;
      case '-h': case '--help': process.stdout.write(USAGE); process.exit(0); break;
      default: throw new UsageError(`unknown option ${a}`);
    }
  }
  if (o.rounds === 0) o.rounds = o.quick ? 1 : 3;
  if (o.seconds === 0) o.seconds = o.quick ? 4 : 10;
  return o;
}

class UsageError extends Error {}

// ---------------------------------------------------------------------------------------------
// progress, processes, clean-up

const started = Date.now();
function progress(msg: string): void {
  const s = Math.round((Date.now() - started) / 1000);
  process.stderr.write(`[bench ${String(Math.floor(s / 60)).padStart(2, '0')}:${String(s % 60).padStart(2, '0')}] ${msg}\n`);
}

const cleanups: Array<{ what: string; run: () => Promise<void> }> = [];
const running = new Set<ChildProcess>();
let cleaning: Promise<void> | null = null;

function onCleanup(what: string, run: () => Promise<void>): void {
  cleanups.push({ what, run });
}

function cleanup(): Promise<void> {
  cleaning ??= (async () => {
    for (const c of running) c.kill('SIGKILL');
    for (const c of cleanups.reverse()) {
      try {
        await c.run();
      } catch (e) {
        progress(`clean-up of ${c.what} failed: ${(e as Error).message}`);
      }
    }
    cleanups.length = 0;
  })();
  return cleaning;
}

let interrupted = false;
function onSignal(signal: NodeJS.Signals): void {
  if (interrupted) return;
  interrupted = true;
  progress(`${signal}: stopping everything that was started`);
  void cleanup().finally(() => process.exit(130));
}

interface RunResult { code: number | null; signal: NodeJS.Signals | null; stdout: string; stderr: string; ms: number }

/** Runs a command to completion (stdout/stderr collected), killed after timeoutMs. */
function run(cmd: string, args: string[], opts: { env?: NodeJS.ProcessEnv; timeoutMs?: number } = {}): Promise<RunResult> {
  if (interrupted) return Promise.reject(new Error('interrupted'));
  return new Promise((resolve, reject) => {
    const t = process.hrtime.bigint();
    const child = spawn(cmd, args, { env: opts.env ?? process.env, stdio: ['ignore', 'pipe', 'pipe'] });
    running.add(child);
    let stdout = '';
    let stderr = '';
    child.stdout!.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    child.stderr!.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    const timer = opts.timeoutMs ? setTimeout(() => child.kill('SIGKILL'), opts.timeoutMs) : null;
    child.on('error', (e) => {
      running.delete(child);
      if (timer) clearTimeout(timer);
      reject(e);
    });
    child.on('close', (code, signal) => {
      running.delete(child);
      if (timer) clearTimeout(timer);
      resolve({ code, signal, stdout, stderr, ms: Number(process.hrtime.bigint() - t) / 1e6 });
    });
  });
}

async function which(cmd: string): Promise<string | null> {
  const r = await run('sh', ['-c', `command -v ${cmd} || { [ -x /usr/sbin/${cmd} ] && echo /usr/sbin/${cmd}; }`]);
  const p = r.stdout.trim().split('\n')[0];
  return r.code === 0 && p ? p : null;
}

/** Waits for a spawned long-running process to exit, signalling it, then SIGKILL after graceMs. */
async function stopProcess(child: ChildProcess, signal: NodeJS.Signals, graceMs: number): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise<void>((r) => child.once('exit', () => r()));
  child.kill(signal);
  const timer = setTimeout(() => child.kill('SIGKILL'), graceMs);
  await exited;
  clearTimeout(timer);
}

const delay = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

async function portAccepts(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.connect({ host: '127.0.0.1', port });
    s.once('connect', () => { s.destroy(); resolve(true); });
    s.once('error', () => resolve(false));
  });
}

/** Removes URLs and host names from tool output before we show it (apt prints its mirrors). */
function scrub(text: string): string {
  return text.replace(/\b[a-z][a-z0-9+.-]*:\/\/\S+/gi, '<url>').replace(/\b(?:[a-z0-9-]+\.)+(?:org|com|net|io)\b/gi, '<host>');
}

// ---------------------------------------------------------------------------------------------
// /proc

async function clockTicks(): Promise<number> {
  try {
    const r = await run('getconf', ['CLK_TCK']);
    const n = Number(r.stdout.trim());
    return Number.isFinite(n) && n > 0 ? n : 100;
  } catch {
    return 100;
  }
}

/** utime + stime of one process (all its threads, not its children), in clock ticks. */
function cpuTicks(pid: number): number {
  const s = readFileSync(`/proc/${pid}/stat`, 'utf8');
  const rest = s.slice(s.lastIndexOf(')') + 2).split(' ');
  // rest[0] is field 3 (state); utime is field 14, stime field 15
  return Number(rest[11]) + Number(rest[12]);
}

function rssKb(pid: number): number {
  const m = /^VmRSS:\s+(\d+)\s+kB/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  if (!m) throw new Error(`no VmRSS for pid ${pid}`);
  return Number(m[1]);
}

/** Busy clock ticks of the whole machine (all cores), from /proc/stat. */
function machineBusyTicks(): number {
  const f = readFileSync('/proc/stat', 'utf8').split('\n')[0].trim().split(/\s+/).slice(1).map(Number);
  // user nice system idle iowait irq softirq steal
  return f[0] + f[1] + f[2] + f[5] + f[6] + (f[7] ?? 0);
}

/**
 * CPU ticks of this bench and everything below it (stagedoor, PostgreSQL, PgBouncer, pgbench), exited children
 * included through their parents' cutime/cstime.
 */
function ownTreeTicks(): number {
  const procs = new Map<number, { ppid: number; ticks: number }>();
  for (const name of readdirSync('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    try {
      const s = readFileSync(`/proc/${name}/stat`, 'utf8');
      const rest = s.slice(s.lastIndexOf(')') + 2).split(' ');
      // rest[1] = ppid (field 4); utime, stime, cutime, cstime = fields 14–17
      procs.set(Number(name), { ppid: Number(rest[1]), ticks: Number(rest[11]) + Number(rest[12]) + Number(rest[13]) + Number(rest[14]) });
    } catch {
      // exited meanwhile
    }
  }
  const children = new Map<number, number[]>();
  for (const [pid, p] of procs) {
    const list = children.get(p.ppid);
    if (list) list.push(pid);
    else children.set(p.ppid, [pid]);
  }
  let total = 0;
  const stack = [process.pid];
  while (stack.length) {
    const pid = stack.pop()!;
    total += procs.get(pid)?.ticks ?? 0;
    stack.push(...(children.get(pid) ?? []));
  }
  return total;
}

/** Measures how much CPU other work on the machine took while `fn` ran, in cores. */
async function withForeignLoad<T>(ticksPerSecond: number, fn: () => Promise<T>): Promise<{ value: T; foreignCores: number }> {
  const t = Date.now();
  const busy0 = machineBusyTicks();
  const own0 = ownTreeTicks();
  const value = await fn();
  const foreign = machineBusyTicks() - busy0 - (ownTreeTicks() - own0);
  const seconds = (Date.now() - t) / 1000;
  return { value, foreignCores: Math.max(0, foreign / ticksPerSecond / Math.max(seconds, 0.001)) };
}

// ---------------------------------------------------------------------------------------------
// targets

type TargetName = 'direct' | 'stagedoor' | 'pgbouncer';

interface Target {
  name: TargetName;
  host: string;
  port: number;
  user: string;
  password: string;
  database: string;
  /** the process whose CPU and RSS we meter (stagedoor: the dev child; pgbouncer: pgbouncer itself) */
  pid: number | null;
}

function clientEnv(t: Target): NodeJS.ProcessEnv {
  // Loopback everywhere; stagedoor accepts non-TLS clients on loopback (REQUIRE_TLS only binds remote ones).
  return { ...process.env, PGPASSWORD: t.password, PGSSLMODE: 'disable', PGAPPNAME: 'stagedoor-bench', PGCONNECT_TIMEOUT: '20' };
}

function connArgs(t: Target): string[] {
  return ['-h', t.host, '-p', String(t.port), '-U', t.user];
}

async function psql(t: Target, command: string, timeoutMs = 600_000): Promise<RunResult> {
  return run('psql', [...connArgs(t), '-d', t.database, '-X', '-v', 'ON_ERROR_STOP=1', '-c', command], { env: clientEnv(t), timeoutMs });
}

async function psqlOk(t: Target, command: string): Promise<string> {
  const r = await psql(t, command);
  if (r.code !== 0) throw new Error(`psql on ${t.name} failed (${command.slice(0, 80)}): ${r.stderr.trim()}`);
  return r.stdout;
}

// ---------------------------------------------------------------------------------------------
// stagedoor (own process) and its upstream server

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');

interface Stagedoor {
  child: ChildProcess;
  proxyPort: number;
  apiUrl: string;
  metricsUrl: string;
  adminToken: string;
  problems: string[];
  problemCount: number;
}

async function startStagedoor(tmp: string, tenantServerUrl: string, logLevel: string): Promise<Stagedoor> {
  const [proxyPort, apiPort, metricsPort] = [await freePort(), await freePort(), await freePort()];
  const adminToken = `sd_admin_bench_${randomBytes(18).toString('base64url')}`;
  const dataDir = path.join(tmp, 'stagedoor');
  const env: NodeJS.ProcessEnv = {
    ...process.env,
    STAGEDOOR_DATA_DIR: dataDir,
    PROXY_LISTEN: `127.0.0.1:${proxyPort}`,
    CONTROL_PLANE_LISTEN: `127.0.0.1:${apiPort}`,
    METRICS_LISTEN: `127.0.0.1:${metricsPort}`,
    LOG_LEVEL: logLevel,
    ADMIN_TOKEN: adminToken,
    TENANT_SERVER_URL: tenantServerUrl,
  };
  const logFile: WriteStream = createWriteStream(path.join(tmp, 'stagedoor.log'));
  const child = spawn(process.execPath, [path.join(ROOT, 'dist', 'cli', 'main.js'), 'dev'], { cwd: ROOT, env, stdio: ['ignore', 'pipe', 'pipe'] } satisfies SpawnOptions);
  const sd: Stagedoor = {
    child, proxyPort, adminToken, problems: [], problemCount: 0,
    apiUrl: `http://127.0.0.1:${apiPort}`,
    metricsUrl: `http://127.0.0.1:${metricsPort}`,
  };
  onCleanup('stagedoor dev child', async () => {
    progress('stopping the stagedoor dev child (SIGTERM)');
    await stopProcess(child, 'SIGTERM', 30_000);
    logFile.end();
  });
  let exitInfo: string | null = null;
  child.on('exit', (code, signal) => (exitInfo = `exit code ${code ?? '-'} signal ${signal ?? '-'}`));
  const collect = (stream: NodeJS.ReadableStream, name: string): void => {
    let buf = '';
    stream.setEncoding('utf8');
    stream.on('data', (d: string) => {
      logFile.write(d);
      buf += d;
      let nl: number;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        // JSON logs on stdout; the banner (not printed: we read nothing else there) and crashes on stderr
        const isProblem = name === 'stdout' ? /"level":"(warn|error|fatal)"/.test(line) : /error|warn|fatal|exception/i.test(line);
        if (isProblem) {
          sd.problemCount++;
          if (sd.problems.length < 40) sd.problems.push(line.slice(0, 600));
        }
      }
    });
  };
  collect(child.stdout!, 'stdout');
  collect(child.stderr!, 'stderr');

  const deadline = Date.now() + 180_000;
  for (;;) {
    if (exitInfo) throw new Error(`stagedoor dev exited during start-up (${exitInfo}); see ${path.join(tmp, 'stagedoor.log')}: ${sd.problems.join(' | ')}`);
    if (Date.now() > deadline) throw new Error('stagedoor dev did not become ready within 180 s');
    const ok = await Promise.all([
      fetch(`${sd.apiUrl}/healthz`).then((r) => r.ok, () => false),
      fetch(`${sd.metricsUrl}/readyz`).then((r) => r.ok, () => false),
      portAccepts(proxyPort),
    ]);
    if (ok.every(Boolean)) return sd;
    await delay(250);
  }
}

async function api<T>(sd: Stagedoor, method: string, route: string, body?: unknown): Promise<{ status: number; body: T }> {
  const r = await fetch(`${sd.apiUrl}${route}`, {
    method,
    headers: { authorization: `Bearer ${sd.adminToken}`, ...(body === undefined ? {} : { 'content-type': 'application/json' }) },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await r.text();
  let parsed: unknown = text;
  try {
    parsed = JSON.parse(text);
  } catch {
    // keep text
  }
  return { status: r.status, body: parsed as T };
}

interface OrchestraView { status: string; upstream: { host: string; port: number; database: string } }

async function proxyHeapUsed(sd: Stagedoor): Promise<number | null> {
  try {
    const text = await (await fetch(`${sd.metricsUrl}/metrics`)).text();
    const m = /^stagedoor_proxy_nodejs_heap_size_used_bytes\s+([\d.e+]+)/m.exec(text);
    return m ? Number(m[1]) : null;
  } catch {
    return null;
  }
}

async function scrapeProxyMetrics(sd: Stagedoor): Promise<string[]> {
  try {
    const text = await (await fetch(`${sd.metricsUrl}/metrics`)).text();
    return text.split('\n').filter((l) => /^stagedoor_(refusals_total|audit_events_dropped_total|sessions_terminated_total|sessions_total|route_cache_total|upstream_reused_total|upstream_discarded_total)\b/.test(l));
  } catch (e) {
    return [`(metrics not readable: ${(e as Error).message})`];
  }
}

// ---------------------------------------------------------------------------------------------
// PgBouncer

interface Bouncer { child: ChildProcess; port: number; version: string; stderrTail: string[] }

async function ensurePgbouncer(): Promise<{ bin: string | null; note: string }> {
  const found = await which('pgbouncer');
  if (found) return { bin: found, note: 'PgBouncer was already installed' };
  progress('pgbouncer is missing: installing it with apt-get (apt-get update, then apt-get install -y pgbouncer)');
  const aptEnv = { ...process.env, DEBIAN_FRONTEND: 'noninteractive' };
  const update = await run('apt-get', ['update'], { env: aptEnv, timeoutMs: 300_000 }).catch((e: Error) => ({ code: 1, stderr: e.message, stdout: '' }) as RunResult);
  if (update.code !== 0) {
    const why = `apt-get update failed: ${scrub(update.stderr.trim().split('\n').slice(-3).join(' / '))}`;
    progress(`${why}; running without the PgBouncer column`);
    return { bin: null, note: why };
  }
  const install = await run('apt-get', ['install', '-y', '--no-install-recommends', 'pgbouncer'], { env: aptEnv, timeoutMs: 600_000 })
    .catch((e: Error) => ({ code: 1, stderr: e.message, stdout: '' }) as RunResult);
  const bin = await which('pgbouncer');
  if (install.code !== 0 || !bin) {
    const why = `apt-get install -y pgbouncer failed (exit ${install.code}): ${scrub(install.stderr.trim().split('\n').slice(-3).join(' / '))}`;
    progress(`${why}; running without the PgBouncer column`);
    return { bin: null, note: why };
  }
  progress(`pgbouncer installed (${bin})`);
  return { bin, note: 'PgBouncer was installed by this run with apt-get install -y pgbouncer' };
}

async function startPgbouncer(bin: string, tmp: string, upstream: { port: number; database: string }, superuser: string, password: string): Promise<Bouncer> {
  const uid = Number((await execFileP('id', ['-u', 'postgres'])).stdout.trim());
  const gid = Number((await execFileP('id', ['-g', 'postgres'])).stdout.trim());
  const dir = path.join(tmp, 'pgbouncer');
  await mkdir(dir, { mode: 0o700 });
  const port = await freePort();
  const ini = path.join(dir, 'pgbouncer.ini');
  const users = path.join(dir, 'userlist.txt');
  await writeFile(users, `"${superuser}" "${password.replace(/"/g, '""')}"\n`, { mode: 0o600 });
  await writeFile(ini, [
    '[databases]',
    `bench = host=127.0.0.1 port=${upstream.port} dbname=${upstream.database}`,
    '',
    '[pgbouncer]',
    'listen_addr = 127.0.0.1',
    `listen_port = ${port}`,
    'unix_socket_dir =',
    'auth_type = scram-sha-256',
    `auth_file = ${users}`,
    'pool_mode = session',
    'max_client_conn = 2000',
    'default_pool_size = 40',
    'ignore_startup_parameters = extra_float_digits,options',
    `admin_users = ${superuser}`,
    'log_connections = 0',
    'log_disconnections = 0',
    'log_pooler_errors = 1',
    '',
  ].join('\n'), { mode: 0o600 });
  for (const p of [dir, ini, users]) await chown(p, uid, gid);

  const version = (await run(bin, ['--version'])).stdout.trim().split('\n')[0] ?? 'unknown';
  // pgbouncer refuses to run as root: spawn it directly as the postgres user (so its pid is pgbouncer's own).
  const child = spawn(bin, [ini], { cwd: dir, uid, gid, env: { PATH: process.env.PATH ?? '/usr/bin:/bin' }, stdio: ['ignore', 'ignore', 'pipe'] });
  const b: Bouncer = { child, port, version, stderrTail: [] };
  onCleanup('pgbouncer', async () => {
    progress('stopping pgbouncer');
    await stopProcess(child, 'SIGTERM', 5_000);
  });
  child.stderr!.setEncoding('utf8').on('data', (d: string) => {
    for (const line of d.split('\n')) if (line.trim() && /ERROR|WARNING|FATAL/.test(line)) {
      b.stderrTail.push(line.slice(0, 400));
      if (b.stderrTail.length > 30) b.stderrTail.shift();
    }
  });
  let exited: string | null = null;
  child.on('exit', (code, signal) => (exited = `exit code ${code ?? '-'} signal ${signal ?? '-'}`));
  const deadline = Date.now() + 20_000;
  while (!(await portAccepts(port))) {
    if (exited) throw new Error(`pgbouncer exited at start (${exited}): ${b.stderrTail.join(' | ')}`);
    if (Date.now() > deadline) throw new Error('pgbouncer did not listen within 20 s');
    await delay(100);
  }
  return b;
}

// ---------------------------------------------------------------------------------------------
// measurements

interface PgbenchRun {
  test: string;
  target: TargetName;
  round: number;
  args: string[];
  ok: boolean;
  tps: number | null;
  tpsKind: string | null;
  latencyMs: number | null;
  transactions: number | null;
  failedTransactions: number | null;
  connectionTimeMs: number | null;
  wallSeconds: number;
  cpuTicks: number | null;
  cpuUsPerTxn: number | null;
  /** cores' worth of CPU taken by processes outside this bench during the run (other work on the machine) */
  foreignCores: number;
  error?: string;
}

interface PgbenchTest { id: string; label: string; args: string[]; clients: number }

function pgbenchTests(): PgbenchTest[] {
  const t = (id: string, label: string, clients: number, extra: string[]): PgbenchTest => ({
    id, label, clients, args: [...extra, '-c', String(clients), '-j', String(Math.min(clients, 2))],
  });
  return [
    t('S1', 'select-only (-S), 1 client', 1, ['-S']),
    t('S8', 'select-only (-S), 8 clients', 8, ['-S']),
    t('S32', 'select-only (-S), 32 clients', 32, ['-S']),
    t('N8', 'simple-update (-N), 8 clients', 8, ['-N']),
    t('SX8', 'select-only extended (-S -M extended), 8 clients', 8, ['-S', '-M', 'extended']),
    t('C4', 'connect per transaction (-C -S), 4 clients', 4, ['-C', '-S']),
  ];
}

const num = (re: RegExp, s: string): number | null => {
  const m = re.exec(s);
  return m ? Number(m[1]) : null;
};

async function runPgbench(test: PgbenchTest, t: Target, round: number, seconds: number, ticksPerSecond: number): Promise<PgbenchRun> {
  const args = ['-n', '-T', String(seconds), ...test.args, ...connArgs(t), t.database];
  const before = t.pid !== null ? cpuTicks(t.pid) : null;
  const { value: r, foreignCores } = await withForeignLoad(ticksPerSecond, () => run('pgbench', args, { env: clientEnv(t), timeoutMs: (seconds + 120) * 1000 }));
  if (interrupted) throw new Error('interrupted');
  const after = t.pid !== null ? cpuTicks(t.pid) : null;
  const out = r.stdout + '\n' + r.stderr;
  const tpsM = /tps = ([\d.]+) \(([^)]+)\)/.exec(out);
  const transactions = num(/number of transactions actually processed: (\d+)/, out);
  const cpu = before !== null && after !== null ? after - before : null;
  const run1: PgbenchRun = {
    test: test.id, target: t.name, round, args,
    ok: r.code === 0 && tpsM !== null,
    tps: tpsM ? Number(tpsM[1]) : null,
    tpsKind: tpsM ? tpsM[2] : null,
    latencyMs: num(/latency average = ([\d.]+) ms/, out),
    transactions,
    failedTransactions: num(/number of failed transactions: (\d+)/, out),
    connectionTimeMs: num(/(?:average|initial) connection time = ([\d.]+) ms/, out),
    wallSeconds: r.ms / 1000,
    cpuTicks: cpu,
    cpuUsPerTxn: cpu !== null && transactions ? (cpu / ticksPerSecond) * 1e6 / transactions : null,
    foreignCores,
  };
  const errLines = r.stderr.split('\n').filter((l) => /error|abort|fatal|could not/i.test(l));
  if (r.code !== 0 || errLines.length) run1.error = (errLines.length ? errLines.slice(0, 5).join(' | ') : `exit ${r.code} ${r.signal ?? ''}: ${r.stderr.trim().slice(-300)}`).slice(0, 1200);
  return run1;
}

interface CopyRun { direction: 'out' | 'in'; target: TargetName; round: number; ok: boolean; seconds: number; rows: number | null; bytes: number; foreignCores: number; mbPerSec: number | null; rowsPerSec: number | null; error?: string }

function copyQuery(rows: number): string {
  return `select g, md5(g::text) from generate_series(1,${rows}) g`;
}

async function runCopy(direction: 'out' | 'in', t: Target, round: number, rows: number, file: string, bytes: number, direct: Target, ticksPerSecond: number): Promise<CopyRun> {
  if (direction === 'in') await psqlOk(direct, 'TRUNCATE bench_copy');
  const command = direction === 'out' ? `\\copy (${copyQuery(rows)}) to '/dev/null'` : `\\copy bench_copy from '${file}'`;
  const { value: r, foreignCores } = await withForeignLoad(ticksPerSecond, () => psql(t, command));
  if (interrupted) throw new Error('interrupted');
  const copied = num(/COPY (\d+)/, r.stdout);
  const seconds = r.ms / 1000;
  const ok = r.code === 0 && copied === rows;
  const res: CopyRun = {
    direction, target: t.name, round, ok, seconds, rows: copied, bytes, foreignCores,
    mbPerSec: ok ? bytes / 1e6 / seconds : null,
    rowsPerSec: ok ? rows / seconds : null,
  };
  if (!ok) res.error = `exit ${r.code}, copied ${copied ?? 'none'}: ${r.stderr.trim().slice(0, 500)}`;
  return res;
}

/**
 * VmRSS once it has stopped moving: node's heap shrinks some seconds after a burst of work (V8's memory
 * reducer), which would otherwise show up as a negative per-session cost. At least 8 s, then until three
 * 1 s samples agree within 64 kB, at most 30 s.
 */
async function settledRss(pid: number): Promise<number> {
  await delay(8_000);
  const samples = [rssKb(pid)];
  for (let i = 0; i < 22; i++) {
    await delay(1_000);
    samples.push(rssKb(pid));
    const last = samples.slice(-3);
    if (last.length === 3 && Math.max(...last) - Math.min(...last) <= 64) break;
  }
  return samples[samples.length - 1];
}

interface IdleRun {
  target: TargetName;
  requested: number;
  opened: number;
  failed: number;
  openSeconds: number;
  rssBeforeKb: number;
  rssAfterKb: number;
  kbPerSession: number | null;
  /** RSS once the first half was open: the second half's slope leaves out one-time costs (code compiled, caches filled) */
  rssMidKb: number | null;
  sessionsAtMid: number | null;
  marginalKbPerSession: number | null;
  /** stagedoor only: V8 heap used (the proxy's own /metrics) after − before, per session; garbage not yet collected included */
  heapUsedKbPerSession: number | null;
  errors: string[];
}

async function idleSessions(t: Target, n: number, heapUsed?: () => Promise<number | null>): Promise<IdleRun> {
  if (t.pid === null) throw new Error(`no process to meter for ${t.name}`);
  const pid = t.pid;
  const rssBeforeKb = await settledRss(pid);
  const heapBefore = heapUsed ? await heapUsed() : null;
  const clients: pg.Client[] = [];
  const errors = new Map<string, number>();
  let failed = 0;
  let failedBatches = 0;
  const began = Date.now();
  const half = Math.ceil(n / 100) * 50; // a batch boundary near n/2
  let mid: { sessions: number; rssKb: number } | null = null;
  for (let i = 0; i < n && failedBatches < 3 && !interrupted; i += 50) {
    if (i === half && mid === null && half > 0) mid = { sessions: clients.length, rssKb: await settledRss(pid) };
    const batch = Array.from({ length: Math.min(50, n - i) }, () => {
      const c = new pg.Client({ host: t.host, port: t.port, user: t.user, password: t.password, database: t.database, ssl: false, application_name: 'stagedoor-bench-idle', connectionTimeoutMillis: 30_000 });
      c.on('error', () => undefined);
      return c.connect().then(() => c);
    });
    const settled = await Promise.allSettled(batch);
    let okInBatch = 0;
    for (const s of settled) {
      if (s.status === 'fulfilled') {
        clients.push(s.value);
        okInBatch++;
      } else {
        failed++;
        const msg = String((s.reason as Error)?.message ?? s.reason);
        errors.set(msg, (errors.get(msg) ?? 0) + 1);
      }
    }
    failedBatches = okInBatch === 0 ? failedBatches + 1 : 0;
  }
  const openSeconds = (Date.now() - began) / 1000; // includes the mid-way RSS read
  const rssAfterKb = await settledRss(pid);
  const heapAfter = heapUsed ? await heapUsed() : null;
  progress(`  ${t.name}: ${clients.length} idle sessions open (${failed} failed); RSS ${rssBeforeKb} → ${mid ? `${mid.rssKb} (${mid.sessions} open) → ` : ''}${rssAfterKb} kB`);
  for (let i = 0; i < clients.length; i += 100) await Promise.allSettled(clients.slice(i, i + 100).map((c) => c.end()));
  return {
    target: t.name, requested: n, opened: clients.length, failed, openSeconds, rssBeforeKb, rssAfterKb,
    kbPerSession: clients.length ? (rssAfterKb - rssBeforeKb) / clients.length : null,
    rssMidKb: mid?.rssKb ?? null,
    sessionsAtMid: mid?.sessions ?? null,
    marginalKbPerSession: mid && clients.length > mid.sessions ? (rssAfterKb - mid.rssKb) / (clients.length - mid.sessions) : null,
    heapUsedKbPerSession: clients.length && heapBefore !== null && heapAfter !== null ? (heapAfter - heapBefore) / 1024 / clients.length : null,
    errors: [...errors].map(([m, k]) => `${k}× ${m}`),
  };
}

// ---------------------------------------------------------------------------------------------
// report

function median(xs: Array<number | null>): number | null {
  const v = xs.filter((x): x is number => x !== null && Number.isFinite(x)).sort((a, b) => a - b);
  if (v.length === 0) return null;
  const m = Math.floor(v.length / 2);
  return v.length % 2 ? v[m] : (v[m - 1] + v[m]) / 2;
}

interface Row { metric: string; values: Record<TargetName, number | null>; digits: number; ratio: boolean; prefix?: string }

function fmt(x: number | null, digits: number, prefix = ''): string {
  if (x === null) return '—';
  const s = x.toLocaleString('en-US', { minimumFractionDigits: digits, maximumFractionDigits: digits });
  return prefix && x >= 0 ? `${prefix}${s}` : s;
}

function ratio(a: number | null, b: number | null): number | null {
  return a !== null && b !== null && b !== 0 ? a / b : null;
}

function table(rows: Row[], haveBouncer: boolean): string {
  const lines = [
    '| metric | direct | stagedoor | pgbouncer | stagedoor/direct | pgbouncer/direct |',
    '|---|---:|---:|---:|---:|---:|',
  ];
  for (const r of rows) {
    const v = r.values;
    const rs = r.ratio ? ratio(v.stagedoor, v.direct) : null;
    const rb = r.ratio ? ratio(v.pgbouncer, v.direct) : null;
    lines.push(`| ${r.metric} | ${fmt(v.direct, r.digits, r.prefix)} | ${fmt(v.stagedoor, r.digits, r.prefix)} | ${haveBouncer ? fmt(v.pgbouncer, r.digits, r.prefix) : 'n/a'} | ${rs === null ? '—' : rs.toFixed(2) + '×'} | ${rb === null ? '—' : rb.toFixed(2) + '×'} |`);
  }
  return lines.join('\n');
}

interface TargetCheck { target: string; value: string; status: 'met' | 'not met' | 'not measured' }

function check(target: string, value: number | null, ok: (v: number) => boolean, show: (v: number) => string): TargetCheck {
  if (value === null) return { target, value: '—', status: 'not measured' };
  return { target, value: show(value), status: ok(value) ? 'met' : 'not met' };
}

// ---------------------------------------------------------------------------------------------
// main

async function bench(opts: Options): Promise<void> {
  const t0 = Date.now();
  const code = await codeVersion();
  for (const tool of ['pgbench', 'psql']) if (!(await which(tool))) throw new Error(`${tool} is not installed (apt-get install -y postgresql-client)`);
  if (!existsSync(path.join(ROOT, 'dist', 'cli', 'main.js'))) throw new Error('dist/cli/main.js is missing: run npm run build');
  progress(`profile: ${opts.quick ? 'quick' : 'full'}; ${opts.rounds} round(s) of direct/stagedoor/pgbouncer; pgbench -T ${opts.seconds}; ${opts.idleSessions} idle sessions; COPY ${opts.copyRows} rows`);

  const ticksPerSecond = await clockTicks();
  const bouncerInstall = opts.pgbouncer ? await ensurePgbouncer() : { bin: null, note: 'skipped (--no-pgbouncer)' };

  const tmp = await mkdtemp(path.join(os.tmpdir(), 'stagedoor-bench-'));
  await chmod(tmp, 0o755); // the postgres user must reach its data dirs below
  onCleanup('temp dir', async () => {
    await rm(tmp, { recursive: true, force: true });
  });

  // The tenant server: dev's own embedded one is capped at max_connections=300 (cli/dev.ts), and every
  // stagedoor session holds one upstream backend, so 1,000 idle sessions could not be measured there.
  // Same embedded PostgreSQL, same start-up code, only max_connections raised; dev uses it as TENANT_SERVER_URL.
  progress('starting the tenant PostgreSQL server (embedded, max_connections=1200)');
  const superPassword = randomBytes(18).toString('base64url');
  const tenant = await startEmbeddedPostgres({
    dataDir: path.join(tmp, 'tenant'),
    password: superPassword,
    settings: { max_connections: '1200' },
  });
  onCleanup('tenant PostgreSQL', async () => {
    progress('stopping the tenant PostgreSQL server');
    await tenant.stop();
  });

  progress('starting stagedoor dev in its own process');
  const sd = await startStagedoor(tmp, tenant.url('postgres'), opts.logLevel);
  progress(`stagedoor ready: proxy 127.0.0.1:${sd.proxyPort}, API ${sd.apiUrl} (pid ${sd.child.pid})`);

  const created = await api<OrchestraView>(sd, 'POST', '/v1/orchestras', { subdomain: 'bench', name: 'Bench' });
  if (created.status !== 201) throw new Error(`POST /v1/orchestras answered ${created.status}: ${JSON.stringify(created.body)}`);
  let orchestra = created.body;
  for (let i = 0; orchestra.status !== 'active' && i < 120; i++) {
    await delay(500);
    orchestra = (await api<OrchestraView>(sd, 'GET', '/v1/orchestras/bench')).body;
  }
  if (orchestra.status !== 'active') throw new Error(`orchestra bench is ${orchestra.status}, not active`);
  const issued = await api<{ token: string }>(sd, 'POST', '/v1/orchestras/bench/tokens', { name: 'bench' });
  if (issued.status !== 201) throw new Error(`POST /v1/orchestras/bench/tokens answered ${issued.status}: ${JSON.stringify(issued.body)}`);
  const up = orchestra.upstream;
  progress(`orchestra bench: upstream database ${up.database} on ${up.host}:${up.port}`);

  const direct: Target = { name: 'direct', host: '127.0.0.1', port: up.port, user: tenant.user, password: superPassword, database: up.database, pid: null };
  const stagedoor: Target = { name: 'stagedoor', host: '127.0.0.1', port: sd.proxyPort, user: 'bench', password: issued.body.token, database: 'bench', pid: sd.child.pid ?? null };

  // pgbench data, owned by the orchestra's role so it can use it through the proxy
  progress('pgbench -i -s 10 on the upstream database (directly, as the superuser)');
  const init = await run('pgbench', ['-i', '-s', '10', '-q', ...connArgs(direct), direct.database], { env: clientEnv(direct), timeoutMs: 600_000 });
  if (init.code !== 0) throw new Error(`pgbench -i failed: ${init.stderr.trim()}`);
  const role = (await psqlOk(direct, 'SELECT datdba::regrole FROM pg_database WHERE datname = current_database()')).split('\n')[2]?.trim();
  if (!role) throw new Error('could not read the orchestra role');
  const roleId = `"${role.replace(/"/g, '')}"`;
  await psqlOk(direct, [
    ...['pgbench_accounts', 'pgbench_branches', 'pgbench_tellers', 'pgbench_history'].map((t) => `ALTER TABLE ${t} OWNER TO ${roleId};`),
    'CREATE UNLOGGED TABLE bench_copy (g integer, h text) WITH (autovacuum_enabled = false);',
    `ALTER TABLE bench_copy OWNER TO ${roleId};`,
    `GRANT ALL ON ALL TABLES IN SCHEMA public TO ${roleId};`,
  ].join('\n'));
  const serverVersion = (await psqlOk(direct, 'SHOW server_version')).split('\n')[2]?.trim() ?? 'unknown';
  const pgbenchVersion = (await run('pgbench', ['--version'])).stdout.trim();

  const copyFile = path.join(tmp, 'copy.tsv');
  progress(`writing the COPY data file (${opts.copyRows} rows)`);
  await psqlOk(direct, `\\copy (${copyQuery(opts.copyRows)}) to '${copyFile}'`);
  const copyBytes = (await stat(copyFile)).size;

  let bouncer: Bouncer | null = null;
  let bouncerNote = bouncerInstall.note;
  if (bouncerInstall.bin) {
    try {
      bouncer = await startPgbouncer(bouncerInstall.bin, tmp, { port: up.port, database: up.database }, tenant.user, superPassword);
      progress(`${bouncer.version} listening on 127.0.0.1:${bouncer.port} (pid ${bouncer.child.pid})`);
    } catch (e) {
      bouncerNote = `PgBouncer did not start: ${(e as Error).message}`;
      progress(`${bouncerNote}; running without the PgBouncer column`);
    }
  }
  const pgbouncer: Target | null = bouncer
    ? { name: 'pgbouncer', host: '127.0.0.1', port: bouncer.port, user: tenant.user, password: superPassword, database: 'bench', pid: bouncer.child.pid ?? null }
    : null;
  const targets = [direct, stagedoor, ...(pgbouncer ? [pgbouncer] : [])];

  // smoke test every path, then warm the buffer cache (not recorded)
  for (const t of targets) {
    const r = await psql(t, 'SELECT count(*) FROM pgbench_branches');
    if (r.code !== 0) throw new Error(`cannot query through ${t.name}: ${r.stderr.trim()}`);
  }
  // idle sessions first, while the processes have only started (after heavy runs node's heap keeps shrinking for a while)
  const idleRuns: IdleRun[] = [];
  for (const t of [stagedoor, ...(pgbouncer ? [pgbouncer] : [])]) {
    progress(`opening ${opts.idleSessions} idle sessions through ${t.name} (batches of 50; RSS read once it is steady)`);
    idleRuns.push(await idleSessions(t, opts.idleSessions, t === stagedoor ? () => proxyHeapUsed(sd) : undefined));
  }

  progress('warm-up: 3 s of -S at 8 clients per target (not recorded)');
  const tests = pgbenchTests();
  for (const t of targets) await runPgbench(tests[1], t, 0, 3, ticksPerSecond);

  // pgbench, alternated A B C A B C
  const pgbenchRuns: PgbenchRun[] = [];
  for (const test of tests) {
    for (let round = 1; round <= opts.rounds; round++) {
      for (const t of targets) {
        const r = await runPgbench(test, t, round, opts.seconds, ticksPerSecond);
        pgbenchRuns.push(r);
        progress(`${test.id.padEnd(3)} round ${round} ${t.name.padEnd(9)} ${r.ok ? `tps ${r.tps?.toFixed(0)} lat ${r.latencyMs} ms${r.cpuUsPerTxn !== null ? ` cpu ${r.cpuUsPerTxn.toFixed(1)} µs/txn` : ''} (other work ${r.foreignCores.toFixed(2)} cores)` : 'FAILED'}${r.error ? ` [${r.error.slice(0, 200)}]` : ''}`);
      }
    }
  }

  // COPY out and in (one unrecorded direct run of each first)
  progress('COPY warm-up (direct, not recorded)');
  for (const direction of ['out', 'in'] as const) await runCopy(direction, direct, 0, opts.copyRows, copyFile, copyBytes, direct, ticksPerSecond);
  const copyRuns: CopyRun[] = [];
  for (const direction of ['out', 'in'] as const) {
    for (let round = 1; round <= opts.rounds; round++) {
      for (const t of targets) {
        const r = await runCopy(direction, t, round, opts.copyRows, copyFile, copyBytes, direct, ticksPerSecond);
        copyRuns.push(r);
        progress(`COPY ${direction.padEnd(3)} round ${round} ${t.name.padEnd(9)} ${r.ok ? `${r.seconds.toFixed(2)} s, ${r.mbPerSec?.toFixed(1)} MB/s (other work ${r.foreignCores.toFixed(2)} cores)` : `FAILED ${r.error}`}`);
      }
    }
  }


  const metricsLines = await scrapeProxyMetrics(sd);
  const reused = metricsLines.filter((l) => l.startsWith('stagedoor_upstream_reused_total')).reduce((a, l) => a + (Number(l.split(/\s+/).pop()) || 0), 0);
  const wallSeconds = (Date.now() - t0) / 1000;

  // ---------------- report
  const haveBouncer = pgbouncer !== null;
  const med = (test: string, field: 'tps' | 'latencyMs' | 'cpuUsPerTxn'): Record<TargetName, number | null> => {
    const out = { direct: null, stagedoor: null, pgbouncer: null } as Record<TargetName, number | null>;
    for (const name of ['direct', 'stagedoor', 'pgbouncer'] as const) out[name] = median(pgbenchRuns.filter((r) => r.test === test && r.target === name && r.ok).map((r) => r[field]));
    return out;
  };
  const copyMed = (direction: 'out' | 'in'): Record<TargetName, number | null> => {
    const out = { direct: null, stagedoor: null, pgbouncer: null } as Record<TargetName, number | null>;
    for (const name of ['direct', 'stagedoor', 'pgbouncer'] as const) out[name] = median(copyRuns.filter((r) => r.direction === direction && r.target === name).map((r) => r.mbPerSec));
    return out;
  };
  const idle = { direct: null, stagedoor: null, pgbouncer: null } as Record<TargetName, number | null>;
  for (const r of idleRuns) idle[r.target] = r.kbPerSession;
  const cpuS8 = med('S8', 'cpuUsPerTxn');
  const cpuC4 = med('C4', 'cpuUsPerTxn');
  const lat1 = med('S1', 'latencyMs');
  const added = {
    direct: null,
    stagedoor: lat1.stagedoor !== null && lat1.direct !== null ? lat1.stagedoor - lat1.direct : null,
    pgbouncer: lat1.pgbouncer !== null && lat1.direct !== null ? lat1.pgbouncer - lat1.direct : null,
  };
  const mb = (copyBytes / 1e6).toFixed(1);
  const rows: Row[] = [
    { metric: 'select-only TPS, 1 client', values: med('S1', 'tps'), digits: 0, ratio: true },
    { metric: 'select-only latency avg, 1 client (ms)', values: lat1, digits: 3, ratio: true },
    { metric: 'added latency vs direct, 1 client (ms)', values: added, digits: 3, ratio: false, prefix: '+' },
    { metric: 'select-only TPS, 8 clients', values: med('S8', 'tps'), digits: 0, ratio: true },
    { metric: 'select-only latency avg, 8 clients (ms)', values: med('S8', 'latencyMs'), digits: 3, ratio: true },
    { metric: 'select-only TPS, 32 clients', values: med('S32', 'tps'), digits: 0, ratio: true },
    { metric: 'select-only latency avg, 32 clients (ms)', values: med('S32', 'latencyMs'), digits: 3, ratio: true },
    { metric: 'simple-update (-N) TPS, 8 clients', values: med('N8', 'tps'), digits: 0, ratio: true },
    { metric: 'simple-update (-N) latency avg, 8 clients (ms)', values: med('N8', 'latencyMs'), digits: 3, ratio: true },
    { metric: 'select-only -M extended TPS, 8 clients', values: med('SX8', 'tps'), digits: 0, ratio: true },
    { metric: 'select-only -M extended latency avg, 8 clients (ms)', values: med('SX8', 'latencyMs'), digits: 3, ratio: true },
    { metric: 'connect per transaction (-C -S) TPS = connections/s, 4 clients', values: med('C4', 'tps'), digits: 0, ratio: true },
    { metric: 'connect per transaction (-C -S) latency avg, 4 clients (ms)', values: med('C4', 'latencyMs'), digits: 3, ratio: true },
    { metric: `COPY OUT ${opts.copyRows.toLocaleString('en-US')} rows, ${mb} MB (MB/s)`, values: copyMed('out'), digits: 1, ratio: true },
    { metric: `COPY IN ${opts.copyRows.toLocaleString('en-US')} rows, ${mb} MB (MB/s)`, values: copyMed('in'), digits: 1, ratio: true },
    { metric: `RSS per idle session, ${opts.idleSessions} sessions (kB)`, values: idle, digits: 1, ratio: false },
    { metric: 'process CPU per transaction, -S 8 clients (µs)', values: cpuS8, digits: 1, ratio: false },
    { metric: 'process CPU per connection, -C -S 4 clients (µs)', values: cpuC4, digits: 1, ratio: false },
  ];
  const tps8 = med('S8', 'tps');
  const checks: TargetCheck[] = [
    check('select-only TPS at 8 clients ≥ 0.55× direct (first target)', ratio(tps8.stagedoor, tps8.direct), (v) => v >= 0.55, (v) => `${v.toFixed(2)}×`),
    check("select-only TPS at 8 clients ≥ PgBouncer's (later target)", ratio(tps8.stagedoor, tps8.pgbouncer), (v) => v >= 1, (v) => `${fmt(tps8.stagedoor, 0)} vs ${fmt(tps8.pgbouncer, 0)} (${v.toFixed(2)}×)`),
    check('connect rate (-C -S, 4 clients) ≥ 0.8× direct', ratio(med('C4', 'tps').stagedoor, med('C4', 'tps').direct), (v) => v >= 0.8, (v) => `${v.toFixed(2)}×`),
    check('added latency at 1 client ≤ 0.1 ms', added.stagedoor, (v) => v <= 0.1, (v) => `${v >= 0 ? '+' : ''}${v.toFixed(3)} ms`),
    check('COPY OUT ≥ 0.95× direct', ratio(copyMed('out').stagedoor, copyMed('out').direct), (v) => v >= 0.95, (v) => `${v.toFixed(2)}×`),
    check('COPY IN ≥ 0.95× direct', ratio(copyMed('in').stagedoor, copyMed('in').direct), (v) => v >= 0.95, (v) => `${v.toFixed(2)}×`),
    check('≤ 16 kB per idle session', idle.stagedoor, (v) => v <= 16, (v) => `${v.toFixed(1)} kB`),
  ];

  const failures = [
    ...pgbenchRuns.filter((r) => !r.ok || r.error).map((r) => `pgbench ${r.test} round ${r.round} ${r.target}: ${r.ok ? 'completed with errors' : 'failed'}: ${r.error ?? 'no tps line'}`),
    ...copyRuns.filter((r) => !r.ok).map((r) => `COPY ${r.direction} round ${r.round} ${r.target}: ${r.error}`),
    ...idleRuns.filter((r) => r.failed > 0).map((r) => `idle sessions through ${r.target}: ${r.failed} of ${r.requested} failed: ${r.errors.slice(0, 5).join(' | ')}`),
  ];
  const idleSd = idleRuns.find((r) => r.target === 'stagedoor');
  const idleBn = idleRuns.find((r) => r.target === 'pgbouncer');
  const nproc = os.availableParallelism();
  const foreign = [...pgbenchRuns.map((r) => r.foreignCores), ...copyRuns.map((r) => r.foreignCores)];
  const foreignSummary = foreign.length ? `median ${median(foreign)?.toFixed(2)}, max ${Math.max(...foreign).toFixed(2)} of ${nproc} cores; ${foreign.filter((f) => f > 0.25).length} of ${foreign.length} runs above 0.25` : 'n/a';
  const date = new Date().toISOString();
  const notes = [
    `- ${date}; ${nproc} cores shared by PostgreSQL, pgbench, the proxy and PgBouncer: compare ratios within this run only.`,
    `- Medians of ${opts.rounds} round(s) per cell, runs alternated direct → stagedoor → pgbouncer; pgbench -n -T ${opts.seconds}, -j min(clients, 2), scale 10; a 3 s warm-up per target before the first test (not recorded).`,
    `- stagedoor code: ${code.text}.`,
    `- Targets: direct = the tenant PostgreSQL ${serverVersion} as its superuser; stagedoor = \`node dist/cli/main.js dev\` in its own process (user bench, the token as password); pgbouncer = ${bouncer ? `${bouncer.version}, pool_mode=session, default_pool_size=40, auth_type=scram-sha-256, as the superuser` : `not measured (${bouncerNote})`}.`,
    `- ${bouncerNote}.`,
    '- All three on 127.0.0.1 with PGSSLMODE=disable: the proxy accepts non-TLS clients on loopback (REQUIRE_TLS applies to remote ones only); no TLS cost anywhere.',
    '- The tenant server is embedded PostgreSQL started by the bench with max_connections=1200 and given to dev as TENANT_SERVER_URL: dev\'s own tenant server is capped at 300 (cli/dev.ts) and every stagedoor session holds one upstream backend.',
    `- Process CPU and RSS: stagedoor = the dev child (pid ${sd.child.pid}), which also hosts the control plane (it receives the proxy's connection audit events), so connection-heavy numbers include that; pgbouncer = its own process. CPU from /proc/<pid>/stat utime+stime (CLK_TCK ${ticksPerSecond}) around each run ÷ transactions.`,
    `- Idle sessions: opened with node-postgres in batches of 50, no query sent; before the pgbench runs; RSS delta (VmRSS after − before, each read once steady) ÷ sessions open.${idleSd ? ` stagedoor: ${idleSd.opened} open, ${idleSd.rssBeforeKb} → ${idleSd.rssAfterKb} kB, second half alone ${idleSd.marginalKbPerSession === null ? 'n/a' : `${idleSd.marginalKbPerSession.toFixed(1)} kB`} per session (V8 heap used ${idleSd.heapUsedKbPerSession === null ? 'n/a' : `${idleSd.heapUsedKbPerSession.toFixed(1)} kB`} per session by the proxy's own /metrics; RSS moves in whole heap pages, so a small delta is approximate), each session also holding an upstream backend.` : ''}${idleBn ? ` PgBouncer: ${idleBn.opened} open, ${idleBn.rssBeforeKb} → ${idleBn.rssAfterKb} kB, second half alone ${idleBn.marginalKbPerSession === null ? 'n/a' : `${idleBn.marginalKbPerSession.toFixed(1)} kB`} per session; in session mode an idle client that has sent no query holds no server connection.` : ''}`,
    `- COPY: \`psql -c "\\copy (${copyQuery(opts.copyRows)}) to '/dev/null'"\` and \`\\copy bench_copy from '<file>'\` into an UNLOGGED table truncated before each run; MB/s = ${mb} MB of COPY text ÷ psql wall time (connection included).`,
    `- Connect per transaction: direct forks a backend per connection; PgBouncer and${reused > 0 ? ` stagedoor (upstream reuse: ${reused} upstream connections reused in this run, reset between clients)` : ' (not in this build: no upstream reused) stagedoor'} hand out kept server connections. pgbench also pays SCRAM-SHA-256 (PBKDF2) as the client of direct and of PgBouncer (which derives the key from the plain password in its auth_file at every login), while through stagedoor the client sends the token in clear (AuthenticationCleartextPassword) and the proxy caches its upstream SCRAM keys.`,
    `- Other work on the machine during the measured runs (machine busy CPU − this bench's process tree, /proc): ${foreignSummary}. Runs with other work are slower for whichever target they hit; the per-run value is in latest.json (foreignCores).`,
    `- stagedoor log (LOG_LEVEL=${opts.logLevel}): ${sd.problemCount} warning/error line(s).`,
  ];
  const md = [
    `## stagedoor bench — ${opts.quick ? 'quick' : 'full'} profile`,
    '',
    table(rows, haveBouncer),
    '',
    '### targets',
    '',
    '| target | stagedoor | status |',
    '|---|---:|---|',
    ...checks.map((c) => `| ${c.target} | ${c.value} | ${c.status} |`),
    '',
    '### notes',
    '',
    ...notes,
    '',
    ...(failures.length ? ['### errors during the run', '', ...failures.map((f) => `- ${f.replace(/\n/g, ' ')}`), ''] : []),
    ...(sd.problems.length ? ['### stagedoor warnings and errors (first 40)', '', '```', ...sd.problems, '```', ''] : []),
    ...(bouncer && bouncer.stderrTail.length ? ['### pgbouncer warnings and errors (last 30)', '', '```', ...bouncer.stderrTail, '```', ''] : []),
    '### proxy counters at the end',
    '',
    '```',
    ...metricsLines,
    '```',
    '',
    `wall time: ${(wallSeconds / 60).toFixed(1)} min`,
    '',
  ].join('\n');

  process.stdout.write(md);
  const resultsDir = path.join(ROOT, 'bench', 'results');
  await mkdir(resultsDir, { recursive: true });
  const json = {
    date,
    profile: opts.quick ? 'quick' : 'full',
    options: opts,
    machine: { nproc, cpus: os.cpus()[0]?.model ?? 'unknown', memoryMb: Math.round(os.totalmem() / 2 ** 20), kernel: os.release() },
    stagedoorCode: code,
    versions: { node: process.version, postgres: serverVersion, pgbench: pgbenchVersion, pgbouncer: bouncer?.version ?? null },
    pgbouncer: { installed: bouncerInstall.bin !== null, note: bouncerNote },
    clockTicksPerSecond: ticksPerSecond,
    copyBytes,
    wallSeconds,
    medians: Object.fromEntries(rows.map((r) => [r.metric, r.values])),
    targets: checks,
    runs: { pgbench: pgbenchRuns, copy: copyRuns, idle: idleRuns },
    failures,
    stagedoorLog: { problemCount: sd.problemCount, firstProblems: sd.problems },
    pgbouncerLog: bouncer?.stderrTail ?? [],
    proxyCounters: metricsLines,
  };
  await writeFile(path.join(resultsDir, 'latest.md'), `# stagedoor bench results\n\n${md}`);
  await writeFile(path.join(resultsDir, 'latest.json'), JSON.stringify(json, null, 2) + '\n');
  progress(`wrote bench/results/latest.md and bench/results/latest.json (wall time ${(wallSeconds / 60).toFixed(1)} min)`);
}

/** Which stagedoor was measured: dist/ is built from the work tree, which may be ahead of HEAD. */
async function codeVersion(): Promise<{ commit: string; changedFiles: number; text: string }> {
  try {
    const commit = (await execFileP('git', ['-C', ROOT, 'rev-parse', '--short', 'HEAD'])).stdout.trim();
    const status = (await execFileP('git', ['-C', ROOT, 'status', '--porcelain', '--', 'proxy', 'common', 'control-plane', 'cli'])).stdout;
    const changedFiles = status.split('\n').filter(Boolean).length;
    return { commit, changedFiles, text: `commit ${commit}${changedFiles ? ` plus ${changedFiles} uncommitted file(s) in proxy/ common/ control-plane/ cli/` : ''} (dist built from the work tree at the start of this run)` };
  } catch {
    return { commit: 'unknown', changedFiles: 0, text: 'unknown (no git)' };
  }
}

async function main(): Promise<number> {
  let opts: Options;
  try {
    opts = parseArgs(process.argv.slice(2));
  } catch (e) {
    if (e instanceof UsageError) {
      process.stderr.write(`${e.message}\n${USAGE}`);
      return 2;
    }
    throw e;
  }
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  try {
    await bench(opts);
    return 0;
  } catch (e) {
    if (!interrupted) progress(`bench failed: ${(e as Error).stack ?? String(e)}`);
    return 1;
  } finally {
    await cleanup();
  }
}

main().then(
  (code) => {
    if (!interrupted) process.exit(code);
  },
  (e: unknown) => {
    process.stderr.write(`${String(e)}\n`);
    process.exit(1);
  },
);
