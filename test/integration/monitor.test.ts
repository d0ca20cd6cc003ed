// The monitor: the audit every AUDIT_INTERVAL, exported as a metric, each new
// violation logged and posted to ALERT_WEBHOOK_URL.

import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import pg from 'pg';
import { startStack, type Stack } from '../fixtures/stack.js';

let stack: Stack;
let hook: Server;
const posts: Array<{ violations: Array<{ kind: string; orchestras: string[] }> }> = [];

before(async () => {
  hook = createServer((req, res) => {
    let body = '';
    req.on('data', (d: Buffer) => (body += d.toString()));
    req.on('end', () => {
      posts.push(JSON.parse(body) as (typeof posts)[number]);
      res.writeHead(204).end();
    });
  });
  await new Promise<void>((r) => hook.listen(0, '127.0.0.1', r));
  stack = await startStack({ controlPlaneEnv: { AUDIT_INTERVAL: '0.5', ALERT_WEBHOOK_URL: `http://127.0.0.1:${(hook.address() as AddressInfo).port}/alert` } });
});
after(async () => {
  await stack?.stop();
  await new Promise((r) => hook.close(r));
});

test('a duplicate written straight into the central database is found by the monitor, exported, and posted once to the webhook', async () => {
  await stack.createOrchestra('horn');
  const central = new pg.Client({ connectionString: stack.central.url('postgres') });
  await central.connect();
  try {
    await central.query(
      `insert into orchestras (id, subdomain, name, status, source, upstream_host, upstream_port, upstream_database, upstream_user, upstream_sslmode)
       select gen_random_uuid(), 'horn-copy', 'Horn copy', 'active', 'attached', upstream_host, upstream_port, upstream_database, upstream_user, upstream_sslmode
         from orchestras where subdomain = 'horn'`,
    );
  } finally {
    await central.end();
  }
  const deadline = Date.now() + 10_000;
  while (!posts.some((p) => p.violations.some((v) => v.kind === 'shared_upstream')) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
  const alert = posts.find((p) => p.violations.some((v) => v.kind === 'shared_upstream'));
  assert.ok(alert, 'the webhook received the violation');
  assert.deepEqual(alert.violations.find((v) => v.kind === 'shared_upstream')!.orchestras, ['horn', 'horn-copy']);
  const metrics = await (await fetch(`${stack.apiUrl}/metrics`)).text();
  assert.match(metrics, /stagedoor_isolation_violations\{kind="shared_upstream"\} 1/);
  // later runs do not repeat a known violation
  const seen = posts.length;
  await new Promise((r) => setTimeout(r, 1_500));
  assert.equal(posts.filter((p) => p.violations.some((v) => v.kind === 'shared_upstream')).length, 1, `posts: ${posts.length - seen} more`);
  const log = await stack.api<{ entries: Array<{ reason: string }> }>('GET', '/v1/audit-log?kind=isolation.violation');
  assert.ok(log.body.entries.some((e) => /shared_upstream/.test(e.reason)));
});

test('the canonical address lower-cases hosts, normalises IPv6, defaults the port and keeps the pooler project ref', async () => {
  const central = new pg.Client({ connectionString: stack.central.url('postgres') });
  await central.connect();
  try {
    const q = async (h: string, p: number | null, d: string, u: string): Promise<string> =>
      (await central.query<{ a: string }>('select stagedoor_canonical_address($1, $2, $3, $4) as a', [h, p, d, u])).rows[0]!.a;
    assert.equal(await q('DB.Example.COM.', null, 'app', 'postgres'), 'db.example.com:5432/app');
    assert.equal(await q('[0:0:0:0:0:0:0:1]', 5433, 'app', 'x'), '[::1]:5433/app');
    assert.equal(await q('::FFFF:127.0.0.1', 5432, 'app', 'x'), await q('::ffff:127.0.0.1', 5432, 'app', 'y'));
    assert.equal(await q('aws-0-eu-north-1.pooler.supabase.com', 6543, 'postgres', 'postgres.tckcuexsdzovsqaqiqkr'), 'aws-0-eu-north-1.pooler.supabase.com:6543/postgres#tckcuexsdzovsqaqiqkr');
    assert.notEqual(
      await q('aws-0-eu-north-1.pooler.supabase.com', 6543, 'postgres', 'postgres.tckcuexsdzovsqaqiqkr'),
      await q('aws-0-eu-north-1.pooler.supabase.com', 6543, 'postgres', 'postgres.hqzrqnsvhyfypqklgoas'),
      'two projects behind one pooler are different databases',
    );
  } finally {
    await central.end();
  }
});
