// The proxy's side of the shared Redis: follows invalidations, forwards
// CancelRequests whose key another instance issued, and counts connection
// leases per orchestra across instances.
//
// Failure policy (README "Scaling out"): Redis down never stops a new session
// the control plane can authorise. Invalidations keep arriving over the
// control plane's event stream; caps fall back to this instance's own count;
// a cancel for a key of another instance is lost until Redis is back.

import { randomBytes } from 'node:crypto';
import type { Redis } from 'ioredis';
import type { BusEvent } from '../common/internal-api.js';
import type { Logger } from '../common/log.js';
import { CANCEL_CHANNEL, EVENTS_CHANNEL, connectRedis, leaseKey } from '../common/redis-bus.js';
import type { ConnectionLimiter } from './connection-limits.js';
import { LocalConnectionLimiter } from './connection-limits.js';

const LEASE_TTL_MS = 30_000;
const LEASE_REFRESH_MS = 10_000;

// Drop expired leases, then take one if under the cap: one round trip, atomic.
const ACQUIRE = `
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4])
redis.call('PEXPIRE', KEYS[1], ${LEASE_TTL_MS * 2})
return 1`;

export interface RedisBusHandlers {
  onEvent: (e: BusEvent) => void;
  /** (re)subscribed: events may have been missed while disconnected */
  onReset: (connected: boolean) => void;
  /** a cancel forwarded by another instance; true when this instance owned the key */
  onRemoteCancel: (processId: number, secretKey: number) => void;
}

export class RedisBus {
  readonly instanceId = randomBytes(6).toString('hex');
  private readonly cmd: Redis;
  private readonly sub: Redis;
  private readonly local = new LocalConnectionLimiter();
  private readonly leases = new Map<string, string>(); // member → orchestraId
  private readonly refresher: NodeJS.Timeout;
  private seq = 0;
  connected = false;

  constructor(url: string, private readonly log: Logger, handlers: RedisBusHandlers) {
    this.cmd = connectRedis(url);
    this.sub = connectRedis(url, { enableOfflineQueue: true, commandTimeout: undefined });
    this.cmd.on('error', () => {});
    this.sub.on('error', () => {});
    this.sub.on('ready', () => {
      // ioredis resubscribes by itself; the messages published meanwhile are lost.
      this.connected = true;
      handlers.onReset(true);
      log.info('redis bus connected', { instance: this.instanceId });
    });
    this.sub.on('close', () => {
      if (this.connected) log.warn('redis bus disconnected; falling back to the event stream and local caps');
      this.connected = false;
      handlers.onReset(false);
    });
    void this.sub.subscribe(EVENTS_CHANNEL, CANCEL_CHANNEL).catch(() => {});
    this.sub.on('message', (channel: string, message: string) => {
      try {
        if (channel === EVENTS_CHANNEL) handlers.onEvent(JSON.parse(message) as BusEvent);
        else if (channel === CANCEL_CHANNEL) {
          const m = JSON.parse(message) as { processId: number; secretKey: number; from: string };
          if (m.from !== this.instanceId) handlers.onRemoteCancel(m.processId, m.secretKey);
        }
      } catch (e) {
        log.warn('bad message on redis bus', { channel, error: e });
      }
    });
    this.refresher = setInterval(() => void this.refreshLeases(), LEASE_REFRESH_MS);
    this.refresher.unref();
  }

  /** Asks every other instance to cancel this key; true when published (Postgres never answers cancels, so neither do we). */
  async forwardCancel(processId: number, secretKey: number): Promise<boolean> {
    try {
      await this.cmd.publish(CANCEL_CHANNEL, JSON.stringify({ processId, secretKey, from: this.instanceId }));
      return true;
    } catch {
      return false;
    }
  }

  readonly limiter: ConnectionLimiter = {
    held: (orchestraId: string): number => this.local.held(orchestraId),
    acquire: async (orchestraId: string, max: number | null): Promise<(() => void) | null> => {
      // Every session of this instance is also counted locally, so that when
      // Redis goes away the fallback still knows what this instance holds.
      const releaseLocal = await this.local.acquire(orchestraId, max);
      if (!releaseLocal) return null;
      if (max === null) return releaseLocal;
      const member = `${this.instanceId}:${++this.seq}`;
      const now = Date.now();
      let granted: number;
      try {
        granted = (await this.cmd.eval(ACQUIRE, 1, leaseKey(orchestraId), now, now + LEASE_TTL_MS, max, member)) as number;
      } catch (e) {
        this.log.warn('redis unavailable for the connection cap; counting on this instance only', { error: e });
        return releaseLocal;
      }
      if (granted !== 1) {
        releaseLocal();
        return null;
      }
      this.leases.set(member, orchestraId);
      return () => {
        releaseLocal();
        if (!this.leases.delete(member)) return;
        this.cmd.zrem(leaseKey(orchestraId), member).catch(() => {});
      };
    },
  };

  /** Live sessions renew their leases; an instance that dies stops renewing and its leases expire. */
  private async refreshLeases(): Promise<void> {
    if (this.leases.size === 0) return;
    const expiry = Date.now() + LEASE_TTL_MS;
    const pipeline = this.cmd.pipeline();
    for (const [member, orchestraId] of this.leases) pipeline.zadd(leaseKey(orchestraId), expiry, member);
    await pipeline.exec().catch(() => {});
  }

  async close(): Promise<void> {
    clearInterval(this.refresher);
    const releases = [...this.leases].map(([member, orchestraId]) => this.cmd.zrem(leaseKey(orchestraId), member).catch(() => {}));
    await Promise.all(releases);
    this.sub.disconnect();
    this.cmd.disconnect();
  }
}
