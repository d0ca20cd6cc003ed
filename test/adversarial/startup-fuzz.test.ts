// Adversarial: the start-up phase is unbreakable by bad input. More than
// 100,000 random and mutated start-up packets: the bulk in-process (the pure
// parser `parseStartupParameters`, and the whole `readStartup` state machine
// over an in-memory socket, where SSLRequest is answered 'N' so many packets
// can be pipelined on one stream), and more than 10,000 over real TCP (and
// TLS) sockets against a real proxy with AUTH_TIMEOUT=2. After the storm the
// proxy still serves a real client and its heap has not grown.
//
// The generator is seeded: a failure prints its seed, and
// STAGEDOOR_FUZZ_SEED=<seed> replays the same inputs.

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import net, { type Socket } from 'node:net';
import tls from 'node:tls';
import v8 from 'node:v8';
import { monitorEventLoopDelay } from 'node:perf_hooks';
import vm from 'node:vm';
import { Duplex } from 'node:stream';
import { ClientGone, ClientReader } from '../../proxy/client-reader.js';
import { Refusal } from '../../proxy/refusals.js';
import { parseStartupParameters, readStartup, type StartupOutcome } from '../../proxy/startup.js';
import type { ProxyServer } from '../../proxy/server.js';
import { connect, startStack, type OrchestraHandle, type Stack } from '../fixtures/stack.js';
import { waitUntil } from '../fixtures/wait.js';

const SEED = Number(process.env.STAGEDOOR_FUZZ_SEED ?? (Date.now() % 2 ** 31));
const AUTH_TIMEOUT_MS = 2_000;
/** In-process cases: pure parser + readStartup state machine (90,000 together). */
const PARSER_CASES = 60_000;
const READ_STARTUP_CASES = 30_000;
/** Real-socket cases per round; two rounds (the second one is the memory check). */
const SOCKET_CASES_PER_ROUND = 7_000;
const SOCKET_CONCURRENCY = 200;
/** What a refused start-up may answer (README "Refusals"): nothing else before authentication. */
const ALLOWED_SQLSTATES = new Set(['08P01', '28000', '28P01']);

// ---------------------------------------------------------------- seeded randomness

class Rng {
  private s: number;
  constructor(seed: number) {
    this.s = seed >>> 0 || 1;
  }
  /** mulberry32 */
  next(): number {
    let t = (this.s = (this.s + 0x6d2b79f5) >>> 0);
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return (t ^ (t >>> 14)) >>> 0;
  }
  int(n: number): number {
    return n <= 0 ? 0 : this.next() % n;
  }
  range(lo: number, hi: number): number {
    return lo + this.int(hi - lo + 1);
  }
  chance(p: number): boolean {
    return this.next() / 2 ** 32 < p;
  }
  pick<T>(a: readonly T[]): T {
    return a[this.int(a.length)]!;
  }
  bytes(n: number): Buffer {
    const b = Buffer.allocUnsafe(n + 3);
    for (let i = 0; i < n; i += 4) b.writeUInt32LE(this.next(), i);
    return b.subarray(0, n);
  }
}

// ---------------------------------------------------------------- packets

const PROTOCOL_3_0 = 196608;
const SSL_REQUEST_CODE = 80877103;
const GSSENC_REQUEST_CODE = 80877104;
const CANCEL_REQUEST_CODE = 80877102;

function int32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeInt32BE(n | 0, 0);
  return b;
}
const header = (length: number, code: number): Buffer => Buffer.concat([int32(length), int32(code)]);
const sslRequest = (): Buffer => header(8, SSL_REQUEST_CODE);
const gssencRequest = (): Buffer => header(8, GSSENC_REQUEST_CODE);

type Param = readonly [string | Buffer, string | Buffer];

function paramsBody(params: readonly Param[]): Buffer {
  const parts: Buffer[] = [];
  for (const [k, v] of params) parts.push(Buffer.from(k), Buffer.from([0]), Buffer.from(v), Buffer.from([0]));
  parts.push(Buffer.from([0]));
  return Buffer.concat(parts);
}
function withHeader(body: Buffer, code = PROTOCOL_3_0): Buffer {
  return Buffer.concat([header(8 + body.length, code), body]);
}
const startupMessage = (params: readonly Param[], code = PROTOCOL_3_0): Buffer => withHeader(paramsBody(params), code);

function passwordMessage(password: Buffer | string): Buffer {
  const body = Buffer.concat([Buffer.from(password), Buffer.from([0])]);
  const h = Buffer.alloc(5);
  h[0] = 0x70;
  h.writeInt32BE(4 + body.length, 1);
  return Buffer.concat([h, body]);
}

// ---------------------------------------------------------------- generators

const USERS = ['fuzz', 'alpha', 'nosuch', '', 'FUZZ', 'fuzz\u00e9', 'a', 'x'.repeat(70), 'fuzz; drop table x'];
const OPTIONAL: Param[] = [
  ['database', 'fuzz'],
  ['database', 'postgres'],
  ['database', ''],
  ['application_name', 'psql'],
  ['options', '-c search_path=public'],
  ['client_encoding', 'UTF8'],
  ['DateStyle', 'ISO, MDY'],
  ['replication', 'false'],
  ['replication', 'database'],
  ['_pq_.compression', 'on'],
  ['_pq_.x', ''],
];

function randomParams(rng: Rng, user = rng.pick(USERS)): Param[] {
  const params: Param[] = [['user', user]];
  const seen = new Set(['user']);
  const n = rng.int(4);
  for (let i = 0; i < n; i++) {
    const p = rng.pick(OPTIONAL);
    if (seen.has(String(p[0]))) continue;
    seen.add(String(p[0]));
    params.push(p);
  }
  // a custom parameter with arbitrary (but NUL-free) bytes
  if (rng.chance(0.1)) params.push([`x${rng.int(1000)}`, Buffer.from(rng.bytes(rng.int(30)).map((x) => x || 1))]);
  // the user parameter need not come first
  if (rng.chance(0.3)) params.reverse();
  return params;
}

function validStartup(rng: Rng, user?: string): Buffer {
  const minor = rng.chance(0.1) ? rng.range(1, 0xffff) : 0;
  return startupMessage(randomParams(rng, user), (3 << 16) | minor);
}

/** A well-formed start-up of user 'fuzz' that the proxy answers with a password request (no replication). */
function benignStartup(rng: Rng): Buffer {
  const minor = rng.chance(0.1) ? rng.range(1, 0xffff) : 0;
  const params = randomParams(rng, 'fuzz').filter(([k, v]) => !(k === 'replication' && v === 'database'));
  return startupMessage(params, (3 << 16) | minor);
}

function bitflip(rng: Rng, b: Buffer, flips = rng.range(1, 8)): Buffer {
  const out = Buffer.from(b);
  for (let i = 0; i < flips && out.length > 0; i++) out[rng.int(out.length)]! ^= 1 << rng.int(8);
  return out;
}

function mutate(rng: Rng, b: Buffer): Buffer {
  switch (rng.int(7)) {
    case 0:
      return bitflip(rng, b);
    case 1:
      return b.subarray(0, rng.int(b.length + 1));
    case 2: {
      const at = rng.int(b.length + 1);
      return Buffer.concat([b.subarray(0, at), rng.bytes(rng.range(1, 16)), b.subarray(at)]);
    }
    case 3: {
      const at = rng.int(b.length);
      return Buffer.concat([b.subarray(0, at), b.subarray(at + rng.range(1, 8))]);
    }
    case 4: {
      const out = Buffer.from(b);
      for (let i = 0; i < out.length; i++) if (out[i] === 0 && rng.chance(0.5)) out[i] = 0x41;
      return out;
    }
    case 5: {
      const out = Buffer.from(b);
      for (let i = 0; i < 3 && out.length; i++) out[rng.int(out.length)] = 0;
      return out;
    }
    default:
      return Buffer.concat([b, b.subarray(rng.int(b.length))]);
  }
}

/** A start-up body (what follows the 8-byte header) for the pure parser. */
function parserInput(rng: Rng): Buffer {
  switch (rng.int(8)) {
    case 0:
      return rng.bytes(rng.int(64));
    case 1:
      return rng.bytes(rng.int(10_000));
    case 2: {
      // only NULs and a few letters: the parser's branches all live here
      const n = rng.int(40);
      const b = Buffer.alloc(n);
      for (let i = 0; i < n; i++) b[i] = rng.chance(0.4) ? 0 : rng.pick([0x61, 0x62, 0x5f]);
      return b;
    }
    case 3: {
      // duplicated parameters
      const params = randomParams(rng);
      const dup = rng.pick(params);
      params.splice(rng.int(params.length + 1), 0, [dup[0], rng.chance(0.5) ? dup[1] : 'other']);
      return paramsBody(params);
    }
    case 4: {
      // many parameters, up to the 10,000-byte packet limit
      const params: Param[] = [];
      const n = rng.range(1, 800);
      for (let i = 0; i < n; i++) params.push([`p${i}`, 'v'.repeat(rng.int(8))]);
      return paramsBody(params);
    }
    case 5:
      return paramsBody(randomParams(rng));
    default:
      return mutate(rng, paramsBody(randomParams(rng)));
  }
}

/** An independent reading of `name\0value\0 … \0`, for differential checks. */
function referenceParse(body: Buffer): { params: Map<string, string>; pqOptions: string[] } | 'malformed' {
  if (body.length === 0 || body[body.length - 1] !== 0) return 'malformed';
  const pieces: Buffer[] = [];
  let start = 0;
  for (let i = 0; i < body.length; i++) {
    if (body[i] === 0) {
      pieces.push(body.subarray(start, i));
      start = i + 1;
    }
  }
  // pieces: name, value, name, value, …, '' (the terminator as an empty name)
  const params = new Map<string, string>();
  const pqOptions: string[] = [];
  for (let i = 0; ; i += 2) {
    if (i >= pieces.length) return 'malformed';
    if (pieces[i]!.length === 0) return i === pieces.length - 1 ? { params, pqOptions } : 'malformed';
    if (i + 1 >= pieces.length) return 'malformed';
    const name = pieces[i]!.toString('utf8');
    if (name.startsWith('_pq_.')) {
      pqOptions.push(name);
      continue;
    }
    if (params.has(name)) return 'malformed';
    params.set(name, pieces[i + 1]!.toString('utf8'));
  }
}

/** A whole client stream for readStartup: possibly several pipelined packets, possibly broken. */
function streamInput(rng: Rng): Buffer {
  const parts: Buffer[] = [];
  const n = rng.range(1, 4);
  for (let i = 0; i < n; i++) {
    switch (rng.int(12)) {
      case 0:
        parts.push(sslRequest());
        break;
      case 1:
        parts.push(gssencRequest());
        break;
      case 2:
        parts.push(header(rng.pick([8, 12, 15, 16, 17, 20]), CANCEL_REQUEST_CODE), rng.bytes(8));
        break;
      case 3:
        parts.push(int32(rng.pick([2 ** 31 - 1, -1, -(2 ** 31), 0, 7, 10_001, -rng.int(2 ** 31)])), rng.bytes(rng.int(16)));
        break;
      case 4:
        parts.push(startupMessage(randomParams(rng), rng.next() | 0));
        break;
      case 5:
        parts.push(rng.bytes(rng.int(40)));
        break;
      case 6:
        parts.push(mutate(rng, validStartup(rng)));
        break;
      case 7:
        parts.push(withHeader(rng.bytes(rng.range(10_001 - 8, 12_000))));
        break;
      default:
        parts.push(validStartup(rng));
    }
  }
  const all = Buffer.concat(parts);
  return rng.chance(0.2) ? bitflip(rng, all) : all;
}

// ---------------------------------------------------------------- socket cases

type Expect = '08P01' | '28P01' | 'closed' | 'any';

interface FuzzCase {
  category: string;
  /** written on connect */
  first: Buffer;
  /** written when the proxy asks for the password (AuthenticationCleartextPassword) */
  onAuthRequest?: Buffer;
  /** after the proxy answers 'S' to an SSLRequest: plaintext garbage, or a real TLS handshake and then a case inside */
  onSslYes?: { garbage: Buffer } | { tls: FuzzCase };
  /** half-close after the last planned write (false: the client stalls) */
  end: boolean;
  /** half-close right after the first write even though an 'S' may come back */
  endEarly?: boolean;
  /** write onAuthRequest one byte per event-loop turn (many TCP segments) */
  trickle?: boolean;
  /** what this category must get (beyond the general contract) */
  expect: Expect;
}

function innerCase(rng: Rng): FuzzCase {
  for (;;) {
    const c = socketCase(rng, rng.int(1000));
    if (!c.onSslYes && c.category !== 'huge-password') return { ...c, category: `tls/${c.category}` };
  }
}

/** One generated case; `slot` (0..999) decides the category mix. */
function socketCase(rng: Rng, slot: number): FuzzCase {
  const garbage = (): Buffer => rng.bytes(rng.range(1, 200));
  if (slot < 80) return { category: 'random-bytes', first: rng.bytes(rng.range(1, rng.chance(0.1) ? 20_000 : 64)), end: true, expect: 'any' };
  if (slot < 160) {
    const full = validStartup(rng);
    return { category: 'truncated-startup', first: full.subarray(0, rng.int(full.length)), end: true, expect: 'closed' };
  }
  if (slot < 220) {
    const length = rng.pick([2 ** 31 - 1, -1, -(2 ** 31), -rng.range(1, 2 ** 30), 0, 1, 7, 10_001, 2 ** 24, 1_000_000]);
    return { category: 'huge-or-negative-length', first: Buffer.concat([int32(length), int32(PROTOCOL_3_0), rng.bytes(rng.int(32))]), end: true, expect: '08P01' };
  }
  if (slot < 280) {
    let code: number;
    do code = rng.next() | 0;
    while (code >>> 16 === 3 || code === SSL_REQUEST_CODE || code === GSSENC_REQUEST_CODE || code === CANCEL_REQUEST_CODE);
    return { category: 'bad-protocol-number', first: startupMessage(randomParams(rng), rng.chance(0.3) ? rng.pick([0x20000, 0x40000, 0x10000, 0]) : code), end: true, expect: '08P01' };
  }
  if (slot < 330) {
    const body = paramsBody(randomParams(rng));
    const noNul = Buffer.from(body.filter((x) => x !== 0));
    return { category: 'missing-nuls', first: withHeader(noNul), end: true, expect: '08P01' };
  }
  if (slot < 380) {
    const params = randomParams(rng, 'fuzz');
    const dup = rng.pick(params);
    params.push([dup[0], rng.chance(0.5) ? dup[1] : 'again']);
    const isPq = String(dup[0]).startsWith('_pq_.');
    return { category: 'duplicated-parameter', first: startupMessage(params), end: true, expect: isPq ? 'any' : '08P01' };
  }
  if (slot < 385) {
    // 1 MB "password": AuthenticationCleartextPassword answered with a 'p' of length 1,000,005
    const big = Buffer.alloc(1_000_006, 0x61);
    big[0] = 0x70;
    big.writeInt32BE(1_000_005, 1);
    big[big.length - 1] = 0;
    return { category: 'huge-password', first: startupMessage([['user', 'fuzz']]), onAuthRequest: big, end: true, expect: 'any' };
  }
  if (slot < 420) return { category: 'ssl-request-twice-pipelined', first: Buffer.concat([sslRequest(), sslRequest()]), end: true, expect: '08P01' };
  if (slot < 450) return { category: 'ssl-request-then-plaintext-startup', first: Buffer.concat([sslRequest(), benignStartup(rng)]), end: true, expect: '08P01' };
  if (slot < 500) {
    const tlsLike = rng.chance(0.5) ? Buffer.concat([Buffer.from([0x16, 0x03, rng.int(4)]), int32(rng.next()).subarray(2), garbage()]) : garbage();
    return { category: 'ssl-request-then-tls-garbage', first: sslRequest(), onSslYes: { garbage: tlsLike }, end: true, expect: 'closed' };
  }
  if (slot < 520) return { category: 'ssl-request-then-second-ssl-request', first: sslRequest(), onSslYes: { garbage: sslRequest() }, end: true, expect: 'closed' };
  if (slot < 550) return { category: 'gssenc-request-twice', first: Buffer.concat([gssencRequest(), gssencRequest()]), end: true, expect: '08P01' };
  if (slot < 570) return { category: 'gssenc-then-ssl-then-garbage', first: Buffer.concat([gssencRequest(), sslRequest()]), onSslYes: { garbage: garbage() }, end: true, expect: 'closed' };
  if (slot < 610) {
    const len = rng.pick([8, 9, 12, 15, 17, 20, 24, 100, 10_001]);
    return { category: 'cancel-request-wrong-length', first: Buffer.concat([header(len, CANCEL_REQUEST_CODE), rng.bytes(Math.min(Math.max(len - 8, 0), 64))]), end: true, expect: '08P01' };
  }
  if (slot < 625) return { category: 'cancel-request-unknown-key', first: Buffer.concat([header(16, CANCEL_REQUEST_CODE), rng.bytes(8)]), end: false, expect: 'closed' };
  if (slot < 715) {
    const flipped = bitflip(rng, validStartup(rng, 'fuzz'));
    const pipelined = rng.chance(0.5);
    const pw = rng.chance(0.5) ? passwordMessage(rng.bytes(rng.int(40)).toString('base64url')) : garbage();
    return { category: 'bit-flipped-startup', first: pipelined ? Buffer.concat([flipped, pw]) : flipped, onAuthRequest: pipelined ? undefined : pw, end: true, expect: 'any' };
  }
  if (slot < 775) {
    const pipelined = rng.chance(0.5);
    // at least a message header's worth: fewer bytes and a FIN is a client gone, not a bad packet
    const g = rng.bytes(rng.range(5, 200));
    // garbage that happens to start with 'p' may be a syntactically valid password: 28P01 then
    return { category: 'startup-then-garbage-instead-of-password', first: pipelined ? Buffer.concat([benignStartup(rng), g]) : benignStartup(rng), onAuthRequest: pipelined ? undefined : g, end: true, expect: g[0] === 0x70 ? 'any' : '08P01' };
  }
  if (slot < 815) {
    const bad = rng.pick([
      Buffer.concat([Buffer.from('p'), int32(rng.pick([0, 1, 3, 4, -1, -(2 ** 31), 8_193, 2 ** 31 - 1]))]),
      Buffer.concat([Buffer.from('p'), int32(4 + 5), Buffer.from('abcde')]), // not NUL-terminated
      Buffer.concat([Buffer.from('p'), int32(4 + 6), Buffer.from('ab\0cd\0')]), // NUL inside
    ]);
    return { category: 'malformed-password-message', first: benignStartup(rng), onAuthRequest: bad, end: true, expect: '08P01' };
  }
  if (slot < 850) {
    // a password message trickled in one byte at a time
    return { category: 'startup-then-trickled-random-token', first: benignStartup(rng), onAuthRequest: passwordMessage(rng.bytes(rng.range(1, 40)).toString('base64url')), trickle: true, end: true, expect: '28P01' };
  }
  if (slot < 865) {
    const token = rng.pick([rng.bytes(rng.int(300)).toString('base64url'), `${rng.bytes(20).toString('base64url')}.${rng.bytes(40).toString('base64url')}.${rng.bytes(64).toString('base64url')}`, '', 'eyJhbGciOiJub25lIn0.e30.']);
    return { category: 'startup-then-random-token', first: benignStartup(rng), onAuthRequest: passwordMessage(token), end: true, expect: '28P01' };
  }
  if (slot < 880) {
    const body = rng.bytes(rng.range(10_001 - 8, 12_000));
    return { category: 'oversized-startup-packet', first: withHeader(body), end: true, expect: '08P01' };
  }
  if (slot < 885) {
    // TLS without an SSLRequest (libpq's sslnegotiation=direct): a handshake record read as a length is huge
    return { category: 'direct-tls-client-hello', first: Buffer.concat([Buffer.from([0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03]), rng.bytes(64)]), end: true, expect: '08P01' };
  }
  if (slot < 895) return { category: 'connect-and-close', first: Buffer.alloc(0), end: true, expect: 'closed' };
  if (slot < 910) {
    // no FIN: the proxy has to end these itself at AUTH_TIMEOUT
    const full = benignStartup(rng);
    const which = rng.int(3);
    const first = which === 0 ? full.subarray(0, rng.int(full.length)) : which === 1 ? full : Buffer.alloc(0);
    return { category: 'stalled-without-fin', first, end: false, expect: '08P01' };
  }
  if (slot < 960) return { category: 'ssl-request-then-tls-then-fuzz', first: sslRequest(), onSslYes: { tls: innerCase(rng) }, end: true, expect: 'any' };
  // may hold SSLRequests: an 'S' is then a correct answer, and the client has already half-closed
  return { category: 'mutated-stream', first: streamInput(rng), onSslYes: { garbage: Buffer.alloc(0) }, end: true, endEarly: true, expect: 'any' };
}

interface SocketOutcome {
  category: string;
  expect: Expect;
  sqlstate: string | null;
  /** the proxy's accept → close: the span AUTH_TIMEOUT bounds */
  closedMs: number;
  /** connect → close as the client saw it (adds the time the connection waited in the listen queue) */
  clientMs: number;
  violation: string | null;
}

/**
 * When the proxy accepted each connection, by client port. Under a 200-wide storm in one process a
 * completed TCP handshake can wait in the listen queue for most of a second before the proxy's event
 * loop accepts it, and the proxy's auth clock starts at accept: that is the span the contract bounds.
 */
const acceptedAt = new Map<number, number>();

/** Plays one case against the proxy and reports what came back and when the proxy closed. */
function playCase(port: number, c: FuzzCase, hardTimeoutMs: number): Promise<SocketOutcome> {
  return new Promise((resolve) => {
    let connectedAt = performance.now();
    let localPort = -1;
    let sqlstate: string | null = null;
    let violation: string | null = null;
    let expect = c.expect;
    let category = c.category;
    let done = false;
    let inner: tls.TLSSocket | null = null;
    const s = net.connect({ port, host: '127.0.0.1' });
    const finish = (): void => {
      if (done) return;
      done = true;
      clearTimeout(hard);
      const closedAt = performance.now();
      const accepted = acceptedAt.get(localPort);
      acceptedAt.delete(localPort);
      resolve({ category, expect, sqlstate, closedMs: closedAt - (accepted ?? connectedAt), clientMs: closedAt - connectedAt, violation });
    };
    const hard = setTimeout(() => {
      violation ??= `still open after ${hardTimeoutMs} ms`;
      inner?.destroy();
      s.destroy();
    }, hardTimeoutMs);
    s.on('error', () => {});
    s.on('close', finish);

    /** Frames what the proxy sent; `plain` allows the single-byte 'S'/'N' answers. */
    const reader = (current: FuzzCase, out: Socket, plain: boolean): ((chunk: Buffer) => void) => {
      let buf: Buffer = Buffer.alloc(0);
      let answeredAuth = false;
      let stopped = false;
      return (chunk) => {
        if (stopped) return;
        buf = buf.length ? Buffer.concat([buf, chunk]) : chunk;
        let pos = 0;
        while (pos < buf.length && !stopped) {
          const type = buf[pos]!;
          if (plain && (type === 0x53 || type === 0x4e)) {
            pos++;
            if (type === 0x53) {
              // 'S': the proxy starts TLS; what follows is no longer plaintext protocol
              stopped = true;
              onSslYes(current);
            }
            continue;
          }
          if (buf.length - pos < 5) break;
          const len = buf.readInt32BE(pos + 1);
          if (len < 4 || len > 65_536) {
            violation ??= `unframed bytes from the proxy (type ${type}, length ${len})`;
            stopped = true;
            break;
          }
          if (buf.length - pos < 1 + len) break;
          const body = buf.subarray(pos + 5, pos + 1 + len);
          pos += 1 + len;
          if (type === 0x45 /* E */) sqlstate = errorField(body, 'C') ?? 'E-without-C';
          else if (type === 0x76 /* v */) continue;
          else if (type === 0x52 /* R */) {
            const code = body.readInt32BE(0);
            if (code !== 3) violation ??= `authentication message ${code} (only cleartext password 3 may be asked; 0 would be AuthenticationOk)`;
            else if (!answeredAuth) {
              answeredAuth = true;
              const answer = current.onAuthRequest;
              if (answer && current.trickle) {
                void (async () => {
                  for (let i = 0; i < answer.length && !out.destroyed; i++) {
                    out.write(answer.subarray(i, i + 1), () => {});
                    await new Promise((r) => setImmediate(r));
                  }
                  if (current.end) out.end();
                })();
              } else if (answer) {
                out.write(answer, () => {});
                if (current.end) out.end();
              }
            }
          } else violation ??= `unexpected message '${String.fromCharCode(type)}' before authentication`;
        }
        buf = buf.subarray(pos);
      };
    };

    const onSslYes = (current: FuzzCase): void => {
      const next = current.onSslYes;
      if (!next) {
        violation ??= "'S' answered to a packet that was not an SSLRequest";
        return;
      }
      if ('garbage' in next) {
        if (next.garbage.length) s.write(next.garbage, () => {});
        if (current.end) s.end();
        return;
      }
      s.removeAllListeners('data');
      category = next.tls.category;
      expect = next.tls.expect === 'closed' ? 'closed' : 'any';
      inner = tls.connect({ socket: s, rejectUnauthorized: false });
      inner.on('error', () => {});
      inner.on('secureConnect', () => {
        inner!.write(next.tls.first, () => {});
        if (next.tls.end && !next.tls.onAuthRequest) inner!.end();
      });
      inner.on('data', reader(next.tls, inner, false));
    };

    s.on('connect', () => {
      connectedAt = performance.now();
      localPort = s.localPort ?? -1;
      if (c.first.length) s.write(c.first, () => {});
      if (c.endEarly || (c.end && !c.onAuthRequest && !c.onSslYes)) s.end();
    });
    s.on('data', reader(c, s, true));
  });
}

function errorField(body: Buffer, code: string): string | null {
  let pos = 0;
  while (pos < body.length && body[pos] !== 0) {
    const field = String.fromCharCode(body[pos]!);
    const end = body.indexOf(0, pos + 1);
    if (end < 0) return null;
    if (field === code) return body.toString('utf8', pos + 1, end);
    pos = end + 1;
  }
  return null;
}

async function pool<T, R>(items: readonly T[], concurrency: number, fn: (item: T) => Promise<R>): Promise<R[]> {
  const results: R[] = new Array(items.length);
  let next = 0;
  const worker = async (): Promise<void> => {
    while (next < items.length) {
      const i = next++;
      results[i] = await fn(items[i]!);
    }
  };
  await Promise.all(Array.from({ length: Math.min(concurrency, items.length) }, worker));
  return results;
}

// ---------------------------------------------------------------- memory

v8.setFlagsFromString('--expose-gc');
const gc = vm.runInNewContext('gc') as () => void;
function heapAfterGc(): { heapUsed: number; rss: number } {
  gc();
  gc();
  const m = process.memoryUsage();
  return { heapUsed: m.heapUsed, rss: m.rss };
}
const mb = (n: number): string => `${(n / 1024 / 1024).toFixed(1)} MB`;

// ---------------------------------------------------------------- the tests

let stack: Stack;
let fuzz: OrchestraHandle;
let proxy: ProxyServer;
let port: number;

before(async () => {
  stack = await startStack();
  fuzz = await stack.createOrchestra('fuzz');
  ({ proxy, port } = await stack.startProxy({ AUTH_TIMEOUT: String(AUTH_TIMEOUT_MS / 1000) }));
});
after(async () => {
  await stack?.stop();
});

describe('start-up fuzzing: no input breaks the proxy', () => {
  test(`parseStartupParameters answers ${PARSER_CASES} random and mutated bodies with parameters or an 08P01 refusal, agreeing with an independent reading`, { timeout: 30_000 }, (t) => {
    t.diagnostic(`seed ${SEED}: replay with STAGEDOOR_FUZZ_SEED=${SEED}`);
    const rng = new Rng(SEED);
    const failures: string[] = [];
    let accepted = 0;
    const started = performance.now();
    for (let i = 0; i < PARSER_CASES; i++) {
      const body = parserInput(rng);
      const expected = referenceParse(body);
      let got: ReturnType<typeof parseStartupParameters> | 'malformed';
      try {
        got = parseStartupParameters(body);
        accepted++;
      } catch (e) {
        if (!(e instanceof Refusal) || e.reason !== 'malformed_packet' || e.sqlstate !== '08P01') {
          failures.push(`case ${i}: threw ${String(e)} for ${body.toString('hex').slice(0, 80)}`);
          continue;
        }
        got = 'malformed';
      }
      const same =
        got === 'malformed' || expected === 'malformed'
          ? got === expected
          : JSON.stringify([...got.params]) === JSON.stringify([...expected.params]) && JSON.stringify(got.pqOptions) === JSON.stringify(expected.pqOptions);
      if (!same) failures.push(`case ${i}: parser ${got === 'malformed' ? 'refused' : 'accepted'}, reference ${expected === 'malformed' ? 'refuses' : 'accepts'}: ${body.toString('hex').slice(0, 120)}`);
      if (failures.length > 20) break;
    }
    const ms = performance.now() - started;
    t.diagnostic(`parser: ${PARSER_CASES} bodies in ${ms.toFixed(0)} ms (${Math.round(PARSER_CASES / (ms / 1000))}/s), ${accepted} accepted, ${PARSER_CASES - accepted} refused with 08P01`);
    assert.deepEqual(failures, []);
  });

  test(`readStartup answers ${READ_STARTUP_CASES} pipelined, broken and random client streams with a start-up, a cancel, an 08P01 refusal or "client gone", and writes nothing but 'N' and NegotiateProtocolVersion`, { timeout: 60_000 }, async (t) => {
    const rng = new Rng(SEED ^ 0x5bd1e995);
    const failures: string[] = [];
    const tally = new Map<string, number>();
    const started = performance.now();
    for (let i = 0; i < READ_STARTUP_CASES && failures.length <= 20; i++) {
      const input = streamInput(rng);
      const written: Buffer[] = [];
      const sock = new Duplex({
        read() {},
        write(chunk: Buffer, _enc, cb) {
          written.push(Buffer.from(chunk));
          cb();
        },
      });
      sock.on('error', () => {});
      const reader = new ClientReader(sock as unknown as Socket, 128 * 1024);
      const outcome = readStartup(reader, { secureContext: undefined });
      // the whole stream arrives, in one or several chunks, then the client half-closes
      let at = 0;
      while (at < input.length) {
        const n = rng.chance(0.7) ? input.length - at : rng.range(1, input.length - at);
        sock.push(input.subarray(at, at + n));
        at += n;
      }
      sock.push(null);
      let hung: NodeJS.Timeout | undefined;
      const settled = await Promise.race([
        outcome.then(
          (o: StartupOutcome) => ({ ok: o }),
          (e: unknown) => ({ err: e }),
        ),
        new Promise<{ hang: true }>((r) => (hung = setTimeout(() => r({ hang: true }), 2_000))),
      ]);
      clearTimeout(hung);
      sock.destroy();
      let label: string;
      if ('hang' in settled) {
        failures.push(`case ${i}: readStartup neither returned nor threw after the client's stream ended: ${input.toString('hex').slice(0, 120)}`);
        continue;
      } else if ('ok' in settled) {
        label = settled.ok.kind;
        if (settled.ok.kind === 'startup') {
          for (const [k, v] of settled.ok.params) if (k.includes('\0') || v.includes('\0')) failures.push(`case ${i}: NUL inside a parameter`);
          if (settled.ok.tls) failures.push(`case ${i}: tls without a secure context`);
        }
      } else if (settled.err instanceof Refusal) {
        label = settled.err.reason;
        if (settled.err.sqlstate !== '08P01') failures.push(`case ${i}: refusal ${settled.err.reason} with ${settled.err.sqlstate}`);
      } else if (settled.err instanceof ClientGone) {
        label = 'client_gone';
      } else {
        failures.push(`case ${i}: unexpected ${String(settled.err)} for ${input.toString('hex').slice(0, 120)}`);
        continue;
      }
      tally.set(label, (tally.get(label) ?? 0) + 1);
      // What the proxy may write during start-up: 'N' (SSL/GSSENC declined) and NegotiateProtocolVersion.
      const out = Buffer.concat(written);
      for (let p = 0; p < out.length; ) {
        if (out[p] === 0x4e) {
          p++;
          continue;
        }
        if (out[p] === 0x76 && out.length - p >= 5) {
          p += 1 + out.readInt32BE(p + 1);
          continue;
        }
        failures.push(`case ${i}: wrote ${out.toString('hex').slice(p * 2, p * 2 + 40)} during start-up`);
        break;
      }
    }
    const ms = performance.now() - started;
    t.diagnostic(`readStartup: ${READ_STARTUP_CASES} streams in ${ms.toFixed(0)} ms (${Math.round(READ_STARTUP_CASES / (ms / 1000))}/s): ${JSON.stringify(Object.fromEntries([...tally].sort()))}`);
    assert.deepEqual(failures, []);
  });

  const rounds: Array<{ outcomes: SocketOutcome[]; heap: { heapUsed: number; rss: number }; ms: number }> = [];
  let baseline: { heapUsed: number; rss: number };

  const socketRound = async (round: number): Promise<void> => {
    const rng = new Rng(SEED + 7919 * round);
    const cases = Array.from({ length: SOCKET_CASES_PER_ROUND }, (_, i) => socketCase(rng, i % 1000));
    const started = performance.now();
    const outcomes = await pool(cases, SOCKET_CONCURRENCY, (c) => playCase(port, c, AUTH_TIMEOUT_MS + 3_000));
    const ms = performance.now() - started;
    // every server-side socket is gone and the audit records have left the proxy
    const internals = proxy as unknown as { sockets: Set<unknown>; audit: { pending: number; flush(): Promise<void> } };
    for (let i = 0; i < 100 && (internals.sockets.size > 0 || internals.audit.pending > 0); i++) {
      await internals.audit.flush();
      await new Promise((r) => setTimeout(r, 50));
    }
    assert.equal(internals.sockets.size, 0, 'every fuzzed connection is closed on the proxy side');
    rounds.push({ outcomes, heap: heapAfterGc(), ms });
  };

  test(`over real sockets (AUTH_TIMEOUT=2), ${2 * SOCKET_CASES_PER_ROUND} connections in two rounds, ${SOCKET_CONCURRENCY} at a time, each get an ErrorResponse 08P01/28000/28P01 or a close, within the auth timeout + 1 s`, { timeout: 120_000 }, async (t) => {
    (proxy as unknown as { server: net.Server }).server.on('connection', (sock: Socket) => acceptedAt.set(sock.remotePort ?? -2, performance.now()));
    baseline = heapAfterGc();
    const lag = monitorEventLoopDelay({ resolution: 10 });
    lag.enable();
    await socketRound(1);
    await socketRound(2);
    lag.disable();
    const all = rounds.flatMap((r) => r.outcomes);
    const failures: string[] = [];
    const byCategory = new Map<string, { n: number; states: Map<string, number>; maxMs: number }>();
    for (const o of all) {
      const entry = byCategory.get(o.category) ?? { n: 0, states: new Map(), maxMs: 0 };
      entry.n++;
      const state = o.sqlstate ?? 'closed';
      entry.states.set(state, (entry.states.get(state) ?? 0) + 1);
      entry.maxMs = Math.max(entry.maxMs, o.closedMs);
      byCategory.set(o.category, entry);
      if (o.violation) failures.push(`${o.category}: ${o.violation}`);
      else if (o.sqlstate !== null && !ALLOWED_SQLSTATES.has(o.sqlstate)) failures.push(`${o.category}: SQLSTATE ${o.sqlstate}`);
      else if (o.closedMs > AUTH_TIMEOUT_MS + 1_000) failures.push(`${o.category}: closed after ${o.closedMs.toFixed(0)} ms`);
      else if (o.expect === 'closed' && o.sqlstate !== null) failures.push(`${o.category}: expected a silent close, got ${o.sqlstate}`);
      else if ((o.expect === '08P01' || o.expect === '28P01') && o.sqlstate !== o.expect) failures.push(`${o.category}: expected ${o.expect}, got ${o.sqlstate ?? 'a close without ErrorResponse'}`);
    }
    const maxMs = Math.max(...all.map((o) => o.closedMs));
    const ms = rounds.reduce((a, r) => a + r.ms, 0);
    const sorted = all.map((o) => o.closedMs).sort((a, b) => a - b);
    const pct = (p: number): string => sorted[Math.min(sorted.length - 1, Math.floor(p * sorted.length))]!.toFixed(0);
    const maxClientMs = Math.max(...all.map((o) => o.clientMs));
    t.diagnostic(`sockets: ${all.length} connections in ${(ms / 1000).toFixed(1)} s (${Math.round(all.length / (ms / 1000))}/s); accept → close p50 ${pct(0.5)} ms, p99 ${pct(0.99)} ms, slowest ${maxMs.toFixed(0)} ms (client connect → close slowest ${maxClientMs.toFixed(0)} ms); event-loop delay p99 ${(lag.percentile(99) / 1e6).toFixed(0)} ms, max ${(lag.max / 1e6).toFixed(0)} ms`);
    for (const [cat, e] of [...byCategory].sort()) t.diagnostic(`  ${cat}: ${e.n} → ${JSON.stringify(Object.fromEntries(e.states))}, slowest ${e.maxMs.toFixed(0)} ms`);
    const unique = [...new Set(failures)];
    assert.deepEqual(unique.slice(0, 30), [], `${failures.length} contract violations`);
    assert.ok(maxMs <= AUTH_TIMEOUT_MS + 1_000, `slowest close ${maxMs.toFixed(0)} ms`);
  });

  test('memory stays flat: the heap after the second round is within 50 MB of the first', (t) => {
    assert.equal(rounds.length, 2, 'both socket rounds ran');
    const [r1, r2] = rounds as [(typeof rounds)[0], (typeof rounds)[0]];
    t.diagnostic(`heapUsed: before ${mb(baseline.heapUsed)}, after round 1 ${mb(r1.heap.heapUsed)}, after round 2 ${mb(r2.heap.heapUsed)}; rss: before ${mb(baseline.rss)}, after ${mb(r1.heap.rss)} / ${mb(r2.heap.rss)}`);
    assert.ok(r2.heap.heapUsed - r1.heap.heapUsed < 50 * 1024 * 1024, `heap grew ${mb(r2.heap.heapUsed - r1.heap.heapUsed)} between rounds`);
    assert.ok(r2.heap.heapUsed - baseline.heapUsed < 100 * 1024 * 1024, `heap grew ${mb(r2.heap.heapUsed - baseline.heapUsed)} over the storm`);
  });

  test('after the storm no fuzzed input became a session, and both proxies are up: a real client connects and queries through each', async () => {
    assert.equal(proxy.live.size, 0, 'no live session came out of the fuzz');
    for (const p of [port, stack.proxyPort]) {
      const c = await connect({ ...stack.clientConfig(fuzz), port: p });
      try {
        assert.equal((await c.query('select 40 + 2 as answer')).rows[0].answer, 42);
      } finally {
        await c.end();
      }
    }
  });

  test('after authentication, 300 sessions that send garbage frames (random, negative or huge lengths, unknown types, cut messages, Terminate then garbage, 1,000 Syncs) all end, leave no session behind, and the next client gets a clean upstream', { timeout: 60_000 }, async (t) => {
    const rng = new Rng(SEED ^ 0x2545f491);
    const frame = (type: string, body: Buffer, length = 4 + body.length): Buffer => Buffer.concat([Buffer.from(type, 'latin1'), int32(length), body]);
    const kinds: Array<[string, () => Buffer]> = [
      ['random-bytes', () => rng.bytes(rng.range(1, 500))],
      ['negative-length', () => frame('Q', Buffer.from('select 1\0'), -rng.range(1, 2 ** 30))],
      ['huge-length', () => frame('Q', rng.bytes(64), 2 ** 31 - 1)],
      ['unknown-message-type', () => frame(String.fromCharCode(rng.pick([0x00, 0x5a, 0x7f, 0xff, 0x41])), rng.bytes(rng.int(16)))],
      ['cut-message-then-fin', () => frame('Q', Buffer.from('select 1\0'), 100)],
      ['terminate-then-garbage', () => Buffer.concat([frame('X', Buffer.alloc(0)), rng.bytes(rng.range(1, 100))])],
      ['query-then-terminate', () => Buffer.concat([frame('Q', Buffer.from('select pg_sleep(0.05)\0')), frame('X', Buffer.alloc(0))])],
      ['thousand-syncs-then-terminate', () => Buffer.concat([...Array.from({ length: 1000 }, () => frame('S', Buffer.alloc(0))), frame('X', Buffer.alloc(0))])],
      ['open-transaction-then-terminate', () => Buffer.concat([frame('Q', Buffer.from("begin; set local search_path = pg_catalog; create temp table poison (x int)\0")), frame('X', Buffer.alloc(0))])],
    ];
    const hello = Buffer.concat([startupMessage([['user', 'fuzz'], ['database', 'fuzz']]), passwordMessage(fuzz.token)]);
    const sessions = Array.from({ length: 300 }, (_, i) => kinds[i % kinds.length]!);
    const outcome = new Map<string, Map<string, number>>();
    const stuck: string[] = [];
    await pool(sessions, 30, ([kind, make]) =>
      new Promise<void>((resolve) => {
        const s = net.connect({ port, host: '127.0.0.1' }, () => s.write(hello));
        let buf: Buffer = Buffer.alloc(0);
        let ready = false;
        let sqlstate: string | null = null;
        const note = (what: string): void => {
          const m = outcome.get(kind) ?? new Map<string, number>();
          m.set(what, (m.get(what) ?? 0) + 1);
          outcome.set(kind, m);
        };
        const hard = setTimeout(() => {
          stuck.push(kind);
          s.destroy();
        }, 5_000);
        s.on('error', () => {});
        s.on('close', () => {
          clearTimeout(hard);
          note(ready ? (sqlstate ?? 'closed') : `never ready: ${sqlstate ?? 'closed'}`);
          resolve();
        });
        s.on('data', (d: Buffer) => {
          buf = Buffer.concat([buf, d]);
          for (let pos = 0; buf.length - pos >= 5; ) {
            const len = buf.readInt32BE(pos + 1);
            if (buf.length - pos < 1 + len) {
              buf = buf.subarray(pos);
              return;
            }
            if (buf[pos] === 0x45) sqlstate = errorField(buf.subarray(pos + 5, pos + 1 + len), 'C');
            if (buf[pos] === 0x5a && !ready) {
              ready = true;
              s.write(make(), () => {});
              // a client that never closes its side would only measure Postgres' patience
              setTimeout(() => s.end(), 100);
            }
            pos += 1 + len;
            if (pos === buf.length) buf = Buffer.alloc(0);
          }
        });
      }),
    );
    for (const [kind, m] of outcome) t.diagnostic(`  ${kind}: ${JSON.stringify(Object.fromEntries(m))}`);
    assert.deepEqual(stuck, [], 'every session ended');
    for (const [kind, m] of outcome) assert.ok(![...m.keys()].some((k) => k.startsWith('never ready')), `${kind}: a valid token did not get a session: ${JSON.stringify(Object.fromEntries(m))}`);
    assert.ok(await waitUntil(() => proxy.live.size === 0, 5_000), `${proxy.live.size} sessions left on the proxy`);
    // the next clients get clean upstreams (reused or not): no open transaction, no temp table, default search_path
    for (let i = 0; i < 10; i++) {
      const c = await connect({ ...stack.clientConfig(fuzz), port });
      try {
        const r = await c.query("select current_setting('search_path') as sp, (select count(*)::int from pg_class where relname = 'poison') as poison, now() = statement_timestamp() as fresh_xact");
        assert.deepEqual(r.rows[0], { sp: '"$user", public', poison: 0, fresh_xact: true });
      } finally {
        await c.end();
      }
    }
  });
});
