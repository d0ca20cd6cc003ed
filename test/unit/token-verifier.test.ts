import { randomUUID } from 'node:crypto';
import { before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { SignJWT, exportJWK, generateKeyPair, importJWK, type CryptoKey, type JSONWebKeySet, type JWK, type JWTPayload } from 'jose';
import { TOKEN_AUDIENCE, TOKEN_ISSUER } from '../../common/internal-api.js';
import { TokenSigner } from '../../control-plane/signing-keys.js';
import { ControlPlaneUnavailable } from '../../proxy/control-plane-client.js';
import { Refusal } from '../../proxy/refusals.js';
import { TokenVerifier } from '../../proxy/token-verifier.js';

interface TestKey {
  kid: string;
  privateKey: CryptoKey;
  publicJwk: JWK;
}

async function makeKey(kid: string = randomUUID()): Promise<TestKey> {
  const { privateKey, publicKey } = await generateKeyPair('EdDSA', { crv: 'Ed25519', extractable: true });
  const publicJwk = { ...(await exportJWK(publicKey)), kid, alg: 'EdDSA', use: 'sig' };
  return { kid, privateKey, publicJwk };
}

const jwksOf = (...keys: TestKey[]): JSONWebKeySet => ({ keys: keys.map((k) => k.publicJwk) });

let key: TestKey;
let otherKeySameKid: TestKey;
let nextKey: TestKey;

before(async () => {
  key = await makeKey();
  otherKeySameKid = await makeKey(key.kid);
  nextKey = await makeKey();
});

/** A controllable clock starting at the real time (tokens are signed with real `iat`). */
function clock(): { now: () => number; advance: (ms: number) => void } {
  let t = Date.now();
  return { now: () => t, advance: (ms) => (t += ms) };
}

/** A JWKS fetcher that counts its calls and whose answer can be changed. */
function fetcher(initial: JSONWebKeySet): {
  fetch: () => Promise<JSONWebKeySet>;
  calls: () => number;
  set: (j: JSONWebKeySet | Error) => void;
} {
  let answer: JSONWebKeySet | Error = initial;
  let calls = 0;
  return {
    fetch: () => {
      calls++;
      return answer instanceof Error ? Promise.reject(answer) : Promise.resolve(answer);
    },
    calls: () => calls,
    set: (j) => (answer = j),
  };
}

interface IssueOptions {
  signer?: TestKey;
  kid?: string;
  sub?: string;
  jti?: string;
  /** seconds since the epoch; null = no exp claim */
  exp?: number | null;
  nbf?: number;
  aud?: string;
  iss?: string;
  nowSeconds?: number;
}

async function issue(o: IssueOptions = {}): Promise<{ token: string; sub: string; jti: string; exp: number | null }> {
  const now = o.nowSeconds ?? Math.floor(Date.now() / 1000);
  const sub = o.sub ?? randomUUID();
  const jti = o.jti ?? randomUUID();
  const exp = o.exp === undefined ? now + 3600 : o.exp;
  const jwt = new SignJWT({ sdm: 'acme-films' })
    .setProtectedHeader({ alg: 'EdDSA', kid: o.kid ?? (o.signer ?? key).kid, typ: 'JWT' })
    .setSubject(sub)
    .setJti(jti)
    .setIssuer(o.iss ?? TOKEN_ISSUER)
    .setAudience(o.aud ?? TOKEN_AUDIENCE)
    .setIssuedAt(now);
  if (exp !== null) jwt.setExpirationTime(exp);
  if (o.nbf !== undefined) jwt.setNotBefore(o.nbf);
  return { token: await jwt.sign((o.signer ?? key).privateKey), sub, jti, exp };
}

function validClaims(): JWTPayload {
  const now = Math.floor(Date.now() / 1000);
  return { sub: randomUUID(), jti: randomUUID(), exp: now + 3600, iat: now, aud: TOKEN_AUDIENCE, iss: TOKEN_ISSUER };
}

const b64url = (v: unknown): string => Buffer.from(typeof v === 'string' ? v : JSON.stringify(v)).toString('base64url');

function refused(reason?: string): (e: unknown) => boolean {
  return (e: unknown) => {
    assert.ok(e instanceof Refusal, `expected a Refusal, got ${String(e)}`);
    assert.equal(e.sqlstate, '28P01');
    if (reason !== undefined) assert.equal(e.reason, reason);
    return true;
  };
}

function verifierWith(jwks: JSONWebKeySet = jwksOf(key), now?: () => number): TokenVerifier {
  return new TokenVerifier(() => Promise.resolve(jwks), now);
}

describe('valid tokens', () => {
  test('a token signed by the control plane key verifies and yields orchestraId, jti and exp', async () => {
    const { token, sub, jti, exp } = await issue();
    const v = await verifierWith().verify(token);
    assert.deepEqual(v, { orchestraId: sub, jti, exp });
  });

  test('a token from TokenSigner.generateJwk keys (the control plane format) verifies', async () => {
    const jwk = await TokenSigner.generateJwk();
    const privateKey = (await importJWK(jwk, 'EdDSA')) as CryptoKey;
    const signer: TestKey = { kid: jwk.kid!, privateKey, publicJwk: { kty: jwk.kty, crv: jwk.crv, x: jwk.x, kid: jwk.kid, alg: 'EdDSA' } };
    const { token, sub } = await issue({ signer });
    const v = await verifierWith(jwksOf(signer)).verify(token);
    assert.equal(v.orchestraId, sub);
  });
});

describe('refused tokens (28P01)', () => {
  test('an expired token is refused as token_expired', async () => {
    const now = Math.floor(Date.now() / 1000);
    const { token } = await issue({ exp: now - 60, nowSeconds: now - 3600 });
    await assert.rejects(verifierWith().verify(token), refused('token_expired'));
  });

  test('a token without exp is refused', async () => {
    const { token } = await issue({ exp: null });
    await assert.rejects(verifierWith().verify(token), refused('token_invalid'));
  });

  test('a token for another audience is refused', async () => {
    const { token } = await issue({ aud: 'some-other-service' });
    await assert.rejects(verifierWith().verify(token), refused('token_invalid'));
  });

  test('a token from another issuer is refused', async () => {
    const { token } = await issue({ iss: 'someone-else' });
    await assert.rejects(verifierWith().verify(token), refused('token_invalid'));
  });

  test('an unsigned token (alg: none) is refused', async () => {
    const claims = b64url(validClaims());
    await assert.rejects(verifierWith().verify(`${b64url({ alg: 'none' })}.${claims}.`), refused('token_invalid'));
    await assert.rejects(verifierWith().verify(`${b64url({ alg: 'none', kid: key.kid, typ: 'JWT' })}.${claims}.`), refused('token_invalid'));
  });

  test('an HS256 token whose secret is the public key bytes (x coordinate) is refused: algorithm confusion', async () => {
    const x = key.publicJwk.x!;
    for (const secret of [Buffer.from(x, 'base64url'), Buffer.from(x, 'utf8')]) {
      const token = await new SignJWT(validClaims()).setProtectedHeader({ alg: 'HS256', kid: key.kid, typ: 'JWT' }).sign(new Uint8Array(secret));
      await assert.rejects(verifierWith().verify(token), refused('token_invalid'));
    }
  });

  test('an HS256 token whose secret is the public JWK JSON is refused: algorithm confusion', async () => {
    const secret = new TextEncoder().encode(JSON.stringify(key.publicJwk));
    const token = await new SignJWT(validClaims()).setProtectedHeader({ alg: 'HS256', kid: key.kid, typ: 'JWT' }).sign(secret);
    await assert.rejects(verifierWith().verify(token), refused('token_invalid'));
  });

  test('a token whose payload was changed after signing (another sub) is refused', async () => {
    const { token } = await issue();
    const [h, p, s] = token.split('.') as [string, string, string];
    const payload = JSON.parse(Buffer.from(p, 'base64url').toString('utf8')) as JWTPayload;
    payload.sub = randomUUID();
    await assert.rejects(verifierWith().verify(`${h}.${b64url(payload)}.${s}`), refused('token_invalid'));
  });

  test('a token signed by a different Ed25519 key under the same kid is refused', async () => {
    const { token } = await issue({ signer: otherKeySameKid });
    await assert.rejects(verifierWith().verify(token), refused('token_invalid'));
  });

  test('an empty password is refused as token_missing', async () => {
    await assert.rejects(verifierWith().verify(''), refused('token_missing'));
  });

  test('garbage ("not.a.jwt") is refused', async () => {
    await assert.rejects(verifierWith().verify('not.a.jwt'), refused('token_invalid'));
    await assert.rejects(verifierWith().verify('hunter2'), refused('token_invalid'));
  });

  test('a 1 MB string is refused, and fast', async () => {
    const verifier = verifierWith();
    await verifier.refreshKeys();
    const started = performance.now();
    await assert.rejects(verifier.verify('a'.repeat(1024 * 1024)), refused('token_invalid'));
    const header = b64url({ alg: 'EdDSA', kid: key.kid, typ: 'JWT' });
    const jwtShaped = `${header}.${'A'.repeat(1024 * 1024)}.${'B'.repeat(86)}`;
    await assert.rejects(verifier.verify(jwtShaped), refused('token_invalid'));
    const elapsed = performance.now() - started;
    assert.ok(elapsed < 1_000, `took ${elapsed.toFixed(0)} ms`);
  });

  test('a token whose nbf is in the future (not yet valid) is refused', async () => {
    const now = Math.floor(Date.now() / 1000);
    const { token } = await issue({ nbf: now + 600 });
    await assert.rejects(verifierWith().verify(token), refused('token_invalid'));
  });

  test('a token with claims of the wrong type (numeric sub) is refused', async () => {
    const claims = { ...validClaims(), sub: 12345 } as unknown as JWTPayload;
    const token = await new SignJWT(claims).setProtectedHeader({ alg: 'EdDSA', kid: key.kid }).sign(key.privateKey);
    await assert.rejects(verifierWith().verify(token), refused());
  });
});

describe('unknown kid and key rotation', () => {
  test('a token with a kid that does not exist is refused, and the JWKS is refetched at most once per 10 s', async () => {
    const c = clock();
    const f = fetcher(jwksOf(key));
    const verifier = new TokenVerifier(f.fetch, c.now);
    const unknown = async (): Promise<string> => (await issue({ kid: `nope-${randomUUID()}` })).token;

    await assert.rejects(verifier.verify(await unknown()), refused('token_invalid'));
    assert.equal(f.calls(), 1, 'the first verification loads the keys once; they are brand new, so no refetch');

    c.advance(5_000);
    await assert.rejects(verifier.verify(await unknown()), refused('token_invalid'));
    assert.equal(f.calls(), 1, 'no refetch 5 s after the last fetch');

    c.advance(5_001);
    await assert.rejects(verifier.verify(await unknown()), refused('token_invalid'));
    assert.equal(f.calls(), 2, 'one refetch more than 10 s after the last fetch');

    await assert.rejects(verifier.verify(await unknown()), refused('token_invalid'));
    assert.equal(f.calls(), 2, 'no second refetch right after the first');

    c.advance(10_001);
    const flood = await Promise.all(Array.from({ length: 50 }, unknown));
    const results = await Promise.allSettled(flood.map((tok) => verifier.verify(tok)));
    assert.ok(results.every((r) => r.status === 'rejected' && refused('token_invalid')(r.reason)));
    assert.equal(f.calls(), 3, '50 concurrent unknown kids cause one refetch');
  });

  test('a refetch that fails still counts: unknown kids do not hammer an unreachable control plane', async () => {
    const c = clock();
    const f = fetcher(jwksOf(key));
    const verifier = new TokenVerifier(f.fetch, c.now);
    await verifier.refreshKeys();
    assert.equal(f.calls(), 1);

    f.set(new ControlPlaneUnavailable('control plane unreachable'));
    c.advance(10_001);
    await assert.rejects(verifier.verify((await issue({ kid: 'nope-1' })).token), refused('token_invalid'));
    assert.equal(f.calls(), 2, 'one refetch attempt');
    // A failed refetch counts against the limit too: otherwise, while the JWKS
    // fetch fails, a garbage-token flood becomes a JWKS flood.
    await assert.rejects(verifier.verify((await issue({ kid: 'nope-2' })).token), refused('token_invalid'));
    await assert.rejects(verifier.verify((await issue({ kid: 'nope-3' })).token), refused('token_invalid'));
    assert.equal(f.calls(), 2, 'no further attempt within 10 s of the failed one');

    // Known keys keep working from the last good key set meanwhile.
    const { token } = await issue();
    await verifier.verify(token);
  });

  test('a token signed by a newly rotated key verifies once the JWKS is refetched', async () => {
    const c = clock();
    const f = fetcher(jwksOf(key));
    const verifier = new TokenVerifier(f.fetch, c.now);
    await verifier.refreshKeys();
    f.set(jwksOf(key, nextKey));
    c.advance(10_001);
    const { token, sub } = await issue({ signer: nextKey });
    assert.equal((await verifier.verify(token)).orchestraId, sub);
    assert.equal(f.calls(), 2);
  });

  test('a control plane that is down when keys are first needed refuses with 57P03, not an exception', async () => {
    const verifier = new TokenVerifier(() => Promise.reject(new ControlPlaneUnavailable('down')));
    const { token } = await issue();
    await assert.rejects(verifier.verify(token), (e: unknown) => {
      assert.ok(e instanceof Refusal);
      assert.equal(e.reason, 'control_plane_unavailable');
      assert.equal(e.sqlstate, '57P03');
      return true;
    });
  });
});

describe('verified-token cache', () => {
  test('a verified token is remembered: it still verifies after its key left the JWKS, while a fresh token from that key does not', async () => {
    const c = clock();
    const f = fetcher(jwksOf(key));
    const verifier = new TokenVerifier(f.fetch, c.now);
    const { token } = await issue();
    const first = await verifier.verify(token);

    // Rotate the key away. A signature check would now fail for lack of a key.
    f.set(jwksOf(nextKey));
    await verifier.refreshKeys();
    const { token: fresh } = await issue();
    await assert.rejects(verifier.verify(fresh), refused('token_invalid'));

    const second = await verifier.verify(token);
    assert.equal(second, first, 'the very same remembered result');
    assert.equal(f.calls(), 2, 'no fetch on the cached path');
  });

  test('a cached token that expires afterwards is refused as token_expired', async () => {
    const c = clock();
    const f = fetcher(jwksOf(key));
    const verifier = new TokenVerifier(f.fetch, c.now);
    const exp = Math.floor(c.now() / 1000) + 60;
    const { token } = await issue({ exp });
    await verifier.verify(token);

    // Take the key away so that only the cached path can say "expired" (a
    // signature check would say token_invalid).
    f.set(jwksOf(nextKey));
    await verifier.refreshKeys();
    c.advance(30_000);
    await verifier.verify(token); // still valid, from the cache
    c.advance(31_000);
    await assert.rejects(verifier.verify(token), refused('token_expired'));
  });
});
