// Verifies tenant tokens (JWTs signed by the control plane) with `jose`.
// The algorithm allow-list (EdDSA only) is what stops `alg: none` and the
// HS256-with-the-public-key confusion attack; `exp` is required because jose
// would otherwise accept a token that never expires.

import { LRUCache } from 'lru-cache';
import { createLocalJWKSet, errors, jwtVerify, type JSONWebKeySet, type JWTVerifyGetKey } from 'jose';
import { TOKEN_ALGORITHMS, TOKEN_AUDIENCE, TOKEN_ISSUER } from '../common/internal-api.js';
import { ControlPlaneUnavailable } from './control-plane-client.js';
import { Refusal } from './refusals.js';

export interface VerifiedToken {
  orchestraId: string;
  jti: string;
  /** seconds since the epoch */
  exp: number;
}

/** Refetching keys on an unknown `kid` is rate-limited: garbage tokens must not become a JWKS flood. */
const UNKNOWN_KID_REFETCH_MS = 10_000;

export class TokenVerifier {
  private keys: JWTVerifyGetKey | null = null;
  private lastFetch = 0;
  private fetching: Promise<void> | null = null;
  // Verified tokens are remembered until they expire: a client that reconnects
  // with the same token skips the signature check (revocation is checked per
  // connect against the route, not here).
  private readonly verified = new LRUCache<string, VerifiedToken>({ max: 50_000 });

  constructor(
    private readonly fetchJwks: () => Promise<JSONWebKeySet>,
    private readonly now: () => number = Date.now,
  ) {}

  /** Fetches the control plane's keys; safe to call repeatedly (calls coalesce). */
  refreshKeys(): Promise<void> {
    if (!this.fetching) {
      // A failed attempt counts too: unknown kids must not hammer an unreachable control plane.
      this.lastFetch = this.now();
      this.fetching = this.fetchJwks()
        .then((set) => {
          this.keys = createLocalJWKSet(set);
        })
        .finally(() => {
          this.fetching = null;
        });
    }
    return this.fetching;
  }

  get ready(): boolean {
    return this.keys !== null;
  }

  async verify(token: string): Promise<VerifiedToken> {
    if (token.length === 0) throw new Refusal('token_missing');
    const cached = this.verified.get(token);
    if (cached) {
      if (cached.exp * 1000 <= this.now()) throw new Refusal('token_expired');
      return cached;
    }
    if (!this.keys) {
      try {
        await this.refreshKeys();
      } catch (e) {
        if (e instanceof ControlPlaneUnavailable) throw new Refusal('control_plane_unavailable', e.message);
        throw e;
      }
    }
    try {
      return this.remember(token, await this.check(token));
    } catch (e) {
      if (e instanceof errors.JWKSNoMatchingKey && this.now() - this.lastFetch > UNKNOWN_KID_REFETCH_MS) {
        // Keys may have rotated since we fetched them.
        await this.refreshKeys().catch(() => {});
        return this.remember(token, await this.check(token).catch(toRefusal));
      }
      return toRefusal(e);
    }
  }

  private async check(token: string): Promise<VerifiedToken> {
    const { payload } = await jwtVerify(token, this.keys as JWTVerifyGetKey, {
      algorithms: [...TOKEN_ALGORITHMS],
      audience: TOKEN_AUDIENCE,
      issuer: TOKEN_ISSUER,
      requiredClaims: ['exp', 'jti', 'sub'],
      currentDate: new Date(this.now()),
    });
    if (typeof payload.sub !== 'string' || typeof payload.jti !== 'string' || typeof payload.exp !== 'number') {
      throw new Refusal('token_invalid', 'claims of the wrong type');
    }
    return { orchestraId: payload.sub, jti: payload.jti, exp: payload.exp };
  }

  private remember(token: string, v: VerifiedToken): VerifiedToken {
    const ttl = v.exp * 1000 - this.now();
    if (ttl > 0) this.verified.set(token, v, { ttl });
    return v;
  }
}

function toRefusal(e: unknown): never {
  if (e instanceof Refusal) throw e;
  if (e instanceof errors.JWTExpired) throw new Refusal('token_expired');
  // jose reports algorithm confusion and malformed input as plain TypeErrors
  // without a code (LIBRARIES.md): anything that is not a valid token is refused.
  const detail = e instanceof Error ? `${(e as { code?: string }).code ?? e.name}: ${e.message}` : String(e);
  throw new Refusal('token_invalid', detail);
}
