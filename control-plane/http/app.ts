// The control-plane HTTP API (fastify). Route schemas validate requests, shape
// responses and generate /openapi.json. Validation is strict: unknown fields
// and wrongly typed values are answered 400, never silently dropped or coerced.

import { timingSafeEqual } from 'node:crypto';
import Fastify, { type FastifyInstance, type FastifyRequest } from 'fastify';
import swagger from '@fastify/swagger';
import type { Logger } from '../../common/log.js';
import { ApiError } from './errors.js';
import { registerOrchestraRoutes, type OrchestraRouteDeps } from './orchestras.js';
import { registerInternalRoutes, type InternalRouteDeps } from './internal.js';
import { registerOpsRoutes, type OpsRouteDeps } from './ops.js';
import { registerAuditRoutes, type AuditRouteDeps } from './audit.js';
import { registerAuditsRoutes, type AuditsRouteDeps } from './audits.js';

export type ApiDeps = OrchestraRouteDeps & InternalRouteDeps & OpsRouteDeps & AuditRouteDeps & AuditsRouteDeps & {
  adminToken: string;
  proxyToken: string;
  log: Logger;
};

const PUBLIC_PATHS = new Set(['/healthz', '/readyz', '/metrics', '/.well-known/jwks.json', '/openapi.json']);

export async function buildApi(deps: ApiDeps): Promise<FastifyInstance> {
  const app = Fastify({
    logger: false,
    bodyLimit: 1_048_576,
    ajv: { customOptions: { removeAdditional: false, coerceTypes: false, useDefaults: true, allErrors: false, allowUnionTypes: true } },
  });
  await app.register(swagger, {
    openapi: {
      openapi: '3.1.0',
      info: { title: 'stagedoor control plane', version: '0.1.0', description: 'Provision orchestra databases, issue and revoke tenant tokens, audit isolation.' },
      components: { securitySchemes: { bearer: { type: 'http', scheme: 'bearer' } } },
      security: [{ bearer: [] }],
    },
  });

  app.addHook('onRequest', async (req) => {
    const path = req.url.split('?')[0]!;
    if (PUBLIC_PATHS.has(path)) return;
    const presented = bearer(req);
    const internal = path.startsWith('/v1/internal/');
    const ok = presented !== null && (equal(presented, deps.adminToken) || (internal && equal(presented, deps.proxyToken)));
    if (!ok) throw new ApiError(401, 'unauthorized', 'missing or wrong bearer token');
  });

  app.setErrorHandler((err, req, reply) => {
    if (err instanceof ApiError) {
      return reply.status(err.status).send({ error: { code: err.code, message: err.message } });
    }
    const e = err as { validation?: unknown; statusCode?: number; message: string; code?: string };
    if (e.validation) return reply.status(400).send({ error: { code: 'invalid_request', message: e.message } });
    if (e.statusCode && e.statusCode >= 400 && e.statusCode < 500) {
      return reply.status(e.statusCode).send({ error: { code: e.code ?? 'bad_request', message: e.message } });
    }
    deps.log.error('request failed', { method: req.method, url: req.url.split('?')[0], error: err });
    const unavailable = /ECONNREFUSED|terminat|timeout|connect/i.test(e.message);
    return reply
      .status(unavailable ? 503 : 500)
      .send({ error: { code: unavailable ? 'unavailable' : 'internal', message: unavailable ? 'a database the control plane needs is unavailable' : 'internal error' } });
  });
  app.setNotFoundHandler((req, reply) => reply.status(404).send({ error: { code: 'not_found', message: `no route ${req.method} ${req.url.split('?')[0]}` } }));

  registerOpsRoutes(app, deps);
  registerOrchestraRoutes(app, deps);
  registerInternalRoutes(app, deps);
  registerAuditRoutes(app, deps);
  registerAuditsRoutes(app, deps);
  app.get('/openapi.json', { schema: { hide: true } }, async () => app.swagger());
  await app.ready();
  return app;
}

function bearer(req: FastifyRequest): string | null {
  const h = req.headers.authorization;
  if (!h || !h.startsWith('Bearer ')) return null;
  return h.slice(7).trim();
}

function equal(a: string, b: string): boolean {
  const x = Buffer.from(a);
  const y = Buffer.from(b);
  return x.length === y.length && timingSafeEqual(x, y);
}
