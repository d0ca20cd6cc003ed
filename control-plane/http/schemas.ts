// JSON schemas shared by routes: they validate requests, shape responses and
// generate /openapi.json, so the documentation cannot drift from the code.

export const orchestraSchema = {
  type: 'object',
  required: ['id', 'subdomain', 'name', 'status', 'source', 'upstream', 'maxConnections', 'createdAt', 'updatedAt'],
  properties: {
    id: { type: 'string', format: 'uuid' },
    subdomain: { type: 'string' },
    name: { type: 'string' },
    status: { type: 'string', enum: ['provisioning', 'pending', 'active', 'suspended', 'deleted'] },
    source: { type: 'string', enum: ['provisioned', 'attached', 'pool', 'imported'] },
    upstream: {
      type: ['object', 'null'],
      properties: { host: { type: 'string' }, port: { type: 'integer' }, database: { type: 'string' } },
    },
    canonicalAddress: { type: ['string', 'null'] },
    fingerprint: { type: ['string', 'null'] },
    maxConnections: { type: ['integer', 'null'] },
    createdAt: { type: 'string' },
    updatedAt: { type: 'string' },
  },
} as const;

export const refParams = {
  type: 'object',
  required: ['ref'],
  properties: { ref: { type: 'string', description: 'orchestra id (UUID) or subdomain' } },
} as const;

export const stepSchema = {
  type: 'object',
  properties: { step: { type: 'string' }, ok: { type: 'boolean' }, ms: { type: 'integer' }, detail: { type: 'string' } },
} as const;
