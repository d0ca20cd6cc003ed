// Names and shapes on the shared Redis (REDIS_URL), in one place for both
// roles. Redis is optional: without it a single proxy works on its own and
// proxies still learn of changes over the control plane's event stream.

import { Redis, type RedisOptions } from 'ioredis';

/** Invalidations published by the control plane (BusEvent JSON). */
export const EVENTS_CHANNEL = 'stagedoor:events';
/** Cancel requests forwarded between proxy instances ({processId, secretKey}). */
export const CANCEL_CHANNEL = 'stagedoor:cancel';
/** Sorted set of connection leases per orchestra (member = instance:session, score = lease expiry ms). */
export const leaseKey = (orchestraId: string): string => `stagedoor:conns:${orchestraId}`;

/**
 * A Redis connection that fails fast instead of queueing: with the default
 * offline queue a command waits ~73 s while Redis is down (LIBRARIES.md), and
 * a connect must never wait on Redis.
 */
export function connectRedis(url: string, extra: RedisOptions = {}): Redis {
  return new Redis(url, {
    enableOfflineQueue: false,
    commandTimeout: 500,
    maxRetriesPerRequest: 1,
    retryStrategy: (times) => Math.min(times * 200, 2_000),
    lazyConnect: false,
    ...extra,
  });
}
