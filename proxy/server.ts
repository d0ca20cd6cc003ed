// The proxy role: accepts clients, owns the services every session shares
// (token verifier, route cache, cancel keys, live sessions, metrics, audit
// reporter) and reacts to control-plane events by dropping caches and ending
// sessions that lost their right to exist.

import { createServer, type AddressInfo, type Server, type Socket } from 'node:net';
import { readFileSync } from 'node:fs';
import { createSecureContext, type SecureContext } from 'node:tls';
import type { Server as HttpServer } from 'node:http';
import type { ProxyConfig } from '../common/config.js';
import type { BusEvent } from '../common/internal-api.js';
import type { Logger } from '../common/log.js';
import { AuditReporter } from './audit-reporter.js';
import { CancelRateLimiter } from './cancel.js';
import { CancelKeys } from './cancel-keys.js';
import { LocalConnectionLimiter, type ConnectionLimiter } from './connection-limits.js';
import { ControlPlaneClient } from './control-plane-client.js';
import { LiveSessions } from './live-sessions.js';
import { ProxyMetrics } from './metrics.js';
import { RedisBus } from './redis-bus.js';
import { startMetricsServer } from './metrics-server.js';
import { RouteCache } from './route-cache.js';
import { runSession, type ProxyContext } from './session.js';
import { TokenVerifier } from './token-verifier.js';
import { UpstreamPool } from './upstream-pool.js';

export interface ProxyServerOptions {
  config: ProxyConfig;
  log: Logger;
  /** Serve METRICS_LISTEN (false in tests that run many proxies). */
  serveMetrics?: boolean;
  /** Replaces the in-process connection cap (the Redis-backed one, with REDIS_URL). */
  limiter?: ConnectionLimiter;
}

export class ProxyServer {
  readonly metrics = new ProxyMetrics();
  readonly live = new LiveSessions();
  readonly controlPlane: ControlPlaneClient;
  readonly routes: RouteCache;
  readonly verifier: TokenVerifier;
  readonly upstreamPool: UpstreamPool;
  private readonly ctx: ProxyContext;
  private readonly audit: AuditReporter;
  private readonly server: Server;
  private readonly sockets = new Set<Socket>();
  private metricsServer: HttpServer | null = null;
  private readonly eventsAbort = new AbortController();
  /** the shared Redis bus, with REDIS_URL */
  readonly bus: RedisBus | null;
  private draining = false;
  private eventsConnected = false;

  constructor(private readonly opts: ProxyServerOptions) {
    const { config, log } = opts;
    this.controlPlane = new ControlPlaneClient(config.controlPlaneUrl, config.proxyToken);
    this.routes = new RouteCache((s) => this.controlPlane.route(s), { ttlMs: config.routeCacheTtlMs, maxStaleMs: config.routeMaxStaleMs }, this.metrics.cacheDecision);
    this.verifier = new TokenVerifier(() => this.controlPlane.jwks());
    this.audit = new AuditReporter({
      post: (events) => this.controlPlane.postConnectionEvents(events),
      onDropped: (n) => this.metrics.auditDropped.inc(n),
      log,
    });
    this.upstreamPool = new UpstreamPool({
      idleTimeoutMs: config.upstreamIdleTimeoutMs,
      maxIdlePerOrchestra: config.upstreamIdleMax,
      onReuse: () => this.metrics.upstreamReused.inc(),
      onDiscard: (reason) => this.metrics.upstreamDiscarded.inc({ reason }),
    });
    const cancelKeys = new CancelKeys();
    this.bus = config.redisUrl
      ? new RedisBus(config.redisUrl, log, {
          onEvent: (e) => this.onEvent(e),
          onReset: (connected) => {
            this.metrics.busConnected.set({ bus: 'redis' }, connected ? 1 : 0);
            if (connected) this.onEvent({ type: 'all-changed' });
          },
          onRemoteCancel: (processId, secretKey) => {
            const target = cancelKeys.lookup(processId, secretKey);
            if (target) void target.cancel().then((ok) => this.metrics.cancels.inc({ result: ok ? 'forwarded_for_peer' : 'failed' }));
          },
        })
      : null;
    this.ctx = {
      secureContext: loadTls(config),
      requireTls: config.requireTls,
      authTimeoutMs: config.authTimeoutMs,
      verifier: this.verifier,
      routes: this.routes,
      cancelKeys,
      cancelLimiter: new CancelRateLimiter(),
      remoteCancel: this.bus ? (p, k) => this.bus!.forwardCancel(p, k) : undefined,
      limiter: opts.limiter ?? this.bus?.limiter ?? new LocalConnectionLimiter(),
      live: this.live,
      upstreamPool: this.upstreamPool,
      metrics: this.metrics,
      audit: this.audit,
      log,
      isDraining: () => this.draining,
    };
    this.server = createServer({ noDelay: true, pauseOnConnect: false }, (socket) => this.accept(socket));
  }

  /** Ready to serve: keys fetched from the control plane and not draining. */
  get ready(): boolean {
    return this.verifier.ready && !this.draining;
  }

  async start(): Promise<AddressInfo> {
    const { config, log } = this.opts;
    await new Promise<void>((resolve, reject) => {
      this.server.once('error', reject);
      this.server.listen(config.listen.port, config.listen.host, () => {
        this.server.off('error', reject);
        resolve();
      });
    });
    if (this.opts.serveMetrics !== false) {
      this.metricsServer = await startMetricsServer(config.metricsListen, this.metrics.registry, () => this.ready);
    }
    void this.controlPlane.followEvents((e) => this.onEvent(e), (c) => this.onEventsReset(c), this.eventsAbort.signal);
    void this.fetchKeysUntilReady();
    const address = this.server.address() as AddressInfo;
    log.info('proxy listening', { address: `${address.address}:${address.port}`, tls: this.ctx.secureContext !== undefined, controlPlane: config.controlPlaneUrl });
    return address;
  }

  /** Stop accepting, let sessions finish for up to drainMs, then end the rest with 57P01. */
  async stop(drainMs = 0): Promise<void> {
    this.draining = true;
    this.server.close();
    if (drainMs > 0) await this.live.whenEmpty(drainMs);
    this.live.terminateWhere(() => true, 'shutting_down');
    await this.live.whenEmpty(2_000);
    for (const s of this.sockets) s.destroy();
    this.eventsAbort.abort();
    this.upstreamPool.closeAll();
    await this.bus?.close();
    await this.audit.close();
    await new Promise<void>((r) => (this.metricsServer ? this.metricsServer.close(() => r()) : r()));
  }

  private accept(socket: Socket): void {
    this.sockets.add(socket);
    socket.once('close', () => this.sockets.delete(socket));
    // Errors are handled inside the session; this keeps a reset socket from crashing the process.
    socket.on('error', () => {});
    runSession(socket, this.ctx).catch((e: unknown) => {
      this.opts.log.error('session crashed', { error: e });
      socket.destroy();
    });
  }

  /** A proxy that starts while the control plane is still down retries until it can verify tokens. */
  private async fetchKeysUntilReady(): Promise<void> {
    let backoff = 200;
    while (!this.verifier.ready && !this.eventsAbort.signal.aborted) {
      try {
        await this.verifier.refreshKeys();
      } catch (e) {
        this.opts.log.warn('control plane not reachable yet, retrying', { error: e, retryMs: backoff });
        await new Promise((r) => setTimeout(r, backoff).unref());
        backoff = Math.min(backoff * 2, 5_000);
      }
    }
  }

  private onEvent(e: BusEvent): void {
    switch (e.type) {
      case 'token-revoked':
        this.routes.invalidateOrchestra(e.orchestraId);
        this.live.terminateWhere((s) => s.jti === e.jti, 'session_revoked');
        break;
      case 'orchestra-changed':
        this.routes.invalidate(e.subdomain);
        this.routes.invalidateOrchestra(e.orchestraId);
        this.upstreamPool.dropOrchestra(e.orchestraId);
        void this.recheck(e.orchestraId, e.subdomain);
        break;
      case 'all-changed':
        this.routes.invalidate();
        this.upstreamPool.closeAll();
        for (const [id, sub] of this.live.orchestras()) void this.recheck(id, sub);
        break;
    }
  }

  private onEventsReset(connected: boolean): void {
    this.eventsConnected = connected;
    this.metrics.busConnected.set({ bus: 'control_plane_events' }, connected ? 1 : 0);
    // Events may have been missed while disconnected: nothing cached can be trusted.
    if (connected) this.onEvent({ type: 'all-changed' });
  }

  get eventStreamConnected(): boolean {
    return this.eventsConnected;
  }

  /** After a change, sessions whose orchestra is no longer servable end with 57P01. */
  private async recheck(orchestraId: string, subdomain: string): Promise<void> {
    let route;
    try {
      route = await this.routes.get(subdomain);
    } catch {
      return; // control plane unreachable: live sessions continue; new ones follow the cache policy
    }
    const ok = route !== null && route.orchestraId === orchestraId && route.status === 'active' && route.isolationOk && route.upstream !== null;
    this.live.terminateWhere(
      (s) => s.orchestraId === orchestraId && (!ok || s.upstreamAddress !== route!.upstreamAddress || route!.revokedJtis.includes(s.jti)),
      'session_orchestra_changed',
    );
  }
}

function loadTls(config: ProxyConfig): SecureContext | undefined {
  if (!config.tlsCertFile || !config.tlsKeyFile) return undefined;
  return createSecureContext({ cert: readFileSync(config.tlsCertFile), key: readFileSync(config.tlsKeyFile), minVersion: 'TLSv1.2' });
}
