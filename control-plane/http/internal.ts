// What proxies ask (PROXY_TOKEN): routes, the event stream, and connection
// audit records. Routes carry the upstream password in clear: this API must
// only be reachable by proxies (loopback or a private network, TLS in front).

import type { FastifyInstance } from 'fastify';
import type { AuditLog } from '../audit-log.js';
import type { CentralStore } from '../central-store.js';
import type { EventBus } from '../event-bus.js';
import { ApiError, errors } from './errors.js';

export interface InternalRouteDeps {
  store: CentralStore;
  audit: AuditLog;
  events: EventBus;
}

const KINDS = ['connection.accepted', 'connection.refused', 'connection.closed'] as const;

export function registerInternalRoutes(app: FastifyInstance, d: InternalRouteDeps): void {
  app.get<{ Params: { subdomain: string } }>(
    '/v1/internal/routes/:subdomain',
    {
      schema: {
        tags: ['internal'],
        description: "For proxies: an orchestra's route, status, isolation verdict and revoked tokens.",
        params: { type: 'object', required: ['subdomain'], properties: { subdomain: { type: 'string', maxLength: 63 } } },
        response: { ...errors(401, 404) },
      },
    },
    async (req) => {
      const route = await d.store.route(req.params.subdomain);
      if (!route) throw new ApiError(404, 'not_found', 'unknown orchestra');
      return route;
    },
  );

  app.get(
    '/v1/internal/events',
    {
      schema: {
        tags: ['internal'],
        description: 'For proxies: server-sent events (text/event-stream), one JSON BusEvent per `data:` line: orchestra-changed, token-revoked, all-changed.',
        response: { 200: { type: 'string', description: 'text/event-stream' }, ...errors(401) },
      },
    },
    (req, reply) => {
    reply.hijack();
    const res = reply.raw;
    res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-store', connection: 'keep-alive' });
    res.write(': connected\n\n');
    const unsubscribe = d.events.subscribe((e) => res.write(`data: ${JSON.stringify(e)}\n\n`));
    // Comments keep idle connections (and the proxies' view of them) alive.
    const ping = setInterval(() => res.write(': ping\n\n'), 15_000);
    req.raw.on('close', () => {
      clearInterval(ping);
      unsubscribe();
    });
    },
  );

  app.post<{ Body: { events: Array<Record<string, unknown>> } }>(
    '/v1/internal/connection-events',
    {
      schema: {
        tags: ['internal'],
        description: 'For proxies: batches of connection accept / refusal / close records for the audit log.',
        body: {
          type: 'object',
          required: ['events'],
          additionalProperties: false,
          properties: {
            events: {
              type: 'array',
              maxItems: 5_000,
              items: {
                type: 'object',
                required: ['kind', 'at'],
                properties: {
                  kind: { type: 'string', enum: [...KINDS] },
                  at: { type: 'string' },
                  orchestraId: { type: ['string', 'null'] },
                  subdomain: { type: ['string', 'null'] },
                  jti: { type: ['string', 'null'] },
                  clientAddress: { type: ['string', 'null'] },
                  sqlstate: { type: ['string', 'null'] },
                  reason: { type: ['string', 'null'] },
                  upstreamAddress: { type: ['string', 'null'] },
                  durationMs: { type: 'number' },
                  bytesFromClient: { type: 'number' },
                  bytesToClient: { type: 'number' },
                },
              },
            },
          },
        },
        response: { 202: { type: 'object', properties: { accepted: { type: 'integer' } } }, ...errors(400, 401) },
      },
    },
    async (req, reply) => {
      for (const e of req.body.events) {
        const { kind, at, orchestraId, subdomain, jti, clientAddress, sqlstate, reason, ...rest } = e as Record<string, string | null | number | undefined>;
        d.audit.record({
          kind: kind as string,
          at: at as string,
          orchestraId: typeof orchestraId === 'string' && /^[0-9a-f-]{36}$/i.test(orchestraId) ? orchestraId : null,
          subdomain: (subdomain as string | null) ?? null,
          jti: (jti as string | null) ?? null,
          clientAddress: (clientAddress as string | null) ?? null,
          sqlstate: (sqlstate as string | null) ?? null,
          reason: (reason as string | null) ?? null,
          detail: Object.keys(rest).length ? rest : null,
        });
      }
      return reply.status(202).send({ accepted: req.body.events.length });
    },
  );
}
