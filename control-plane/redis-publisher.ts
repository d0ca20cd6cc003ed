// With REDIS_URL the control plane also publishes every invalidation on Redis,
// for proxies that follow the shared bus. A publish that fails is logged and
// dropped: the event stream (GET /v1/internal/events) carries the same event.

import type { Redis } from 'ioredis';
import type { BusEvent } from '../common/internal-api.js';
import type { Logger } from '../common/log.js';
import { EVENTS_CHANNEL } from '../common/redis-bus.js';
import type { EventSink } from './event-bus.js';

export class RedisPublisher implements EventSink {
  constructor(
    private readonly redis: Redis,
    private readonly log: Logger,
  ) {}

  publish(e: BusEvent): void {
    this.redis.publish(EVENTS_CHANNEL, JSON.stringify(e)).catch((err: unknown) => this.log.warn('redis publish failed', { error: err, event: e.type }));
  }
}
