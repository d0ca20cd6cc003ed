// Start-up phase, client side: SSLRequest, GSSENCRequest, CancelRequest and
// the StartupMessage, parsed with Postgres' own bounds. Written by hand because
// the libraries measured here mishandle SSLRequest/GSSENC/cancel or hang on a
// huge length (see LIBRARIES.md).

import { TLSSocket, type SecureContext } from 'node:tls';
import { ClientGone, ClientReader } from './client-reader.js';
import { Refusal } from './refusals.js';
import {
  CANCEL_REQUEST_CODE,
  GSSENC_REQUEST_CODE,
  MAX_STARTUP_PACKET,
  SSL_REQUEST_CODE,
  negotiateProtocolVersion,
} from './wire.js';

export type StartupOutcome =
  | { kind: 'startup'; tls: boolean; params: Map<string, string> }
  | { kind: 'cancel'; processId: number; secretKey: number };

export interface StartupOptions {
  /** When set, SSLRequest is answered 'S' and the connection upgraded. */
  secureContext: SecureContext | undefined;
}

/**
 * Reads packets until a StartupMessage or CancelRequest arrives. SSLRequest and
 * GSSENCRequest are answered in between, as a Postgres server does. Throws a
 * Refusal for anything malformed; the reader's socket is the one to answer on.
 */
export async function readStartup(reader: ClientReader, opts: StartupOptions): Promise<StartupOutcome> {
  let tls = false;
  let gssDeclined = false;
  for (;;) {
    // The length alone decides: a negative or tiny one is malformed at once, and
    // a huge one must not make us wait for gigabytes.
    const length = (await reader.read(4)).readInt32BE(0);
    if (length < 8 || length > MAX_STARTUP_PACKET) throw new Refusal('malformed_packet', `length ${length}`);
    const code = (await reader.read(4)).readInt32BE(0);

    if (code === SSL_REQUEST_CODE) {
      if (length !== 8 || tls) throw new Refusal('malformed_packet', tls ? 'SSLRequest inside TLS' : 'SSLRequest length');
      if (!opts.secureContext) {
        reader.socket.write('N');
        continue;
      }
      // CVE-2021-23214: bytes that arrived before the handshake were never
      // encrypted; a man in the middle could have injected them.
      if (reader.buffered > 0) throw new Refusal('plaintext_after_ssl_request');
      reader.socket.write('S');
      const secure = await upgradeToTls(reader, opts.secureContext);
      reader.switchTo(secure);
      tls = true;
      continue;
    }
    if (code === GSSENC_REQUEST_CODE) {
      if (length !== 8 || tls || gssDeclined) throw new Refusal('malformed_packet', 'GSSENCRequest');
      // We do not offer GSSAPI encryption; libpq then falls back to SSLRequest.
      gssDeclined = true;
      reader.socket.write('N');
      continue;
    }
    if (code === CANCEL_REQUEST_CODE) {
      if (length !== 16) throw new Refusal('malformed_packet', 'CancelRequest length');
      const body = await reader.read(8);
      return { kind: 'cancel', processId: body.readInt32BE(0), secretKey: body.readInt32BE(4) };
    }

    const major = code >>> 16;
    const minor = code & 0xffff;
    if (major !== 3) throw new Refusal('unsupported_protocol', `protocol ${major}.${minor}`);
    const body = await reader.read(length - 8);
    const { params, pqOptions } = parseStartupParameters(body);
    // We speak 3.0 only: a newer minor version or any `_pq_.` option is answered
    // with NegotiateProtocolVersion, and the client continues at 3.0.
    if (minor > 0 || pqOptions.length > 0) {
      reader.socket.write(negotiateProtocolVersion(0, pqOptions));
    }
    return { kind: 'startup', tls, params };
  }
}

/** Parses `name\0value\0 … \0`. Exported for the unit tests of the parser itself. */
export function parseStartupParameters(body: Buffer): { params: Map<string, string>; pqOptions: string[] } {
  const params = new Map<string, string>();
  const pqOptions: string[] = [];
  let pos = 0;
  for (;;) {
    if (pos >= body.length) throw new Refusal('malformed_packet', 'missing terminator');
    if (body[pos] === 0) {
      if (pos !== body.length - 1) throw new Refusal('malformed_packet', 'bytes after terminator');
      return { params, pqOptions };
    }
    const nameEnd = body.indexOf(0, pos);
    if (nameEnd < 0) throw new Refusal('malformed_packet', 'unterminated name');
    const valueEnd = body.indexOf(0, nameEnd + 1);
    if (valueEnd < 0) throw new Refusal('malformed_packet', 'unterminated value');
    const name = body.toString('utf8', pos, nameEnd);
    const value = body.toString('utf8', nameEnd + 1, valueEnd);
    pos = valueEnd + 1;
    if (name.startsWith('_pq_.')) {
      pqOptions.push(name);
      continue;
    }
    if (params.has(name)) throw new Refusal('malformed_packet', `duplicate parameter ${name}`);
    params.set(name, value);
  }
}

function upgradeToTls(reader: ClientReader, secureContext: SecureContext): Promise<TLSSocket> {
  const plain = reader.socket;
  reader.detach();
  const secure = new TLSSocket(plain, { isServer: true, secureContext });
  return new Promise((resolve, reject) => {
    const onError = (e: Error): void => {
      cleanup();
      secure.destroy();
      // Nothing can be said to a client whose handshake failed: plaintext would be garbage to it.
      reject(new ClientGone(e));
    };
    const onClose = (): void => onError(new Error('closed during handshake'));
    const onSecure = (): void => {
      cleanup();
      resolve(secure);
    };
    const cleanup = (): void => {
      secure.off('error', onError);
      secure.off('close', onClose);
      secure.off('secure', onSecure);
    };
    secure.once('secure', onSecure);
    secure.once('error', onError);
    secure.once('close', onClose);
  });
}
