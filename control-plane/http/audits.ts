// /v1/audits/isolation (+ /fix) and /v1/orchestras/import.

import type { FastifyInstance } from 'fastify';
import type { AuditLog } from '../audit-log.js';
import type { CentralStore } from '../central-store.js';
import type { EventSink } from '../event-bus.js';
import { fixSharedUpstreams } from '../isolation-fix.js';
import type { IsolationMonitor } from '../isolation-monitor.js';
import { ImportSourceError, importLegacy } from '../legacy-import.js';
import { ApiError, errors } from './errors.js';

export interface AuditsRouteDeps {
  store: CentralStore;
  audit: AuditLog;
  bus: EventSink;
  monitor: IsolationMonitor;
}

const violation = { type: 'object', properties: { kind: { type: 'string' }, orchestras: { type: 'array', items: { type: 'string' } }, detail: { type: 'string' } } } as const;

export function registerAuditsRoutes(app: FastifyInstance, d: AuditsRouteDeps): void {
  app.get(
    '/v1/audits/isolation',
    {
      schema: {
        tags: ['audit'],
        description:
          'Run the isolation audit now. Violation kinds: shared_upstream, shared_fingerprint, missing_database, central_schema_leak, orchestra_schema_leak, cross_access, marker_mismatch, unreachable.',
        response: {
          200: { type: 'object', properties: { ok: { type: 'boolean' }, checkedAt: { type: 'string' }, orchestrasChecked: { type: 'integer' }, violations: { type: 'array', items: violation } } },
          ...errors(401, 503),
        },
      },
    },
    async () => d.monitor.run(),
  );

  app.post<{ Body: { dryRun?: boolean } }>(
    '/v1/audits/isolation/fix',
    {
      schema: {
        tags: ['audit'],
        description: 'For each database shared by several orchestras keep the oldest assignment, clear the newer ones and set them pending. `dryRun` (default true) only answers the plan.',
        body: { type: 'object', additionalProperties: false, properties: { dryRun: { type: 'boolean', default: true } } },
        response: {
          200: {
            type: 'object',
            properties: {
              dryRun: { type: 'boolean' },
              changes: { type: 'array', items: { type: 'object', properties: { action: { type: 'string' }, orchestraId: { type: 'string' }, subdomain: { type: 'string' }, keptOrchestra: { type: 'string' }, detail: { type: 'string' } } } },
            },
          },
          ...errors(400, 401),
        },
      },
    },
    async (req) => {
      // Fresh fingerprints first, so the plan sees every physical sharing.
      await d.monitor.run();
      return fixSharedUpstreams(d.store, d.audit, d.bus, req.body?.dryRun ?? true);
    },
  );

  app.post<{ Body: { sourceUrl: string } }>(
    '/v1/orchestras/import',
    {
      schema: {
        tags: ['orchestras'],
        description: 'Adopt a legacy central database: reads its "Orchestra" table and creates the same orchestras with the same upstreams, duplicates included and reported. Idempotent.',
        body: { type: 'object', required: ['sourceUrl'], additionalProperties: false, properties: { sourceUrl: { type: 'string', maxLength: 2000 } } },
        response: {
          200: {
            type: 'object',
            properties: {
              imported: { type: 'integer' },
              unchanged: { type: 'integer' },
              skipped: { type: 'integer' },
              orchestras: {
                type: 'array',
                items: {
                  type: 'object',
                  properties: { legacyId: { type: 'string' }, subdomain: { type: 'string' }, result: { type: 'string' }, status: { type: ['string', 'null'] }, violation: { type: ['string', 'null'] }, detail: { type: ['string', 'null'] } },
                },
              },
            },
          },
          ...errors(400, 401, 422),
        },
      },
    },
    async (req) => {
      try {
        return await importLegacy(req.body.sourceUrl, d.store, d.audit, d.bus);
      } catch (e) {
        if (e instanceof ImportSourceError) throw new ApiError(422, 'import_source', e.message);
        throw e;
      }
    },
  );
}
