// SCRAM-SHA-256 client side (RFC 5802 / RFC 7677) as Postgres speaks it:
// mechanism 'SCRAM-SHA-256' only, no channel binding (gs2 header "n,,").
// Postgres ignores the SCRAM user name (the start-up packet names the role),
// so it is sent empty by default, as libpq does.
//
// The expensive part is PBKDF2 (about 1 ms at Postgres' default 4096
// iterations, linear in the count). Derived keys are cached per
// (password, salt, iterations): a server keeps the same salt and count for a
// role until its password changes, so every connect after the first for a
// credential skips PBKDF2 entirely.

import { createHash, createHmac, pbkdf2, randomFillSync, timingSafeEqual } from 'node:crypto';

export const SCRAM_MECHANISM = 'SCRAM-SHA-256';

/**
 * RFC 7677 §4: the count SHOULD be at least 4096, which is also Postgres'
 * default (and its fixed value before 16). A lower count from the "server" is
 * what an active man-in-the-middle would offer: our ClientProof then becomes a
 * cheap-to-crack verifier of the password.
 */
export const SCRAM_MIN_ITERATIONS = 4096;
/**
 * PBKDF2 runs on libuv's small shared thread pool (also used for DNS) and
 * cannot be interrupted by our connect timeout. One million rounds is about
 * 0.2 s of one thread on current hardware and still above OWASP's 2023 advice
 * (600 000), so legitimately hardened roles work while a hostile upstream
 * cannot park the pool for seconds per connect.
 */
export const SCRAM_MAX_ITERATIONS = 1_000_000;

const KEY_CACHE_LIMIT = 256;
// base64("n,,"): the gs2 header echoed in client-final's channel-binding attribute.
const GS2_HEADER_B64 = 'biws';
const CLIENT_NONCE_BYTES = 18;

// One CSPRNG call per 128 nonces: a lone randomBytes(18) showed up at ~30 µs
// per connect in profiles (call overhead, not entropy). Nonces only need to be
// unpredictable and unique, which slices of a CSPRNG buffer are.
const noncePool = Buffer.alloc(CLIENT_NONCE_BYTES * 128);
let noncePoolOffset = noncePool.length;
function freshNonce(): string {
  if (noncePoolOffset === noncePool.length) {
    randomFillSync(noncePool);
    noncePoolOffset = 0;
  }
  const start = noncePoolOffset;
  noncePoolOffset += CLIENT_NONCE_BYTES;
  return noncePool.toString('base64', start, noncePoolOffset);
}

export type ScramFailureKind = 'protocol' | 'auth';

export class ScramError extends Error {
  /** 'auth': the exchange is well-formed but must not succeed; 'protocol': the server sent something malformed. */
  readonly kind: ScramFailureKind;
  constructor(kind: ScramFailureKind, message: string) {
    super(message);
    this.name = 'ScramError';
    this.kind = kind;
  }
}

interface DerivedKeys {
  clientKey: Buffer;
  storedKey: Buffer;
  serverKey: Buffer;
}

// Insertion order doubles as recency: a hit is re-inserted at the end, the
// first key is the least recently used. Holding the promise (not the result)
// lets concurrent connects for the same credential share one PBKDF2 run.
const keyCache = new Map<string, Promise<DerivedKeys>>();
let derivations = 0;
let hits = 0;

/** Counters for tests and metrics: PBKDF2 runs started, cache hits, current entries. */
export function scramKeyCacheStats(): { derivations: number; hits: number; size: number } {
  return { derivations, hits, size: keyCache.size };
}

export function clearScramKeyCache(): void {
  keyCache.clear();
  derivations = 0;
  hits = 0;
}

function deriveKeys(password: string, salt: Buffer, saltB64: string, iterations: number): Promise<DerivedKeys> {
  // The password goes into the key verbatim: a fast hash of it would hand a
  // memory dump a cheap password oracle, worse than the PBKDF2-protected keys
  // stored as values. Salt is base64 and the count is digits, so the layout is
  // unambiguous with the password last.
  const cacheKey = `${iterations}:${saltB64}:${password}`;
  const cached = keyCache.get(cacheKey);
  if (cached !== undefined) {
    hits++;
    keyCache.delete(cacheKey);
    keyCache.set(cacheKey, cached);
    return cached;
  }
  derivations++;
  const pending = new Promise<DerivedKeys>((resolve, reject) => {
    // Async PBKDF2: the sync variant would stall every session on this event loop for its duration.
    pbkdf2(saslPrep(password), salt, iterations, 32, 'sha256', (err, salted) => {
      if (err) {
        reject(err);
        return;
      }
      const clientKey = createHmac('sha256', salted).update('Client Key').digest();
      resolve({
        clientKey,
        storedKey: createHash('sha256').update(clientKey).digest(),
        serverKey: createHmac('sha256', salted).update('Server Key').digest(),
      });
    });
  });
  pending.catch(() => {
    if (keyCache.get(cacheKey) === pending) keyCache.delete(cacheKey);
  });
  keyCache.set(cacheKey, pending);
  if (keyCache.size > KEY_CACHE_LIMIT) {
    const oldest = keyCache.keys().next();
    if (!oldest.done) keyCache.delete(oldest.value);
  }
  return pending;
}

/**
 * One SCRAM exchange. Use once: clientFirstMessage → (server-first)
 * clientFinalMessage → (server-final) verifyServerFinal.
 */
export class ScramClient {
  readonly mechanism = SCRAM_MECHANISM;
  private readonly password: string;
  private readonly clientNonce: string;
  private readonly clientFirstBare: string;
  private step: 'first' | 'final' | 'verify' | 'done' = 'first';
  private expectedServerSignature: Buffer | null = null;

  /** `clientNonce` is for test vectors only; by default 18 random bytes, base64 (as libpq). */
  constructor(password: string, options?: { username?: string; clientNonce?: string }) {
    this.password = password;
    const given = options?.clientNonce;
    if (given !== undefined && !isPrintableNonce(given)) throw new ScramError('protocol', 'client nonce must be printable ASCII without commas');
    const nonce = given ?? freshNonce();
    this.clientNonce = nonce;
    this.clientFirstBare = `n=${saslName(options?.username ?? '')},r=${nonce}`;
  }

  /** client-first-message, including the gs2 header: the SASLInitialResponse payload. */
  clientFirstMessage(): string {
    if (this.step !== 'first') throw new ScramError('protocol', 'SCRAM client-first already sent');
    this.step = 'final';
    return `n,,${this.clientFirstBare}`;
  }

  /** Takes server-first-message (AuthenticationSASLContinue), returns client-final-message. */
  async clientFinalMessage(serverFirst: string): Promise<string> {
    if (this.step !== 'final') throw new ScramError('protocol', 'unexpected SCRAM server-first-message');
    this.step = 'verify';
    const { nonce, saltB64, salt, iterations } = this.parseServerFirst(serverFirst);
    const keys = await deriveKeys(this.password, salt, saltB64, iterations);
    const withoutProof = `c=${GS2_HEADER_B64},r=${nonce}`;
    const authMessage = `${this.clientFirstBare},${serverFirst},${withoutProof}`;
    const proof = createHmac('sha256', keys.storedKey).update(authMessage).digest();
    for (let i = 0; i < proof.length; i++) proof[i] ^= keys.clientKey[i]!;
    this.expectedServerSignature = createHmac('sha256', keys.serverKey).update(authMessage).digest();
    return `${withoutProof},p=${proof.toString('base64')}`;
  }

  /**
   * Checks server-final-message (AuthenticationSASLFinal). A wrong signature
   * means the peer does not know the password's ServerKey: it is not the real
   * server (or is relaying while impersonating it), so it throws.
   */
  verifyServerFinal(serverFinal: string): void {
    if (this.step !== 'verify' || this.expectedServerSignature === null) {
      throw new ScramError('protocol', 'unexpected SCRAM server-final-message');
    }
    this.step = 'done';
    if (serverFinal.startsWith('e=')) {
      throw new ScramError('auth', `server rejected SCRAM exchange: ${serverFinal.slice(2, 200)}`);
    }
    if (!serverFinal.startsWith('v=')) throw new ScramError('protocol', 'malformed SCRAM server-final-message');
    const comma = serverFinal.indexOf(',');
    const sig = decodeBase64(comma < 0 ? serverFinal.slice(2) : serverFinal.slice(2, comma));
    if (sig === null || sig.length !== this.expectedServerSignature.length) {
      throw new ScramError('protocol', 'malformed SCRAM server signature');
    }
    if (!timingSafeEqual(sig, this.expectedServerSignature)) {
      throw new ScramError('auth', 'SCRAM server signature mismatch: the upstream could not prove it knows the password');
    }
  }

  private parseServerFirst(msg: string): { nonce: string; saltB64: string; salt: Buffer; iterations: number } {
    // server-first-message = [reserved-mext ","] nonce "," salt "," iteration-count ["," extensions]
    // A leading "m=" is a mandatory extension we cannot honour: RFC 5802 says fail.
    const parts = msg.split(',');
    if (parts.length < 3 || !parts[0]!.startsWith('r=') || !parts[1]!.startsWith('s=') || !parts[2]!.startsWith('i=')) {
      throw new ScramError('protocol', 'malformed SCRAM server-first-message');
    }
    const nonce = parts[0]!.slice(2);
    // The server must extend our nonce, not replace or merely echo it: that
    // fresh server part is what stops a recorded exchange from being replayed.
    if (nonce.length <= this.clientNonce.length || !nonce.startsWith(this.clientNonce) || !isPrintableNonce(nonce)) {
      throw new ScramError('protocol', 'SCRAM server nonce does not extend the client nonce');
    }
    const saltB64 = parts[1]!.slice(2);
    const salt = decodeBase64(saltB64);
    if (salt === null || salt.length === 0) throw new ScramError('protocol', 'malformed SCRAM salt');
    const iterText = parts[2]!.slice(2);
    if (!/^[1-9][0-9]{0,9}$/.test(iterText)) throw new ScramError('protocol', 'malformed SCRAM iteration count');
    const iterations = Number(iterText);
    if (iterations < SCRAM_MIN_ITERATIONS || iterations > SCRAM_MAX_ITERATIONS) {
      throw new ScramError(
        'auth',
        `SCRAM iteration count ${iterations} outside accepted range ${SCRAM_MIN_ITERATIONS}..${SCRAM_MAX_ITERATIONS}`,
      );
    }
    return { nonce, saltB64, salt, iterations };
  }
}

// printable = %x21-2B / %x2D-7E (RFC 5802 §7): no comma, no space, ASCII only.
function isPrintableNonce(s: string): boolean {
  if (s.length === 0) return false;
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    if (c < 0x21 || c > 0x7e || c === 0x2c) return false;
  }
  return true;
}

function saslName(user: string): string {
  return user.replace(/=/g, '=3D').replace(/,/g, '=2C');
}

// Buffer.from(…, 'base64') silently skips junk; a signature or salt that is not
// canonical base64 is a malformed message, not something to guess around.
const BASE64 = /^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$/;
function decodeBase64(s: string): Buffer | null {
  return BASE64.test(s) ? Buffer.from(s, 'base64') : null;
}

// SASLprep (RFC 4013) the way Postgres applies it on both sides: pure-ASCII
// passwords pass unchanged (fast path, the common case), and a password that
// SASLprep prohibits is used as raw bytes instead of being refused. Bidi and
// unassigned-code-point checks are omitted: a password that needs them fails
// authentication; it cannot authenticate wrongly.
const ASCII = /^[\x00-\x7f]*$/;
// RFC 3454 C.1.2 (non-ASCII spaces → U+0020) and B.1 (commonly mapped to nothing).
const NON_ASCII_SPACE = /[\u00a0\u1680\u2000-\u200b\u202f\u205f\u3000]/g;
const MAPPED_TO_NOTHING = /[\u00ad\u034f\u1806\u180b-\u180d\u200b-\u200d\u2060\ufe00-\ufe0f\ufeff]/g;
// C.2.1, C.2.2, C.3, C.4, C.5, C.6, C.7, C.8, C.9 (plus the C.1.2 spaces, which survive only if NFKC produced them).
const PROHIBITED =
  /[\u0000-\u001f\u007f-\u009f\u00a0\u0340\u0341\u06dd\u070f\u1680\u180e\u2000-\u200f\u2028-\u202f\u205f-\u2063\u206a-\u206f\u2ff0-\u2ffb\u3000\ud800-\udfff\ue000-\uf8ff\ufdd0-\ufdef\ufeff\ufff9-\ufffd\ufffe\uffff]|[\u{1d173}-\u{1d17a}\u{e0001}\u{e0020}-\u{e007f}\u{f0000}-\u{ffffd}\u{100000}-\u{10fffd}]|[\u{1fffe}\u{1ffff}\u{2fffe}\u{2ffff}\u{3fffe}\u{3ffff}\u{4fffe}\u{4ffff}\u{5fffe}\u{5ffff}\u{6fffe}\u{6ffff}\u{7fffe}\u{7ffff}\u{8fffe}\u{8ffff}\u{9fffe}\u{9ffff}\u{afffe}\u{affff}\u{bfffe}\u{bffff}\u{cfffe}\u{cffff}\u{dfffe}\u{dffff}\u{efffe}\u{effff}\u{ffffe}\u{fffff}\u{10fffe}\u{10ffff}]/u;

/** Exported for tests. */
export function saslPrep(password: string): string {
  if (ASCII.test(password)) return password;
  const prepared = password.replace(NON_ASCII_SPACE, ' ').replace(MAPPED_TO_NOTHING, '').normalize('NFKC');
  return PROHIBITED.test(prepared) ? password : prepared;
}
