// The deployment files (Dockerfile, .dockerignore, docker-compose.yml,
// deploy/.env.example) and the README's configuration table, checked against
// what the code reads and serves. No Docker engine is needed: the files are
// parsed, and the image's health check is run with a stubbed fetch.
//
// docker-compose.yml is kept to a plain YAML subset that parseYamlSubset()
// below reads exactly; anything outside it is refused, not guessed at. When
// python3 with PyYAML is present, a test also checks that PyYAML reads the
// file the same way.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { dirname, join, posix } from 'node:path';
import { fileURLToPath } from 'node:url';
import { VARIABLES, loadControlPlaneConfig, loadProxyConfig, type Env } from '../../common/config.js';
import { parseListenAddress } from '../../common/listen-address.js';

// ---------------------------------------------------------------------------
// Locations

function findRepoRoot(): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  for (;;) {
    const pkg = join(dir, 'package.json');
    if (existsSync(pkg) && (JSON.parse(readFileSync(pkg, 'utf8')) as { name?: string }).name === 'stagedoor') return dir;
    const up = dirname(dir);
    if (up === dir) throw new Error('could not find the repository root (package.json named stagedoor)');
    dir = up;
  }
}

const ROOT = findRepoRoot();
const read = (rel: string): string => readFileSync(join(ROOT, rel), 'utf8');

// ---------------------------------------------------------------------------
// A YAML subset: block mappings and block sequences indented with spaces,
// plain scalars, JSON-compatible double-quoted scalars and JSON-compatible flow
// sequences of strings, full-line and trailing comments. No anchors, aliases,
// tags, block scalars, single quotes, flow mappings or multi-line scalars.

type Yaml = string | number | boolean | null | Yaml[] | { [key: string]: Yaml };
type YamlMap = { [key: string]: Yaml };

interface Line {
  no: number;
  indent: number;
  text: string;
}

class YamlSubsetError extends Error {}

function stripComment(raw: string, no: number): string {
  let inQuotes = false;
  for (let i = 0; i < raw.length; i++) {
    const c = raw[i];
    if (inQuotes && c === '\\') {
      i++;
      continue;
    }
    if (c === '"') inQuotes = !inQuotes;
    if (!inQuotes && c === '#' && (i === 0 || raw[i - 1] === ' ')) return raw.slice(0, i).trimEnd();
  }
  if (inQuotes) throw new YamlSubsetError(`line ${no}: unterminated double-quoted scalar (multi-line scalars are outside the subset)`);
  return raw.trimEnd();
}

function toLines(text: string): Line[] {
  const lines: Line[] = [];
  text.split('\n').forEach((raw0, i) => {
    const no = i + 1;
    const raw = raw0.replace(/\r$/, '');
    if (raw.includes('\t')) throw new YamlSubsetError(`line ${no}: tab character`);
    const body = stripComment(raw, no);
    if (body.trim() === '') return;
    if (/^(---|\.\.\.)(\s|$)/.test(body) || body.startsWith('%')) throw new YamlSubsetError(`line ${no}: document markers and directives are outside the subset`);
    const indent = body.length - body.trimStart().length;
    lines.push({ no, indent, text: body.trim() });
  });
  return lines;
}

const YAML11_BOOLEAN_LOOKALIKES = /^(y|Y|yes|Yes|YES|n|N|no|No|NO|on|On|ON|off|Off|OFF)$/;

function scalar(s: string, no: number): Yaml {
  if (s.startsWith('"')) {
    if (!/^"(?:[^"\\]|\\.)*"$/.test(s)) throw new YamlSubsetError(`line ${no}: text after a double-quoted scalar`);
    try {
      return JSON.parse(s) as string;
    } catch {
      throw new YamlSubsetError(`line ${no}: a double-quoted scalar must also be a valid JSON string`);
    }
  }
  if (s.startsWith('[')) {
    let parsed: unknown;
    try {
      parsed = JSON.parse(s);
    } catch {
      throw new YamlSubsetError(`line ${no}: a flow sequence must be a JSON array of double-quoted strings`);
    }
    if (!Array.isArray(parsed) || !parsed.every((x) => typeof x === 'string')) {
      throw new YamlSubsetError(`line ${no}: a flow sequence must hold strings only`);
    }
    return parsed as string[];
  }
  if (/^['{&*!|>%@`?,\]}]/.test(s)) throw new YamlSubsetError(`line ${no}: "${s[0]}" starts a construct outside the subset`);
  if (s.includes(': ') || s.endsWith(':')) throw new YamlSubsetError(`line ${no}: ": " inside a plain scalar; quote it`);
  if (s === 'null' || s === 'Null' || s === 'NULL' || s === '~') return null;
  if (s === 'true' || s === 'True' || s === 'TRUE') return true;
  if (s === 'false' || s === 'False' || s === 'FALSE') return false;
  if (/^(0|[-+]?[1-9][0-9]*)$/.test(s)) return Number(s);
  // Plain scalars that YAML 1.1 (and so PyYAML and older Compose) would read
  // as booleans, octals, floats or base-60 numbers: quote them.
  if (YAML11_BOOLEAN_LOOKALIKES.test(s)) throw new YamlSubsetError(`line ${no}: "${s}" is a boolean in YAML 1.1; quote it`);
  if (/^[-+]?(0[0-9_]+|0x[0-9a-fA-F_]+|0b[01_]+|[0-9][0-9_]*(:[0-5]?[0-9])+(\.[0-9_]*)?|[0-9_]*\.[0-9_]*([eE][-+]?[0-9]+)?|\.(inf|Inf|INF|nan|NaN|NAN))$/.test(s) && /[0-9]/.test(s)) {
    throw new YamlSubsetError(`line ${no}: "${s}" reads as a number in some YAML version; quote it`);
  }
  return s;
}

function parseYamlSubset(text: string): Yaml {
  const lines = toLines(text);
  let pos = 0;

  function block(indent: number): Yaml {
    const first = lines[pos]!;
    return first.text === '-' || first.text.startsWith('- ') ? sequence(indent) : mapping(indent);
  }

  function nested(parentIndent: number, no: number): Yaml {
    const next = lines[pos];
    if (next === undefined || next.indent <= parentIndent) return null;
    if (next.indent !== parentIndent + 2) throw new YamlSubsetError(`line ${next.no}: indent by two spaces (after line ${no})`);
    return block(next.indent);
  }

  function mapping(indent: number): YamlMap {
    const out: YamlMap = {};
    while (pos < lines.length && lines[pos]!.indent === indent) {
      const line = lines[pos]!;
      if (line.text === '-' || line.text.startsWith('- ')) throw new YamlSubsetError(`line ${line.no}: a list item where a mapping key was expected`);
      const m = /^("(?:[^"\\]|\\.)*"|[A-Za-z0-9_][A-Za-z0-9_.\-/]*):(?: +(.*))?$/.exec(line.text);
      if (!m) throw new YamlSubsetError(`line ${line.no}: expected "key: value" or "key:"`);
      const key = m[1]!.startsWith('"') ? (JSON.parse(m[1]!) as string) : m[1]!;
      if (Object.prototype.hasOwnProperty.call(out, key)) throw new YamlSubsetError(`line ${line.no}: duplicate key "${key}"`);
      pos++;
      out[key] = m[2] === undefined || m[2] === '' ? nested(indent, line.no) : scalar(m[2], line.no);
    }
    return out;
  }

  function sequence(indent: number): Yaml[] {
    const out: Yaml[] = [];
    while (pos < lines.length && lines[pos]!.indent === indent) {
      const line = lines[pos]!;
      if (!(line.text === '-' || line.text.startsWith('- '))) throw new YamlSubsetError(`line ${line.no}: a mapping key inside a list`);
      const item = line.text.slice(1).trim();
      pos++;
      if (item === '') {
        out.push(nested(indent, line.no));
      } else if (/^("(?:[^"\\]|\\.)*"|[^"\s[][^\s]*):( |$)/.test(item)) {
        throw new YamlSubsetError(`line ${line.no}: mappings inside lists are outside the subset`);
      } else {
        out.push(scalar(item, line.no));
      }
    }
    return out;
  }

  if (lines.length === 0) return null;
  if (lines[0]!.indent !== 0) throw new YamlSubsetError(`line ${lines[0]!.no}: the document must start at column 0`);
  const doc = block(0);
  if (pos < lines.length) throw new YamlSubsetError(`line ${lines[pos]!.no}: unexpected indentation`);
  return doc;
}

// ---------------------------------------------------------------------------
// What the code declares and the CLI offers

const DECLARED = VARIABLES.map((v) => v.name);
const variableNamed = (key: string) =>
  VARIABLES.find((v) => v.name === key || (v.name === 'DATABASE_URL_POOL_1…N' && /^DATABASE_URL_POOL_[1-9][0-9]*$/.test(key)));
const defaultPort = (name: string): number => {
  const v = VARIABLES.find((x) => x.name === name);
  assert.ok(v, `${name} is declared in VARIABLES`);
  return parseListenAddress(v.default, name).port;
};

/** Variables a stagedoor service may set that VARIABLES does not declare, each with the reason. */
const EXTRA_STAGEDOOR_VARIABLES: ReadonlyMap<string, string> = new Map([
  // none today: add ['NAME', 'why a service sets it although common/config.ts does not declare it']
]);

/** Variables of the official images used in docker-compose.yml. */
const IMAGE_VARIABLES: Readonly<Record<string, readonly string[]>> = {
  postgres: ['POSTGRES_PASSWORD', 'POSTGRES_USER', 'POSTGRES_DB', 'POSTGRES_INITDB_ARGS', 'POSTGRES_HOST_AUTH_METHOD', 'PGDATA'],
  redis: [],
};

/** The secrets .env must supply. */
const SECRETS = ['ADMIN_TOKEN', 'PROXY_TOKEN', 'ENCRYPTION_KEY', 'POSTGRES_PASSWORD'].sort();

let helpCache: string[] | undefined;
function cliCommands(): string[] {
  if (helpCache) return helpCache;
  const main = join(ROOT, 'dist', 'cli', 'main.js');
  const r = spawnSync(process.execPath, [main, '--help'], { encoding: 'utf8', timeout: 30_000 });
  assert.equal(r.status, 0, `node dist/cli/main.js --help exits 0 (stderr: ${r.stderr})`);
  const words = new Set<string>();
  for (const line of r.stdout.split('\n')) {
    const m = /^ {2}([a-z][a-z-]*)(?:\s|$)/.exec(line);
    if (m) words.add(m[1]!);
  }
  helpCache = [...words];
  return helpCache;
}

// ---------------------------------------------------------------------------
// docker-compose.yml

interface Service {
  name: string;
  def: YamlMap;
  env: Record<string, string>;
  command: string[];
}

function asMap(v: Yaml | undefined, what: string): YamlMap {
  assert.ok(v !== null && typeof v === 'object' && !Array.isArray(v), `${what} is a mapping`);
  return v as YamlMap;
}

function asStrings(v: Yaml | undefined, what: string): string[] {
  assert.ok(Array.isArray(v) && v.every((x) => typeof x === 'string'), `${what} is a list of strings`);
  return v as string[];
}

const compose = asMap(parseYamlSubset(read('docker-compose.yml')), 'docker-compose.yml');
const services: Service[] = Object.entries(asMap(compose.services, 'services')).map(([name, raw]) => {
  const def = asMap(raw, `service ${name}`);
  const envRaw = def.environment === undefined ? {} : asMap(def.environment, `${name}.environment (written as a mapping)`);
  const env: Record<string, string> = {};
  for (const [k, v] of Object.entries(envRaw)) {
    assert.equal(typeof v, 'string', `${name}.environment.${k} is a string (quote numbers and booleans)`);
    env[k] = v as string;
  }
  const command = def.command === undefined ? [] : typeof def.command === 'string' ? def.command.split(/\s+/) : asStrings(def.command, `${name}.command`);
  return { name, def, env, command };
});
const stagedoorServices = services.filter((s) => s.def.build !== undefined);
const byRole = (role: string) => stagedoorServices.filter((s) => s.command[0] === role);
const imageOf = (s: Service) => String(s.def.image ?? '').split(':')[0]!;

/** Fills each ${NAME:?message} with a valid stand-in, as Compose would with .env. */
function interpolate(value: string): string {
  const standIns: Record<string, string> = {
    ADMIN_TOKEN: 'admin-token-0123456789abcdef',
    PROXY_TOKEN: 'proxy-token-0123456789abcdef',
    ENCRYPTION_KEY: Buffer.alloc(32, 7).toString('base64'),
    POSTGRES_PASSWORD: 'ab'.repeat(32),
  };
  return value.replace(/\$\{([A-Za-z_][A-Za-z0-9_]*):\?[^}]*\}/g, (_m, name: string) => {
    const v = standIns[name];
    assert.ok(v !== undefined, `no stand-in for \${${name}}`);
    return v;
  });
}
const envOf = (s: Service): Env => Object.fromEntries(Object.entries(s.env).map(([k, v]) => [k, interpolate(v)]));

function publishedPorts(s: Service): Array<{ host: number; container: number }> {
  if (s.def.ports === undefined) return [];
  return asStrings(s.def.ports, `${s.name}.ports (short syntax, quoted)`).map((p) => {
    const m = /^(?:(?:\d{1,3}(?:\.\d{1,3}){3}|\[[0-9a-fA-F:]+\]):)?(\d+):(\d+)(?:\/tcp)?$/.exec(p);
    assert.ok(m, `${s.name}: port "${p}" is [ip:]host:container`);
    return { host: Number(m[1]), container: Number(m[2]) };
  });
}

function healthcheckUrl(s: Service): URL {
  const hc = asMap(s.def.healthcheck, `${s.name}.healthcheck`);
  const cmd = asStrings(hc.test, `${s.name}.healthcheck.test`).join(' ');
  const m = /https?:\/\/[^'"\s)]+/.exec(cmd);
  assert.ok(m, `${s.name}'s health check asks a URL`);
  return new URL(m[0]);
}

test('docker-compose.yml stays inside the YAML subset and PyYAML reads it the same way', (t) => {
  const probe = spawnSync('python3', ['-c', 'import yaml'], { encoding: 'utf8' });
  if (probe.error || probe.status !== 0) {
    t.skip('python3 with PyYAML is not available');
    return;
  }
  const r = spawnSync('python3', ['-c', 'import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)'], {
    input: read('docker-compose.yml'),
    encoding: 'utf8',
  });
  assert.equal(r.status, 0, r.stderr);
  assert.deepEqual(compose, JSON.parse(r.stdout));
});

test('the YAML subset parser refuses what it does not understand instead of guessing', () => {
  assert.deepEqual(parseYamlSubset('a:\n  b: "x # y" # note\n  c:\n    - "1"\n    - two\n  d: ["e", "f"]\n  g:\n'), {
    a: { b: 'x # y', c: ['1', 'two'], d: ['e', 'f'], g: null },
  });
  assert.deepEqual(parseYamlSubset('n: 8080\nt: true\ns: 40s\ni: postgres:16'), { n: 8080, t: true, s: '40s', i: 'postgres:16' });
  for (const bad of [
    'a: &x 1\nb: *x',
    "a: 'single'",
    'a: |\n  text',
    'a: {b: 1}',
    'a:\n  - b: 1',
    'a: 1\na: 2',
    'a: yes',
    'a: 22:22',
    'a: 0755',
    'a: b: c',
    'a:\n    b: 1',
    'a: "unterminated',
  ]) {
    assert.throws(() => parseYamlSubset(bad), YamlSubsetError, JSON.stringify(bad));
  }
});

test('the stagedoor services are one control plane and two proxies, all built from this repository as one image', () => {
  assert.deepEqual(stagedoorServices.map((s) => s.command[0]).sort(), ['control-plane', 'proxy', 'proxy']);
  assert.equal(new Set(stagedoorServices.map((s) => s.def.image)).size, 1, 'one image name for all of them');
  for (const s of stagedoorServices) assert.equal(s.def.build, '.', `${s.name} builds the Dockerfile at the root`);
});

test('every environment variable a stagedoor service sets is declared in VARIABLES and read by its role', () => {
  for (const s of stagedoorServices) {
    const role = s.command[0] as 'proxy' | 'control-plane';
    for (const key of Object.keys(s.env)) {
      if (EXTRA_STAGEDOOR_VARIABLES.has(key)) continue;
      const v = variableNamed(key);
      assert.ok(v, `${s.name} sets ${key}, which common/config.ts does not declare`);
      assert.ok(v.roles.includes(role), `${s.name} (${role}) sets ${key}, which only ${v.roles.join(', ')} read`);
    }
  }
});

test('the environment of each stagedoor service is one its role accepts at start', () => {
  for (const s of byRole('control-plane')) {
    const c = loadControlPlaneConfig(envOf(s));
    assert.equal(c.listen.host, '0.0.0.0', `${s.name} listens on every interface of its container`);
  }
  for (const s of byRole('proxy')) {
    const c = loadProxyConfig(envOf(s));
    assert.equal(c.listen.host, '0.0.0.0', `${s.name}'s PROXY_LISTEN is reachable from outside its container`);
    assert.equal(c.metricsListen.host, '0.0.0.0', `${s.name}'s METRICS_LISTEN is reachable from outside its container`);
    assert.equal(c.requireTls, true, `${s.name} requires TLS`);
    assert.ok(c.tlsCertFile && c.tlsKeyFile, `${s.name} has a certificate and key`);
  }
});

test('the postgres and redis services set only variables their images read', () => {
  for (const s of services.filter((x) => x.def.build === undefined)) {
    const known = IMAGE_VARIABLES[imageOf(s)];
    assert.ok(known, `${s.name} uses an image this test knows (${String(s.def.image)})`);
    for (const key of Object.keys(s.env)) assert.ok(known.includes(key), `${s.name} sets ${key}, which the ${imageOf(s)} image does not read`);
  }
});

test('every stagedoor service runs a command that stagedoor --help lists', () => {
  const commands = cliCommands();
  for (const role of ['dev', 'proxy', 'control-plane', 'migrate']) assert.ok(commands.includes(role), `help lists ${role}`);
  for (const s of stagedoorServices) {
    assert.ok(s.command.length > 0, `${s.name} names its command`);
    assert.ok(commands.includes(s.command[0]!), `${s.name} runs "${s.command[0]}", which stagedoor --help does not list`);
  }
});

test('each *_LISTEN port is the container port its service publishes, and no host port is published twice', () => {
  const hostPorts: number[] = [];
  for (const s of stagedoorServices) {
    const published = publishedPorts(s);
    hostPorts.push(...published.map((p) => p.host));
    const listenPorts = Object.entries(s.env)
      .filter(([k]) => k.endsWith('_LISTEN'))
      .map(([k, v]) => ({ name: k, port: parseListenAddress(v, k).port }));
    assert.ok(listenPorts.length > 0, `${s.name} sets its *_LISTEN addresses`);
    for (const l of listenPorts) {
      assert.ok(published.some((p) => p.container === l.port), `${s.name}: ${l.name} port ${l.port} is published`);
    }
    for (const p of published) {
      assert.ok(listenPorts.some((l) => l.port === p.container), `${s.name}: published container port ${p.container} is one of its *_LISTEN ports`);
    }
  }
  assert.equal(new Set(hostPorts).size, hostPorts.length, `host ports are distinct: ${hostPorts.join(', ')}`);
});

test('two proxies find the control plane at its service name and listen port, and share its Redis', () => {
  const proxies = byRole('proxy');
  const [cp] = byRole('control-plane');
  assert.equal(proxies.length, 2);
  assert.ok(cp);
  const cpPort = parseListenAddress(cp.env.CONTROL_PLANE_LISTEN ?? '', 'CONTROL_PLANE_LISTEN').port;
  const redisServices = services.filter((s) => imageOf(s) === 'redis').map((s) => s.name);
  const redisUrl = cp.env.REDIS_URL;
  assert.ok(redisUrl, 'the control plane has REDIS_URL');
  assert.ok(redisServices.includes(new URL(redisUrl).hostname), 'REDIS_URL names the redis service');
  for (const p of proxies) {
    assert.ok(p.env.CONTROL_PLANE_URL, `${p.name} sets CONTROL_PLANE_URL`);
    const u = new URL(p.env.CONTROL_PLANE_URL);
    assert.equal(u.hostname, cp.name, `${p.name} reaches the control plane by its service name`);
    assert.equal(Number(u.port || (u.protocol === 'https:' ? 443 : 80)), cpPort, `${p.name} uses the control plane's CONTROL_PLANE_LISTEN port`);
    assert.equal(p.env.REDIS_URL, redisUrl, `${p.name} uses the control plane's Redis`);
    assert.equal(p.env.PROXY_TOKEN, cp.env.PROXY_TOKEN, `${p.name} presents the PROXY_TOKEN the control plane expects`);
    const deps = asMap(p.def.depends_on, `${p.name}.depends_on`);
    assert.equal(asMap(deps[cp.name], `${p.name}.depends_on.${cp.name}`).condition, 'service_healthy');
  }
});

test('the control plane reaches the central database and the tenant server by service name', () => {
  const [cp] = byRole('control-plane');
  assert.ok(cp);
  const names = services.map((s) => s.name);
  for (const key of ['CENTRAL_DATABASE_URL', 'TENANT_SERVER_URL']) {
    const u = new URL(interpolate(cp.env[key] ?? ''));
    assert.ok(names.includes(u.hostname), `${key} names a compose service (${u.hostname})`);
    assert.notEqual(u.hostname, byRole('proxy')[0]?.name);
  }
  assert.notEqual(new URL(interpolate(cp.env.CENTRAL_DATABASE_URL!)).hostname, new URL(interpolate(cp.env.TENANT_SERVER_URL!)).hostname, 'orchestra databases are not created on the central server');
});

test('every health check of a stagedoor service asks the port its role serves health on', () => {
  for (const s of stagedoorServices) {
    const u = healthcheckUrl(s);
    const listen = s.command[0] === 'proxy' ? 'METRICS_LISTEN' : 'CONTROL_PLANE_LISTEN';
    assert.equal(u.hostname, '127.0.0.1');
    assert.equal(Number(u.port), parseListenAddress(s.env[listen] ?? '', listen).port, `${s.name} checks ${listen}`);
    assert.ok(['/healthz', '/readyz'].includes(u.pathname), `${s.name} checks /healthz or /readyz`);
  }
});

test('every service waited on as healthy has a health check', () => {
  for (const s of services) {
    if (s.def.depends_on === undefined) continue;
    for (const [dep, cond] of Object.entries(asMap(s.def.depends_on, `${s.name}.depends_on`))) {
      const target = services.find((x) => x.name === dep);
      assert.ok(target, `${s.name} depends on a service that exists (${dep})`);
      if (asMap(cond, `${s.name}.depends_on.${dep}`).condition === 'service_healthy') {
        assert.ok(target.def.healthcheck !== undefined, `${dep} has a healthcheck`);
      }
    }
  }
});

test('the proxies mount the directory their certificate and key are read from', () => {
  for (const s of byRole('proxy')) {
    const volumes = asStrings(s.def.volumes, `${s.name}.volumes`).map((v) => v.split(':'));
    for (const key of ['TLS_CERT_FILE', 'TLS_KEY_FILE']) {
      const file = s.env[key];
      assert.ok(file, `${s.name} sets ${key}`);
      const mount = volumes.find(([, target]) => target === posix.dirname(file));
      assert.ok(mount, `${s.name} mounts ${posix.dirname(file)}`);
      assert.equal(mount[2], 'ro', `${s.name} mounts its TLS directory read-only`);
    }
  }
});

test('secrets come only from .env, each required with a message, and deploy/.env.example lists exactly them', () => {
  const text = read('docker-compose.yml');
  const refs = [...text.matchAll(/\$\{?([A-Za-z_][A-Za-z0-9_]*)(:?[?\-+]?)/g)];
  for (const [whole, name, op] of refs) {
    assert.ok(SECRETS.includes(name!), `${whole} is one of the secrets`);
    assert.equal(op, ':?', `${name} is written \${${name}:?message}`);
  }
  assert.deepEqual([...new Set(refs.map((r) => r[1]))].sort(), SECRETS);
  const example = read('deploy/.env.example');
  const assigned = [...example.matchAll(/^([A-Z_][A-Z0-9_]*)=(.*)$/gm)];
  assert.deepEqual(assigned.map((m) => m[1]).sort(), SECRETS);
  for (const [, name, value] of assigned) assert.equal(value, '', `${name} is left empty in the example, so a forgotten value stops Compose`);
  assert.match(example, /openssl rand -base64 32/);
});

// ---------------------------------------------------------------------------
// Dockerfile

interface Instruction {
  op: string;
  args: string;
}

function parseDockerfile(text: string): Instruction[] {
  const out: Instruction[] = [];
  let current = '';
  for (const raw of text.split('\n')) {
    const line = raw.replace(/\r$/, '');
    if (current === '' && /^\s*(#|$)/.test(line)) continue;
    if (current !== '' && /^\s*#/.test(line)) continue; // comment lines inside a continuation are dropped by Docker too
    if (/\\\s*$/.test(line)) {
      current += line.replace(/\\\s*$/, '') + ' ';
      continue;
    }
    current += line;
    const m = /^\s*([A-Za-z]+)\s+([\s\S]*)$/.exec(current);
    assert.ok(m, `Dockerfile line "${current}" is an instruction`);
    out.push({ op: m[1]!.toUpperCase(), args: m[2]!.trim() });
    current = '';
  }
  return out;
}

const dockerfile = parseDockerfile(read('Dockerfile'));
const stages: Instruction[][] = [];
const preludeArgs = new Map<string, string>();
for (const ins of dockerfile) {
  if (ins.op === 'FROM') stages.push([]);
  if (stages.length === 0) {
    const m = /^([A-Za-z_][A-Za-z0-9_]*)=(\S+)$/.exec(ins.args);
    if (ins.op === 'ARG' && m) preludeArgs.set(m[1]!, m[2]!);
    continue;
  }
  stages[stages.length - 1]!.push(ins);
}
const finalStage = stages[stages.length - 1] ?? [];
const lastOf = (op: string) => finalStage.filter((i) => i.op === op).at(-1);
const execForm = (ins: Instruction | undefined, what: string): string[] => {
  assert.ok(ins, `the final stage has ${what}`);
  const parsed = JSON.parse(ins.args) as unknown;
  assert.ok(Array.isArray(parsed) && parsed.every((x) => typeof x === 'string'), `${what} is in exec form`);
  return parsed as string[];
};
function healthcheckScript(): string {
  const hc = lastOf('HEALTHCHECK');
  assert.ok(hc, 'the final stage has a HEALTHCHECK');
  const m = /(?:^|\s)CMD\s+(\[.*\])\s*$/.exec(hc.args);
  assert.ok(m, 'HEALTHCHECK runs a command in exec form');
  const cmd = JSON.parse(m[1]!) as string[];
  assert.deepEqual(cmd.slice(0, 2), ['node', '-e'], 'the health check runs node -e (no curl in the image)');
  return cmd[2]!;
}

test('the Dockerfile builds in one stage and runs from another, both node:20-bookworm-slim', () => {
  const froms = dockerfile.filter((i) => i.op === 'FROM').map((i) => i.args.split(/\s+/)[0]!.replace(/^\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?$/, (_m, n: string) => preludeArgs.get(n) ?? _m));
  assert.ok(froms.length >= 2, 'at least two FROM stages');
  for (const f of froms) assert.equal(f, 'node:20-bookworm-slim');
  const build = stages[0]!.map((i) => i.args).join('\n');
  assert.match(build, /npm ci\b/);
  assert.match(build, /npm run build\b/);
  assert.match(build, /npm prune --omit=dev\b/);
});

test('the runtime stage holds only dist, schemas, the pruned node_modules and package.json', () => {
  const copies = finalStage.filter((i) => i.op === 'COPY' || i.op === 'ADD');
  for (const c of copies) assert.match(c.args, /^--from=\S+\s/, `runtime "${c.op} ${c.args}" copies from the build stage`);
  const sources = copies.map((c) => c.args.split(/\s+/)[1]!.replace(/^\/app\//, '').replace(/\/$/, '')).sort();
  assert.deepEqual(sources, ['dist', 'node_modules', 'package.json', 'schemas']);
  assert.ok(finalStage.some((i) => i.op === 'ENV' && /(^|\s)NODE_ENV=production(\s|$)/.test(i.args)), 'ENV NODE_ENV=production');
});

test('the image runs as a non-root user', () => {
  const user = lastOf('USER');
  assert.ok(user, 'the final stage has a USER');
  const name = user.args.split(':')[0]!;
  assert.ok(!['root', '0'].includes(name), `USER ${user.args} must not be root`);
});

test('the entrypoint runs dist/cli/main.js and the default command is one stagedoor --help lists', () => {
  const entry = execForm(lastOf('ENTRYPOINT'), 'ENTRYPOINT');
  assert.equal(entry[0], 'node');
  assert.ok(entry[1]?.endsWith('dist/cli/main.js'), `ENTRYPOINT runs dist/cli/main.js (${entry.join(' ')})`);
  const workdir = lastOf('WORKDIR')?.args;
  assert.ok(entry[1]!.startsWith('/') || workdir, 'the entrypoint path is absolute or under WORKDIR');
  const cmd = execForm(lastOf('CMD'), 'CMD');
  assert.ok(cliCommands().includes(cmd[0]!), `CMD ${cmd[0]} is a stagedoor command`);
});

test('the image exposes the default ports of PROXY_LISTEN, CONTROL_PLANE_LISTEN and METRICS_LISTEN', () => {
  const exposed = finalStage.filter((i) => i.op === 'EXPOSE').flatMap((i) => i.args.split(/\s+/)).map((p) => Number(p.replace(/\/tcp$/, '')));
  for (const name of ['PROXY_LISTEN', 'CONTROL_PLANE_LISTEN', 'METRICS_LISTEN']) {
    assert.ok(exposed.includes(defaultPort(name)), `EXPOSE ${defaultPort(name)} (${name})`);
  }
});

function runHealthcheck(answers: Record<number, number | 'refused'>): { status: number | null; asked: string[] } {
  // Replaces fetch before the -e script runs: each URL's port gets the status
  // given, or a refused connection; every URL asked is printed.
  const stub = `
    const answers = JSON.parse(process.env.STAGEDOOR_HC_ANSWERS);
    globalThis.fetch = async (url) => {
      const u = new URL(String(url));
      process.stdout.write('ASKED ' + u.href + '\\n');
      const a = answers[u.port];
      if (a === undefined || a === 'refused') throw new TypeError('fetch failed: connect ECONNREFUSED');
      return new Response(null, { status: a });
    };`;
  const r = spawnSync(process.execPath, ['--import', `data:text/javascript,${encodeURIComponent(stub)}`, '-e', healthcheckScript()], {
    encoding: 'utf8',
    timeout: 20_000,
    env: { ...process.env, STAGEDOOR_HC_ANSWERS: JSON.stringify(answers) },
  });
  return { status: r.status, asked: r.stdout.split('\n').filter((l) => l.startsWith('ASKED ')).map((l) => l.slice(6)) };
}

test("the image's health check passes when the proxy's or the control plane's /healthz answers 200, and fails otherwise", () => {
  const metrics = defaultPort('METRICS_LISTEN');
  const api = defaultPort('CONTROL_PLANE_LISTEN');
  const proxyUp = runHealthcheck({ [metrics]: 200 });
  assert.equal(proxyUp.status, 0, 'a proxy answering on METRICS_LISTEN is healthy');
  assert.deepEqual(proxyUp.asked.sort(), [`http://127.0.0.1:${api}/healthz`, `http://127.0.0.1:${metrics}/healthz`].sort());
  assert.equal(runHealthcheck({ [api]: 200 }).status, 0, 'a control plane answering on CONTROL_PLANE_LISTEN is healthy');
  assert.equal(runHealthcheck({}).status, 1, 'nothing answering is unhealthy');
  assert.equal(runHealthcheck({ [metrics]: 500, [api]: 'refused' }).status, 1, 'an answer other than 200 is unhealthy');
});

test('.dockerignore keeps secrets and local state out of the build context, but not what the build copies', () => {
  const patterns = read('.dockerignore')
    .split('\n')
    .map((l) => l.trim())
    .filter((l) => l !== '' && !l.startsWith('#'));
  for (const p of patterns) assert.ok(!p.startsWith('!') && !p.includes('**'), `pattern "${p}" is a plain one this test understands`);
  const toRegExp = (p: string) => new RegExp('^' + p.replace(/^\/+|\/+$/g, '').replace(/[.+^${}()|[\]\\]/g, '\\$&').replace(/\*/g, '[^/]*').replace(/\?/g, '[^/]') + '$');
  const ignored = (path: string) => {
    const parts = path.replace(/^\.\//, '').replace(/\/$/, '').split('/');
    return patterns.some((p) => parts.some((_x, i) => toRegExp(p).test(parts.slice(0, i + 1).join('/'))));
  };
  for (const secret of ['.env', 'deploy/tls/proxy.key', '.stagedoor/state.json', 'node_modules', 'dist', '.git']) {
    assert.ok(ignored(secret), `${secret} stays out of the build context`);
  }
  const contextSources = stages
    .flat()
    .filter((i) => (i.op === 'COPY' || i.op === 'ADD') && !/^--from=/.test(i.args))
    .flatMap((i) => i.args.split(/\s+/).filter((a) => !a.startsWith('--')).slice(0, -1));
  assert.ok(contextSources.length > 0);
  for (const src of contextSources) {
    assert.ok(!ignored(src), `${src} is copied by the Dockerfile, so .dockerignore must not drop it`);
    assert.ok(existsSync(join(ROOT, src)), `${src} exists`);
  }
});

// ---------------------------------------------------------------------------
// README

function readmeSection(title: string): string {
  const readme = read('README.md');
  const start = readme.indexOf(`\n## ${title}\n`);
  assert.ok(start >= 0, `README.md has a "## ${title}" section`);
  const rest = readme.slice(start + 1);
  const end = rest.indexOf('\n## ', 1);
  return end < 0 ? rest : rest.slice(0, end);
}

function readmeConfigurationNames(): string[] {
  return readmeSection('Configuration')
    .split('\n')
    .map((l) => /^\|\s*`([^`]+)`\s*\|/.exec(l)?.[1])
    .filter((x): x is string => x !== undefined);
}

test("the README's configuration table lists every variable declared in VARIABLES", () => {
  const documented = readmeConfigurationNames();
  const missing = DECLARED.filter((n) => !documented.includes(n));
  assert.deepEqual(missing, [], `declared in common/config.ts but missing from README.md's table: ${missing.join(', ')}`);
});

test("the README's configuration table lists nothing that common/config.ts does not declare", () => {
  const extra = readmeConfigurationNames().filter((n) => !DECLARED.includes(n));
  assert.deepEqual(extra, [], `in README.md's table but not declared in VARIABLES of common/config.ts: ${extra.join(', ')}`);
});

test('the README explains containers right before the configuration, including the certificate the proxies mount', () => {
  const readme = read('README.md');
  assert.ok(readme.indexOf('\n## Deploying with containers\n') >= 0);
  assert.ok(/\n## Deploying with containers\n[\s\S]*?\n## (\S[^\n]*)\n/.exec(readme)?.[1] === 'Configuration', 'the next section is Configuration');
  const section = readmeSection('Deploying with containers');
  for (const s of byRole('proxy')) {
    const hostDir = asStrings(s.def.volumes, `${s.name}.volumes`).map((v) => v.split(':')).find(([, target]) => target === posix.dirname(s.env.TLS_CERT_FILE ?? ''))?.[0];
    assert.ok(hostDir, `${s.name} mounts a TLS directory from the host`);
    for (const key of ['TLS_CERT_FILE', 'TLS_KEY_FILE']) {
      const onHost = posix.join(hostDir, posix.basename(s.env[key] ?? ''));
      assert.ok(section.includes(`-${key === 'TLS_CERT_FILE' ? 'out' : 'keyout'} ${onHost.replace(/^\.\//, '')}`), `the README's openssl command writes ${onHost}`);
    }
  }
  assert.match(section, /cp deploy\/\.env\.example \.env/);
});
