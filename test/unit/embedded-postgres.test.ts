import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import pg from 'pg';
import { freePort, startEmbeddedPostgres, type EmbeddedServer } from '../../cli/embedded-postgres.js';
import { dockerUnavailableReason, startTestPostgres } from '../fixtures/postgres.js';

const execFileP = promisify(execFile);
const PASSWORD = 'unit test pw:@/%';

async function tempDataDir(t: { after(fn: () => Promise<void>): void }): Promise<string> {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'stagedoor-unit-pg-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  return dir;
}

async function query<T extends pg.QueryResultRow>(url: string, sql: string): Promise<T[]> {
  const client = new pg.Client({ connectionString: url });
  await client.connect();
  try {
    return (await client.query<T>(sql)).rows;
  } finally {
    await client.end();
  }
}

async function postgresPidsFor(dataDir: string): Promise<string> {
  try {
    return (await execFileP('pgrep', ['-f', dataDir])).stdout.trim();
  } catch (err) {
    // pgrep exits 1 when nothing matches
    if ((err as { code?: unknown }).code === 1) return '';
    throw err;
  }
}

test('a server starts on a free port and answers select 1', async (t) => {
  const dataDir = await tempDataDir(t);
  const server = await startEmbeddedPostgres({ dataDir, password: PASSWORD });
  try {
    assert.equal(server.host, '127.0.0.1');
    assert.ok(server.port > 0 && server.port < 65536);
    const rows = await query<{ one: number }>(server.url(), 'select 1 as one');
    assert.deepEqual(rows, [{ one: 1 }]);
  } finally {
    await server.stop();
  }
});

test('SCRAM is required: the right password authenticates with SCRAM and a wrong one is refused with 28P01', async (t) => {
  const dataDir = await tempDataDir(t);
  const server = await startEmbeddedPostgres({ dataDir, password: PASSWORD });
  try {
    const [row] = await query<{ system_user: string }>(server.url(), 'select system_user');
    assert.equal(row?.system_user, 'scram-sha-256:postgres');

    const wrong = new pg.Client({ host: server.host, port: server.port, user: server.user, password: 'not-the-password', database: 'postgres' });
    await assert.rejects(wrong.connect(), (err: { code?: string }) => {
      assert.equal(err.code, '28P01');
      return true;
    });
  } finally {
    await server.stop();
  }
});

test('restarting with the same dataDir keeps a table created before', async (t) => {
  const dataDir = await tempDataDir(t);
  const first = await startEmbeddedPostgres({ dataDir, password: PASSWORD });
  try {
    await query(first.url(), 'create table kept (v text); insert into kept values ($$still here$$)');
  } finally {
    await first.stop();
  }
  const second = await startEmbeddedPostgres({ dataDir, password: PASSWORD });
  try {
    assert.deepEqual(await query(second.url(), 'select v from kept'), [{ v: 'still here' }]);
  } finally {
    await second.stop();
  }
});

test('a stale postmaster.pid from a SIGKILLed server does not prevent a restart', async (t) => {
  const dataDir = await tempDataDir(t);
  const pidFile = path.join(dataDir, 'postmaster.pid');
  const killed = await startEmbeddedPostgres({ dataDir, password: PASSWORD });
  let restarted: EmbeddedServer | undefined;
  try {
    await query(killed.url(), 'create table survived (v int); insert into survived values (42)');
    const pid = Number.parseInt((await readFile(pidFile, 'utf8')).split('\n')[0] ?? '', 10);
    process.kill(pid, 'SIGKILL');
    assert.ok(existsSync(pidFile), 'a SIGKILLed postmaster leaves its pid file behind');

    restarted = await startEmbeddedPostgres({ dataDir, password: PASSWORD });
    assert.deepEqual(await query(restarted.url(), 'select v from survived'), [{ v: 42 }]);
  } finally {
    await killed.stop();
    await restarted?.stop();
  }
});

test('a postmaster.pid naming a live process that is not postgres (a reused pid) does not prevent a restart', async (t) => {
  const dataDir = await tempDataDir(t);
  await (await startEmbeddedPostgres({ dataDir, password: PASSWORD })).stop();
  // postgres alone would refuse this file, because the pid is alive
  await writeFile(path.join(dataDir, 'postmaster.pid'), `${process.pid}\n${dataDir}\n`);
  const server = await startEmbeddedPostgres({ dataDir, password: PASSWORD });
  try {
    assert.deepEqual(await query(server.url(), 'select 1 as ok'), [{ ok: 1 }]);
  } finally {
    await server.stop();
  }
});

test('two servers run at once', async (t) => {
  const [dirA, dirB] = await Promise.all([tempDataDir(t), tempDataDir(t)]);
  const [a, b] = await Promise.all([
    startEmbeddedPostgres({ dataDir: dirA, password: PASSWORD }),
    startEmbeddedPostgres({ dataDir: dirB, password: PASSWORD }),
  ]);
  try {
    assert.notEqual(a.port, b.port);
    await query(a.url(), 'create table only_in_a (x int)');
    const [inA, inB] = await Promise.all([
      query<{ n: string }>(a.url(), `select count(*) as n from pg_tables where tablename = 'only_in_a'`),
      query<{ n: string }>(b.url(), `select count(*) as n from pg_tables where tablename = 'only_in_a'`),
    ]);
    assert.equal(inA[0]?.n, '1');
    assert.equal(inB[0]?.n, '0');
  } finally {
    await Promise.all([a.stop(), b.stop()]);
  }
});

test('servers with different passwords each accept only their own, though they share one template', async (t) => {
  const [dirA, dirB] = await Promise.all([tempDataDir(t), tempDataDir(t)]);
  // the second password can never be the one the cached template was initialised with
  const a = await startEmbeddedPostgres({ dataDir: dirA, password: `a-${randomUUID()}` });
  const b = await startEmbeddedPostgres({ dataDir: dirB, password: `b-${randomUUID()}'"\\` });
  try {
    assert.deepEqual(await query(a.url(), 'select 1 as ok'), [{ ok: 1 }]);
    assert.deepEqual(await query(b.url(), 'select 1 as ok'), [{ ok: 1 }]);
    const crossed = new pg.Client({ host: b.host, port: b.port, user: b.user, password: a.password, database: 'postgres' });
    await assert.rejects(crossed.connect(), { code: '28P01' });
  } finally {
    await Promise.all([a.stop(), b.stop()]);
  }
});

test('an explicit port is used as given', async (t) => {
  const dataDir = await tempDataDir(t);
  const port = await freePort();
  const server = await startEmbeddedPostgres({ dataDir, password: PASSWORD, port });
  try {
    assert.equal(server.port, port);
    assert.equal(server.url('x y'), `postgres://postgres:${encodeURIComponent(PASSWORD)}@127.0.0.1:${port}/x%20y`);
  } finally {
    await server.stop();
  }
});

test('stop() leaves no postgres process for that data dir and is safe to call twice', async (t) => {
  const dataDir = await tempDataDir(t);
  const server = await startEmbeddedPostgres({ dataDir, password: PASSWORD });
  assert.notEqual(await postgresPidsFor(dataDir), '', 'pgrep sees the running server');
  await Promise.all([server.stop(), server.stop()]);
  await server.stop();
  assert.equal(await postgresPidsFor(dataDir), '');
});

test('the test fixture gives an embedded server by default, with md5 when asked', async () => {
  const server = await startTestPostgres({ authMethod: 'md5' });
  try {
    assert.equal(server.backend, process.env.STAGEDOOR_TEST_BACKEND === 'docker' ? 'docker' : 'embedded');
    const [row] = await query<{ system_user: string }>(server.url(), 'select system_user');
    assert.equal(row?.system_user, `md5:${server.adminUser}`);
  } finally {
    await server.stop();
  }
});

test('dockerUnavailableReason() answers within 6 s and names Docker when it is unusable', async (t) => {
  const started = Date.now();
  const reason = await dockerUnavailableReason();
  assert.ok(Date.now() - started < 6_000, `took ${Date.now() - started} ms`);
  if (reason === null) {
    t.diagnostic('Docker is usable on this machine');
    return;
  }
  assert.match(reason, /Docker/);
});
