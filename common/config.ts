// Every environment variable stagedoor reads is declared here, once, with its
// meaning and default. Both roles and `stagedoor dev` parse through this file,
// and the README's configuration table is checked against it by a test.

import { z } from 'zod';
import { parseListenAddress, type ListenAddress } from './listen-address.js';

export interface VariableDoc {
  name: string;
  meaning: string;
  default: string;
  roles: ReadonlyArray<'proxy' | 'control-plane' | 'dev' | 'cli'>;
}

export const VARIABLES: readonly VariableDoc[] = [
  { name: 'STAGEDOOR_DATA_DIR', meaning: 'where `dev` keeps its embedded servers, keys and certificate', default: './.stagedoor', roles: ['dev'] },
  { name: 'CENTRAL_DATABASE_URL', meaning: 'control-plane database', default: 'embedded (dev)', roles: ['control-plane', 'dev'] },
  { name: 'TENANT_SERVER_URL', meaning: 'admin URL of the server new orchestra databases are created on', default: 'embedded (dev)', roles: ['control-plane', 'dev'] },
  { name: 'DATABASE_URL_POOL_1…N', meaning: 'pre-made databases the control plane may assign, each to one orchestra at most', default: 'none', roles: ['control-plane', 'dev'] },
  { name: 'PROXY_LISTEN', meaning: 'proxy address', default: '127.0.0.1:6432', roles: ['proxy', 'dev'] },
  { name: 'CONTROL_PLANE_LISTEN', meaning: 'API address', default: '127.0.0.1:8080', roles: ['control-plane', 'dev'] },
  { name: 'METRICS_LISTEN', meaning: "proxy's /metrics, /healthz, /readyz", default: '127.0.0.1:9187', roles: ['proxy', 'dev'] },
  { name: 'CONTROL_PLANE_URL', meaning: "where a proxy (and the CLI) finds the control plane's keys and routes", default: 'dev: the local one; else http://127.0.0.1:8080', roles: ['proxy', 'cli'] },
  { name: 'ADMIN_TOKEN', meaning: 'bearer token of the control-plane API', default: 'generated and printed in dev', roles: ['control-plane', 'dev', 'cli'] },
  { name: 'PROXY_TOKEN', meaning: 'what a proxy presents to the control plane', default: '`ADMIN_TOKEN`', roles: ['proxy', 'control-plane'] },
  { name: 'ENCRYPTION_KEY', meaning: 'key that encrypts upstream credentials at rest (32 bytes, base64 or hex)', default: 'generated and kept in dev', roles: ['control-plane', 'dev'] },
  { name: 'TOKEN_SIGNING_KEY', meaning: 'private JWK (EdDSA/Ed25519) that signs tenant tokens', default: 'dev: generated and kept; control-plane: generated once and stored encrypted in the central database', roles: ['control-plane', 'dev'] },
  { name: 'REDIS_URL', meaning: 'invalidation, revocation and cancel routing across proxy instances', default: 'none: single node', roles: ['proxy', 'control-plane', 'dev'] },
  { name: 'TLS_CERT_FILE', meaning: 'proxy TLS certificate (PEM)', default: 'dev: self-signed, generated', roles: ['proxy', 'dev'] },
  { name: 'TLS_KEY_FILE', meaning: 'proxy TLS private key (PEM)', default: 'dev: self-signed, generated', roles: ['proxy', 'dev'] },
  { name: 'REQUIRE_TLS', meaning: 'refuse non-TLS clients that are not on loopback', default: 'true', roles: ['proxy', 'dev'] },
  { name: 'PUBLIC_PROXY_ADDRESS', meaning: 'host:port put in the connection strings the API hands out', default: 'the `PROXY_LISTEN` address', roles: ['control-plane', 'dev'] },
  { name: 'AUTH_TIMEOUT', meaning: 'seconds a client has to finish start-up and authentication', default: '10', roles: ['proxy', 'dev'] },
  { name: 'ROUTE_CACHE_TTL', meaning: 'seconds a route from the control plane is used without asking again', default: '5', roles: ['proxy', 'dev'] },
  { name: 'ROUTE_MAX_STALE', meaning: 'seconds a cached route may still be used while the control plane is unreachable; beyond it the proxy refuses with 57P03', default: '30', roles: ['proxy', 'dev'] },
  { name: 'UPSTREAM_IDLE_TIMEOUT', meaning: 'seconds a reset upstream connection is kept for the next client of its orchestra', default: '60', roles: ['proxy', 'dev'] },
  { name: 'UPSTREAM_IDLE_MAX', meaning: 'kept upstream connections per orchestra (0 turns reuse off)', default: '20', roles: ['proxy', 'dev'] },
  { name: 'ORCHESTRA_SCHEMA_DIR', meaning: 'directory of the orchestra migration set applied to new orchestra databases', default: '`schemas/orchestra`', roles: ['control-plane', 'dev'] },
  { name: 'AUDIT_INTERVAL', meaning: 'seconds between two runs of the isolation monitor', default: '600', roles: ['control-plane', 'dev'] },
  { name: 'ALERT_WEBHOOK_URL', meaning: 'where the monitor POSTs each new isolation violation (JSON)', default: 'none', roles: ['control-plane', 'dev'] },
  { name: 'DRAIN_TIMEOUT', meaning: 'seconds a stopping proxy lets sessions finish before ending them with 57P01', default: '30', roles: ['proxy', 'dev'] },
  { name: 'STAGEDOOR_MANAGES_TENANT_SERVER', meaning: 'the tenant server is dedicated to stagedoor: provisioning also revokes PUBLIC CONNECT on its other non-template databases', default: 'false (dev: true)', roles: ['control-plane', 'dev'] },
  { name: 'LOG_LEVEL', meaning: 'debug, info, warn or error', default: 'info', roles: ['proxy', 'control-plane', 'dev'] },
];

export type Env = Readonly<Record<string, string | undefined>>;

/** A configuration problem, always naming the variable, printed without a stack. */
export class ConfigError extends Error {}

function read(env: Env, name: string): string | undefined {
  const v = env[name];
  return v === undefined || v.trim() === '' ? undefined : v.trim();
}

function listen(env: Env, name: string, fallback: string): ListenAddress {
  try {
    return parseListenAddress(read(env, name) ?? fallback, name);
  } catch (e) {
    throw new ConfigError((e as Error).message);
  }
}

function seconds(env: Env, name: string, fallback: number): number {
  const raw = read(env, name);
  if (raw === undefined) return fallback;
  const parsed = z.coerce.number().positive().max(86_400).safeParse(raw);
  if (!parsed.success) throw new ConfigError(`${name} must be a number of seconds, got "${raw}"`);
  return parsed.data;
}

function count(env: Env, name: string, fallback: number): number {
  const raw = read(env, name);
  if (raw === undefined) return fallback;
  const parsed = z.coerce.number().int().min(0).max(100_000).safeParse(raw);
  if (!parsed.success) throw new ConfigError(`${name} must be a whole number, got "${raw}"`);
  return parsed.data;
}

function bool(env: Env, name: string, fallback: boolean): boolean {
  const raw = read(env, name);
  if (raw === undefined) return fallback;
  if (/^(1|true|yes|on)$/i.test(raw)) return true;
  if (/^(0|false|no|off)$/i.test(raw)) return false;
  throw new ConfigError(`${name} must be true or false, got "${raw}"`);
}

function url(env: Env, name: string): string | undefined {
  const raw = read(env, name);
  if (raw === undefined) return undefined;
  try {
    new URL(raw);
  } catch {
    throw new ConfigError(`${name} is not a valid URL`);
  }
  return raw;
}

function required<T>(value: T | undefined, name: string, why: string): T {
  if (value === undefined) throw new ConfigError(`${name} is required ${why}`);
  return value;
}

/** 32 raw bytes from base64 or hex, the AES-256-GCM key. */
export function parseEncryptionKey(raw: string, name = 'ENCRYPTION_KEY'): Buffer {
  const key = /^[0-9a-fA-F]{64}$/.test(raw) ? Buffer.from(raw, 'hex') : Buffer.from(raw, 'base64');
  if (key.length !== 32) throw new ConfigError(`${name} must be 32 bytes, as 64 hex digits or base64`);
  return key;
}

export interface ProxyConfig {
  listen: ListenAddress;
  metricsListen: ListenAddress;
  controlPlaneUrl: string;
  proxyToken: string;
  tlsCertFile: string | undefined;
  tlsKeyFile: string | undefined;
  requireTls: boolean;
  authTimeoutMs: number;
  routeCacheTtlMs: number;
  routeMaxStaleMs: number;
  drainTimeoutMs: number;
  upstreamIdleTimeoutMs: number;
  upstreamIdleMax: number;
  redisUrl: string | undefined;
}

export function loadProxyConfig(env: Env): ProxyConfig {
  const cert = read(env, 'TLS_CERT_FILE');
  const key = read(env, 'TLS_KEY_FILE');
  if ((cert === undefined) !== (key === undefined)) {
    throw new ConfigError('TLS_CERT_FILE and TLS_KEY_FILE must be set together');
  }
  const token = read(env, 'PROXY_TOKEN') ?? read(env, 'ADMIN_TOKEN');
  return {
    listen: listen(env, 'PROXY_LISTEN', '127.0.0.1:6432'),
    metricsListen: listen(env, 'METRICS_LISTEN', '127.0.0.1:9187'),
    controlPlaneUrl: (url(env, 'CONTROL_PLANE_URL') ?? 'http://127.0.0.1:8080').replace(/\/+$/, ''),
    proxyToken: required(token, 'PROXY_TOKEN', '(or ADMIN_TOKEN): the proxy authenticates to the control plane with it'),
    tlsCertFile: cert,
    tlsKeyFile: key,
    requireTls: bool(env, 'REQUIRE_TLS', true),
    authTimeoutMs: seconds(env, 'AUTH_TIMEOUT', 10) * 1000,
    routeCacheTtlMs: seconds(env, 'ROUTE_CACHE_TTL', 5) * 1000,
    routeMaxStaleMs: seconds(env, 'ROUTE_MAX_STALE', 30) * 1000,
    drainTimeoutMs: seconds(env, 'DRAIN_TIMEOUT', 30) * 1000,
    upstreamIdleTimeoutMs: seconds(env, 'UPSTREAM_IDLE_TIMEOUT', 60) * 1000,
    upstreamIdleMax: count(env, 'UPSTREAM_IDLE_MAX', 20),
    redisUrl: url(env, 'REDIS_URL'),
  };
}

export interface ControlPlaneConfig {
  listen: ListenAddress;
  centralDatabaseUrl: string;
  tenantServerUrl: string | undefined;
  poolUrls: string[];
  adminToken: string;
  proxyToken: string;
  encryptionKey: Buffer;
  tokenSigningKey: string | undefined;
  publicProxyAddress: string;
  orchestraSchemaDir: string | undefined;
  redisUrl: string | undefined;
  auditIntervalMs: number;
  alertWebhookUrl: string | undefined;
  /** dev: stagedoor created the tenant server, so it may lock down its other databases too */
  managesTenantServer: boolean;
}

export function loadControlPlaneConfig(env: Env): ControlPlaneConfig {
  const admin = required(read(env, 'ADMIN_TOKEN'), 'ADMIN_TOKEN', 'to protect the control-plane API');
  if (admin.length < 16) throw new ConfigError('ADMIN_TOKEN must be at least 16 characters');
  const poolUrls: string[] = [];
  for (let i = 1; ; i++) {
    const v = url(env, `DATABASE_URL_POOL_${i}`);
    if (v === undefined) break;
    poolUrls.push(v);
  }
  return {
    listen: listen(env, 'CONTROL_PLANE_LISTEN', '127.0.0.1:8080'),
    centralDatabaseUrl: required(url(env, 'CENTRAL_DATABASE_URL'), 'CENTRAL_DATABASE_URL', 'for the control plane'),
    tenantServerUrl: url(env, 'TENANT_SERVER_URL'),
    poolUrls,
    adminToken: admin,
    proxyToken: read(env, 'PROXY_TOKEN') ?? admin,
    encryptionKey: parseEncryptionKey(required(read(env, 'ENCRYPTION_KEY'), 'ENCRYPTION_KEY', 'to encrypt upstream credentials at rest')),
    tokenSigningKey: read(env, 'TOKEN_SIGNING_KEY'),
    publicProxyAddress: read(env, 'PUBLIC_PROXY_ADDRESS') ?? read(env, 'PROXY_LISTEN') ?? '127.0.0.1:6432',
    orchestraSchemaDir: read(env, 'ORCHESTRA_SCHEMA_DIR'),
    redisUrl: url(env, 'REDIS_URL'),
    auditIntervalMs: seconds(env, 'AUDIT_INTERVAL', 600) * 1000,
    alertWebhookUrl: url(env, 'ALERT_WEBHOOK_URL'),
    managesTenantServer: bool(env, 'STAGEDOOR_MANAGES_TENANT_SERVER', false),
  };
}
