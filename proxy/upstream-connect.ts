// Opens a session to a tenant's upstream Postgres as an ordinary client:
// optional TLS (SSLRequest), StartupMessage, authentication (trust, cleartext,
// md5, SCRAM-SHA-256), then collects ParameterStatus/BackendKeyData up to
// ReadyForQuery and hands over a paused, listener-free socket.
//
// The upstream is semi-trusted (a tenant may point us at anything, and the
// path may be hostile), so every start-up message is size-bounded, every
// message type is checked against the state we are in, and any doubt destroys
// the socket. One socket write per step, no pipes, no per-message timers.

import { createHash } from 'node:crypto';
import { connect as netConnect, isIP, type Socket } from 'node:net';
import { connect as tlsConnect, createSecureContext, type ConnectionOptions, type SecureContext } from 'node:tls';
import { serialize } from 'pg-protocol';
import type { BackendMessage, DatabaseError, ParameterStatusMessage } from 'pg-protocol/dist/messages.js';
import { Parser } from 'pg-protocol/dist/parser.js';
import { SCRAM_MECHANISM, ScramClient, ScramError } from './scram.js';

export type SslMode = 'disable' | 'allow' | 'prefer' | 'require' | 'verify-ca' | 'verify-full';

export interface UpstreamTarget {
  host: string;
  port: number;
  database: string;
  user: string;
  password: string;
  /**
   * 'prefer'/'allow': try TLS, fall back to plain if the server says N.
   * 'require': TLS without verification — unless sslrootcert is set, then the
   * chain is verified (libpq treats require + root cert as verify-ca).
   * 'verify-ca'/'verify-full': verify against sslrootcert or Node's CA bundle;
   * verify-full also checks the host name (or IP SAN).
   */
  sslmode: SslMode;
  /** PEM text of the CA to trust instead of the default bundle. */
  sslrootcert?: string;
}

export interface UpstreamSession {
  /** Plain or TLS socket, authenticated, positioned right after ReadyForQuery; paused, with none of our listeners left (attach an 'error' listener at once). */
  socket: Socket;
  /** Raw bytes of every ParameterStatus ('S') and NoticeResponse ('N') between AuthenticationOk and ReadyForQuery, verbatim and in order. */
  handoff: Buffer;
  parameters: Map<string, string>;
  /** From BackendKeyData; { 0, 0 } if the server sent none (no Postgres does; some look-alikes do). */
  backendKey: { processId: number; secretKey: number };
  /** Bytes read past ReadyForQuery, normally empty; the caller must forward them. */
  rest: Buffer;
  tls: boolean;
  authMethod: 'scram-sha-256' | 'md5' | 'password' | 'trust';
}

export type UpstreamFailureKind = 'unreachable' | 'timeout' | 'tls' | 'auth' | 'server' | 'protocol';

export class UpstreamError extends Error {
  readonly kind: UpstreamFailureKind;
  /** From the server's ErrorResponse when there was one. */
  readonly sqlstate: string | undefined;
  readonly serverMessage: string | undefined;
  constructor(
    kind: UpstreamFailureKind,
    message: string,
    details?: { sqlstate?: string | undefined; serverMessage?: string | undefined; cause?: unknown },
  ) {
    super(message, details?.cause === undefined ? undefined : { cause: details.cause });
    this.name = 'UpstreamError';
    this.kind = kind;
    this.sqlstate = details?.sqlstate;
    this.serverMessage = details?.serverMessage;
  }
}

export interface ConnectOptions {
  /** Default 10 000; covers TCP, TLS and authentication together. */
  timeoutMs?: number;
  /** Aborting rejects with kind 'timeout' (cause: the signal's reason) and destroys the socket. */
  signal?: AbortSignal;
}

const PROTOCOL_3_0 = 196608; // 3 << 16
/** Postgres' MAX_STARTUP_PACKET_LENGTH: the server drops larger packets without an ErrorResponse. */
const MAX_STARTUP_PACKET = 10_000;
/** Largest single message accepted before ReadyForQuery; real ones are under 1 KiB. */
const MAX_STARTUP_MESSAGE = 1 << 20;
/** Cap on ParameterStatus + NoticeResponse bytes kept for the client: a server looping notices must not grow memory until the timeout. */
const MAX_HANDOFF_BYTES = 1 << 20;
const DEFAULT_TIMEOUT_MS = 10_000;
const CANCEL_TIMEOUT_MS = 5_000;

const SSL_REQUEST = serialize.requestSsl();
const EMPTY = Buffer.alloc(0);
const noop = (): void => {};

// Message type bytes.
const AUTH = 0x52; // R
const ERROR = 0x45; // E
const NOTICE = 0x4e; // N
const PARAMETER_STATUS = 0x53; // S
const BACKEND_KEY = 0x4b; // K
const READY = 0x5a; // Z
const NEGOTIATE_VERSION = 0x76; // v

// Before any byte from the server, a reset or EOF usually means a load
// balancer or port-forward with nothing behind it: report it as unreachable.
const UNREACHABLE_CODES = new Set(['ECONNREFUSED', 'ECONNRESET', 'EHOSTUNREACH', 'ENETUNREACH', 'EHOSTDOWN', 'ENETDOWN', 'EADDRNOTAVAIL', 'EPIPE']);

export async function connectUpstream(
  target: UpstreamTarget,
  startupParams: ReadonlyMap<string, string>,
  opts?: ConnectOptions,
): Promise<UpstreamSession> {
  const startup = buildStartupPacket(target, startupParams);
  const signal = opts?.signal;
  if (signal?.aborted) throw new UpstreamError('timeout', 'upstream connect aborted before it started', { cause: signal.reason });
  let sock: Socket;
  try {
    sock = netConnect({ host: target.host, port: target.port, noDelay: true });
  } catch (err) {
    // Synchronous throws are argument errors (a port out of range and the like).
    throw new UpstreamError('unreachable', `cannot connect to ${target.host}:${target.port}: ${(err as Error).message}`, { cause: err });
  }
  return new Promise<UpstreamSession>((resolve, reject) => {
    new UpstreamConnector(sock, target, startup, opts?.timeoutMs ?? DEFAULT_TIMEOUT_MS, signal, resolve, reject);
  });
}

/** user/database come from the target; replication is never passed; _pq_.* protocol options are ours to negotiate, not the client's. */
function buildStartupPacket(target: UpstreamTarget, params: ReadonlyMap<string, string>): Buffer {
  // Built by hand: pg-protocol's serialize.startup() appends its own
  // client_encoding=UTF8 after ours, which would override the client's choice.
  const pairs: string[] = ['user', target.user, 'database', target.database];
  for (const [k, v] of params) {
    // Postgres matches these names case-sensitively, but nothing legitimate
    // sends 'User' or 'Replication'; dropping case variants costs nothing.
    const lower = k.toLowerCase();
    if (lower === 'user' || lower === 'database' || lower === 'replication' || lower.startsWith('_pq_.')) continue;
    if (k.length === 0) throw new UpstreamError('protocol', 'empty start-up parameter name');
    pairs.push(k, v);
  }
  let size = 4 + 4 + 1;
  for (const s of pairs) {
    // A NUL inside a name or value would end the string early and let the
    // rest be read as further parameters, e.g. a smuggled "database".
    if (s.includes('\0')) throw new UpstreamError('protocol', 'start-up parameter contains a NUL byte');
    size += Buffer.byteLength(s, 'utf8') + 1;
  }
  if (size > MAX_STARTUP_PACKET) throw new UpstreamError('protocol', `start-up packet of ${size} bytes exceeds Postgres' ${MAX_STARTUP_PACKET}`);
  const out = Buffer.allocUnsafe(size);
  out.writeInt32BE(size, 0);
  out.writeInt32BE(PROTOCOL_3_0, 4);
  let off = 8;
  for (const s of pairs) {
    off += out.write(s, off, 'utf8');
    out[off++] = 0;
  }
  out[off] = 0;
  return out;
}

type Phase = 'tcp' | 'sslresponse' | 'tls' | 'auth' | 'params';
type AuthMethod = UpstreamSession['authMethod'];

class UpstreamConnector {
  private phase: Phase = 'tcp';
  private settled = false;
  private heardFromServer = false;
  private usingTls = false;
  private timer: NodeJS.Timeout | null;

  // Framing across TCP reads: pieces of an incomplete message and how many bytes complete it.
  private pending: Buffer[] = [];
  private pendingBytes = 0;
  private need = 5;

  private authMethod: AuthMethod = 'trust';
  private authRequested = false;
  private scram: ScramClient | null = null;
  private sasl: 'none' | 'continue' | 'deriving' | 'final' | 'done' = 'none';

  private readonly handoff: Buffer[] = [];
  private handoffBytes = 0;
  private readonly parameters = new Map<string, string>();
  private readonly backendKey = { processId: 0, secretKey: 0 };
  private parser: Parser | null = null;

  constructor(
    private sock: Socket,
    private readonly target: UpstreamTarget,
    private readonly startup: Buffer,
    private readonly timeoutMs: number,
    private readonly signal: AbortSignal | undefined,
    private readonly resolve: (s: UpstreamSession) => void,
    private readonly reject: (e: UpstreamError) => void,
  ) {
    this.timer = setTimeout(this.onTimeout, timeoutMs);
    signal?.addEventListener('abort', this.onAbort, { once: true });
    sock.on('connect', this.onConnect);
    sock.on('data', this.onData);
    sock.on('error', this.onError);
    sock.on('close', this.onClose);
  }

  private readonly onConnect = (): void => {
    if (this.target.sslmode === 'disable') {
      this.phase = 'auth';
      this.sock.write(this.startup);
    } else {
      this.phase = 'sslresponse';
      this.sock.write(SSL_REQUEST);
    }
  };

  private readonly onData = (chunk: Buffer): void => {
    this.heardFromServer = true;
    if (this.phase === 'sslresponse') this.onSslResponse(chunk);
    else this.onMessages(chunk);
  };

  private onSslResponse(chunk: Buffer): void {
    // Exactly one byte, and nothing queued behind it: bytes after 'S' would
    // be plaintext injected by a man-in-the-middle and later mistaken for
    // TLS-protected data (CVE-2021-23222). The server sends nothing more until
    // our ClientHello / StartupMessage, so a legitimate answer is one byte.
    if (chunk.length !== 1) {
      this.fail('protocol', `upstream answered SSLRequest with ${chunk.length} bytes instead of one (possible injection)`);
      return;
    }
    const answer = chunk[0];
    if (answer === 0x53 /* S */) {
      this.startTls();
    } else if (answer === 0x4e /* N */) {
      const mode = this.target.sslmode;
      if (mode === 'prefer' || mode === 'allow') {
        this.phase = 'auth';
        this.sock.write(this.startup);
      } else {
        this.fail('tls', `upstream does not accept TLS but sslmode is ${mode}`);
      }
    } else {
      this.fail('protocol', `unexpected answer 0x${(answer ?? 0).toString(16)} to SSLRequest`);
    }
  }

  private startTls(): void {
    const raw = this.sock;
    let options: ConnectionOptions;
    let secure: Socket;
    try {
      options = tlsOptions(this.target, raw);
      secure = tlsConnect(options);
    } catch (err) {
      this.fail('tls', `cannot start TLS to upstream: ${(err as Error).message}`, err);
      return;
    }
    // The TLS socket now owns the raw one (it forwards its errors and close);
    // our listeners move with it.
    raw.removeListener('data', this.onData);
    raw.removeListener('error', this.onError);
    raw.removeListener('close', this.onClose);
    this.sock = secure;
    this.phase = 'tls';
    this.usingTls = true;
    secure.on('secureConnect', this.onSecureConnect);
    secure.on('data', this.onData);
    secure.on('error', this.onError);
    secure.on('close', this.onClose);
  }

  private readonly onSecureConnect = (): void => {
    this.phase = 'auth';
    this.sock.write(this.startup);
  };

  private onMessages(chunk: Buffer): void {
    let buf = chunk;
    if (this.pendingBytes > 0) {
      // Collect until the awaited message is complete, then copy once: no
      // quadratic re-concatenation of a large message arriving in pieces.
      this.pending.push(chunk);
      this.pendingBytes += chunk.length;
      if (this.pendingBytes < this.need) return;
      buf = Buffer.concat(this.pending, this.pendingBytes);
      this.pending = [];
      this.pendingBytes = 0;
    }
    const n = buf.length;
    let off = 0;
    while (n - off >= 5) {
      const len = buf.readUInt32BE(off + 1);
      // Checked from the header alone, before buffering a byte of the body.
      if (len < 4 || len > MAX_STARTUP_MESSAGE) {
        this.fail('protocol', `upstream sent a ${len}-byte message during start-up (limit ${MAX_STARTUP_MESSAGE})`);
        return;
      }
      const end = off + 1 + len;
      if (end > n) break;
      this.handleMessage(buf[off]!, buf, off, end);
      off = end;
      if (this.settled) return;
    }
    if (off < n) {
      const left = n - off;
      this.need = left >= 5 ? 1 + buf.readUInt32BE(off + 1) : 5;
      this.pending.push(off === 0 ? buf : buf.subarray(off));
      this.pendingBytes = left;
    }
  }

  /** `start` is the type byte, `end` one past the message. */
  private handleMessage(type: number, buf: Buffer, start: number, end: number): void {
    if (this.phase === 'auth') {
      switch (type) {
        case AUTH:
          this.handleAuthRequest(buf, start, end);
          return;
        case ERROR:
          this.failWithServerError(buf, start, end);
          return;
        case NOTICE:
          // About our own authentication: not the client's business.
          return;
        case NEGOTIATE_VERSION:
          // Only sent when the request asked for a newer minor version or _pq_ options; we asked for neither.
          this.fail('protocol', 'upstream sent NegotiateProtocolVersion to a plain 3.0 start-up');
          return;
      }
    } else if (this.phase === 'params') {
      switch (type) {
        case PARAMETER_STATUS: {
          const msg = this.parseOne(buf, start, end) as ParameterStatusMessage | null;
          if (msg === null) return;
          this.parameters.set(msg.parameterName, msg.parameterValue);
          this.keepForClient(buf, start, end);
          return;
        }
        case NOTICE:
          this.keepForClient(buf, start, end);
          return;
        case BACKEND_KEY:
          // Protocol 3.0 keys are exactly two int32s (3.2's longer keys need a 3.2 request).
          if (end - start !== 13) {
            this.fail('protocol', 'malformed BackendKeyData');
            return;
          }
          this.backendKey.processId = buf.readInt32BE(start + 5);
          this.backendKey.secretKey = buf.readInt32BE(start + 9);
          return;
        case ERROR:
          this.failWithServerError(buf, start, end);
          return;
        case READY:
          // A fresh session is idle; any other status means this is not one.
          if (end - start !== 6 || buf[start + 5] !== 0x49 /* I */) {
            this.fail('protocol', 'malformed ReadyForQuery at end of start-up');
            return;
          }
          this.succeed(end === buf.length ? EMPTY : buf.subarray(end));
          return;
      }
    }
    this.fail('protocol', `unexpected message '${String.fromCharCode(type)}' from upstream during ${this.phase === 'params' ? 'start-up' : 'authentication'}`);
  }

  private handleAuthRequest(buf: Buffer, start: number, end: number): void {
    const len = end - start - 1;
    if (len < 8) {
      this.fail('protocol', 'malformed authentication request');
      return;
    }
    const code = buf.readInt32BE(start + 5);
    const body = start + 9;
    switch (code) {
      case 0: // AuthenticationOk
        if (len !== 8) break;
        // Accepting Ok mid-SCRAM would let an impostor skip proving it holds
        // the ServerKey, i.e. defeat SCRAM's mutual authentication.
        if (this.sasl !== 'none' && this.sasl !== 'done') {
          this.fail('auth', 'upstream sent AuthenticationOk before completing SCRAM (server not authenticated)');
          return;
        }
        this.phase = 'params';
        return;
      case 3: // AuthenticationCleartextPassword
        if (len !== 8) break;
        if (!this.beginAuth('password')) return;
        this.sock.write(serialize.password(this.target.password));
        return;
      case 5: // AuthenticationMD5Password
        if (len !== 12) break;
        if (!this.beginAuth('md5')) return;
        this.sock.write(serialize.password(md5Password(this.target.user, this.target.password, buf.subarray(body, end))));
        return;
      case 10: {
        // AuthenticationSASL
        if (!this.beginAuth('scram-sha-256')) return;
        const mechanisms = cstrings(buf, body, end);
        if (mechanisms === null) break;
        if (!mechanisms.includes(SCRAM_MECHANISM)) {
          this.fail('auth', `upstream offers SASL mechanisms [${mechanisms.join(', ')}]; only ${SCRAM_MECHANISM} without channel binding is supported`);
          return;
        }
        const scram = new ScramClient(this.target.password);
        this.scram = scram;
        this.sasl = 'continue';
        this.sock.write(serialize.sendSASLInitialResponseMessage(SCRAM_MECHANISM, scram.clientFirstMessage()));
        return;
      }
      case 11: // AuthenticationSASLContinue
        if (this.sasl !== 'continue' || this.scram === null) break;
        this.sasl = 'deriving';
        this.scram.clientFinalMessage(buf.toString('utf8', body, end)).then(this.onClientFinal, this.onScramFailure);
        return;
      case 12: // AuthenticationSASLFinal
        if (this.sasl !== 'final' || this.scram === null) break;
        try {
          this.scram.verifyServerFinal(buf.toString('utf8', body, end));
        } catch (err) {
          this.onScramFailure(err);
          return;
        }
        this.sasl = 'done';
        return;
      case 2:
        this.fail('auth', 'upstream requires KerberosV5 authentication, which is not supported');
        return;
      case 7:
      case 8:
        this.fail('auth', 'upstream requires GSSAPI authentication, which is not supported');
        return;
      case 9:
        this.fail('auth', 'upstream requires SSPI authentication, which is not supported');
        return;
      default:
        this.fail('auth', `upstream requires unsupported authentication method ${code}`);
        return;
    }
    this.fail('protocol', `malformed or out-of-order authentication request ${code}`);
  }

  /** One challenge per connection: a second one (say cleartext after SCRAM) is a downgrade attempt or a broken server. */
  private beginAuth(method: AuthMethod): boolean {
    if (this.authRequested) {
      this.fail('protocol', `upstream asked for ${method} authentication after ${this.authMethod}`);
      return false;
    }
    this.authRequested = true;
    this.authMethod = method;
    return true;
  }

  private readonly onClientFinal = (message: string): void => {
    if (this.settled) return;
    this.sasl = 'final';
    this.sock.write(serialize.sendSCRAMClientFinalMessage(message));
  };

  private readonly onScramFailure = (err: unknown): void => {
    if (err instanceof ScramError) this.fail(err.kind, `SCRAM with upstream failed: ${err.message}`, err);
    else this.fail('protocol', `SCRAM with upstream failed: ${(err as Error).message}`, err);
  };

  private keepForClient(buf: Buffer, start: number, end: number): void {
    this.handoffBytes += end - start;
    if (this.handoffBytes > MAX_HANDOFF_BYTES) {
      this.fail('protocol', `upstream sent more than ${MAX_HANDOFF_BYTES} bytes of parameters and notices during start-up`);
      return;
    }
    this.handoff.push(buf.subarray(start, end));
  }

  /** Runs pg-protocol's parser over exactly one framed message; null (after failing) if it is malformed. */
  private parseOne(buf: Buffer, start: number, end: number): BackendMessage | null {
    const parser = (this.parser ??= new Parser());
    let out: BackendMessage | null = null;
    try {
      parser.parse(buf.subarray(start, end), (m) => {
        out = m;
      });
    } catch (err) {
      this.parser = null;
      this.fail('protocol', `malformed message from upstream: ${(err as Error).message}`, err);
      return null;
    }
    const found = out as BackendMessage | null;
    if (found === null) this.fail('protocol', 'malformed message from upstream');
    return found;
  }

  private failWithServerError(buf: Buffer, start: number, end: number): void {
    const err = this.parseOne(buf, start, end) as DatabaseError | null;
    if (err === null) return;
    const sqlstate = err.code;
    const serverMessage = err.message;
    // 28P01 invalid_password, 28000 invalid_authorization_specification (no pg_hba entry, role cannot log in).
    const kind: UpstreamFailureKind = sqlstate === '28P01' || sqlstate === '28000' ? 'auth' : 'server';
    this.fail(kind, `upstream refused the session: ${serverMessage} (SQLSTATE ${sqlstate ?? 'none'})`, undefined, sqlstate, serverMessage);
  }

  private readonly onError = (err: Error): void => {
    const code = (err as NodeJS.ErrnoException).code;
    if (this.phase === 'tcp' || (!this.heardFromServer && code !== undefined && UNREACHABLE_CODES.has(code))) {
      const kind = code === 'ETIMEDOUT' ? 'timeout' : 'unreachable';
      this.fail(kind, `cannot reach upstream ${this.target.host}:${this.target.port}: ${err.message}`, err);
    } else if (this.phase === 'tls') {
      this.fail('tls', `TLS with upstream failed: ${err.message}`, err);
    } else {
      this.fail('protocol', `upstream connection failed during start-up: ${err.message}`, err);
    }
  };

  private readonly onClose = (): void => {
    if (this.settled) return;
    if (!this.heardFromServer) this.fail('unreachable', `upstream ${this.target.host}:${this.target.port} closed the connection before answering`);
    else if (this.phase === 'tls') this.fail('tls', 'upstream closed the connection during the TLS handshake');
    else this.fail('protocol', 'upstream closed the connection during start-up');
  };

  private readonly onTimeout = (): void => {
    this.timer = null;
    this.fail('timeout', `upstream ${this.target.host}:${this.target.port} did not complete start-up within ${this.timeoutMs} ms (stuck in ${this.phase})`);
  };

  private readonly onAbort = (): void => {
    this.fail('timeout', 'upstream connect aborted', this.signal?.reason);
  };

  private succeed(rest: Buffer): void {
    this.settled = true;
    const sock = this.sock;
    // Pause before dropping our 'data' listener: a flowing socket with no
    // listener would silently discard whatever arrives next.
    sock.pause();
    this.cleanup();
    this.resolve({
      socket: sock,
      handoff: this.handoffBytes === 0 ? EMPTY : Buffer.concat(this.handoff, this.handoffBytes),
      parameters: this.parameters,
      backendKey: this.backendKey,
      rest,
      tls: this.usingTls,
      authMethod: this.authMethod,
    });
  }

  private fail(kind: UpstreamFailureKind, message: string, cause?: unknown, sqlstate?: string, serverMessage?: string): void {
    if (this.settled) return;
    this.settled = true;
    this.cleanup();
    // A late error from the dying socket must not become an uncaught exception.
    this.sock.on('error', noop);
    this.sock.destroy();
    this.reject(new UpstreamError(kind, message, { cause, sqlstate, serverMessage }));
  }

  private cleanup(): void {
    if (this.timer !== null) {
      clearTimeout(this.timer);
      this.timer = null;
    }
    this.signal?.removeEventListener('abort', this.onAbort);
    const s = this.sock;
    s.removeListener('connect', this.onConnect);
    s.removeListener('secureConnect', this.onSecureConnect);
    s.removeListener('data', this.onData);
    s.removeListener('error', this.onError);
    s.removeListener('close', this.onClose);
    this.pending = [];
    this.scram = null;
  }
}

function md5Password(user: string, password: string, salt: Buffer): string {
  const inner = createHash('md5').update(password).update(user).digest('hex');
  return 'md5' + createHash('md5').update(inner).update(salt).digest('hex');
}

/** NUL-terminated strings up to an empty one (the SASL mechanism list); null if unterminated. */
function cstrings(buf: Buffer, start: number, end: number): string[] | null {
  const out: string[] = [];
  let p = start;
  while (p < end) {
    const z = buf.indexOf(0, p);
    if (z < 0 || z >= end) return null;
    if (z === p) return out;
    out.push(buf.toString('utf8', p, z));
    p = z + 1;
  }
  return null;
}

// Building a SecureContext parses the CA PEM (or loads Node's bundle) and
// costs far more than the handshake's own CPU; contexts are immutable and
// shareable, so one per distinct CA text. Keyed by the PEM itself, bounded.
const secureContexts = new Map<string, SecureContext>();
// 'postgresql' in ALPN wire format (length-prefixed), built once instead of per handshake.
// Sent as libpq 17 does; older servers ignore it, 17+ require it for direct TLS.
const ALPN_POSTGRESQL = Buffer.from('\x0apostgresql', 'latin1');
const SECURE_CONTEXT_LIMIT = 64;

function secureContextFor(ca: string | undefined): SecureContext {
  const key = ca ?? '';
  let ctx = secureContexts.get(key);
  if (ctx === undefined) {
    ctx = createSecureContext(ca === undefined ? {} : { ca });
    if (secureContexts.size >= SECURE_CONTEXT_LIMIT) {
      const oldest = secureContexts.keys().next();
      if (!oldest.done) secureContexts.delete(oldest.value);
    }
    secureContexts.set(key, ctx);
  }
  return ctx;
}

function tlsOptions(target: Pick<UpstreamTarget, 'host' | 'sslmode' | 'sslrootcert'>, socket: Socket): ConnectionOptions {
  const mode = target.sslmode;
  const verify = mode === 'verify-ca' || mode === 'verify-full' || (mode === 'require' && target.sslrootcert !== undefined);
  const options: ConnectionOptions = {
    socket,
    host: target.host,
    secureContext: secureContextFor(verify ? target.sslrootcert : undefined),
    rejectUnauthorized: verify,
    ALPNProtocols: ALPN_POSTGRESQL,
  };
  // RFC 6066 forbids IP literals in SNI (Node warns); verification still uses `host`.
  if (isIP(target.host) === 0) options.servername = target.host;
  if (mode !== 'verify-full') options.checkServerIdentity = () => undefined;
  return options;
}

/**
 * Sends a CancelRequest for `key` on a fresh connection and waits for the
 * server to close it (Postgres signals the backend before closing). TLS first
 * for require/verify-* (as libpq does), plain otherwise: Postgres accepts
 * cancels before any pg_hba check. Never throws; false if not confirmed within 5 s.
 */
export async function sendUpstreamCancel(
  target: Pick<UpstreamTarget, 'host' | 'port' | 'sslmode' | 'sslrootcert'>,
  key: { processId: number; secretKey: number },
): Promise<boolean> {
  let packet: Buffer;
  try {
    packet = serialize.cancel(key.processId, key.secretKey);
  } catch {
    return false; // not int32s
  }
  const useTls = target.sslmode === 'require' || target.sslmode === 'verify-ca' || target.sslmode === 'verify-full';
  return new Promise<boolean>((resolve) => {
    let sock: Socket;
    let sent = false;
    let done = false;
    const finish = (ok: boolean): void => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      sock.removeListener('close', onClose);
      sock.on('error', noop);
      sock.destroy();
      resolve(ok);
    };
    const onError = (): void => finish(false);
    const onClose = (): void => finish(sent);
    const timer = setTimeout(onError, CANCEL_TIMEOUT_MS);
    try {
      sock = netConnect({ host: target.host, port: target.port, noDelay: true });
    } catch {
      clearTimeout(timer);
      resolve(false);
      return;
    }
    sock.on('error', onError);
    sock.on('close', onClose);
    sock.once('connect', () => {
      if (!useTls) {
        sent = true;
        sock.write(packet);
        return;
      }
      sock.write(SSL_REQUEST);
      sock.once('data', (chunk: Buffer) => {
        // Same one-byte rule as for sessions: anything else is refused, never sent in the clear.
        if (chunk.length !== 1 || chunk[0] !== 0x53) {
          finish(false);
          return;
        }
        const raw = sock;
        let secure: Socket;
        try {
          secure = tlsConnect(tlsOptions(target, raw));
        } catch {
          finish(false);
          return;
        }
        raw.removeListener('error', onError);
        raw.removeListener('close', onClose);
        sock = secure;
        secure.on('error', onError);
        secure.on('close', onClose);
        secure.once('secureConnect', () => {
          sent = true;
          secure.write(packet);
        });
      });
    });
  });
}
