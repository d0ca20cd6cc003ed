// GET /v1/audit-log: connection accepts and refusals, provisioning, token and
// fix events, newest first, paged by id.

import type { FastifyInstance } from 'fastify';
import type { AuditLog } from '../audit-log.js';
import { UUID_PATTERN, type CentralStore } from '../central-store.js';
import { ApiError, errors } from './errors.js';

export interface AuditRouteDeps {
  audit: AuditLog;
  store: CentralStore;
}

export function registerAuditRoutes(app: FastifyInstance, d: AuditRouteDeps): void {
  app.get<{ Querystring: { orchestra?: string; kind?: string; since?: string; limit?: string; before?: string } }>(
    '/v1/audit-log',
    {
      schema: {
        tags: ['audit'],
        description: 'Audit records, newest first. `orchestra` takes an id or a subdomain; `kind` an exact kind or a prefix (`connection`); page with `before=<id of the last record>`.',
        querystring: {
          type: 'object',
          additionalProperties: false,
          properties: {
            orchestra: { type: 'string', maxLength: 63 },
            kind: { type: 'string', maxLength: 100 },
            since: { type: 'string', description: 'ISO 8601 time' },
            limit: { type: 'string', pattern: '^[0-9]{1,4}$' },
            before: { type: 'string', pattern: '^[0-9]{1,18}$' },
          },
        },
        response: {
          200: {
            type: 'object',
            properties: {
              entries: { type: 'array', items: { type: 'object', additionalProperties: true } },
              nextBefore: { type: ['integer', 'null'] },
            },
          },
          ...errors(400, 401),
        },
      },
    },
    async (req) => {
      const q = req.query;
      const since = q.since ? new Date(q.since) : undefined;
      if (since && Number.isNaN(since.getTime())) throw new ApiError(400, 'invalid_since', 'since must be an ISO 8601 time');
      const limit = Math.min(Math.max(Number(q.limit ?? 100), 1), 1000);
      await d.audit.flush();
      let orchestraId: string | undefined;
      let subdomain: string | undefined;
      if (q.orchestra) {
        if (UUID_PATTERN.test(q.orchestra)) orchestraId = q.orchestra;
        else subdomain = q.orchestra;
      }
      const entries = await d.audit.query({ orchestraId, subdomain, kind: q.kind, since, before: q.before ? Number(q.before) : undefined, limit });
      return { entries, nextBefore: entries.length === limit ? entries[entries.length - 1]!.id : null };
    },
  );
}
