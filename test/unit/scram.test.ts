import { createHash, createHmac, pbkdf2Sync, randomBytes, timingSafeEqual } from 'node:crypto';
import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  SCRAM_MAX_ITERATIONS,
  SCRAM_MIN_ITERATIONS,
  ScramClient,
  ScramError,
  clearScramKeyCache,
  saslPrep,
  scramKeyCacheStats,
} from '../../proxy/scram.js';

// RFC 7677 §3 example exchange.
const RFC = {
  user: 'user',
  password: 'pencil',
  clientNonce: 'rOprNGfwEbeRWgbNEkqO',
  clientFirst: 'n,,n=user,r=rOprNGfwEbeRWgbNEkqO',
  serverFirst: 'r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096',
  clientFinal: 'c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=',
  serverFinal: 'v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=',
};

/** The server's half, written from RFC 5802 §3 independently of the client under test. */
class TestScramServer {
  readonly storedKey: Buffer;
  readonly serverKey: Buffer;
  serverFirst = '';
  private clientFirstBare = '';
  private nonce = '';

  constructor(
    password: string,
    readonly salt: Buffer = randomBytes(16),
    readonly iterations = 4096,
    private readonly serverNoncePart = randomBytes(18).toString('base64'),
  ) {
    const salted = pbkdf2Sync(password, salt, iterations, 32, 'sha256');
    const clientKey = createHmac('sha256', salted).update('Client Key').digest();
    this.storedKey = createHash('sha256').update(clientKey).digest();
    this.serverKey = createHmac('sha256', salted).update('Server Key').digest();
  }

  first(clientFirst: string): string {
    assert.ok(clientFirst.startsWith('n,,'), 'gs2 header must say: no channel binding');
    this.clientFirstBare = clientFirst.slice(3);
    const clientNonce = /(?:^|,)r=([^,]+)/.exec(this.clientFirstBare)?.[1];
    assert.ok(clientNonce);
    this.nonce = clientNonce + this.serverNoncePart;
    this.serverFirst = `r=${this.nonce},s=${this.salt.toString('base64')},i=${this.iterations}`;
    return this.serverFirst;
  }

  /** Verifies the proof the way Postgres does; returns server-final. */
  final(clientFinal: string, opts?: { skipProofCheck?: boolean }): string {
    const m = /^(c=biws,r=([^,]+)),p=([^,]+)$/.exec(clientFinal);
    assert.ok(m, `malformed client-final ${clientFinal}`);
    assert.equal(m[2], this.nonce);
    const authMessage = `${this.clientFirstBare},${this.serverFirst},${m[1]}`;
    const clientSignature = createHmac('sha256', this.storedKey).update(authMessage).digest();
    const proof = Buffer.from(m[3]!, 'base64');
    const clientKey = Buffer.alloc(32);
    for (let i = 0; i < 32; i++) clientKey[i] = proof[i]! ^ clientSignature[i]!;
    if (!opts?.skipProofCheck && !timingSafeEqual(createHash('sha256').update(clientKey).digest(), this.storedKey)) return 'e=invalid-proof';
    return `v=${createHmac('sha256', this.serverKey).update(authMessage).digest('base64')}`;
  }
}

async function rejectsWith(p: Promise<unknown> | (() => unknown), kind: 'auth' | 'protocol', pattern: RegExp): Promise<void> {
  await assert.rejects(
    async () => (typeof p === 'function' ? p() : p),
    (err: unknown) => {
      assert.ok(err instanceof ScramError, `expected ScramError, got ${String(err)}`);
      assert.equal(err.kind, kind);
      assert.match(err.message, pattern);
      return true;
    },
  );
}

test('the client reproduces the RFC 7677 example exchange byte for byte', async () => {
  clearScramKeyCache();
  const client = new ScramClient(RFC.password, { username: RFC.user, clientNonce: RFC.clientNonce });
  assert.equal(client.clientFirstMessage(), RFC.clientFirst);
  assert.equal(await client.clientFinalMessage(RFC.serverFirst), RFC.clientFinal);
  client.verifyServerFinal(RFC.serverFinal);
});

test('an independent server-side computation accepts the RFC 7677 proof and produces its server signature', () => {
  const server = new TestScramServer(RFC.password, Buffer.from('W22ZaJ0SNY7soEsUEjb6gQ==', 'base64'), 4096, '%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0');
  assert.equal(server.first(RFC.clientFirst), RFC.serverFirst);
  assert.equal(server.final(RFC.clientFinal), RFC.serverFinal);
});

test('a full exchange with random nonce and salt passes the server-side verification', async () => {
  const server = new TestScramServer('correct horse battery staple');
  const client = new ScramClient('correct horse battery staple');
  const first = client.clientFirstMessage();
  assert.match(first, /^n,,n=,r=[A-Za-z0-9+/]{24}$/, 'empty user name and an 18-byte base64 nonce, as libpq sends');
  const serverFinal = server.final(await client.clientFinalMessage(server.first(first)));
  client.verifyServerFinal(serverFinal);
});

test('client nonces are distinct across refills of the random pool', () => {
  const nonces = new Set<string>();
  for (let i = 0; i < 1000; i++) nonces.add(new ScramClient('x').clientFirstMessage().slice('n,,n=,r='.length));
  assert.equal(nonces.size, 1000);
  for (const n of nonces) assert.match(n, /^[A-Za-z0-9+/]{24}$/);
});

test('a wrong password produces a proof the server rejects', async () => {
  const server = new TestScramServer('right');
  const client = new ScramClient('wrong');
  const serverFinal = server.final(await client.clientFinalMessage(server.first(client.clientFirstMessage())));
  assert.equal(serverFinal, 'e=invalid-proof');
  await rejectsWith(() => client.verifyServerFinal(serverFinal), 'auth', /invalid-proof/);
});

test('a server signature that does not match is rejected as a man-in-the-middle', async () => {
  const client = new ScramClient(RFC.password, { username: RFC.user, clientNonce: RFC.clientNonce });
  client.clientFirstMessage();
  await client.clientFinalMessage(RFC.serverFirst);
  const forged = Buffer.from(RFC.serverFinal.slice(2), 'base64');
  forged[0]! ^= 1;
  await rejectsWith(() => client.verifyServerFinal(`v=${forged.toString('base64')}`), 'auth', /signature mismatch/);
});

test('a server signature from an impostor who does not know the password is rejected', async () => {
  const impostor = new TestScramServer('not the password');
  const client = new ScramClient('the password');
  const clientFinal = await client.clientFinalMessage(impostor.first(client.clientFirstMessage()));
  // Signs with its own ServerKey without checking the proof, as a relay pretending to be the server would.
  await rejectsWith(() => client.verifyServerFinal(impostor.final(clientFinal, { skipProofCheck: true })), 'auth', /signature mismatch/);
});

test('server-final that is not canonical base64 or has the wrong length is a protocol error', async () => {
  for (const bad of ['v=not base64!', 'v=AAAA', 'x=abc', '']) {
    const client = new ScramClient(RFC.password, { username: RFC.user, clientNonce: RFC.clientNonce });
    client.clientFirstMessage();
    await client.clientFinalMessage(RFC.serverFirst);
    await rejectsWith(() => client.verifyServerFinal(bad), 'protocol', /malformed/);
  }
});

test('a server nonce that does not strictly extend the client nonce is refused', async () => {
  for (const nonce of ['somethingElseEntirely1234567890', RFC.clientNonce, 'rOprNGfwEbeRWgbNEkq', `${RFC.clientNonce}abc def`]) {
    const client = new ScramClient(RFC.password, { clientNonce: RFC.clientNonce });
    client.clientFirstMessage();
    await rejectsWith(client.clientFinalMessage(`r=${nonce},s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096`), 'protocol', /nonce/);
  }
});

test('iteration counts outside the accepted range are refused before any key derivation', async () => {
  clearScramKeyCache();
  for (const i of [1, SCRAM_MIN_ITERATIONS - 1, SCRAM_MAX_ITERATIONS + 1, 2 ** 31 - 1]) {
    const client = new ScramClient(RFC.password, { clientNonce: RFC.clientNonce });
    client.clientFirstMessage();
    await rejectsWith(client.clientFinalMessage(`r=${RFC.clientNonce}xyz,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=${i}`), 'auth', /iteration count/);
  }
  for (const i of ['0', '-4096', '4096.5', 'abc', '04096', '99999999999']) {
    const client = new ScramClient(RFC.password, { clientNonce: RFC.clientNonce });
    client.clientFirstMessage();
    await rejectsWith(client.clientFinalMessage(`r=${RFC.clientNonce}xyz,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=${i}`), 'protocol', /iteration count/);
  }
  assert.equal(scramKeyCacheStats().derivations, 0);
});

test('a mandatory extension, a missing attribute or a bad salt in server-first is a protocol error', async () => {
  for (const msg of [
    `m=ext,r=${RFC.clientNonce}x,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096`,
    `r=${RFC.clientNonce}x,i=4096`,
    `r=${RFC.clientNonce}x,s=,i=4096`,
    `r=${RFC.clientNonce}x,s=%%%%,i=4096`,
    `s=W22ZaJ0SNY7soEsUEjb6gQ==,r=${RFC.clientNonce}x,i=4096`,
  ]) {
    const client = new ScramClient(RFC.password, { clientNonce: RFC.clientNonce });
    client.clientFirstMessage();
    await rejectsWith(client.clientFinalMessage(msg), 'protocol', /malformed|nonce/);
  }
});

test('steps out of order are refused', async () => {
  const client = new ScramClient(RFC.password, { clientNonce: RFC.clientNonce });
  await rejectsWith(client.clientFinalMessage(RFC.serverFirst), 'protocol', /unexpected/);
  await rejectsWith(() => client.verifyServerFinal(RFC.serverFinal), 'protocol', /unexpected/);
  client.clientFirstMessage();
  await rejectsWith(() => client.clientFirstMessage(), 'protocol', /already sent/);
});

test('a second exchange with the same password, salt and count skips PBKDF2', async () => {
  clearScramKeyCache();
  const server = new TestScramServer('cached secret');
  for (let i = 0; i < 3; i++) {
    const client = new ScramClient('cached secret');
    client.verifyServerFinal(server.final(await client.clientFinalMessage(server.first(client.clientFirstMessage()))));
  }
  assert.deepEqual(scramKeyCacheStats(), { derivations: 1, hits: 2, size: 1 });

  // Another password with the same salt is another key: no false sharing.
  const other = new ScramClient('other secret');
  const otherFinal = await other.clientFinalMessage(server.first(other.clientFirstMessage()));
  assert.equal(server.final(otherFinal), 'e=invalid-proof');
  assert.equal(scramKeyCacheStats().derivations, 2);
});

test('concurrent exchanges for one credential share a single PBKDF2 run', async () => {
  clearScramKeyCache();
  const server = new TestScramServer('shared');
  const clients = Array.from({ length: 5 }, () => new ScramClient('shared'));
  const firsts = clients.map((c) => server.first(c.clientFirstMessage()));
  await Promise.all(clients.map((c, i) => c.clientFinalMessage(firsts[i]!)));
  assert.equal(scramKeyCacheStats().derivations, 1);
  assert.equal(scramKeyCacheStats().hits, 4);
});

test('the key cache stays bounded at 256 entries', async () => {
  clearScramKeyCache();
  const salt = 'W22ZaJ0SNY7soEsUEjb6gQ==';
  await Promise.all(
    Array.from({ length: 300 }, async (_, i) => {
      const client = new ScramClient(`pw${i}`, { clientNonce: RFC.clientNonce });
      client.clientFirstMessage();
      await client.clientFinalMessage(`r=${RFC.clientNonce}x,s=${salt},i=4096`);
    }),
  );
  assert.equal(scramKeyCacheStats().size, 256);
  clearScramKeyCache();
});

test('SASLprep leaves ASCII alone and maps the RFC 4013 examples like Postgres does', () => {
  assert.equal(saslPrep('pencil'), 'pencil');
  assert.equal(saslPrep('with\tcontrol'), 'with\tcontrol', 'pure ASCII is never altered, even control characters');
  assert.equal(saslPrep('I\u00adX'), 'IX', 'soft hyphen maps to nothing');
  assert.equal(saslPrep('\u00aa'), 'a', 'NFKC');
  assert.equal(saslPrep('\u2168'), 'IX', 'NFKC');
  assert.equal(saslPrep('a\u00a0b\u3000c'), 'a b c', 'non-ASCII spaces map to U+0020');
  assert.equal(saslPrep('caf\u00e9\u0007'), 'caf\u00e9\u0007', 'a prohibited character means the raw password is used');
});
