// /v1/orchestras…, /v1/tokens…: provisioning, life cycle and tokens.

import type { FastifyInstance, FastifyReply } from 'fastify';
import type { Logger } from '../../common/log.js';
import type { AuditLog } from '../audit-log.js';
import { toView, type CentralStore, type OrchestraRow } from '../central-store.js';
import type { EventSink } from '../event-bus.js';
import type { Lifecycle, PatchRequest } from '../lifecycle.js';
import { ProvisioningError, type Provisioner, type StepReport } from '../provisioning.js';
import type { TokenSigner } from '../signing-keys.js';
import { ApiError, errorSchema, errors } from './errors.js';
import { orchestraSchema, refParams, stepSchema } from './schemas.js';

export interface OrchestraRouteDeps {
  store: CentralStore;
  audit: AuditLog;
  bus: EventSink;
  provisioner: Provisioner;
  lifecycle: Lifecycle;
  signer: TokenSigner;
  /** host:port written into connection strings */
  publicProxyAddress: string;
  log: Logger;
}

const NDJSON = 'application/x-ndjson';

/** One line of the NDJSON provisioning stream. */
const provisioningLineSchema = {
  oneOf: [
    { type: 'object', required: ['step'], additionalProperties: false, properties: { step: stepSchema } },
    {
      type: 'object',
      required: ['status', 'orchestra'],
      additionalProperties: false,
      properties: { status: { type: 'integer', const: 201 }, orchestra: { type: 'object', properties: { ...orchestraSchema.properties, steps: { type: 'array', items: stepSchema } } } },
    },
    { type: 'object', required: ['status', 'error'], additionalProperties: false, properties: { status: { type: 'integer' }, error: errorSchema.properties.error } },
  ],
} as const;

/** True when the Accept header asks for application/x-ndjson (with a q above 0). */
export function wantsNdjson(accept: string | undefined): boolean {
  if (!accept) return false;
  return accept.split(',').some((part) => {
    const [type, ...params] = part.split(';').map((x) => x.trim().toLowerCase());
    if (type !== NDJSON) return false;
    const q = params.find((p) => p.startsWith('q='));
    return q === undefined || Number(q.slice(2)) > 0;
  });
}

/** A provisioning failure as the API answers it (other errors pass through unchanged). */
function provisioningApiError(e: unknown): unknown {
  if (e instanceof ProvisioningError) {
    const undone = e.leftovers.length === 0
      ? 'everything done before it was rolled back'
      : `the rollback could not finish (${e.leftovers.join('; ')}); the rest is removed at the next start of the control plane`;
    return new ApiError(e.status, `provisioning_failed_at_${e.step}`, `step "${e.step}" failed: ${e.message}; ${undone}`);
  }
  return e;
}

const DEFAULT_TTL_SECONDS = 30 * 86_400;
const MAX_TTL_SECONDS = 366 * 86_400;

/** "3600", "90m", "12h", "30d" → seconds. */
export function parseTtl(raw: string | number | undefined): number {
  if (raw === undefined) return DEFAULT_TTL_SECONDS;
  const m = /^(\d+)\s*([smhd]?)$/.exec(String(raw).trim());
  if (!m) throw new ApiError(400, 'invalid_ttl', 'ttl must be seconds or a number with s, m, h or d (e.g. 30d)');
  const n = Number(m[1]) * ({ '': 1, s: 1, m: 60, h: 3_600, d: 86_400 } as const)[m[2] as '' | 's' | 'm' | 'h' | 'd'];
  if (n < 60 || n > MAX_TTL_SECONDS) throw new ApiError(400, 'invalid_ttl', 'ttl must be between 60 seconds and 366 days');
  return n;
}

export function registerOrchestraRoutes(app: FastifyInstance, d: OrchestraRouteDeps): void {
  const load = async (ref: string): Promise<OrchestraRow> => {
    const row = await d.store.find(ref);
    if (!row) throw new ApiError(404, 'not_found', `no orchestra "${ref}"`);
    return row;
  };

  app.post<{ Body: { subdomain: string } }>(
    '/v1/orchestras/validate',
    {
      schema: {
        tags: ['orchestras'],
        description: 'Pre-flight: subdomain free, tenant server reachable and has room, existing sharing found. Changes nothing.',
        body: { type: 'object', required: ['subdomain'], additionalProperties: false, properties: { subdomain: { type: 'string', maxLength: 200 } } },
        response: {
          200: {
            type: 'object',
            properties: {
              ok: { type: 'boolean' },
              checks: { type: 'array', items: { type: 'object', properties: { name: { type: 'string' }, ok: { type: 'boolean' }, detail: { type: 'string' } } } },
            },
          },
          ...errors(400, 401),
        },
      },
    },
    async (req) => d.provisioner.validate(req.body.subdomain),
  );

  app.post<{ Body: { subdomain: string; name: string; databaseUrl?: string } }>(
    '/v1/orchestras',
    {
      schema: {
        tags: ['orchestras'],
        description:
          'Provision an orchestra: a database and login role of its own on the tenant server (or attach `databaseUrl`), schemas/orchestra applied, health check, then active. Any failure rolls everything back; the answer names the failed step.\n\n' +
          'With `Accept: application/x-ndjson` the answer is `200` and a stream of JSON lines written as provisioning goes: one `{"step": {step, ok, ms, detail?}}` per step as it completes, then one final line, ' +
          '`{"status": 201, "orchestra": <the JSON answer>}` or `{"status": <4xx|5xx>, "error": {code, message}}` (the status the JSON answer would have had). A request the schema refuses is still answered 400 in JSON.',
        body: {
          type: 'object',
          required: ['subdomain', 'name'],
          additionalProperties: false,
          properties: { subdomain: { type: 'string', maxLength: 63 }, name: { type: 'string', minLength: 1, maxLength: 200 }, databaseUrl: { type: 'string', maxLength: 2000 } },
        },
        response: {
          200: {
            description: 'With `Accept: application/x-ndjson`: the provisioning steps as they complete, then the outcome (one JSON object per line).',
            content: { [NDJSON]: { schema: provisioningLineSchema } },
          },
          201: { type: 'object', properties: { ...orchestraSchema.properties, steps: { type: 'array', items: stepSchema } } },
          ...errors(400, 401, 409, 422, 503),
        },
      },
    },
    async (req, reply) => {
      if (wantsNdjson(req.headers.accept)) return streamProvisioning(req.body, reply);
      const steps: StepReport[] = [];
      try {
        const row = await d.provisioner.provision(req.body, (s) => steps.push(s));
        return reply.status(201).send({ ...toView(row), steps });
      } catch (e) {
        throw provisioningApiError(e);
      }
    },
  );

  /** The NDJSON variant of POST /v1/orchestras: each step is written the moment it completes. */
  const streamProvisioning = async (body: { subdomain: string; name: string; databaseUrl?: string }, reply: FastifyReply): Promise<void> => {
    reply.hijack();
    const res = reply.raw;
    res.writeHead(200, { 'content-type': `${NDJSON}; charset=utf-8`, 'cache-control': 'no-store', 'x-content-type-options': 'nosniff' });
    const line = (o: unknown): void => {
      if (!res.destroyed) res.write(JSON.stringify(o) + '\n');
    };
    const steps: StepReport[] = [];
    try {
      const row = await d.provisioner.provision(body, (s) => {
        steps.push(s);
        line({ step: s });
      });
      line({ status: 201, orchestra: { ...toView(row), steps } });
    } catch (e) {
      const err = provisioningApiError(e);
      if (err instanceof ApiError) line({ status: err.status, error: { code: err.code, message: err.message } });
      else {
        d.log.error('request failed', { method: 'POST', url: '/v1/orchestras', error: err });
        const unavailable = /ECONNREFUSED|terminat|timeout|connect/i.test((err as Error).message ?? '');
        line({
          status: unavailable ? 503 : 500,
          error: { code: unavailable ? 'unavailable' : 'internal', message: unavailable ? 'a database the control plane needs is unavailable' : 'internal error' },
        });
      }
    }
    res.end();
  };

  app.get(
    '/v1/orchestras',
    { schema: { tags: ['orchestras'], response: { 200: { type: 'object', properties: { orchestras: { type: 'array', items: orchestraSchema } } }, ...errors(401) } } },
    async () => ({ orchestras: (await d.store.list()).map(toView) }),
  );

  app.get<{ Params: { ref: string } }>(
    '/v1/orchestras/:ref',
    { schema: { tags: ['orchestras'], params: refParams, response: { 200: orchestraSchema, ...errors(401, 404) } } },
    async (req) => toView(await load(req.params.ref)),
  );

  app.patch<{ Params: { ref: string }; Body: PatchRequest }>(
    '/v1/orchestras/:ref',
    {
      schema: {
        tags: ['orchestras'],
        description: 'Suspend or resume, set the connection cap, or move the orchestra to another database (same identity checks as provisioning). Live sessions of a suspended orchestra end with 57P01.',
        params: refParams,
        body: {
          type: 'object',
          additionalProperties: false,
          minProperties: 1,
          properties: {
            status: { type: 'string', enum: ['active', 'suspended'] },
            maxConnections: { type: ['integer', 'null'], minimum: 1, maximum: 100_000 },
            name: { type: 'string', minLength: 1, maxLength: 200 },
            databaseUrl: { type: 'string', maxLength: 2000 },
          },
        },
        response: { 200: orchestraSchema, ...errors(400, 401, 404, 409, 422) },
      },
    },
    async (req) => toView(await d.lifecycle.patch(await load(req.params.ref), req.body)),
  );

  app.delete<{ Params: { ref: string }; Querystring: { dropDatabase?: string } }>(
    '/v1/orchestras/:ref',
    {
      schema: {
        tags: ['orchestras'],
        description: 'Delete an orchestra: new sessions are refused with 28000 and live ones end. `?dropDatabase=true` also drops its database and role (only those stagedoor created).',
        params: refParams,
        querystring: { type: 'object', additionalProperties: false, properties: { dropDatabase: { type: 'string', enum: ['true', 'false'] } } },
        response: { 200: orchestraSchema, ...errors(400, 401, 404, 422) },
      },
    },
    async (req) => toView(await d.lifecycle.remove(await load(req.params.ref), req.query.dropDatabase === 'true')),
  );

  const tokenView = { type: 'object', properties: { jti: { type: 'string' }, name: { type: 'string' }, createdAt: { type: 'string' }, expiresAt: { type: 'string' }, revokedAt: { type: ['string', 'null'] } } } as const;

  app.post<{ Params: { ref: string }; Body: { name?: string; ttl?: string | number } }>(
    '/v1/orchestras/:ref/tokens',
    {
      schema: {
        tags: ['tokens'],
        description: 'Issue a tenant token. The token is shown once: use it as the password of the connection string.',
        params: refParams,
        body: {
          type: 'object',
          additionalProperties: false,
          properties: { name: { type: 'string', minLength: 1, maxLength: 200 }, ttl: { type: ['string', 'integer'], description: 'seconds, or e.g. 90m, 12h, 30d (default 30d)' } },
        },
        response: {
          201: { type: 'object', properties: { token: { type: 'string' }, jti: { type: 'string' }, expiresAt: { type: 'string' }, connectionString: { type: 'string' } } },
          ...errors(400, 401, 404, 422),
        },
      },
    },
    async (req, reply) => {
      const row = await load(req.params.ref);
      if (row.status === 'deleted') throw new ApiError(404, 'not_found', `no orchestra "${req.params.ref}"`);
      const body = req.body ?? {};
      const ttl = parseTtl(body.ttl);
      const issued = await d.signer.issue(row.id, row.subdomain, ttl);
      await d.store.insertToken({ jti: issued.jti, orchestraId: row.id, name: body.name ?? 'default', expiresAt: issued.expiresAt });
      d.audit.record({ kind: 'token.issued', orchestraId: row.id, subdomain: row.subdomain, jti: issued.jti, detail: { name: body.name ?? 'default', expiresAt: issued.expiresAt.toISOString() } });
      return reply.status(201).send({
        token: issued.token,
        jti: issued.jti,
        expiresAt: issued.expiresAt.toISOString(),
        connectionString: `postgres://${row.subdomain}:${issued.token}@${d.publicProxyAddress}/${row.subdomain}?sslmode=require`,
      });
    },
  );

  app.get<{ Params: { ref: string } }>(
    '/v1/orchestras/:ref/tokens',
    { schema: { tags: ['tokens'], description: 'Tokens of an orchestra (never the secret).', params: refParams, response: { 200: { type: 'object', properties: { tokens: { type: 'array', items: tokenView } } }, ...errors(401, 404) } } },
    async (req) => ({ tokens: await d.store.listTokens((await load(req.params.ref)).id) }),
  );

  app.delete<{ Params: { jti: string } }>(
    '/v1/tokens/:jti',
    {
      schema: {
        tags: ['tokens'],
        description: 'Revoke a token: it no longer connects, and its live sessions end with 57P01.',
        params: { type: 'object', required: ['jti'], properties: { jti: { type: 'string' } } },
        response: { 200: { type: 'object', properties: { jti: { type: 'string' }, revoked: { type: 'boolean' }, alreadyRevoked: { type: 'boolean' } } }, ...errors(401, 404) },
      },
    },
    async (req) => {
      const r = await d.store.revokeToken(req.params.jti);
      if (!r) throw new ApiError(404, 'not_found', 'no such token');
      d.bus.publish({ type: 'token-revoked', orchestraId: r.orchestraId, jti: req.params.jti });
      d.audit.record({ kind: 'token.revoked', orchestraId: r.orchestraId, jti: req.params.jti });
      return { jti: req.params.jti, revoked: true, alreadyRevoked: r.alreadyRevoked };
    },
  );
}
