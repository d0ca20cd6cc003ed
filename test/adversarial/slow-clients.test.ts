// Adversarial: slow and silent clients (slowloris). A thousand sockets that
// connect and never finish start-up cost the proxy nothing but a timer each:
// a good client meanwhile connects and queries with normal latency, and the
// proxy itself closes every stalled socket at AUTH_TIMEOUT (2 s here).

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import net from 'node:net';
import tls from 'node:tls';
import type { ProxyServer } from '../../proxy/server.js';
import { connect, startStack, type OrchestraHandle, type Stack } from '../fixtures/stack.js';
import { waitUntil } from '../fixtures/wait.js';

const AUTH_TIMEOUT_MS = 2_000;
/** Two file descriptors per stalled connection live in this process (client end and proxy end), plus TLS and Postgres. */
const WANTED_SOCKETS = 1_000;
const FD_LIMIT = (() => {
  try {
    return Number(execFileSync('sh', ['-c', 'ulimit -n'], { encoding: 'utf8' }).trim()) || 1024;
  } catch {
    return 1024;
  }
})();
/** Scaled down only when `ulimit -n` cannot hold 1,000 × 2 ends with room to spare (~4,500). */
const SOCKETS = FD_LIMIT >= 4_500 ? WANTED_SOCKETS : Math.max(100, Math.floor((FD_LIMIT - 500) / 4));

const PROTOCOL_3_0 = 196608;
const SSL_REQUEST_CODE = 80877103;

function int32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeInt32BE(n, 0);
  return b;
}
function startupMessage(params: Record<string, string>): Buffer {
  const body = Buffer.concat([...Object.entries(params).map(([k, v]) => Buffer.from(`${k}\0${v}\0`)), Buffer.from([0])]);
  return Buffer.concat([int32(8 + body.length), int32(PROTOCOL_3_0), body]);
}
const sslRequest = (): Buffer => Buffer.concat([int32(8), int32(SSL_REQUEST_CODE)]);

type Stall =
  | 'nothing' // connects and sends no byte
  | 'half-header' // two of the four length bytes
  | 'partial-startup' // most of a StartupMessage
  | 'startup-no-password' // a complete StartupMessage, never a password
  | 'ssl-then-silence' // SSLRequest, proxy says 'S', the client never starts the handshake
  | 'ssl-then-partial-client-hello' // SSLRequest, 'S', then the first bytes of a TLS record
  | 'ssl-then-client-hello-then-silence' // SSLRequest, 'S', a whole ClientHello, then never the client's Finished
  | 'tls-then-silence'; // full TLS handshake, then no StartupMessage

const MIX: Array<[Stall, number]> = [
  ['nothing', 0.15],
  ['half-header', 0.15],
  ['ssl-then-client-hello-then-silence', 0.1],
  ['partial-startup', 0.1],
  ['startup-no-password', 0.15],
  ['ssl-then-silence', 0.15],
  ['ssl-then-partial-client-hello', 0.1],
  ['tls-then-silence', 0.1],
];

/** When the proxy accepted each connection (its auth clock starts there), by client port. */
const acceptedAt = new Map<number, number>();

interface Stalled {
  kind: Stall;
  connectedAt: number;
  /** ms from the proxy's accept to the proxy closing the socket; null while open */
  closedAfter: number | null;
  /** ms from the client's connect to the close (adds any wait in the listen queue) */
  clientMs: number | null;
  /** SQLSTATE of an ErrorResponse the proxy sent before closing, if any */
  sqlstate: string | null;
  destroy(): void;
}


/** A real ClientHello, captured once from Node's TLS client against a socket that never answers. */
let clientHello: Buffer;
async function captureClientHello(): Promise<Buffer> {
  const server = net.createServer();
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  try {
    return await new Promise<Buffer>((resolve, reject) => {
      server.once('connection', (sock) => sock.once('data', (d: Buffer) => {
        resolve(d);
        sock.destroy();
      }));
      const c = tls.connect({ host: '127.0.0.1', port: (server.address() as net.AddressInfo).port, rejectUnauthorized: false });
      c.on('error', () => {});
      setTimeout(() => reject(new Error('no ClientHello')), 5_000).unref();
    });
  } finally {
    server.close();
  }
}

/** Opens one stalled connection; resolves once it is in its stalled state. */
function openStalled(port: number, kind: Stall): Promise<Stalled> {
  return new Promise((resolve, reject) => {
    const s = net.connect({ port, host: '127.0.0.1' });
    let inner: tls.TLSSocket | null = null;
    let plain = Buffer.alloc(0);
    const st: Stalled = {
      kind,
      connectedAt: 0,
      closedAfter: null,
      clientMs: null,
      sqlstate: null,
      destroy: () => {
        inner?.destroy();
        s.destroy();
      },
    };
    const collect = (chunk: Buffer): void => {
      plain = Buffer.concat([plain, chunk]);
      const e = plain.indexOf(0x45);
      if (e >= 0) {
        const m = /C(\w{5})\0/.exec(plain.subarray(e).toString('latin1'));
        if (m) st.sqlstate = m[1]!;
      }
    };
    s.on('error', () => {});
    let localPort = -1;
    s.on('close', () => {
      const now = performance.now();
      st.closedAfter = now - (acceptedAt.get(localPort) ?? st.connectedAt);
      st.clientMs = now - st.connectedAt;
      reject(new Error(`${kind}: closed before it was stalled`));
    });
    s.on('connect', () => {
      st.connectedAt = performance.now();
      localPort = s.localPort ?? -1;
      switch (kind) {
        case 'nothing':
          // it reads (or it could never notice the close), it just never writes
          s.on('data', collect);
          return resolve(st);
        case 'half-header':
          s.write(Buffer.from([0, 0]));
          s.on('data', collect);
          return resolve(st);
        case 'partial-startup': {
          const full = startupMessage({ user: 'tortoise', database: 'tortoise' });
          s.write(full.subarray(0, full.length - 3));
          s.on('data', collect);
          return resolve(st);
        }
        case 'startup-no-password':
          s.write(startupMessage({ user: 'tortoise', database: 'tortoise' }));
          s.once('data', (d) => {
            // AuthenticationCleartextPassword (9 bytes): from here the client says nothing
            if (d[0] !== 0x52) reject(new Error(`expected a password request, got ${d.toString('hex')}`));
            // a starved event loop may read the request and the proxy's final answer together
            if (d.length > 9) collect(d.subarray(9));
            s.on('data', collect);
            resolve(st);
          });
          return;
        default:
          s.write(sslRequest());
          s.once('data', (d) => {
            if (d.toString('latin1') !== 'S') return reject(new Error(`expected 'S', got ${d.toString('hex')}`));
            if (kind === 'ssl-then-silence') return resolve(st);
            if (kind === 'ssl-then-client-hello-then-silence') {
              s.write(clientHello);
              // the proxy answers with its ServerHello (and, in TLS 1.3, its Finished); we never answer back
              s.on('data', () => {});
              return resolve(st);
            }
            if (kind === 'ssl-then-partial-client-hello') {
              // a TLS handshake record header announcing 512 bytes, and 10 of them
              s.write(Buffer.from([0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03, 0, 0, 0, 0]));
              return resolve(st);
            }
            inner = tls.connect({ socket: s, rejectUnauthorized: false });
            inner.on('error', () => {});
            inner.on('data', collect);
            inner.once('secureConnect', () => resolve(st));
          });
      }
    });
  });
}

let stack: Stack;
let good: OrchestraHandle;
let port: number;
let proxy: ProxyServer;

before(async () => {
  clientHello = await captureClientHello();
  stack = await startStack();
  good = await stack.createOrchestra('tortoise');
  const started = await stack.startProxy({ AUTH_TIMEOUT: String(AUTH_TIMEOUT_MS / 1000) });
  port = started.port;
  proxy = started.proxy;
  (started.proxy as unknown as { server: net.Server }).server.on('connection', (sock: net.Socket) => acceptedAt.set(sock.remotePort ?? -2, performance.now()));
});
after(async () => {
  await stack?.stop();
});

describe(`${SOCKETS} slow clients that never finish start-up (ulimit -n ${FD_LIMIT})`, () => {
  const stalled: Stalled[] = [];

  test(`${SOCKETS} sockets stall in every start-up state at once`, { timeout: 30_000 }, async (t) => {
    const kinds: Stall[] = [];
    for (const [kind, share] of MIX) for (let i = 0; i < Math.round(share * SOCKETS); i++) kinds.push(kind);
    while (kinds.length < SOCKETS) kinds.push('nothing');
    kinds.length = SOCKETS;
    // open in batches of 100: a burst of 1,000 SYNs at once would only measure the listen backlog
    const opening = performance.now();
    for (let i = 0; i < kinds.length; i += 100) {
      const batch = await Promise.all(kinds.slice(i, i + 100).map((k) => openStalled(port, k)));
      stalled.push(...batch);
    }
    t.diagnostic(`opened ${stalled.length} stalled sockets in ${(performance.now() - opening).toFixed(0)} ms`);
    assert.equal(stalled.length, SOCKETS);
  });

  test('meanwhile a good client connects and runs a query within 2 s, several times over', { timeout: 20_000 }, async (t) => {
    assert.ok(stalled.length > 0);
    const latencies: number[] = [];
    for (let i = 0; i < 3; i++) {
      const started = performance.now();
      const c = await connect({ ...stack.clientConfig(good), port });
      try {
        assert.equal((await c.query('select count(*)::int as n from generate_series(1, 1000)')).rows[0].n, 1000);
      } finally {
        await c.end();
      }
      latencies.push(performance.now() - started);
    }
    t.diagnostic(`connect + query under ${SOCKETS} stalled sockets: ${latencies.map((l) => `${l.toFixed(0)} ms`).join(', ')}`);
    for (const l of latencies) assert.ok(l < 2_000, `connect + query took ${l.toFixed(0)} ms`);
  });

  test('the proxy closes every stalled socket between 1.9 s and 4 s after accepting it, with 08P01 where it can still speak', { timeout: 30_000 }, async (t) => {
    // Wait (bounded) until all are closed, or until 6 s past the last connect.
    const deadline = performance.now() + 8_000;
    while (stalled.some((s) => s.closedAfter === null) && performance.now() < deadline) await new Promise((r) => setTimeout(r, 100));
    const open = stalled.filter((s) => s.closedAfter === null);
    const byKind = new Map<Stall, { n: number; min: number; max: number; states: Map<string, number> }>();
    for (const s of stalled) {
      const e = byKind.get(s.kind) ?? { n: 0, min: Infinity, max: 0, states: new Map() };
      e.n++;
      if (s.closedAfter !== null) {
        e.min = Math.min(e.min, s.closedAfter);
        e.max = Math.max(e.max, s.closedAfter);
      }
      const st = s.closedAfter === null ? 'open' : (s.sqlstate ?? 'closed');
      e.states.set(st, (e.states.get(st) ?? 0) + 1);
      byKind.set(s.kind, e);
    }
    for (const [kind, e] of byKind) t.diagnostic(`  ${kind}: ${e.n}, closed after ${e.min.toFixed(0)}–${e.max.toFixed(0)} ms, ${JSON.stringify(Object.fromEntries(e.states))}`);
    const times = stalled.filter((s) => s.closedAfter !== null).map((s) => s.closedAfter!);
    const clientTimes = stalled.filter((s) => s.clientMs !== null).map((s) => s.clientMs!);
    t.diagnostic(`all (proxy accept → close): min ${Math.min(...times).toFixed(0)} ms, max ${Math.max(...times).toFixed(0)} ms; as the clients saw it (connect → close): min ${Math.min(...clientTimes).toFixed(0)} ms, max ${Math.max(...clientTimes).toFixed(0)} ms`);
    for (const s of open) s.destroy();
    assert.equal(open.length, 0, `${open.length} stalled sockets still open: ${[...new Set(open.map((s) => s.kind))].join(', ')}`);
    const early = stalled.filter((s) => s.closedAfter! < 1_900);
    const late = stalled.filter((s) => s.closedAfter! > 4_000);
    assert.deepEqual(early.map((s) => `${s.kind} ${s.closedAfter!.toFixed(0)} ms`).slice(0, 10), [], 'closed before the auth timeout');
    assert.deepEqual(late.map((s) => `${s.kind} ${s.closedAfter!.toFixed(0)} ms`).slice(0, 10), [], 'closed long after the auth timeout');
    // Where the client is at a protocol boundary the proxy can still read, it says why: 08P01.
    const speaking: Stall[] = ['nothing', 'half-header', 'partial-startup', 'startup-no-password', 'tls-then-silence'];
    const silent = stalled.filter((s) => speaking.includes(s.kind) && s.sqlstate !== '08P01');
    assert.deepEqual(silent.map((s) => `${s.kind}: ${s.sqlstate ?? 'no ErrorResponse'}`).slice(0, 10), []);
    // and nothing is left on the proxy's side
    const proxySockets = (proxy as unknown as { sockets: Set<unknown> }).sockets;
    assert.ok(await waitUntil(() => proxySockets.size === 0, 3_000), `${proxySockets.size} sockets still open on the proxy`);
    assert.equal(proxy.live.size, 0);
  });
});
