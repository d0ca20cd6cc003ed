// What a scenario needs from a running stagedoor, whatever runs it: the
// embedded backend (test/fixtures/stack.ts: servers and roles in and beside
// the test process) or containers (test/fixtures/container-stack.ts: the
// gateway image, postgres and redis containers, configured as in
// docker-compose.yml). Scenarios speak to it only as users and operators do:
// the HTTP API, Postgres clients through a proxy, admin SQL on the servers.

import type pg from 'pg';

export type Backend = 'embedded' | 'containers';

export interface ApiAnswer<T = Record<string, unknown>> {
  status: number;
  body: T;
}

export interface OrchestraHandle {
  id: string;
  subdomain: string;
  token: string;
  jti: string;
  /** the handed-out connection string, pointed at the primary proxy as this test process reaches it */
  connectionString: string;
}

export interface IssuedToken {
  token: string;
  jti: string;
  connectionString: string;
}

/** A PostgreSQL server of the stack, seen from two sides. */
export interface ServerView {
  /** superuser URL reachable from the test process; without a database, the one the stack uses (the central database, or `postgres`) */
  url(database?: string): string;
  /** host:port at which the gateway's own processes (control plane, proxies) reach this server */
  readonly gatewayAddress: string;
  /** another host name for the same server, as the gateway's processes would reach it (the incident's alias) */
  readonly gatewayAlias: string;
  /** superuser URL as the gateway's processes reach it (for URLs handed to the API, such as an import source) */
  gatewayUrl(database?: string): string;
}

export interface ProxyHandle {
  readonly host: string;
  readonly port: number;
  /** http://host:port of its /metrics, /healthz and /readyz, when it serves them */
  readonly metricsUrl?: string;
  /** signing keys loaded and not draining */
  ready(): Promise<boolean>;
  /** SIGTERM (drain, flush the audit queue) and the exit code; an in-process proxy answers 0 */
  stop(): Promise<number | null>;
}

export interface StartProxyOptions {
  /** wait until /readyz (default true); false for a proxy that is expected never to become ready */
  waitReady?: boolean;
}

export interface Target {
  readonly backend: Backend;
  readonly apiUrl: string;
  readonly adminToken: string;
  /** the primary proxy, as this test process reaches it */
  readonly proxyHost: string;
  readonly proxyPort: number;
  readonly centralServer: ServerView;
  readonly tenantServer: ServerView;
  api<T = Record<string, unknown>>(method: string, path: string, body?: unknown): Promise<ApiAnswer<T>>;
  /** provisions an orchestra and issues a token for it */
  createOrchestra(subdomain: string, opts?: { ttl?: string }): Promise<OrchestraHandle>;
  issueToken(subdomain: string, ttl?: string): Promise<IssuedToken>;
  /** pg options for a session through the primary proxy (TLS when the backend needs it: containers are not on the proxy's loopback) */
  clientConfig(o: { subdomain: string; token: string; database?: string; ssl?: boolean; application_name?: string }): pg.ClientConfig;
  /** every proxy forgets its cached routes: embedded drops them in-process, containers wait ROUTE_CACHE_TTL out */
  invalidateRoutes(): Promise<void>;
  /** stops the primary proxy with SIGTERM semantics (its audit queue is flushed) and puts a fresh one in its place */
  replacePrimaryProxy(): Promise<void>;
  /** another proxy on the same control plane, stopped with the stack if the scenario does not stop it */
  startProxy(env?: Record<string, string>, opts?: StartProxyOptions): Promise<ProxyHandle>;
  /** a proxy that reaches the control plane through a link the scenario can cut (an outage) */
  startProxyBehindCuttableLink(env?: Record<string, string>): Promise<{ proxy: ProxyHandle; cut(): Promise<void> }>;
  /** another control plane on the same central database; rejects with the reason it refused to start */
  startAnotherControlPlane(): Promise<{ stop(): Promise<void> }>;
}

/** Two proxies on one control plane sharing a Redis (docker-compose.yml's proxy-1 and proxy-2). */
export interface TwoProxyTarget extends Target {
  readonly proxies: readonly [ProxyHandle, ProxyHandle];
  /** a proxy as its own process (or container), without Redis, stopped by SIGTERM */
  startProxyProcess(env?: Record<string, string>): Promise<ProxyHandle>;
  /** kill the Redis every role uses */
  stopRedis(): Promise<void>;
}
