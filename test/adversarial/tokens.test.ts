// Adversarial: forged, stale and misused tenant tokens, through the real
// proxy (not only the verifier). Every one is refused with 28P01 and shows in
// the audit log as connection.refused with its reason. The test knows the
// control plane's private signing key (TOKEN_SIGNING_KEY), so it can mint
// tokens that are correctly signed but wrong in one claim.

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { createHmac, createPrivateKey, createPublicKey, randomUUID, sign as edSign } from 'node:crypto';
import { SignJWT, generateKeyPair, exportJWK, importJWK, type JWK, type CryptoKey } from 'jose';
import { TokenSigner } from '../../control-plane/signing-keys.js';
import { TOKEN_AUDIENCE, TOKEN_ISSUER } from '../../common/internal-api.js';
import { connect, refusalOf, startStack, type OrchestraHandle, type Stack } from '../fixtures/stack.js';

let stack: Stack;
let alpha: OrchestraHandle;
let beta: OrchestraHandle;
let signingJwk: JWK;
let privateKey: CryptoKey;
let publicJwk: JWK;

before(async () => {
  signingJwk = await TokenSigner.generateJwk();
  privateKey = (await importJWK(signingJwk, 'EdDSA')) as CryptoKey;
  stack = await startStack({ controlPlaneEnv: { TOKEN_SIGNING_KEY: JSON.stringify(signingJwk) } });
  alpha = await stack.createOrchestra('alpha');
  beta = await stack.createOrchestra('beta');
  const jwks = (await (await fetch(`${stack.apiUrl}/.well-known/jwks.json`)).json()) as { keys: JWK[] };
  publicJwk = jwks.keys[0]!;
  assert.equal(publicJwk.kid, signingJwk.kid, 'the control plane serves the key the test configured');
});
after(async () => {
  await stack?.stop();
});

const b64 = (v: unknown): string => Buffer.from(typeof v === 'string' ? v : JSON.stringify(v)).toString('base64url');
const now = (): number => Math.floor(Date.now() / 1000);

/** Claims of a token the control plane would issue for `orchestraId`. */
function claims(orchestraId: string, extra: Record<string, unknown> = {}): Record<string, unknown> {
  return { sub: orchestraId, jti: randomUUID(), iss: TOKEN_ISSUER, aud: TOKEN_AUDIENCE, iat: now(), exp: now() + 3600, sdm: 'alpha', ...extra };
}

/** Signed with the real private key (EdDSA, the real kid) unless told otherwise. */
async function sign(payload: Record<string, unknown>, header: Record<string, unknown> = {}, key: CryptoKey = privateKey): Promise<string> {
  const clean = Object.fromEntries(Object.entries(payload).filter(([, v]) => v !== undefined));
  return new SignJWT(clean).setProtectedHeader({ alg: 'EdDSA', kid: signingJwk.kid, typ: 'JWT', ...header } as { alg: string }).sign(key);
}

/** Raw EdDSA signing with the real key: for headers jose itself refuses to produce. */
function signRaw(header: Record<string, unknown>, payload: Record<string, unknown>): string {
  const input = `${b64(header)}.${b64(payload)}`;
  const key = createPrivateKey({ key: signingJwk as import('node:crypto').JsonWebKey, format: 'jwk' });
  return `${input}.${edSign(null, Buffer.from(input), key).toString('base64url')}`;
}

function hs256(payload: Record<string, unknown>, secret: Buffer | string): string {
  const input = `${b64({ alg: 'HS256', kid: signingJwk.kid, typ: 'JWT' })}.${b64(payload)}`;
  return `${input}.${createHmac('sha256', secret).update(input).digest('base64url')}`;
}

interface Attack {
  name: string;
  token: () => Promise<string>;
  /** the refusal reason the audit log must carry (prefix of its `reason`) */
  reason: string;
}

async function auditRefusals(since: string, subdomain: string): Promise<Array<{ sqlstate: string; reason: string; jti: string | null; at: string }>> {
  const r = await stack.api<{ entries: Array<{ kind: string; sqlstate: string; reason: string; jti: string | null; at: string; id: number }> }>(
    'GET',
    `/v1/audit-log?orchestra=${subdomain}&kind=connection.refused&since=${encodeURIComponent(since)}&limit=1000`,
  );
  assert.equal(r.status, 200);
  return r.body.entries.sort((a, b) => a.id - b.id);
}

describe('forged and misused tokens through the real proxy', () => {
  test('every attack is refused with 28P01 and audit-logged as connection.refused with its reason, and the genuine token still connects', { timeout: 60_000 }, async (t) => {
    const attacker = await generateKeyPair('EdDSA', { crv: 'Ed25519', extractable: true });
    const attackerJwk = await exportJWK(attacker.publicKey);
    const spkiPem = createPublicKey({ key: publicJwk as import('node:crypto').JsonWebKey, format: 'jwk' }).export({ type: 'spki', format: 'pem' }).toString();

    const revoked = await stack.issueToken('alpha');
    assert.equal((await stack.api('DELETE', `/v1/tokens/${revoked.jti}`)).status, 200);

    const attacks: Attack[] = [
      { name: 'expired (exp an hour ago, correctly signed)', reason: 'token_expired', token: () => sign(claims(alpha.id, { iat: now() - 7200, exp: now() - 3600 })) },
      { name: 'expired a second ago', reason: 'token_expired', token: () => sign(claims(alpha.id, { exp: now() - 1 })) },
      { name: 'not yet valid (nbf in an hour)', reason: 'token_invalid', token: () => sign(claims(alpha.id, { nbf: now() + 3600 })) },
      { name: 'alg none, no signature', reason: 'token_invalid', token: async () => `${b64({ alg: 'none', typ: 'JWT' })}.${b64(claims(alpha.id))}.` },
      { name: 'alg none with the real kid and a copied signature', reason: 'token_invalid', token: async () => `${b64({ alg: 'none', kid: signingJwk.kid })}.${b64(claims(alpha.id))}.${alpha.token.split('.')[2]}` },
      { name: 'HS256 signed with the raw public key', reason: 'token_invalid', token: async () => hs256(claims(alpha.id), Buffer.from(publicJwk.x!, 'base64url')) },
      { name: 'HS256 signed with the public key as PEM', reason: 'token_invalid', token: async () => hs256(claims(alpha.id), spkiPem) },
      { name: 'HS256 signed with the public JWK as JSON', reason: 'token_invalid', token: async () => hs256(claims(alpha.id), JSON.stringify(publicJwk)) },
      { name: 'a key id that does not exist (real key)', reason: 'token_invalid', token: () => sign(claims(alpha.id), { kid: 'no-such-key' }) },
      { name: 'a key id that does not exist (attacker key)', reason: 'token_invalid', token: () => sign(claims(alpha.id), { kid: randomUUID() }, attacker.privateKey) },
      { name: 'the real key id, signed by an attacker key', reason: 'token_invalid', token: () => sign(claims(alpha.id), {}, attacker.privateKey) },
      { name: "the attacker's key embedded in the header (jwk)", reason: 'token_invalid', token: () => sign(claims(alpha.id), { kid: undefined, jwk: attackerJwk }, attacker.privateKey) },
      { name: "another orchestra's token", reason: 'token_other_orchestra', token: async () => beta.token },
      { name: 'a revoked token', reason: 'token_revoked', token: async () => revoked.token },
      {
        name: 'a valid token with sub changed to the other orchestra, signature kept',
        reason: 'token_invalid',
        token: async () => {
          const [h, p, s] = beta.token.split('.') as [string, string, string];
          const payload = JSON.parse(Buffer.from(p, 'base64url').toString()) as Record<string, unknown>;
          return `${h}.${b64({ ...payload, sub: alpha.id })}.${s}`;
        },
      },
      {
        name: 'a valid token with exp pushed a year ahead, signature kept',
        reason: 'token_invalid',
        token: async () => {
          const [h, p, s] = alpha.token.split('.') as [string, string, string];
          const payload = JSON.parse(Buffer.from(p, 'base64url').toString()) as Record<string, unknown>;
          return `${h}.${b64({ ...payload, exp: now() + 366 * 86400 })}.${s}`;
        },
      },
      { name: "header and payload of one token with another token's signature", reason: 'token_invalid', token: async () => `${alpha.token.split('.').slice(0, 2).join('.')}.${revoked.token.split('.')[2]}` },
      { name: 'wrong audience', reason: 'token_invalid', token: () => sign(claims(alpha.id, { aud: 'postgres' })) },
      { name: 'wrong issuer', reason: 'token_invalid', token: () => sign(claims(alpha.id, { iss: 'someone-else' })) },
      { name: 'no exp claim', reason: 'token_invalid', token: () => sign(claims(alpha.id, { exp: undefined })) },
      { name: 'no jti claim', reason: 'token_invalid', token: () => sign(claims(alpha.id, { jti: undefined })) },
      { name: 'sub of the wrong type', reason: 'token_invalid', token: () => sign(claims(alpha.id, { sub: 42 })) },
      { name: 'an unknown critical header', reason: 'token_invalid', token: async () => signRaw({ alg: 'EdDSA', kid: signingJwk.kid, typ: 'JWT', crit: ['x-stagedoor'], 'x-stagedoor': 1 }, claims(alpha.id)) },
      { name: 'the genuine token with its signature truncated', reason: 'token_invalid', token: async () => alpha.token.slice(0, -2) },
      { name: 'an empty password', reason: 'token_missing', token: async () => '' },
    ];

    const since = new Date(Date.now() - 1_000).toISOString();
    const wire: string[] = [];
    for (const a of attacks) {
      const code = await refusalOf(stack.clientConfig({ subdomain: 'alpha', token: await a.token() }));
      if (code !== '28P01') wire.push(`${a.name}: ${code ?? 'connected'}`);
    }
    assert.deepEqual(wire, [], 'each attack is refused with 28P01 on the wire');

    // The proxy posts its audit records in batches; wait (bounded) until all have arrived.
    let entries: Awaited<ReturnType<typeof auditRefusals>> = [];
    const deadline = Date.now() + 10_000;
    while (Date.now() < deadline) {
      entries = await auditRefusals(since, 'alpha');
      if (entries.length >= attacks.length) break;
      await new Promise((r) => setTimeout(r, 200));
    }
    assert.equal(entries.length, attacks.length, 'one connection.refused record per attack');
    const mismatches: string[] = [];
    attacks.forEach((a, i) => {
      const e = entries[i]!;
      t.diagnostic(`${a.name} → ${e.sqlstate} ${e.reason.slice(0, 110)}`);
      if (e.sqlstate !== '28P01' || !(e.reason === a.reason || e.reason.startsWith(`${a.reason}: `))) mismatches.push(`${a.name}: audit says ${e.sqlstate} ${e.reason}, expected ${a.reason}`);
    });
    assert.deepEqual(mismatches, []);

    // nothing above poisoned the verifier's cache: the genuine tokens still work
    for (const o of [alpha, beta]) {
      const c = await connect(stack.clientConfig(o));
      assert.equal((await c.query('select current_user as u')).rows[0].u, `sd_${o.subdomain}`);
      await c.end();
    }
  });

  test('a token that was accepted once is refused after it expires, even from the verified-token cache', { timeout: 20_000 }, async () => {
    const short = await sign(claims(alpha.id, { exp: now() + 2 }));
    assert.equal(await refusalOf(stack.clientConfig({ subdomain: 'alpha', token: short })), null, 'valid while exp is ahead');
    await new Promise((r) => setTimeout(r, 3_100));
    assert.equal(await refusalOf(stack.clientConfig({ subdomain: 'alpha', token: short })), '28P01');
  });

  test('a genuine token for one orchestra cannot open another orchestra through the database parameter', async () => {
    assert.equal(await refusalOf(stack.clientConfig({ subdomain: 'alpha', token: alpha.token, database: 'beta' })), '3D000');
    assert.equal(await refusalOf(stack.clientConfig({ subdomain: 'beta', token: alpha.token, database: 'beta' })), '28P01');
  });
});
