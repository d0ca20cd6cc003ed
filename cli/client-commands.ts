// CLI commands that are clients of the control-plane HTTP API
// (CONTROL_PLANE_URL, ADMIN_TOKEN): readable tables by default, --json for
// scripts. Exit codes: 0 ok, 1 failed (or audit found violations), 2 could
// not run (usage, configuration, control plane unreachable).

import type { Env } from '../common/config.js';

export const CLIENT_COMMANDS_HELP = `API commands (CONTROL_PLANE_URL, ADMIN_TOKEN; add --json for machine-readable output):
  orchestra create <subdomain> --name <name> [--database-url <url>]
  orchestra list
  orchestra show <id|subdomain>
  orchestra suspend <id|subdomain>
  orchestra resume <id|subdomain>
  orchestra delete <id|subdomain> [--drop-database]
  token create <subdomain> [--ttl 30d] [--name <name>]
  token list <subdomain>
  token revoke <jti>
  audit [--fix [--yes]]    isolation audit: exit 0 clean, 1 violations, 2 could not run
  import <legacy-central-database-url>
`;

class Usage extends Error {}

/** the API commands and their subcommands (null: none) */
const SUBCOMMANDS: Record<string, readonly string[] | null> = {
  orchestra: ['create', 'list', 'show', 'suspend', 'resume', 'delete'],
  token: ['create', 'list', 'revoke'],
  audit: null,
  import: null,
};

interface Parsed {
  positional: string[];
  flags: Map<string, string | true>;
}

function parseArgs(args: string[]): Parsed {
  const positional: string[] = [];
  const flags = new Map<string, string | true>();
  for (let i = 0; i < args.length; i++) {
    const a = args[i]!;
    if (a.startsWith('--')) {
      const [k, v] = a.slice(2).split('=', 2) as [string, string | undefined];
      const next = args[i + 1];
      if (v !== undefined) flags.set(k, v);
      else if (['name', 'ttl', 'database-url'].includes(k) && next !== undefined) {
        flags.set(k, next);
        i++;
      } else flags.set(k, true);
    } else positional.push(a);
  }
  return { positional, flags };
}

class Api {
  constructor(
    private readonly base: string,
    private readonly token: string,
  ) {}

  async call(method: string, path: string, body?: unknown): Promise<{ status: number; data: Record<string, unknown> }> {
    let res: Response;
    try {
      res = await fetch(this.base + path, {
        method,
        headers: { authorization: `Bearer ${this.token}`, ...(body !== undefined ? { 'content-type': 'application/json' } : {}) },
        body: body !== undefined ? JSON.stringify(body) : undefined,
        signal: AbortSignal.timeout(120_000),
      });
    } catch (e) {
      throw new Unreachable(`cannot reach the control plane at ${this.base}: ${(e as Error).message}`);
    }
    return { status: res.status, data: await readJson(res) };
  }

  /**
   * POST /v1/orchestras, asking for the NDJSON answer: onStep is called with
   * each provisioning step the moment the control plane reports it. Falls back
   * to the JSON answer (steps reported at the end) when that is what arrives.
   */
  async provision(body: unknown, onStep: (s: Step) => void): Promise<{ status: number; data: Record<string, unknown> }> {
    let res: Response;
    try {
      res = await fetch(this.base + '/v1/orchestras', {
        method: 'POST',
        headers: { authorization: `Bearer ${this.token}`, 'content-type': 'application/json', accept: 'application/x-ndjson, application/json;q=0.5' },
        body: JSON.stringify(body),
        signal: AbortSignal.timeout(120_000),
      });
    } catch (e) {
      throw new Unreachable(`cannot reach the control plane at ${this.base}: ${(e as Error).message}`);
    }
    if (!/^application\/x-ndjson/i.test(res.headers.get('content-type') ?? '') || !res.body) {
      const data = await readJson(res);
      if (res.status === 201) for (const s of (data.steps as Step[] | undefined) ?? []) onStep(s);
      return { status: res.status, data };
    }
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffered = '';
    const handle = (text: string): { status: number; data: Record<string, unknown> } | undefined => {
      if (!text.trim()) return undefined;
      const line = JSON.parse(text) as { step?: Step; status?: number; orchestra?: Record<string, unknown>; error?: unknown };
      if (line.step) {
        onStep(line.step);
        return undefined;
      }
      if (typeof line.status === 'number') return { status: line.status, data: line.orchestra ?? { error: line.error } };
      return undefined;
    };
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffered += decoder.decode(value, { stream: true });
        let nl: number;
        while ((nl = buffered.indexOf('\n')) >= 0) {
          const outcome = handle(buffered.slice(0, nl));
          buffered = buffered.slice(nl + 1);
          if (outcome) return outcome;
        }
      }
      const outcome = handle(buffered + decoder.decode());
      if (outcome) return outcome;
    } catch (e) {
      throw new LostAnswer(`the connection to the control plane broke during provisioning (${(e as Error).message})`);
    } finally {
      reader.releaseLock();
    }
    throw new LostAnswer('the control plane ended the answer before provisioning finished');
  }
}

interface Step {
  step: string;
  ok: boolean;
  ms: number;
  detail?: string;
}

async function readJson(res: Response): Promise<Record<string, unknown>> {
  const text = await res.text();
  if (!text) return {};
  try {
    return JSON.parse(text) as Record<string, unknown>;
  } catch {
    // not the control plane (a proxy or load balancer in the way): say what came back
    return { error: { code: 'not_json', message: `HTTP ${res.status} with a body that is not JSON: ${text.slice(0, 200)}` } };
  }
}

const stepLine = (s: Step): string => `  ${s.ok ? '✓' : '✗'} ${s.step.padEnd(10)} ${String(s.ms).padStart(5)} ms${s.ok || !s.detail ? '' : `  ${s.detail}`}`;

class Unreachable extends Error {}
/** the request reached the control plane but its outcome is unknown */
class LostAnswer extends Error {}

export async function runClientCommand(command: string, args: string[], env: Env): Promise<number> {
  const { positional, flags } = parseArgs(args);
  const json = flags.has('json');
  const out = (data: unknown, text: string): void => {
    process.stdout.write((json ? JSON.stringify(data, null, 2) : text) + '\n');
  };
  if (flags.has('help') || flags.has('h') || args.includes('-h')) {
    // help needs no control plane and no token
    process.stdout.write(CLIENT_COMMANDS_HELP);
    return 0;
  }
  try {
    // usage first: a wrong command is a usage error whatever the environment
    const sub0 = positional[0];
    if (!Object.hasOwn(SUBCOMMANDS, command)) throw new Usage(`unknown command "${command}" (stagedoor --help lists them)`);
    const subs = SUBCOMMANDS[command];
    if (subs && (!sub0 || !subs.includes(sub0))) throw new Usage(`usage: stagedoor ${command} ${subs.join('|')} …`);
    const token = env.ADMIN_TOKEN;
    if (!token) throw new Usage('ADMIN_TOKEN is not set (stagedoor dev prints it)');
    const api = new Api((env.CONTROL_PLANE_URL ?? 'http://127.0.0.1:8080').replace(/\/+$/, ''), token);
    const failed = (r: { status: number; data: Record<string, unknown> }): number => {
      const err = r.data.error as { code?: string; message?: string } | undefined;
      process.stderr.write(`stagedoor: ${err?.message ?? `HTTP ${r.status}`}${err?.code ? ` (${err.code})` : ''}\n`);
      if (json) process.stdout.write(JSON.stringify(r.data, null, 2) + '\n');
      return r.status === 503 || r.status === 401 ? 2 : 1;
    };
    const sub = positional[0];
    const ref = positional[1];
    const needRef = (): string => {
      if (!ref) throw new Usage(`usage: stagedoor ${command} ${sub} <id|subdomain>`);
      return encodeURIComponent(ref);
    };

    if (command === 'orchestra') {
      if (sub === 'create') {
        const name = flags.get('name');
        if (!ref || typeof name !== 'string') throw new Usage('usage: stagedoor orchestra create <subdomain> --name <name> [--database-url <url>]');
        const dbUrl = flags.get('database-url');
        if (!json) process.stdout.write(`provisioning ${ref} …\n`);
        // each step is printed the moment the control plane reports it
        const r = await api.provision({ subdomain: ref, name, ...(typeof dbUrl === 'string' ? { databaseUrl: dbUrl } : {}) }, (s) => {
          if (!json) process.stdout.write(stepLine(s) + '\n');
        });
        if (r.status !== 201) return failed(r);
        out(r.data, `orchestra ${r.data.subdomain} is ${r.data.status} (${r.data.id})`);
        return 0;
      }
      if (sub === 'list') {
        const r = await api.call('GET', '/v1/orchestras');
        if (r.status !== 200) return failed(r);
        const rows = r.data.orchestras as Array<Record<string, unknown>>;
        out(r.data, table(['SUBDOMAIN', 'STATUS', 'NAME', 'UPSTREAM', 'ID'], rows.map((o) => [o.subdomain, o.status, o.name, upstreamText(o.upstream), o.id])));
        return 0;
      }
      if (sub === 'show') {
        const r = await api.call('GET', `/v1/orchestras/${needRef()}`);
        if (r.status !== 200) return failed(r);
        out(r.data, Object.entries(r.data).map(([k, v]) => `${k.padEnd(16)} ${k === 'upstream' ? upstreamText(v) : String(v)}`).join('\n'));
        return 0;
      }
      if (sub === 'suspend' || sub === 'resume') {
        const r = await api.call('PATCH', `/v1/orchestras/${needRef()}`, { status: sub === 'suspend' ? 'suspended' : 'active' });
        if (r.status !== 200) return failed(r);
        out(r.data, `orchestra ${r.data.subdomain} is ${r.data.status}`);
        return 0;
      }
      if (sub === 'delete') {
        const drop = flags.has('drop-database');
        const r = await api.call('DELETE', `/v1/orchestras/${needRef()}${drop ? '?dropDatabase=true' : ''}`);
        if (r.status !== 200) return failed(r);
        out(r.data, `orchestra ${r.data.subdomain} deleted${drop ? ' (database and role dropped)' : ''}`);
        return 0;
      }
      throw new Usage('usage: stagedoor orchestra create|list|show|suspend|resume|delete …');
    }

    if (command === 'token') {
      if (sub === 'create') {
        const ttl = flags.get('ttl');
        const name = flags.get('name');
        const r = await api.call('POST', `/v1/orchestras/${needRef()}/tokens`, { ...(typeof ttl === 'string' ? { ttl } : {}), ...(typeof name === 'string' ? { name } : {}) });
        if (r.status !== 201) return failed(r);
        out(r.data, `jti        ${r.data.jti}\nexpires    ${r.data.expiresAt}\ntoken      ${r.data.token}\nconnect    psql "${r.data.connectionString}"`);
        return 0;
      }
      if (sub === 'list') {
        const r = await api.call('GET', `/v1/orchestras/${needRef()}/tokens`);
        if (r.status !== 200) return failed(r);
        const rows = r.data.tokens as Array<Record<string, unknown>>;
        out(r.data, table(['JTI', 'NAME', 'EXPIRES', 'REVOKED'], rows.map((t) => [t.jti, t.name, t.expiresAt, t.revokedAt ?? '-'])));
        return 0;
      }
      if (sub === 'revoke') {
        if (!ref) throw new Usage('usage: stagedoor token revoke <jti>');
        const r = await api.call('DELETE', `/v1/tokens/${encodeURIComponent(ref)}`);
        if (r.status !== 200) return failed(r);
        out(r.data, `token ${ref} revoked${r.data.alreadyRevoked ? ' (it already was)' : ''}; its live sessions are being ended`);
        return 0;
      }
      throw new Usage('usage: stagedoor token create|list|revoke …');
    }

    if (command === 'audit') {
      if (flags.has('fix')) {
        const dryRun = !flags.has('yes');
        const r = await api.call('POST', '/v1/audits/isolation/fix', { dryRun });
        if (r.status !== 200) return failed(r);
        const changes = (r.data.changes as Array<Record<string, unknown>>) ?? [];
        out(r.data, [dryRun ? 'dry run (add --yes to apply):' : 'applied:', ...changes.map((c) => `  ${c.action} ${c.subdomain}: ${c.detail}`), changes.length ? '' : '  nothing to fix'].join('\n'));
        return 0;
      }
      const r = await api.call('GET', '/v1/audits/isolation');
      if (r.status !== 200) return r.status === 404 || r.status >= 500 ? (failed(r), 2) : failed(r);
      const violations = (r.data.violations as Array<{ kind: string; orchestras: string[]; detail: string }>) ?? [];
      out(r.data, violations.length === 0 ? `isolation audit clean (${r.data.checkedAt})` : table(['KIND', 'ORCHESTRAS', 'DETAIL'], violations.map((v) => [v.kind, v.orchestras.join(', '), v.detail])));
      return violations.length === 0 ? 0 : 1;
    }

    if (command === 'import') {
      if (!sub) throw new Usage('usage: stagedoor import <legacy-central-database-url>');
      const r = await api.call('POST', '/v1/orchestras/import', { sourceUrl: sub });
      if (r.status !== 200) return failed(r);
      const rows = (r.data.orchestras as Array<Record<string, unknown>>) ?? [];
      out(r.data, table(['SUBDOMAIN', 'RESULT', 'STATUS', 'VIOLATION'], rows.map((o) => [o.subdomain, o.result, o.status, o.violation ?? '-'])));
      return 0;
    }
    throw new Usage(`unknown command "${command}" (stagedoor --help lists them)`);
  } catch (e) {
    if (e instanceof Usage || e instanceof Unreachable) {
      process.stderr.write(`stagedoor: ${e.message}\n`);
      return 2;
    }
    if (e instanceof LostAnswer) {
      process.stderr.write(`stagedoor: ${e.message}; see \`stagedoor orchestra show\` for the outcome\n`);
      return 1;
    }
    throw e;
  }
}

function upstreamText(u: unknown): string {
  if (!u || typeof u !== 'object') return '-';
  const x = u as { host: string; port: number; database: string };
  return `${x.host}:${x.port}/${x.database}`;
}

function table(headers: string[], rows: unknown[][]): string {
  const cells = rows.map((r) => r.map((c) => (c === null || c === undefined ? '-' : String(c))));
  const widths = headers.map((h, i) => Math.max(h.length, ...cells.map((r) => r[i]!.length)));
  const line = (r: string[]): string => r.map((c, i) => c.padEnd(widths[i]!)).join('  ').trimEnd();
  return [line(headers), ...(cells.length ? cells.map(line) : ['(none)'])].join('\n');
}
