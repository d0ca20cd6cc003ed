// Route cache policy (documented in the README, "Caches and failing closed"):
//  - a route is used for ROUTE_CACHE_TTL seconds without asking again (hit);
//  - an unknown subdomain is remembered for NEGATIVE_TTL (negative hit);
//  - when the control plane cannot be reached, a cached route younger than
//    ROUTE_MAX_STALE is still used (stale); beyond that the proxy fails closed;
//  - an event from the control plane (orchestra changed, token revoked) drops
//    the entry at once, so a new duplicate or a revocation never waits for a TTL.
// Concurrent misses for one subdomain share one request.

import { LRUCache } from 'lru-cache';
import type { RouteAnswer } from '../common/internal-api.js';
import { ControlPlaneUnavailable, type RouteLookup } from './control-plane-client.js';

export type CacheDecision = 'hit' | 'miss' | 'negative_hit' | 'stale' | 'unavailable';

interface Entry {
  lookup: RouteLookup;
  fetchedAt: number;
}

export interface RouteCacheOptions {
  ttlMs: number;
  maxStaleMs: number;
  negativeTtlMs?: number;
  max?: number;
  now?: () => number;
}

export class RouteCache {
  private readonly entries: LRUCache<string, Entry>;
  private readonly inflight = new Map<string, { generation: number; promise: Promise<Entry> }>();
  private readonly now: () => number;
  private generation = 0;

  constructor(
    private readonly fetchRoute: (subdomain: string) => Promise<RouteLookup>,
    private readonly opts: RouteCacheOptions,
    private readonly onDecision: (d: CacheDecision) => void = () => {},
  ) {
    this.entries = new LRUCache<string, Entry>({ max: opts.max ?? 10_000 });
    this.now = opts.now ?? Date.now;
  }

  /** The route, or null for an unknown orchestra. Throws ControlPlaneUnavailable when failing closed. */
  async get(subdomain: string): Promise<RouteAnswer | null> {
    const cached = this.entries.get(subdomain);
    const age = cached ? this.now() - cached.fetchedAt : Infinity;
    const ttl = cached && !cached.lookup.found ? (this.opts.negativeTtlMs ?? 2_000) : this.opts.ttlMs;
    if (cached && age < ttl) {
      this.onDecision(cached.lookup.found ? 'hit' : 'negative_hit');
      return cached.lookup.found ? cached.lookup.route : null;
    }
    try {
      const fresh = await this.load(subdomain);
      this.onDecision('miss');
      return fresh.lookup.found ? fresh.lookup.route : null;
    } catch (e) {
      if (!(e instanceof ControlPlaneUnavailable)) throw e;
      // Re-read: an invalidation may have removed the entry while we waited.
      const still = this.entries.get(subdomain);
      if (still && still.lookup.found && this.now() - still.fetchedAt < this.opts.maxStaleMs) {
        this.onDecision('stale');
        return still.lookup.route;
      }
      this.onDecision('unavailable');
      throw e;
    }
  }

  /** Drops one subdomain (or everything) so the next connect asks the control plane. */
  invalidate(subdomain?: string): void {
    this.generation++;
    if (subdomain === undefined) this.entries.clear();
    else this.entries.delete(subdomain);
  }

  /** Drops every entry of an orchestra id (events name ids; the cache is keyed by subdomain). */
  invalidateOrchestra(orchestraId: string): void {
    this.generation++;
    for (const [key, entry] of this.entries.entries()) {
      if (entry.lookup.found && entry.lookup.route.orchestraId === orchestraId) this.entries.delete(key);
    }
  }

  private load(subdomain: string): Promise<Entry> {
    // Join a request in flight only if no invalidation happened since it started:
    // a connect that begins after a revocation must see the revocation.
    const running = this.inflight.get(subdomain);
    if (running && running.generation === this.generation) return running.promise;
    const generation = this.generation;
    const p = this.fetchRoute(subdomain)
      .then((lookup) => {
        const entry = { lookup, fetchedAt: this.now() };
        // An invalidation that raced with this request wins: do not store an
        // answer that may predate it (the next connect asks again).
        if (generation === this.generation) this.entries.set(subdomain, entry);
        return entry;
      })
      .finally(() => {
        if (this.inflight.get(subdomain)?.promise === p) this.inflight.delete(subdomain);
      });
    this.inflight.set(subdomain, { generation, promise: p });
    return p;
  }
}
