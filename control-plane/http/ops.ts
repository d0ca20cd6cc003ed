// Health, readiness, metrics and the public keys proxies verify tokens with.

import type { FastifyInstance } from 'fastify';
import type { Registry } from 'prom-client';
import type { JWK } from 'jose';

export interface OpsRouteDeps {
  jwks: () => { keys: JWK[] };
  ready: () => Promise<boolean>;
  registry: Registry;
}

export function registerOpsRoutes(app: FastifyInstance, d: OpsRouteDeps): void {
  app.get('/healthz', { schema: { tags: ['ops'], security: [], response: { 200: { type: 'object', properties: { ok: { type: 'boolean' } } } } } }, async () => ({ ok: true }));
  app.get(
    '/readyz',
    { schema: { tags: ['ops'], security: [], response: { 200: { type: 'object', properties: { ready: { type: 'boolean' } } }, 503: { type: 'object', properties: { ready: { type: 'boolean' } } } } } },
    async (_req, reply) => {
      const ok = await d.ready();
      return reply.status(ok ? 200 : 503).send({ ready: ok });
    },
  );
  app.get('/metrics', { schema: { tags: ['ops'], security: [], description: 'Prometheus text exposition', response: { 200: { type: 'string' } } } }, async (_req, reply) => {
    reply.header('content-type', d.registry.contentType);
    return d.registry.metrics();
  });
  app.get(
    '/.well-known/jwks.json',
    {
      schema: {
        tags: ['ops'],
        security: [],
        description: 'Public keys (Ed25519) that verify tenant tokens',
        response: { 200: { type: 'object', properties: { keys: { type: 'array', items: { type: 'object', additionalProperties: true } } } } },
      },
    },
    async (_req, reply) => {
      reply.header('cache-control', 'public, max-age=300');
      return d.jwks();
    },
  );
}
