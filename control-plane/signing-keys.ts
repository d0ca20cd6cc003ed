// Tenant tokens are JWTs signed with an Ed25519 key (EdDSA). The private key
// comes from TOKEN_SIGNING_KEY (dev writes one to its data dir) or is
// generated once and kept in the central database, sealed with
// ENCRYPTION_KEY, so a restarted control plane keeps honouring its tokens.

import { randomUUID } from 'node:crypto';
import { SignJWT, exportJWK, generateKeyPair, importJWK, type JWK, type CryptoKey } from 'jose';
import type pg from 'pg';
import { TOKEN_AUDIENCE, TOKEN_ISSUER } from '../common/internal-api.js';
import type { SecretBox } from './secrets.js';

export interface IssuedToken {
  token: string;
  jti: string;
  expiresAt: Date;
}

export class TokenSigner {
  private constructor(
    private readonly kid: string,
    private readonly privateKey: CryptoKey,
    private readonly publicJwks: JWK[],
  ) {}

  static async generateJwk(): Promise<JWK> {
    const { privateKey } = await generateKeyPair('EdDSA', { crv: 'Ed25519', extractable: true });
    const jwk = await exportJWK(privateKey);
    return { ...jwk, kid: randomUUID(), alg: 'EdDSA', use: 'sig' };
  }

  /** From TOKEN_SIGNING_KEY (a private JWK as JSON), or from / into the central database. */
  static async load(pool: pg.Pool, box: SecretBox, configured: string | undefined): Promise<TokenSigner> {
    let jwk: JWK;
    if (configured) {
      try {
        jwk = JSON.parse(configured) as JWK;
      } catch {
        throw new Error('TOKEN_SIGNING_KEY must be a private JWK (JSON) for Ed25519');
      }
      if (jwk.kty !== 'OKP' || jwk.crv !== 'Ed25519' || !jwk.d) throw new Error('TOKEN_SIGNING_KEY must be an Ed25519 private JWK');
      jwk.kid ??= 'configured';
    } else {
      const existing = await pool.query<{ kid: string; private_jwk_enc: string }>(
        'SELECT kid, private_jwk_enc FROM signing_keys WHERE retired_at IS NULL ORDER BY created_at DESC LIMIT 1',
      );
      if (existing.rows[0]) {
        jwk = JSON.parse(box.open(existing.rows[0].private_jwk_enc, `signing-key:${existing.rows[0].kid}`)) as JWK;
      } else {
        jwk = await TokenSigner.generateJwk();
        await pool.query('INSERT INTO signing_keys (kid, private_jwk_enc, public_jwk) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING', [
          jwk.kid,
          box.seal(JSON.stringify(jwk), `signing-key:${jwk.kid}`),
          JSON.stringify(publicPart(jwk)),
        ]);
      }
    }
    const key = (await importJWK(jwk, 'EdDSA')) as CryptoKey;
    return new TokenSigner(jwk.kid as string, key, [publicPart(jwk)]);
  }

  jwks(): { keys: JWK[] } {
    return { keys: this.publicJwks };
  }

  async issue(orchestraId: string, subdomain: string, ttlSeconds: number): Promise<IssuedToken> {
    const jti = randomUUID();
    const now = Math.floor(Date.now() / 1000);
    const exp = now + ttlSeconds;
    const token = await new SignJWT({ sdm: subdomain })
      .setProtectedHeader({ alg: 'EdDSA', kid: this.kid, typ: 'JWT' })
      .setSubject(orchestraId)
      .setJti(jti)
      .setIssuer(TOKEN_ISSUER)
      .setAudience(TOKEN_AUDIENCE)
      .setIssuedAt(now)
      .setExpirationTime(exp)
      .sign(this.privateKey);
    return { token, jti, expiresAt: new Date(exp * 1000) };
  }
}

function publicPart(jwk: JWK): JWK {
  return { kty: jwk.kty, crv: jwk.crv, x: jwk.x, kid: jwk.kid, alg: 'EdDSA', use: 'sig' };
}
