import { execFileSync } from 'node:child_process';
import { once } from 'node:events';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { createServer, connect as netConnect, type AddressInfo, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { connect as tlsConnect, createSecureContext, type SecureContext, type TLSSocket } from 'node:tls';
import { after, before, describe, test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { ClientGone, ClientReader } from '../../proxy/client-reader.js';
import { Inbox } from '../fixtures/inbox.js';
import { Refusal } from '../../proxy/refusals.js';
import { parseStartupParameters, readStartup, type StartupOutcome } from '../../proxy/startup.js';
import { CANCEL_REQUEST_CODE, GSSENC_REQUEST_CODE, PROTOCOL_3_0, SSL_REQUEST_CODE } from '../../proxy/wire.js';

const READ_AHEAD_LIMIT = 128 * 1024;
/** Upper bound for any single test: a hang is a failure, not a slow pass. */
const QUICK = { timeout: 5_000 };

// ---------------------------------------------------------------- packets

function int32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeInt32BE(n, 0);
  return b;
}

/** An 8-byte start-up header: length (including itself) and code / protocol version. */
function header(length: number, code: number): Buffer {
  return Buffer.concat([int32(length), int32(code)]);
}

function paramsBody(params: ReadonlyArray<readonly [string, string]>): Buffer {
  const parts: Buffer[] = [];
  for (const [name, value] of params) parts.push(Buffer.from(`${name}\0${value}\0`, 'utf8'));
  parts.push(Buffer.from([0]));
  return Buffer.concat(parts);
}

function startupMessage(params: ReadonlyArray<readonly [string, string]>, protocol = PROTOCOL_3_0): Buffer {
  const body = paramsBody(params);
  return Buffer.concat([header(8 + body.length, protocol), body]);
}

const sslRequest = (): Buffer => header(8, SSL_REQUEST_CODE);
const gssencRequest = (): Buffer => header(8, GSSENC_REQUEST_CODE);

function cancelRequest(processId: number, secretKey: number): Buffer {
  return Buffer.concat([header(16, CANCEL_REQUEST_CODE), int32(processId), int32(secretKey)]);
}

const PROTOCOL_3_2 = (3 << 16) | 2;
const BASIC: ReadonlyArray<readonly [string, string]> = [
  ['user', 'acme-films'],
  ['database', 'acme-films'],
];

// ---------------------------------------------------------------- loopback harness

interface ServerSide {
  socket: Socket;
  reader: ClientReader;
  outcome: Promise<StartupOutcome>;
  /** socket.bytesWritten (including queued bytes) at the moment the outcome settled */
  writtenWhenSettled: Promise<number>;
  /** largest reader.buffered seen after any chunk arrived */
  maxBuffered: () => number;
}

interface Pair {
  client: Socket;
  inbox: Inbox;
  server: ServerSide;
}

async function connectPair(t: TestContext, secureContext?: SecureContext): Promise<Pair> {
  const server = createServer();
  const toClose: Socket[] = [];
  let accepted!: (s: ServerSide) => void;
  const serverSide = new Promise<ServerSide>((resolve) => (accepted = resolve));
  server.on('connection', (socket) => {
    toClose.push(socket);
    const reader = new ClientReader(socket, READ_AHEAD_LIMIT);
    let max = 0;
    // Appended after the reader's own listener: sees the buffer right after each push.
    socket.on('data', () => {
      max = Math.max(max, reader.buffered);
    });
    const outcome = readStartup(reader, { secureContext });
    const writtenWhenSettled = outcome.then(
      () => reader.socket.bytesWritten,
      () => reader.socket.bytesWritten,
    );
    outcome.catch(() => {}); // asserted by the tests; never an unhandled rejection
    accepted({ socket, reader, outcome, writtenWhenSettled, maxBuffered: () => max });
  });
  let side: ServerSide | undefined;
  t.after(async () => {
    side?.reader.socket.destroy(); // the TLS socket, after an upgrade
    for (const s of toClose) s.destroy();
    if (server.listening) {
      server.close();
      await once(server, 'close');
    }
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const client = netConnect((server.address() as AddressInfo).port, '127.0.0.1');
  toClose.push(client);
  client.on('error', () => {}); // the server may destroy its end under us
  await once(client, 'connect');
  side = await serverSide;
  return { client, inbox: new Inbox(client), server: side };
}

function isRefusal(sqlstate: string, reason?: string): (e: unknown) => boolean {
  return (e: unknown) => {
    assert.ok(e instanceof Refusal, `expected a Refusal, got ${String(e)}`);
    assert.equal(e.sqlstate, sqlstate);
    if (reason !== undefined) assert.equal(e.reason, reason);
    return true;
  };
}

/** Parses a NegotiateProtocolVersion message: 'v', int32 len, int32 minor, int32 n, n C strings. */
function parseNegotiate(msg: Buffer): { minor: number; options: string[] } {
  assert.equal(String.fromCharCode(msg[0]!), 'v');
  assert.equal(msg.readInt32BE(1), msg.length - 1);
  const minor = msg.readInt32BE(5);
  const n = msg.readInt32BE(9);
  const options: string[] = [];
  let pos = 13;
  for (let i = 0; i < n; i++) {
    const end = msg.indexOf(0, pos);
    assert.ok(end >= 0, 'option name must be NUL-terminated');
    options.push(msg.toString('utf8', pos, end));
    pos = end + 1;
  }
  assert.equal(pos, msg.length, 'no bytes after the option list');
  return { minor, options };
}

async function readNegotiate(inbox: Inbox): Promise<{ minor: number; options: string[]; raw: Buffer }> {
  const head = await inbox.read(5);
  assert.equal(String.fromCharCode(head[0]!), 'v', 'expected NegotiateProtocolVersion');
  const rest = await inbox.read(head.readInt32BE(1) - 4);
  const raw = Buffer.concat([head, rest]);
  return { ...parseNegotiate(raw), raw };
}

// ---------------------------------------------------------------- TLS material

let secureContext: SecureContext;
let certDir: string;

before(() => {
  certDir = mkdtempSync(join(tmpdir(), 'stagedoor-startup-'));
  const key = join(certDir, 'k');
  const cert = join(certDir, 'c');
  execFileSync(
    'openssl',
    ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-days', '1', '-subj', '/CN=localhost', '-keyout', key, '-out', cert],
    { stdio: 'ignore' },
  );
  secureContext = createSecureContext({ key: readFileSync(key), cert: readFileSync(cert) });
});

after(() => {
  rmSync(certDir, { recursive: true, force: true });
});

async function upgradeClient(t: TestContext, pair: Pair): Promise<{ secure: TLSSocket; inbox: Inbox }> {
  pair.inbox.detach();
  const secure = tlsConnect({ socket: pair.client, rejectUnauthorized: false });
  t.after(() => secure.destroy());
  secure.on('error', () => {});
  await once(secure, 'secureConnect');
  return { secure, inbox: new Inbox(secure as unknown as Socket) };
}

// ================================================================ tests

describe('StartupMessage', () => {
  test('a well-formed 3.0 StartupMessage yields its parameters, without TLS', QUICK, async (t) => {
    const { client, server } = await connectPair(t);
    client.write(
      startupMessage([
        ['user', 'acme-films'],
        ['database', 'acme-films'],
        ['application_name', 'psql'],
        ['options', '-c search_path=public'],
      ]),
    );
    const outcome = await server.outcome;
    assert.equal(outcome.kind, 'startup');
    assert.ok(outcome.kind === 'startup');
    assert.equal(outcome.tls, false);
    assert.deepEqual(
      [...outcome.params],
      [
        ['user', 'acme-films'],
        ['database', 'acme-films'],
        ['application_name', 'psql'],
        ['options', '-c search_path=public'],
      ],
    );
    assert.equal(await server.writtenWhenSettled, 0, 'a plain 3.0 start-up needs no answer during the start-up phase');
  });

  test('a StartupMessage split over many small writes is reassembled', QUICK, async (t) => {
    const { client, server } = await connectPair(t);
    const packet = startupMessage(BASIC);
    for (let i = 0; i < packet.length; i += 3) client.write(packet.subarray(i, i + 3));
    const outcome = await server.outcome;
    assert.ok(outcome.kind === 'startup');
    assert.equal(outcome.params.get('user'), 'acme-films');
  });
});

describe('parseStartupParameters', () => {
  const body = (s: string): Buffer => Buffer.from(s, 'utf8');

  test('name/value pairs followed by one terminator are parsed in order', () => {
    const { params, pqOptions } = parseStartupParameters(body('user\0acme\0database\0acme\0\0'));
    assert.deepEqual([...params], [
      ['user', 'acme'],
      ['database', 'acme'],
    ]);
    assert.deepEqual(pqOptions, []);
  });

  test('an empty value is kept as an empty string', () => {
    const { params } = parseStartupParameters(body('user\0acme\0options\0\0\0'));
    assert.equal(params.get('options'), '');
  });

  test('a body without the final terminator is refused with 08P01', () => {
    assert.throws(() => parseStartupParameters(body('user\0acme\0')), isRefusal('08P01', 'malformed_packet'));
  });

  test('an empty body (not even the terminator) is refused with 08P01', () => {
    assert.throws(() => parseStartupParameters(Buffer.alloc(0)), isRefusal('08P01', 'malformed_packet'));
  });

  test('an unterminated parameter name is refused with 08P01', () => {
    assert.throws(() => parseStartupParameters(body('user')), isRefusal('08P01', 'malformed_packet'));
  });

  test('an unterminated parameter value is refused with 08P01', () => {
    assert.throws(() => parseStartupParameters(body('user\0acme')), isRefusal('08P01', 'malformed_packet'));
  });

  test('bytes after the terminator are refused with 08P01', () => {
    assert.throws(() => parseStartupParameters(body('user\0acme\0\0junk')), isRefusal('08P01', 'malformed_packet'));
    assert.throws(() => parseStartupParameters(body('user\0acme\0\0\0')), isRefusal('08P01', 'malformed_packet'));
  });

  test('a duplicate parameter is refused with 08P01', () => {
    assert.throws(() => parseStartupParameters(body('user\0acme\0user\0other\0\0')), isRefusal('08P01', 'malformed_packet'));
  });

  test('_pq_.* options are collected into pqOptions and not into params', () => {
    const { params, pqOptions } = parseStartupParameters(body('user\0acme\0_pq_.foo\0on\0_pq_.bar\0x\0database\0acme\0\0'));
    assert.deepEqual([...params], [
      ['user', 'acme'],
      ['database', 'acme'],
    ]);
    assert.deepEqual(pqOptions, ['_pq_.foo', '_pq_.bar']);
  });
});

describe('packet length bounds', () => {
  test('a length below 8 is refused with 08P01', QUICK, async (t) => {
    const { client, server } = await connectPair(t);
    client.write(header(7, PROTOCOL_3_0));
    await assert.rejects(server.outcome, isRefusal('08P01', 'malformed_packet'));
  });

  test('a StartupMessage longer than 10,000 bytes (10,001) is refused with 08P01', QUICK, async (t) => {
    const { client, server } = await connectPair(t);
    client.write(header(10_001, PROTOCOL_3_0));
    await assert.rejects(server.outcome, isRefusal('08P01', 'malformed_packet'));
  });

  test('a length of 2^31-1 is refused at once, without waiting for the announced bytes', QUICK, async (t) => {
    const { client, server } = await connectPair(t);
    client.write(header(2 ** 31 - 1, PROTOCOL_3_0)); // and nothing more: a server that waits would hang here
    await assert.rejects(server.outcome, isRefusal('08P01', 'malformed_packet'));
  });

  test('a negative length is refused with 08P01', QUICK, async (t) => {
    const { client, server } = await connectPair(t);
    client.write(Buffer.concat([Buffer.from([0xff, 0xff, 0xff, 0xf0]), int32(PROTOCOL_3_0)]));
    await assert.rejects(server.outcome, isRefusal('08P01', 'malformed_packet'));
  });
});

describe('protocol versions', () => {
  test('protocol 2.0 is refused as unsupported_protocol with 08P01', QUICK, async (t) => {
    const { client, server } = await connectPair(t);
    client.write(startupMessage(BASIC, 2 << 16));
    await assert.rejects(server.outcome, isRefusal('08P01', 'unsupported_protocol'));
  });

  test('protocol 4.0 is refused as unsupported_protocol with 08P01', QUICK, async (t) => {
    const { client, server } = await connectPair(t);
    client.write(startupMessage(BASIC, 4 << 16));
    await assert.rejects(server.outcome, isRefusal('08P01', 'unsupported_protocol'));
  });

  test('protocol 3.2 is answered with NegotiateProtocolVersion (minor 0) before the outcome resolves', QUICK, async (t) => {
    const { client, inbox, server } = await connectPair(t);
    client.write(startupMessage(BASIC, PROTOCOL_3_2));
    const outcome = await server.outcome;
    assert.ok(outcome.kind === 'startup');
    assert.equal(outcome.params.get('user'), 'acme-films');
    const v = await readNegotiate(inbox);
    assert.equal(v.minor, 0);
    assert.deepEqual(v.options, []);
    assert.equal(await server.writtenWhenSettled, v.raw.length, 'the whole message was written before the outcome settled');
  });

  test('protocol 3.2 with a _pq_.x option lists that option in NegotiateProtocolVersion', QUICK, async (t) => {
    const { client, inbox, server } = await connectPair(t);
    client.write(startupMessage([...BASIC, ['_pq_.x', 'on']], PROTOCOL_3_2));
    const outcome = await server.outcome;
    assert.ok(outcome.kind === 'startup');
    assert.equal(outcome.params.has('_pq_.x'), false, '_pq_ options are not start-up parameters');
    const v = await readNegotiate(inbox);
    assert.equal(v.minor, 0);
    assert.deepEqual(v.options, ['_pq_.x']);
    assert.equal(await server.writtenWhenSettled, v.raw.length);
  });

  test('protocol 3.0 with a _pq_ option is also answered with NegotiateProtocolVersion listing it', QUICK, async (t) => {
    const { client, inbox, server } = await connectPair(t);
    client.write(startupMessage([...BASIC, ['_pq_.foo', '1']]));
    await server.outcome;
    const v = await readNegotiate(inbox);
    assert.equal(v.minor, 0);
    assert.deepEqual(v.options, ['_pq_.foo']);
  });
});

describe('SSLRequest', () => {
  test("without a secure context an SSLRequest is answered with exactly 'N' and a StartupMessage may follow", QUICK, async (t) => {
    const { client, inbox, server } = await connectPair(t);
    client.write(sslRequest());
    assert.equal((await inbox.read(1)).toString('latin1'), 'N');
    client.write(startupMessage(BASIC));
    const outcome = await server.outcome;
    assert.ok(outcome.kind === 'startup');
    assert.equal(outcome.tls, false);
    assert.equal(outcome.params.get('database'), 'acme-films');
    assert.equal(await server.writtenWhenSettled, 1, "nothing but 'N' was written");
    server.socket.end();
    assert.equal((await inbox.untilClosed()).length, 0, "the client received nothing after 'N'");
  });

  test("with a secure context an SSLRequest is answered 'S', TLS is negotiated and the StartupMessage arrives over TLS", QUICK, async (t) => {
    const pair = await connectPair(t, secureContext);
    pair.client.write(sslRequest());
    assert.equal((await pair.inbox.read(1)).toString('latin1'), 'S');
    const { secure } = await upgradeClient(t, pair);
    secure.write(startupMessage([...BASIC, ['application_name', 'over-tls']]));
    const outcome = await pair.server.outcome;
    assert.ok(outcome.kind === 'startup');
    assert.equal(outcome.tls, true);
    assert.equal(outcome.params.get('application_name'), 'over-tls');
    assert.notEqual(pair.server.reader.socket, pair.server.socket, 'the reader continues on the TLS socket');
  });

  test('a second SSLRequest inside TLS is refused with 08P01', QUICK, async (t) => {
    const pair = await connectPair(t, secureContext);
    pair.client.write(sslRequest());
    assert.equal((await pair.inbox.read(1)).toString('latin1'), 'S');
    const { secure } = await upgradeClient(t, pair);
    secure.write(sslRequest());
    await assert.rejects(pair.server.outcome, isRefusal('08P01', 'malformed_packet'));
  });

  test('an SSLRequest followed in the same write by plaintext bytes is refused (CVE-2021-23214)', QUICK, async (t) => {
    const { client, server } = await connectPair(t, secureContext);
    client.write(Buffer.concat([sslRequest(), startupMessage(BASIC)]));
    await assert.rejects(server.outcome, isRefusal('08P01', 'plaintext_after_ssl_request'));
    assert.equal(await server.writtenWhenSettled, 0, "'S' must not be sent when injected plaintext is pending");
  });

  test('an SSLRequest whose length is not 8 is refused with 08P01', QUICK, async (t) => {
    const { client, server } = await connectPair(t, secureContext);
    client.write(Buffer.concat([header(12, SSL_REQUEST_CODE), int32(0)]));
    await assert.rejects(server.outcome, isRefusal('08P01', 'malformed_packet'));
  });
});

describe('GSSENCRequest', () => {
  test("a GSSENCRequest is answered 'N' and a StartupMessage then works", QUICK, async (t) => {
    const { client, inbox, server } = await connectPair(t);
    client.write(gssencRequest());
    assert.equal((await inbox.read(1)).toString('latin1'), 'N');
    client.write(startupMessage(BASIC));
    const outcome = await server.outcome;
    assert.ok(outcome.kind === 'startup');
    assert.equal(outcome.tls, false);
    assert.equal(outcome.params.get('user'), 'acme-films');
  });

  test("libpq's fallback (GSSENCRequest, then SSLRequest, then TLS) ends in a TLS start-up", QUICK, async (t) => {
    const pair = await connectPair(t, secureContext);
    pair.client.write(gssencRequest());
    assert.equal((await pair.inbox.read(1)).toString('latin1'), 'N');
    pair.client.write(sslRequest());
    assert.equal((await pair.inbox.read(1)).toString('latin1'), 'S');
    const { secure } = await upgradeClient(t, pair);
    secure.write(startupMessage(BASIC));
    const outcome = await pair.server.outcome;
    assert.ok(outcome.kind === 'startup');
    assert.equal(outcome.tls, true);
  });

  test('a second GSSENCRequest is refused with 08P01', QUICK, async (t) => {
    const { client, inbox, server } = await connectPair(t);
    client.write(gssencRequest());
    assert.equal((await inbox.read(1)).toString('latin1'), 'N');
    client.write(gssencRequest());
    await assert.rejects(server.outcome, isRefusal('08P01', 'malformed_packet'));
  });
});

describe('CancelRequest', () => {
  test('a CancelRequest yields kind cancel with its processId and secretKey', QUICK, async (t) => {
    const { client, server } = await connectPair(t);
    client.write(cancelRequest(4242, 0x7ffffff0));
    const outcome = await server.outcome;
    assert.deepEqual(outcome, { kind: 'cancel', processId: 4242, secretKey: 0x7ffffff0 });
  });

  test('a CancelRequest with a negative secretKey keeps the sign', QUICK, async (t) => {
    const { client, server } = await connectPair(t);
    client.write(cancelRequest(17, -1_234_567_890));
    const outcome = await server.outcome;
    assert.deepEqual(outcome, { kind: 'cancel', processId: 17, secretKey: -1_234_567_890 });
  });

  test('a CancelRequest of length 12 is refused with 08P01', QUICK, async (t) => {
    const { client, server } = await connectPair(t);
    client.write(Buffer.concat([header(12, CANCEL_REQUEST_CODE), int32(17)]));
    await assert.rejects(server.outcome, isRefusal('08P01', 'malformed_packet'));
  });
});

describe('misbehaving clients', () => {
  test('a client closing mid-packet makes the start-up reject with ClientGone', QUICK, async (t) => {
    const { client, server } = await connectPair(t);
    const packet = startupMessage(BASIC);
    client.end(packet.subarray(0, packet.length - 5));
    await assert.rejects(server.outcome, (e: unknown) => {
      assert.ok(e instanceof ClientGone, `expected ClientGone, got ${String(e)}`);
      return true;
    });
  });

  test('a client closing after half a header makes the start-up reject with ClientGone', QUICK, async (t) => {
    const { client, server } = await connectPair(t);
    client.end(int32(100));
    await assert.rejects(server.outcome, (e: unknown) => e instanceof ClientGone);
  });

  test('1 MB of garbage after a valid 10,000-byte header is refused and the reader never buffers beyond its limit', QUICK, async (t) => {
    const { client, server } = await connectPair(t);
    client.write(Buffer.concat([header(10_000, PROTOCOL_3_0), Buffer.alloc(1024 * 1024, 'x')]));
    await assert.rejects(server.outcome, (e: unknown) => {
      if (e instanceof ClientGone) {
        assert.match(String((e.cause as Error | undefined)?.message), /start-up flood/);
        return true;
      }
      return isRefusal('08P01')(e);
    });
    // Let any further chunk that is already on its way be delivered (or not).
    for (let i = 0; i < 5; i++) await new Promise((r) => setImmediate(r));
    assert.ok(server.maxBuffered() <= READ_AHEAD_LIMIT, `buffered up to ${server.maxBuffered()} bytes`);
    assert.ok(server.reader.buffered <= READ_AHEAD_LIMIT, `buffered ${server.reader.buffered} bytes`);
    assert.ok(server.socket.isPaused(), 'the flooding socket is no longer read');
  });
});
