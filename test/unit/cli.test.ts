// The `stagedoor` command as an operator meets it: the built dist/cli/main.js
// in a process of its own. Usage errors without any server; the API commands
// against a real stack (embedded PostgreSQL, control plane, proxy): readable
// tables by default, --json for scripts, and provisioning steps printed live.

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { CLI, runCli } from '../fixtures/cli.js';
import { asTarget, startStack, type Stack } from '../fixtures/stack.js';
import { holdProvisioningAtLockdown, PROVISIONING_STEPS } from '../scenarios/provisioning.js';
import { refusalOf } from '../scenarios/wire.js';

const UUID = /[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}/;
const NOWHERE = { CONTROL_PLANE_URL: 'http://127.0.0.1:1' };

describe('usage', () => {
  test('--help lists every command with its options, and the exit codes', async () => {
    for (const flag of ['--help', '-h', 'help']) {
      const r = await runCli([flag], { ADMIN_TOKEN: undefined });
      assert.equal(r.code, 0, flag);
      for (const command of ['dev', 'proxy', 'control-plane', 'migrate \\[--orchestras\\]']) assert.match(r.stdout, new RegExp(`^  ${command}(?!\\S)`, 'm'), command);
      for (const sub of ['create <subdomain> --name <name>', 'list', 'show <id\\|subdomain>', 'suspend <id\\|subdomain>', 'resume <id\\|subdomain>', 'delete <id\\|subdomain> \\[--drop-database\\]']) {
        assert.match(r.stdout, new RegExp(`^  orchestra ${sub}`, 'm'), `orchestra ${sub}`);
      }
      for (const sub of ['create <subdomain> \\[--ttl 30d\\]', 'list <subdomain>', 'revoke <jti>']) assert.match(r.stdout, new RegExp(`^  token ${sub}`, 'm'), `token ${sub}`);
      assert.match(r.stdout, /^ {2}audit \[--fix \[--yes\]\]/m);
      assert.match(r.stdout, /^ {2}import <legacy-central-database-url>/m);
      assert.match(r.stdout, /--json/);
      assert.match(r.stdout, /Exit codes: 0 success; 1 failure or \(audit\) violations found; 2 could not run/);
    }
  });

  test('without a command it prints the help and exits 2', async () => {
    const r = await runCli([], {});
    assert.equal(r.code, 2);
    assert.match(r.stdout, /Usage: stagedoor <command>/);
  });

  test('an unknown command exits 2 and says so, whatever the environment', async () => {
    for (const env of [{ ADMIN_TOKEN: 'x'.repeat(24), ...NOWHERE }, { ADMIN_TOKEN: undefined }]) {
      const r = await runCli(['orchestrate'], env);
      assert.equal(r.code, 2);
      assert.match(r.stderr, /unknown command "orchestrate"/);
    }
    const sub = await runCli(['orchestra', 'frobnicate'], { ADMIN_TOKEN: 'x'.repeat(24), ...NOWHERE });
    assert.equal(sub.code, 2);
    assert.match(sub.stderr, /usage: stagedoor orchestra create\|list\|show\|suspend\|resume\|delete/);
  });

  test('orchestra create without --name exits 2 with its usage', async () => {
    for (const args of [['orchestra', 'create', 'sco'], ['orchestra', 'create', 'sco', '--name'], ['orchestra', 'create', '--name', 'X']]) {
      const r = await runCli(args, { ADMIN_TOKEN: 'x'.repeat(24), ...NOWHERE });
      assert.equal(r.code, 2, args.join(' '));
      assert.match(r.stderr, /usage: stagedoor orchestra create <subdomain> --name <name>/, args.join(' '));
    }
  });

  test('with ADMIN_TOKEN unset an API command exits 2 naming ADMIN_TOKEN', async () => {
    for (const args of [['orchestra', 'list'], ['token', 'list', 'sco'], ['audit']]) {
      const r = await runCli(args, { ADMIN_TOKEN: undefined, ...NOWHERE });
      assert.equal(r.code, 2, args.join(' '));
      assert.match(r.stderr, /ADMIN_TOKEN is not set/);
    }
  });

  test('an unreachable control plane exits 2 naming its address', async () => {
    const r = await runCli(['orchestra', 'list'], { ADMIN_TOKEN: 'x'.repeat(24), ...NOWHERE });
    assert.equal(r.code, 2);
    assert.match(r.stderr, /cannot reach the control plane at http:\/\/127\.0\.0\.1:1/);
  });
});

describe('against a running stagedoor', () => {
  let stack: Stack;
  let env: Record<string, string>;
  const cli = (...args: string[]) => runCli(args, env);
  const json = async <T = Record<string, any>>(...args: string[]): Promise<T> => {
    const r = await cli(...args, '--json');
    assert.equal(r.code, 0, `${args.join(' ')}: ${r.stderr}`);
    return JSON.parse(r.stdout) as T;
  };

  before(async () => {
    stack = await startStack();
    env = { CONTROL_PLANE_URL: stack.apiUrl, ADMIN_TOKEN: stack.adminToken };
  });
  after(async () => {
    await stack?.stop();
  });

  test('orchestra create prints each provisioning step the moment it completes, in order, then the outcome', async () => {
    const hold = await holdProvisioningAtLockdown(asTarget(stack).tenantServer);
    const child = spawn(process.execPath, [CLI, 'orchestra', 'create', 'cli-live', '--name', 'Live Ensemble'], { env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
    try {
      let stdout = '';
      let stderr = '';
      const exited = new Promise<number | null>((r) => child.once('close', (code) => r(code)));
      const sawDatabaseStep = new Promise<void>((resolve, reject) => {
        child.stdout.on('data', (d: Buffer) => {
          stdout += d.toString();
          if (/✓ database\b/.test(stdout)) resolve();
        });
        child.once('close', () => reject(new Error(`the CLI ended before printing the database step:\n${stdout}\n${stderr}`)));
      });
      child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
      await sawDatabaseStep;
      // provisioning is held in `lockdown`: what is on screen was printed while it ran
      assert.doesNotMatch(stdout, /lockdown|activate|is active/);
      assert.equal((await stack.api<{ status: string }>('GET', '/v1/orchestras/cli-live')).body.status, 'provisioning');
      await hold.release();
      assert.equal(await exited, 0, stderr);
      const lines = stdout.trimEnd().split('\n');
      assert.equal(lines[0], 'provisioning cli-live …');
      assert.deepEqual(
        lines.slice(1, -1).map((l) => /^ {2}✓ (\S+) +\d+ ms$/.exec(l)?.[1]),
        PROVISIONING_STEPS,
        stdout,
      );
      assert.match(lines[lines.length - 1]!, new RegExp(`^orchestra cli-live is active \\(${UUID.source}\\)$`));
    } finally {
      await hold.release();
      if (child.exitCode === null) child.kill('SIGKILL');
      await hold.dispose();
    }
  });

  test('orchestra create --json prints the API’s answer only: the orchestra with its steps', async () => {
    const body = await json('orchestra', 'create', 'cli-json', '--name', 'JSON Consort');
    assert.equal(body.subdomain, 'cli-json');
    assert.equal(body.status, 'active');
    assert.match(body.id, UUID);
    assert.deepEqual(body.steps.map((s: { step: string }) => s.step), PROVISIONING_STEPS);
    assert.deepEqual(await stack.api('GET', '/v1/orchestras/cli-json').then((r) => r.body.id), body.id);
  });

  test('a failed create exits 1, shows the failed step and says why on stderr', async () => {
    const r = await cli('orchestra', 'create', 'cli-json', '--name', 'Again');
    assert.equal(r.code, 1);
    assert.match(r.stdout, /^ {2}✗ validate +\d+ ms {2}subdomain "cli-json" is already taken$/m);
    assert.match(r.stderr, /stagedoor: step "validate" failed: subdomain "cli-json" is already taken; everything done before it was rolled back \(provisioning_failed_at_validate\)/);
    const j = await cli('orchestra', 'create', 'cli-json', '--name', 'Again', '--json');
    assert.equal(j.code, 1);
    assert.equal(JSON.parse(j.stdout).error.code, 'provisioning_failed_at_validate');
  });

  test('orchestra list is a table by default and the API answer with --json', async () => {
    const r = await cli('orchestra', 'list');
    assert.equal(r.code, 0, r.stderr);
    const [header, ...rows] = r.stdout.trimEnd().split('\n');
    assert.match(header!, /^SUBDOMAIN +STATUS +NAME +UPSTREAM +ID$/);
    const row = rows.find((l) => l.startsWith('cli-json '));
    assert.ok(row, r.stdout);
    assert.match(row, new RegExp(`^cli-json +active +JSON Consort +127\\.0\\.0\\.1:${stack.tenant.port}/sd_cli_json +${UUID.source}$`));
    const body = await json<{ orchestras: Array<{ subdomain: string }> }>('orchestra', 'list');
    assert.deepEqual(body, (await stack.api('GET', '/v1/orchestras')).body);
    assert.deepEqual(body.orchestras.map((o) => o.subdomain).sort(), ['cli-json', 'cli-live']);
  });

  test('orchestra show prints one field a line, by subdomain or id, and the API answer with --json', async () => {
    const api = (await stack.api<{ id: string }>('GET', '/v1/orchestras/cli-json')).body;
    for (const ref of ['cli-json', api.id]) {
      const r = await cli('orchestra', 'show', ref);
      assert.equal(r.code, 0, r.stderr);
      assert.match(r.stdout, /^subdomain +cli-json$/m);
      assert.match(r.stdout, /^status +active$/m);
      assert.match(r.stdout, new RegExp(`^upstream +127\\.0\\.0\\.1:${stack.tenant.port}/sd_cli_json$`, 'm'));
      assert.deepEqual(await json('orchestra', 'show', ref), api);
    }
    const missing = await cli('orchestra', 'show', 'nosuch');
    assert.equal(missing.code, 1);
    assert.match(missing.stderr, /no orchestra "nosuch" \(not_found\)/);
  });

  test('token create prints the token and a ready psql line; --json is the API answer; the token connects', async () => {
    const r = await cli('token', 'create', 'cli-json', '--ttl', '30d', '--name', 'laptop');
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, new RegExp(`^jti +${UUID.source}$`, 'm'));
    assert.match(r.stdout, /^expires +\d{4}-\d\d-\d\dT/m);
    assert.match(r.stdout, /^token +\S+$/m);
    assert.match(r.stdout, /^connect +psql "postgres:\/\/cli-json:\S+@127\.0\.0\.1:\d+\/cli-json\?sslmode=require"$/m);
    const body = await json<{ token: string; jti: string; expiresAt: string; connectionString: string }>('token', 'create', 'cli-json', '--ttl', '1h');
    assert.deepEqual(Object.keys(body).sort(), ['connectionString', 'expiresAt', 'jti', 'token']);
    const hours = (Date.parse(body.expiresAt) - Date.now()) / 3_600_000;
    assert.ok(hours > 0.9 && hours <= 1, `expires in ${hours} h`);
    assert.equal(await refusalOf(stack.clientConfig({ subdomain: 'cli-json', token: body.token })), null);
  });

  test('token list is a table by default (never the secret) and the API answer with --json', async () => {
    const r = await cli('token', 'list', 'cli-json');
    assert.equal(r.code, 0, r.stderr);
    const [header, ...rows] = r.stdout.trimEnd().split('\n');
    assert.match(header!, /^JTI +NAME +EXPIRES +REVOKED$/);
    assert.equal(rows.length, 2, r.stdout);
    assert.ok(rows.some((l) => new RegExp(`^${UUID.source} +laptop +\\d{4}-.+ +-$`).test(l)), r.stdout);
    const body = await json<{ tokens: Array<{ jti: string; name: string; revokedAt: string | null }> }>('token', 'list', 'cli-json');
    assert.deepEqual(body, (await stack.api('GET', '/v1/orchestras/cli-json/tokens')).body);
    assert.doesNotMatch(JSON.stringify(body), /"token"/);
  });

  test('token revoke ends the token: it no longer connects, a second revoke says it already was, --json is the API answer', async () => {
    const t = await json<{ token: string; jti: string }>('token', 'create', 'cli-json');
    const r = await cli('token', 'revoke', t.jti);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stdout, `token ${t.jti} revoked; its live sessions are being ended\n`);
    assert.equal(await refusalOf(stack.clientConfig({ subdomain: 'cli-json', token: t.token })), '28P01');
    const again = await json('token', 'revoke', t.jti);
    assert.deepEqual(again, { jti: t.jti, revoked: true, alreadyRevoked: true });
    assert.match((await cli('token', 'revoke', t.jti)).stdout, /\(it already was\)/);
    const listed = await json<{ tokens: Array<{ jti: string; revokedAt: string | null }> }>('token', 'list', 'cli-json');
    assert.ok(listed.tokens.find((x) => x.jti === t.jti)?.revokedAt);
    const unknown = await cli('token', 'revoke', '00000000-0000-4000-8000-000000000000');
    assert.equal(unknown.code, 1);
  });

  test('orchestra suspend refuses new sessions with 57P03 and resume lets them back, in text and --json', async () => {
    const t = await json<{ token: string }>('token', 'create', 'cli-json');
    const s = await cli('orchestra', 'suspend', 'cli-json');
    assert.equal(s.code, 0, s.stderr);
    assert.equal(s.stdout, 'orchestra cli-json is suspended\n');
    assert.equal(await refusalOf(stack.clientConfig({ subdomain: 'cli-json', token: t.token })), '57P03');
    const resumed = await json<{ status: string; subdomain: string }>('orchestra', 'resume', 'cli-json');
    assert.deepEqual([resumed.subdomain, resumed.status], ['cli-json', 'active']);
    assert.equal(await refusalOf(stack.clientConfig({ subdomain: 'cli-json', token: t.token })), null);
    assert.equal((await json('orchestra', 'suspend', 'cli-json')).status, 'suspended');
    const back = await cli('orchestra', 'resume', 'cli-json');
    assert.equal(back.stdout, 'orchestra cli-json is active\n');
  });

  test('orchestra delete --drop-database removes the orchestra, its database and role; --json is the API answer', async () => {
    const t = await json<{ token: string }>('token', 'create', 'cli-live');
    const r = await cli('orchestra', 'delete', 'cli-live', '--drop-database');
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stdout, 'orchestra cli-live deleted (database and role dropped)\n');
    assert.equal(await refusalOf(stack.clientConfig({ subdomain: 'cli-live', token: t.token })), '28000');
    const gone = await stack.api<{ status: string }>('GET', '/v1/orchestras/cli-live');
    assert.ok(gone.status === 404 || gone.body.status === 'deleted', JSON.stringify(gone));
    const body = await json<{ subdomain: string; status: string }>('orchestra', 'delete', 'cli-json');
    assert.deepEqual([body.subdomain, body.status], ['cli-json', 'deleted']);
  });

  test('a wrong ADMIN_TOKEN exits 2: the command could not run', async () => {
    const r = await runCli(['orchestra', 'list'], { ...env, ADMIN_TOKEN: 'not-the-admin-token' });
    assert.equal(r.code, 2);
    assert.match(r.stderr, /missing or wrong bearer token \(unauthorized\)/);
  });
});
