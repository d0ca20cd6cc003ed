// Hand-over: the client sees a normal Postgres greeting. AuthenticationOk, the
// upstream's own ParameterStatus (and notices) verbatim, then BackendKeyData
// with the proxy's key (never the upstream's pid and secret), ReadyForQuery.
// One write, so the greeting costs one packet.

import type { Socket } from 'node:net';
import { authenticationOk, backendKeyData, readyForQuery } from './wire.js';

export function writeGreeting(client: Socket, upstreamHandoff: Buffer, key: { processId: number; secretKey: number }): void {
  client.write(Buffer.concat([authenticationOk(), upstreamHandoff, backendKeyData(key.processId, key.secretKey), readyForQuery('I')]));
}

/** Start-up parameters that travel upstream: everything but what identifies the session to us. */
export function upstreamStartupParameters(params: ReadonlyMap<string, string>): Map<string, string> {
  const out = new Map<string, string>();
  for (const [k, v] of params) {
    if (k === 'user' || k === 'database' || k === 'replication') continue;
    out.set(k, v);
  }
  return out;
}
