// After hand-over the proxy only moves bytes. The relay writes each chunk to
// the other side as it arrives (no stream pipes, no copies) and pauses the
// reader whenever the writer's buffer is full, so a slow client slows its
// upstream instead of filling our memory.
//
// One thing it must know about the bytes: where backend messages begin. A
// session ended by the gateway (token revoked, orchestra suspended, shutdown)
// gets a FATAL ErrorResponse, and that is only readable by the client if it is
// written between two messages, never inside a DataRow.

import type { Socket } from 'node:net';

export interface RelayStats {
  bytesFromClient: number;
  bytesToClient: number;
}

export interface Relay {
  readonly stats: RelayStats;
  /** Resolves once both sockets are closed. */
  readonly closed: Promise<void>;
  /** Ends the session with `finalMessage` written at the next backend message boundary. */
  terminate(finalMessage: Buffer): void;
}

/** Most time we wait for a message boundary before closing without a goodbye. */
const TERMINATE_GRACE_MS = 1_000;

export function startRelay(client: Socket, upstream: Socket, pendingFromClient: Buffer, pendingFromUpstream: Buffer): Relay {
  const stats: RelayStats = { bytesFromClient: 0, bytesToClient: 0 };
  // Backend framing: bytes still to skip in the current message, and the
  // partial header (type + length) when a chunk ends inside one.
  let remaining = 0;
  const header = Buffer.alloc(5);
  let headerFill = 0;
  let goodbye: Buffer | null = null;
  let done = false;
  let resolveClosed!: () => void;
  const closed = new Promise<void>((r) => (resolveClosed = r));
  let openSockets = 2;
  const onSocketClosed = (): void => {
    if (--openSockets === 0) resolveClosed();
  };

  /** Offset of the first message boundary at or after which we may cut, or -1. Advances framing state. */
  const scan = (chunk: Buffer, stopAtBoundary: boolean): number => {
    let pos = 0;
    const n = chunk.length;
    while (pos < n) {
      if (remaining > 0) {
        const step = Math.min(remaining, n - pos);
        remaining -= step;
        pos += step;
        continue;
      }
      if (headerFill === 0 && stopAtBoundary) return pos;
      if (headerFill === 0 && n - pos >= 5) {
        remaining = chunk.readInt32BE(pos + 1) - 4;
        pos += 5;
        continue;
      }
      const take = Math.min(5 - headerFill, n - pos);
      chunk.copy(header, headerFill, pos, pos + take);
      headerFill += take;
      pos += take;
      if (headerFill === 5) {
        remaining = header.readInt32BE(1) - 4;
        headerFill = 0;
      }
    }
    return remaining === 0 && headerFill === 0 && stopAtBoundary ? n : -1;
  };

  const finish = (): void => {
    if (done) return;
    done = true;
    client.off('data', fromClient);
    upstream.off('data', fromUpstream);
    if (goodbye) client.end(goodbye);
    else client.end();
    upstream.destroy();
    // end() lets queued bytes reach the client; a client that never reads is cut off.
    setTimeout(() => client.destroy(), TERMINATE_GRACE_MS).unref();
  };

  const fromClient = (chunk: Buffer): void => {
    stats.bytesFromClient += chunk.length;
    if (!upstream.write(chunk)) {
      client.pause();
      upstream.once('drain', () => client.resume());
    }
  };

  const fromUpstream = (chunk: Buffer): void => {
    if (goodbye) {
      const cut = scan(chunk, true);
      if (cut >= 0) {
        if (cut > 0) {
          stats.bytesToClient += cut;
          client.write(chunk.subarray(0, cut));
        }
        finish();
        return;
      }
    } else {
      scan(chunk, false);
    }
    stats.bytesToClient += chunk.length;
    if (!client.write(chunk)) {
      upstream.pause();
      client.once('drain', () => upstream.resume());
    }
  };

  client.on('data', fromClient);
  upstream.on('data', fromUpstream);
  client.on('error', () => finish());
  upstream.on('error', () => finish());
  client.on('close', () => {
    onSocketClosed();
    finish();
  });
  upstream.on('close', () => {
    onSocketClosed();
    finish();
  });
  client.on('end', () => finish());
  upstream.on('end', () => finish());

  if (pendingFromUpstream.length) fromUpstream(pendingFromUpstream);
  if (pendingFromClient.length) fromClient(pendingFromClient);
  client.resume();
  upstream.resume();

  return {
    stats,
    closed,
    terminate(finalMessage: Buffer): void {
      if (done || goodbye) return;
      goodbye = finalMessage;
      if (remaining === 0 && headerFill === 0) {
        finish();
        return;
      }
      setTimeout(() => {
        if (!done) {
          goodbye = null;
          finish();
        }
      }, TERMINATE_GRACE_MS).unref();
    },
  };
}
