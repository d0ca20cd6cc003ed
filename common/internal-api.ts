// The contract between proxy and control plane: what a proxy may ask and what
// it gets back. Both roles import these types; neither imports the other.

/** An orchestra's subdomain (PRODUCT.md): the proxy's user name and database name. */
export const SUBDOMAIN_PATTERN = /^[a-z][a-z0-9-]{1,62}$/;

export type OrchestraStatus = 'provisioning' | 'pending' | 'active' | 'suspended' | 'deleted';

export const TOKEN_AUDIENCE = 'stagedoor';
export const TOKEN_ISSUER = 'stagedoor-control-plane';
/** Only the algorithm the control plane signs with; `none` and HMAC can never verify. */
export const TOKEN_ALGORITHMS = ['EdDSA'] as const;

/** Claims of a tenant token, beyond `jti`, `exp`, `iat`, `aud`, `iss`. */
export interface TenantTokenClaims {
  /** the orchestra id (UUID) */
  sub: string;
  /** the subdomain at issue time, informative only: routing compares ids */
  sdm: string;
}

export interface UpstreamRoute {
  host: string;
  port: number;
  database: string;
  user: string;
  password: string;
  sslmode: 'disable' | 'allow' | 'prefer' | 'require' | 'verify-ca' | 'verify-full';
}

/** GET /v1/internal/routes/:subdomain (PROXY_TOKEN) */
export interface RouteAnswer {
  orchestraId: string;
  subdomain: string;
  status: OrchestraStatus;
  maxConnections: number | null;
  /** null when the orchestra has no upstream (pending) */
  upstream: UpstreamRoute | null;
  /** canonical address, safe to log (no credentials) */
  upstreamAddress: string | null;
  /** false when the upstream's identity is shared with another orchestra */
  isolationOk: boolean;
  isolationDetail: string | null;
  /** revoked token ids of this orchestra that have not yet expired */
  revokedJtis: string[];
}

/** Events on GET /v1/internal/events (server-sent events) and on the Redis bus. */
export type BusEvent =
  | { type: 'orchestra-changed'; orchestraId: string; subdomain: string }
  | { type: 'token-revoked'; orchestraId: string; jti: string }
  | { type: 'all-changed' };
