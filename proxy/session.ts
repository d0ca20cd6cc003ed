// One client connection, top to bottom: start-up → authenticate → route →
// connect upstream → hand over → relay. Each step lives in its own file; this
// one only sequences them and owns the clean-up, so that every exit path
// (refusal, timeout, client gone, upstream gone) releases everything it took.

import type { Socket } from 'node:net';
import type { SecureContext } from 'node:tls';
import type { Logger } from '../common/log.js';
import type { AuditReporter } from './audit-reporter.js';
import { authenticate, checkStartupParameters, type AuthorizedSession } from './authenticate.js';
import { handleCancel, type CancelRateLimiter } from './cancel.js';
import type { CancelKeys } from './cancel-keys.js';
import { ClientGone, ClientReader } from './client-reader.js';
import type { ConnectionLimiter } from './connection-limits.js';
import { upstreamStartupParameters, writeGreeting } from './handover.js';
import type { LiveSessions } from './live-sessions.js';
import type { ProxyMetrics } from './metrics.js';
import { REFUSALS, Refusal, type RefusalReason } from './refusals.js';
import { startRelay } from './relay.js';
import type { RouteCache } from './route-cache.js';
import { readStartup } from './startup.js';
import { UpstreamPool } from './upstream-pool.js';
import type { TokenVerifier } from './token-verifier.js';
import { UpstreamError, connectUpstream, sendUpstreamCancel, type UpstreamSession } from './upstream-connect.js';
import { errorResponse } from './wire.js';

export interface ProxyContext {
  secureContext: SecureContext | undefined;
  requireTls: boolean;
  authTimeoutMs: number;
  verifier: TokenVerifier;
  routes: RouteCache;
  cancelKeys: CancelKeys;
  cancelLimiter: CancelRateLimiter;
  /** forwards a cancel whose key another proxy instance issued (REDIS_URL), if any */
  remoteCancel?: (processId: number, secretKey: number) => Promise<boolean>;
  limiter: ConnectionLimiter;
  live: LiveSessions;
  upstreamPool: UpstreamPool;
  metrics: ProxyMetrics;
  audit: AuditReporter;
  log: Logger;
  isDraining: () => boolean;
}

/** Start-up exchange is small; anything beyond this before authentication is a flood. */
const MAX_READ_AHEAD = 128 * 1024;

export async function runSession(socket: Socket, ctx: ProxyContext): Promise<void> {
  socket.setNoDelay(true);
  socket.setKeepAlive(true, 60_000);
  const clientAddress = socket.remoteAddress ?? 'unknown';
  const reader = new ClientReader(socket, MAX_READ_AHEAD);
  const started = process.hrtime.bigint();
  const upstreamAbort = new AbortController();
  let subdomain: string | null = null;
  let authorized: AuthorizedSession | null = null;
  let upstream: UpstreamSession | null = null;
  let releaseSlot: (() => void) | null = null;
  let reuseKey = '';

  const deadline = setTimeout(() => {
    upstreamAbort.abort();
    reader.fail(new Refusal('auth_timeout'));
    // A client stuck in the TLS handshake has no pending read to fail.
    if (reader.buffered === 0 && !socket.destroyed) setTimeout(() => socket.destroy(), 100).unref();
  }, ctx.authTimeoutMs);

  try {
    const hello = await readStartup(reader, { secureContext: ctx.secureContext });
    if (hello.kind === 'cancel') {
      clearTimeout(deadline);
      socket.destroy();
      const result = await handleCancel(ctx.cancelKeys, ctx.cancelLimiter, clientAddress, hello.processId, hello.secretKey, ctx.remoteCancel);
      ctx.metrics.cancels.inc({ result });
      return;
    }
    if (ctx.isDraining()) throw new Refusal('shutting_down');
    if (ctx.requireTls && !hello.tls && !isLoopback(clientAddress)) throw new Refusal('tls_required');
    subdomain = checkStartupParameters(hello.params).subdomain;
    authorized = await authenticate(reader, hello.params, subdomain, { verifier: ctx.verifier, routes: ctx.routes });
    const route = authorized.route;

    releaseSlot = await ctx.limiter.acquire(route.orchestraId, route.maxConnections);
    if (!releaseSlot) throw new Refusal('connection_limit', `cap ${route.maxConnections}`);
    ctx.metrics.authSeconds.observe(Number(process.hrtime.bigint() - started) / 1e9);

    const connectStarted = process.hrtime.bigint();
    const params = upstreamStartupParameters(hello.params);
    reuseKey = UpstreamPool.keyFor(route.orchestraId, route.upstream, params);
    try {
      upstream = ctx.upstreamPool.take(reuseKey);
      if (!upstream) {
        // A new backend: kept idle ones of this orchestra (other start-up
        // parameters) count against its cap too, so make room first.
        if (route.maxConnections !== null) ctx.upstreamPool.trim(route.orchestraId, route.maxConnections - ctx.limiter.held(route.orchestraId));
        upstream = await connectUpstream(route.upstream, params, { timeoutMs: ctx.authTimeoutMs, signal: upstreamAbort.signal });
      }
    } catch (e) {
      if (e instanceof UpstreamError) {
        throw new Refusal('upstream_unavailable', `${e.kind}${e.sqlstate ? ` ${e.sqlstate}` : ''}: ${e.serverMessage ?? e.message}`);
      }
      throw e;
    }
    ctx.metrics.upstreamConnectSeconds.observe(Number(process.hrtime.bigint() - connectStarted) / 1e9);
    clearTimeout(deadline);
  } catch (e) {
    clearTimeout(deadline);
    releaseSlot?.();
    upstreamAbort.abort();
    refuse(reader, e, ctx, { clientAddress, subdomain, authorized });
    return;
  }

  // Hand-over and relay: from here the session is accepted.
  const auth = authorized;
  const up = upstream;
  const target = auth.route.upstream;
  const key = ctx.cancelKeys.issue({
    orchestraId: auth.route.orchestraId,
    cancel: () => sendUpstreamCancel(target, up.backendKey),
  });
  const client = reader.socket;
  const leftover = reader.detach();
  writeGreeting(client, up.handoff, key);
  const relay = startRelay(client, up.socket, leftover, up.rest, { keepIdleUpstream: ctx.upstreamPool.enabled });

  const id = ctx.live.newId();
  const orchestra = auth.subdomain;
  const expiresIn = auth.token.exp * 1000 - Date.now();
  const expiry = setTimeout(() => terminate('session_expired'), Math.max(0, Math.min(expiresIn, 2 ** 31 - 1)));
  expiry.unref();
  function terminate(reason: RefusalReason): void {
    ctx.metrics.terminated.inc({ reason });
    relay.terminate(errorResponse({ severity: 'FATAL', sqlstate: REFUSALS[reason].sqlstate, message: REFUSALS[reason].message }));
  }
  ctx.live.add({ id, orchestraId: auth.route.orchestraId, subdomain: orchestra, jti: auth.token.jti, upstreamAddress: auth.route.upstreamAddress, terminate });
  ctx.metrics.sessionsActive.inc({ orchestra });
  ctx.metrics.sessionsTotal.inc({ orchestra, result: 'accepted' });
  const base = {
    orchestraId: auth.route.orchestraId,
    subdomain: orchestra,
    jti: auth.token.jti,
    clientAddress,
    upstreamAddress: auth.route.upstreamAddress,
  };
  ctx.audit.record({ kind: 'connection.accepted', at: new Date().toISOString(), sqlstate: null, reason: null, ...base });

  const outcome = await relay.closed;
  if (outcome.reusableUpstream) {
    // Kept plus active backends of the orchestra stay within its cap (this session, still holding its slot, is leaving).
    const cap = auth.route.maxConnections;
    const maxIdle = cap === null ? undefined : cap - (ctx.limiter.held(auth.route.orchestraId) - 1);
    void ctx.upstreamPool.giveBack({ session: up, orchestraId: auth.route.orchestraId, key: reuseKey }, outcome.reusableUpstream, maxIdle);
  }
  clearTimeout(expiry);
  key.release();
  releaseSlot();
  ctx.live.remove(id);
  ctx.metrics.sessionsActive.dec({ orchestra });
  ctx.metrics.bytes.inc({ orchestra, direction: 'from_client' }, relay.stats.bytesFromClient);
  ctx.metrics.bytes.inc({ orchestra, direction: 'to_client' }, relay.stats.bytesToClient);
  ctx.audit.record({
    kind: 'connection.closed',
    at: new Date().toISOString(),
    sqlstate: null,
    reason: null,
    ...base,
    durationMs: Number(process.hrtime.bigint() - started) / 1e6,
    bytesFromClient: relay.stats.bytesFromClient,
    bytesToClient: relay.stats.bytesToClient,
  });
}

interface RefusalContext {
  clientAddress: string;
  subdomain: string | null;
  authorized: AuthorizedSession | null;
}

function refuse(reader: ClientReader, e: unknown, ctx: ProxyContext, rc: RefusalContext): void {
  const socket = reader.socket;
  reader.detach();
  if (e instanceof ClientGone) {
    // Nobody left to tell; a TCP probe that never sent a start-up packet is not worth a record.
    socket.destroy();
    if (rc.subdomain !== null) ctx.log.debug('client left during start-up', { client: rc.clientAddress, orchestra: rc.subdomain });
    return;
  }
  if (!(e instanceof Refusal)) {
    ctx.log.error('session failed unexpectedly', { error: e, client: rc.clientAddress });
    e = new Refusal('internal_error', e instanceof Error ? e.message : String(e));
  }
  const refusal = e as Refusal;
  if (!socket.destroyed) {
    socket.end(errorResponse({ severity: 'FATAL', sqlstate: refusal.sqlstate, message: refusal.message }));
    setTimeout(() => socket.destroy(), 1_000).unref();
  }
  ctx.metrics.refusals.inc({ sqlstate: refusal.sqlstate, reason: refusal.reason });
  const orchestra = rc.authorized?.subdomain ?? null;
  if (orchestra) ctx.metrics.sessionsTotal.inc({ orchestra, result: refusal.reason });
  ctx.log.info('connection refused', { client: rc.clientAddress, orchestra: rc.subdomain, sqlstate: refusal.sqlstate, reason: refusal.reason, detail: refusal.auditDetail });
  ctx.audit.record({
    kind: 'connection.refused',
    at: new Date().toISOString(),
    orchestraId: rc.authorized?.route.orchestraId ?? null,
    subdomain: rc.subdomain,
    jti: rc.authorized?.token.jti ?? null,
    clientAddress: rc.clientAddress,
    sqlstate: refusal.sqlstate,
    reason: refusal.auditDetail ? `${refusal.reason}: ${refusal.auditDetail}` : refusal.reason,
    upstreamAddress: rc.authorized?.route.upstreamAddress ?? null,
  });
}

export function isLoopback(address: string): boolean {
  return address === '::1' || address.startsWith('127.') || address.startsWith('::ffff:127.');
}
