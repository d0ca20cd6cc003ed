// /openapi.json is the API's contract: OpenAPI 3.1, every route fastify
// serves is in it with its method, every route documents its error answers
// with the `{error: {code, message}}` schema, and the same schemas validate
// requests (unknown fields and wrong types are 400, never dropped or coerced).
// The API is the real one: ControlPlane.start on a real central PostgreSQL.

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { readFileSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { loadControlPlaneConfig } from '../../common/config.js';
import { silentLogger } from '../../common/log.js';
import { ControlPlane } from '../../control-plane/server.js';
import { startTestPostgres, type TestPostgres } from '../fixtures/postgres.js';
import { REPO_ROOT } from '../fixtures/container-stack.js';

type Json = Record<string, any>;

const ADMIN_TOKEN = `test_admin_${randomBytes(16).toString('hex')}`;
const METHODS = ['get', 'post', 'put', 'patch', 'delete'] as const;
/** the document itself: served, deliberately not described (schema.hide in control-plane/http/app.ts) */
const SELF = 'GET /openapi.json';
/**
 * Public operations routes (no token, nothing to validate) can answer no 4xx;
 * they are checked for being documented as public instead.
 */
const PUBLIC_OPS = new Set(['GET /healthz', 'GET /readyz', 'GET /metrics', 'GET /.well-known/jwks.json']);

let central: TestPostgres;
let cp: ControlPlane;
let doc: Json;
let served: string[];

before(async () => {
  central = await startTestPostgres();
  cp = await ControlPlane.start(
    loadControlPlaneConfig({
      CENTRAL_DATABASE_URL: central.url('postgres'),
      ADMIN_TOKEN,
      ENCRYPTION_KEY: randomBytes(32).toString('base64'),
      CONTROL_PLANE_LISTEN: '127.0.0.1:0',
    }),
    silentLogger,
  );
  const res = await fetch(`${cp.url}/openapi.json`);
  assert.equal(res.status, 200);
  doc = (await res.json()) as Json;
  served = routesOf(cp.app.printRoutes({ commonPrefix: false }));
});
after(async () => {
  await cp?.stop();
  await central?.stop();
});

/** "METHOD /path" for every route fastify serves, read from its route tree (HEAD is fastify's own twin of GET). */
function routesOf(tree: string): string[] {
  const out: string[] = [];
  const stack: string[] = [];
  for (const line of tree.split('\n')) {
    const m = /^([│ ]*)[├└]── (\S+)(?: \(([A-Z, ]+)\))?$/.exec(line.trimEnd());
    if (!m) continue;
    const depth = m[1]!.length / 4;
    stack.length = depth;
    const path = (stack[depth - 1] ?? '') + m[2]!;
    stack[depth] = path;
    for (const method of (m[3] ?? '').split(', ').filter((x) => x && x !== 'HEAD')) out.push(`${method} ${path}`);
  }
  return out.sort();
}

/** "METHOD /path" for every operation of the document, `{param}` written as fastify's `:param`. */
function documented(d: Json): string[] {
  const out: string[] = [];
  for (const [path, item] of Object.entries(d.paths as Json)) {
    for (const method of METHODS) if ((item as Json)[method]) out.push(`${method.toUpperCase()} ${path.replace(/\{([^}]+)\}/g, ':$1')}`);
  }
  return out.sort();
}

/** the paths the source registers: `app.<method>(` followed by a path literal, in every control-plane/http/*.ts */
function registeredInSource(): string[] {
  const dir = join(REPO_ROOT, 'control-plane', 'http');
  const out: string[] = [];
  for (const file of readdirSync(dir).filter((f) => f.endsWith('.ts'))) {
    const text = readFileSync(join(dir, file), 'utf8');
    for (const m of text.matchAll(/app\.(get|post|put|patch|delete)(?:<[^(]*?>)?\(\s*'([^']+)'/g)) out.push(`${m[1]!.toUpperCase()} ${m[2]}`);
  }
  return out.sort();
}

function operation(key: string): Json {
  const [method, path] = key.split(' ') as [string, string];
  return doc.paths[path.replace(/:([A-Za-z]+)/g, '{$1}')][method.toLowerCase()];
}

function deref(schema: Json | undefined): Json | undefined {
  if (schema && typeof schema.$ref === 'string') {
    const name = schema.$ref.replace('#/components/schemas/', '');
    return doc.components?.schemas?.[name];
  }
  return schema;
}

function isErrorSchema(schema: Json | undefined): boolean {
  const s = deref(schema);
  const error = deref(s?.properties?.error);
  return (
    s?.type === 'object' &&
    Array.isArray(s.required) &&
    s.required.includes('error') &&
    error?.type === 'object' &&
    ['code', 'message'].every((k) => error.required?.includes(k) && deref(error.properties?.[k])?.type === 'string')
  );
}

describe('the document', () => {
  test('is OpenAPI 3.1 and describes the control plane', () => {
    assert.equal(typeof doc.openapi, 'string');
    assert.ok(doc.openapi.startsWith('3.1'), doc.openapi);
    assert.equal(doc.info.title, 'stagedoor control plane');
    assert.equal(doc.components.securitySchemes.bearer.scheme, 'bearer');
  });

  test('fastify’s route list is read honestly: it has every route the source registers', () => {
    const source = registeredInSource();
    assert.ok(source.length >= 15, `found ${source.length} registrations in control-plane/http/*.ts`);
    assert.deepEqual(served, source);
  });

  test('every route fastify serves appears in the document with its method (the document itself aside), and nothing else does', () => {
    assert.deepEqual(documented(doc), served.filter((r) => r !== SELF));
  });
});

describe('error answers are documented with the {error: {code, message}} schema', () => {
  test('every route that needs the bearer token documents 401', async () => {
    const missing: string[] = [];
    let guarded = 0;
    for (const key of served.filter((r) => r !== SELF)) {
      const [method, path] = key.split(' ') as [string, string];
      const probe = await fetch(`${cp.url}${path.replace(/:([A-Za-z]+)/g, 'x')}`, { method, headers: method === 'GET' ? {} : { 'content-type': 'application/json' }, body: method === 'GET' ? undefined : '{}' });
      await probe.body?.cancel();
      if (probe.status !== 401) continue; // public
      guarded++;
      if (!isErrorSchema(operation(key).responses?.['401']?.content?.['application/json']?.schema)) missing.push(key);
    }
    assert.ok(guarded >= 15, `only ${guarded} routes answered 401 without a token`);
    assert.deepEqual(missing, [], `routes that answer 401 but do not document it: ${missing.join(', ')}`);
  });

  // one test per route, so the report names each one that falls short
  const KNOWN_ROUTES = [
    'GET /healthz', 'GET /readyz', 'GET /metrics', 'GET /.well-known/jwks.json',
    'POST /v1/orchestras/validate', 'POST /v1/orchestras', 'GET /v1/orchestras', 'GET /v1/orchestras/:ref', 'PATCH /v1/orchestras/:ref', 'DELETE /v1/orchestras/:ref',
    'POST /v1/orchestras/:ref/tokens', 'GET /v1/orchestras/:ref/tokens', 'DELETE /v1/tokens/:jti',
    'GET /v1/internal/routes/:subdomain', 'GET /v1/internal/events', 'POST /v1/internal/connection-events',
    'GET /v1/audit-log', 'GET /v1/audits/isolation', 'POST /v1/audits/isolation/fix', 'POST /v1/orchestras/import',
  ];
  test('the per-route checks below cover exactly the routes fastify serves', () => {
    assert.deepEqual([...KNOWN_ROUTES].sort(), served.filter((r) => r !== SELF));
  });
  for (const key of KNOWN_ROUTES.filter((k) => PUBLIC_OPS.has(k))) {
    test(`${key} is documented as public (no bearer token) with its 200 answer, and really answers without a token`, async () => {
      const op = operation(key) as Json;
      assert.deepEqual(op.security, [], `${key} must declare security: []`);
      assert.ok(op.responses?.['200'], `${key} documents its 200 answer`);
      const [, path] = key.split(' ') as [string, string];
      const res = await fetch(`${cp.url}${path}`);
      await res.body?.cancel();
      assert.ok(res.status === 200 || (key === 'GET /readyz' && res.status === 503), `${key} answered ${res.status} without a token`);
    });
  }
  for (const key of KNOWN_ROUTES.filter((k) => !PUBLIC_OPS.has(k))) {
    test(`${key} documents at least one 4xx answer, each with the error schema`, () => {
      const responses = (operation(key)?.responses ?? {}) as Json;
      const fourxx = Object.keys(responses).filter((s) => /^4\d\d$/.test(s));
      assert.ok(fourxx.length > 0, `${key} documents no 4xx answer (documented: ${Object.keys(responses).join(', ') || 'none'})`);
      for (const status of fourxx) {
        assert.ok(isErrorSchema(responses[status]?.content?.['application/json']?.schema), `${key} ${status} is not documented with {error: {code, message}}`);
      }
    });
  }
});

describe('request validation uses the documented schemas: strict, never coercing', () => {
  const call = async (method: string, path: string, body: unknown): Promise<{ status: number; body: Json }> => {
    const res = await fetch(`${cp.url}${path}`, { method, headers: { authorization: `Bearer ${ADMIN_TOKEN}`, 'content-type': 'application/json' }, body: JSON.stringify(body) });
    return { status: res.status, body: (await res.json()) as Json };
  };

  test('POST /v1/orchestras documents a closed request body, and an unknown property is answered 400 invalid_request', async () => {
    const schema = deref(operation('POST /v1/orchestras').requestBody.content['application/json'].schema)!;
    assert.equal(schema.additionalProperties, false);
    assert.deepEqual(Object.keys(schema.properties).sort(), ['databaseUrl', 'name', 'subdomain']);
    assert.deepEqual([...schema.required].sort(), ['name', 'subdomain']);
    const r = await call('POST', '/v1/orchestras', { subdomain: 'strict', name: 'Strict', colour: 'red' });
    assert.equal(r.status, 400);
    assert.equal(r.body.error.code, 'invalid_request');
    assert.equal(typeof r.body.error.message, 'string');
    // nothing was created: the handler never ran
    const list = await fetch(`${cp.url}/v1/orchestras`, { headers: { authorization: `Bearer ${ADMIN_TOKEN}` } });
    assert.deepEqual(await list.json(), { orchestras: [] });
  });

  test('a missing required property is answered 400 invalid_request', async () => {
    const r = await call('POST', '/v1/orchestras', { subdomain: 'strict' });
    assert.equal(r.status, 400);
    assert.equal(r.body.error.code, 'invalid_request');
  });

  test('"maxConnections": "5" (a string) is answered 400, not coerced; the integer 5 passes validation', async () => {
    const schema = deref(operation('PATCH /v1/orchestras/:ref').requestBody.content['application/json'].schema)!;
    assert.deepEqual(schema.properties.maxConnections.type, ['integer', 'null']);
    const asString = await call('PATCH', '/v1/orchestras/nosuch', { maxConnections: '5' });
    assert.equal(asString.status, 400, JSON.stringify(asString.body));
    assert.equal(asString.body.error.code, 'invalid_request');
    // the same request with an integer gets past validation to the handler: no such orchestra
    const asInteger = await call('PATCH', '/v1/orchestras/nosuch', { maxConnections: 5 });
    assert.equal(asInteger.status, 404, JSON.stringify(asInteger.body));
    assert.equal(asInteger.body.error.code, 'not_found');
  });

  test('a token ttl of the wrong type is answered 400, as documented (string or integer)', async () => {
    const schema = deref(operation('POST /v1/orchestras/:ref/tokens').requestBody.content['application/json'].schema)!;
    assert.deepEqual(schema.properties.ttl.type, ['string', 'integer']);
    const r = await call('POST', '/v1/orchestras/nosuch/tokens', { ttl: true });
    assert.equal(r.status, 400);
    assert.equal(r.body.error.code, 'invalid_request');
  });
});
