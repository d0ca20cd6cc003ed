// Proxy metrics (Prometheus, prefix stagedoor_). Per-orchestra series carry
// orchestra="<subdomain>", refusals carry sqlstate (PRODUCT.md "Metrics").

import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';
import type { CacheDecision } from './route-cache.js';

export class ProxyMetrics {
  readonly registry = new Registry();
  readonly sessionsActive = new Gauge({ name: 'stagedoor_sessions_active', help: 'Client sessions currently relayed', labelNames: ['orchestra'], registers: [this.registry] });
  readonly sessionsTotal = new Counter({ name: 'stagedoor_sessions_total', help: 'Client sessions by outcome (accepted or the refusal reason)', labelNames: ['orchestra', 'result'], registers: [this.registry] });
  readonly refusals = new Counter({ name: 'stagedoor_refusals_total', help: 'Refused connections by SQLSTATE and reason', labelNames: ['sqlstate', 'reason'], registers: [this.registry] });
  readonly bytes = new Counter({ name: 'stagedoor_bytes_total', help: 'Bytes relayed, by orchestra and direction', labelNames: ['orchestra', 'direction'], registers: [this.registry] });
  readonly authSeconds = new Histogram({ name: 'stagedoor_auth_duration_seconds', help: 'Start-up to authorised (token and route checks)', buckets: [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1], registers: [this.registry] });
  readonly upstreamConnectSeconds = new Histogram({ name: 'stagedoor_upstream_connect_duration_seconds', help: 'Time to an authenticated upstream connection', buckets: [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5], registers: [this.registry] });
  readonly routeCache = new Counter({ name: 'stagedoor_route_cache_total', help: 'Route cache decisions (hit, miss, negative_hit, stale, unavailable)', labelNames: ['decision'], registers: [this.registry] });
  readonly cancels = new Counter({ name: 'stagedoor_cancel_requests_total', help: 'CancelRequests by outcome', labelNames: ['result'], registers: [this.registry] });
  readonly terminated = new Counter({ name: 'stagedoor_sessions_terminated_total', help: 'Live sessions ended by the gateway', labelNames: ['reason'], registers: [this.registry] });
  readonly busConnected = new Gauge({ name: 'stagedoor_bus_connected', help: '1 while the control-plane event stream (and Redis, when configured) is connected', labelNames: ['bus'], registers: [this.registry] });
  readonly upstreamReused = new Counter({ name: 'stagedoor_upstream_reused_total', help: 'Sessions served by a reset, kept upstream connection instead of a new one', registers: [this.registry] });
  readonly upstreamDiscarded = new Counter({ name: 'stagedoor_upstream_discarded_total', help: 'Kept upstream connections closed, by reason', labelNames: ['reason'], registers: [this.registry] });
  readonly auditDropped = new Counter({ name: 'stagedoor_audit_events_dropped_total', help: 'Connection audit events dropped because the buffer was full while the control plane was unreachable', registers: [this.registry] });

  constructor() {
    collectDefaultMetrics({ register: this.registry, prefix: 'stagedoor_proxy_' });
  }

  cacheDecision = (d: CacheDecision): void => {
    this.routeCache.inc({ decision: d });
  };
}
