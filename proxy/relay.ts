// After hand-over the proxy only moves bytes. The relay writes each chunk to
// the other side as it arrives (no stream pipes, no copies) and pauses the
// reader whenever the writer's buffer is full, so a slow client slows its
// upstream instead of filling our memory.
//
// It also follows the message framing of both directions, cheaply (one
// length read per message), for two reasons:
//  - a session ended by the gateway (token revoked, orchestra suspended,
//    shutdown) gets a FATAL ErrorResponse, and that is only readable by the
//    client if it is written between two backend messages, never inside a
//    DataRow;
//  - an upstream connection can be kept for the next client of the same
//    orchestra only if the client left it idle: every Query/Sync/FunctionCall
//    answered by a ReadyForQuery 'I', nothing half-sent, and the client's
//    Terminate ('X') not forwarded.

import type { Socket } from 'node:net';

export interface RelayStats {
  bytesFromClient: number;
  bytesToClient: number;
}

export interface RelayOutcome {
  /** The upstream socket, paused and listener-free, when it was left idle and may be reset and reused; otherwise null (destroyed). */
  reusableUpstream: Socket | null;
}

export interface Relay {
  readonly stats: RelayStats;
  /** Resolves once the client side is closed and the upstream is either destroyed or handed back. */
  readonly closed: Promise<RelayOutcome>;
  /** Ends the session with `finalMessage` written at the next backend message boundary. */
  terminate(finalMessage: Buffer): void;
}

export interface RelayOptions {
  /** Keep the upstream when the client leaves it idle (upstream reuse enabled). */
  keepIdleUpstream: boolean;
}

/** Most time we wait for a message boundary before closing without a goodbye. */
const TERMINATE_GRACE_MS = 1_000;

/** Message framing state of one direction. */
class Framing {
  /** bytes of the current message body still to come */
  remaining = 0;
  /** header bytes (type + length) collected so far when a chunk ended inside one */
  readonly header = Buffer.alloc(5);
  headerFill = 0;

  get atBoundary(): boolean {
    return this.remaining === 0 && this.headerFill === 0;
  }

  /**
   * Walks the chunk; calls onMessage(type, headerAt, bodyAt, chunk) for each
   * message whose header completes here (headerAt -1 when the header began in
   * the previous chunk; bodyAt -1 when the body starts in a later one). With stopAtBoundary,
   * returns the first offset at which a message starts (or the chunk end if it
   * ends on a boundary), else -1.
   */
  scan(chunk: Buffer, onMessage: ((type: number, headerAt: number, bodyAt: number, chunk: Buffer) => void) | null, stopAtBoundary: boolean): number {
    let pos = 0;
    const n = chunk.length;
    while (pos < n) {
      if (this.remaining > 0) {
        const step = Math.min(this.remaining, n - pos);
        this.remaining -= step;
        pos += step;
        continue;
      }
      if (this.headerFill === 0) {
        if (stopAtBoundary) return pos;
        if (n - pos >= 5) {
          const type = chunk[pos]!;
          const headerAt = pos;
          this.remaining = chunk.readInt32BE(pos + 1) - 4;
          pos += 5;
          onMessage?.(type, headerAt, this.remaining > 0 && pos < n ? pos : -1, chunk);
          continue;
        }
      }
      const headerAt = this.headerFill === 0 ? pos : -1;
      const take = Math.min(5 - this.headerFill, n - pos);
      chunk.copy(this.header, this.headerFill, pos, pos + take);
      this.headerFill += take;
      pos += take;
      if (this.headerFill === 5) {
        this.remaining = this.header.readInt32BE(1) - 4;
        this.headerFill = 0;
        onMessage?.(this.header[0]!, headerAt, this.remaining > 0 && pos < n ? pos : -1, chunk);
      }
    }
    return stopAtBoundary && this.atBoundary ? n : -1;
  }
}

const QUERY = 0x51; // 'Q'
const SYNC = 0x53; // 'S'
const FUNCTION_CALL = 0x46; // 'F'
const TERMINATE = 0x58; // 'X'
const READY_FOR_QUERY = 0x5a; // 'Z'
const IDLE = 0x49; // 'I'

export function startRelay(client: Socket, upstream: Socket, pendingFromClient: Buffer, pendingFromUpstream: Buffer, opts: RelayOptions): Relay {
  const stats: RelayStats = { bytesFromClient: 0, bytesToClient: 0 };
  const fromServer = new Framing();
  const fromClientFraming = new Framing();
  // Requests that will be answered by a ReadyForQuery, minus those answered.
  let outstanding = 0;
  let lastReadyIdle = true;
  // A ReadyForQuery whose status byte is in the next chunk.
  let readyStatusPending = false;
  let clientTerminated = false;
  let upstreamFailed = false;
  let goodbye: Buffer | null = null;
  let done = false;
  let resolveClosed!: (o: RelayOutcome) => void;
  const closed = new Promise<RelayOutcome>((r) => (resolveClosed = r));

  const onServerMessage = (type: number, _headerAt: number, bodyAt: number, chunk: Buffer): void => {
    if (type !== READY_FOR_QUERY) return;
    if (outstanding > 0) outstanding--;
    if (bodyAt >= 0) lastReadyIdle = chunk[bodyAt] === IDLE;
    else readyStatusPending = true;
  };

  // Where the client's Terminate starts in the current chunk (-1: began in an earlier one).
  let terminateAt = -1;
  const onClientMessage = (type: number, headerAt: number): void => {
    if (type === QUERY || type === SYNC || type === FUNCTION_CALL) outstanding++;
    else if (type === TERMINATE) {
      clientTerminated = true;
      terminateAt = headerAt;
    }
  };

  const reusable = (): boolean =>
    opts.keepIdleUpstream && !upstreamFailed && !goodbye && outstanding === 0 && lastReadyIdle && fromServer.atBoundary && fromClientFraming.atBoundary && !upstream.destroyed;

  const finish = (): void => {
    if (done) return;
    done = true;
    client.off('data', fromClient);
    upstream.off('data', fromUpstream);
    client.off('drain', resumeUpstream);
    upstream.off('drain', resumeClient);
    let kept: Socket | null = null;
    if (reusable()) {
      upstream.off('error', onUpstreamError);
      upstream.off('close', onUpstreamClosed);
      upstream.off('end', onUpstreamClosed);
      upstream.pause();
      kept = upstream;
    } else {
      upstream.destroy();
    }
    if (goodbye) client.end(goodbye);
    else client.end();
    // end() lets queued bytes reach the client; a client that never reads is cut off.
    const cutoff = setTimeout(() => client.destroy(), TERMINATE_GRACE_MS);
    cutoff.unref();
    const settle = (): void => {
      clearTimeout(cutoff);
      resolveClosed({ reusableUpstream: kept });
    };
    if (client.destroyed) settle();
    else client.once('close', settle);
  };

  const resumeClient = (): void => {
    client.resume();
  };
  const resumeUpstream = (): void => {
    upstream.resume();
  };

  const fromClient = (chunk: Buffer): void => {
    stats.bytesFromClient += chunk.length;
    if (!opts.keepIdleUpstream) {
      if (!upstream.write(chunk)) {
        client.pause();
        upstream.once('drain', resumeClient);
      }
      return;
    }
    fromClientFraming.scan(chunk, onClientMessage, false);
    if (clientTerminated) {
      // The Terminate is the last thing a client sends; everything before it
      // goes upstream, the Terminate itself does not, so the connection stays open.
      if (terminateAt > 0) upstream.write(chunk.subarray(0, terminateAt));
      // A Terminate split across reads already sent part of itself upstream: not reusable.
      if (terminateAt < 0) upstreamFailed = true;
      finish();
      return;
    }
    if (!upstream.write(chunk)) {
      client.pause();
      upstream.once('drain', resumeClient);
    }
  };

  const fromUpstream = (chunk: Buffer): void => {
    if (readyStatusPending) {
      lastReadyIdle = chunk[0] === IDLE;
      readyStatusPending = false;
    }
    if (goodbye) {
      const cut = fromServer.scan(chunk, null, true);
      if (cut >= 0) {
        if (cut > 0) {
          stats.bytesToClient += cut;
          client.write(chunk.subarray(0, cut));
        }
        finish();
        return;
      }
    } else {
      fromServer.scan(chunk, onServerMessage, false);
    }
    stats.bytesToClient += chunk.length;
    if (!client.write(chunk)) {
      upstream.pause();
      client.once('drain', resumeUpstream);
    }
  };

  const onUpstreamError = (): void => {
    upstreamFailed = true;
    finish();
  };
  const onUpstreamClosed = (): void => {
    upstreamFailed = true;
    finish();
  };

  client.on('data', fromClient);
  upstream.on('data', fromUpstream);
  client.on('error', () => finish());
  upstream.on('error', onUpstreamError);
  client.on('close', () => finish());
  upstream.on('close', onUpstreamClosed);
  client.on('end', () => finish());
  upstream.on('end', onUpstreamClosed);

  if (pendingFromUpstream.length) fromUpstream(pendingFromUpstream);
  if (pendingFromClient.length) fromClient(pendingFromClient);
  // A side that closed while the upstream was being connected will never emit
  // 'close' again: settle now rather than wait forever.
  if (client.destroyed || upstream.destroyed) {
    if (upstream.destroyed) upstreamFailed = true;
    finish();
  } else {
    client.resume();
    upstream.resume();
  }

  return {
    stats,
    closed,
    terminate(finalMessage: Buffer): void {
      if (done || goodbye) return;
      goodbye = finalMessage;
      if (fromServer.atBoundary) {
        finish();
        return;
      }
      setTimeout(() => {
        if (!done) {
          goodbye = null;
          upstreamFailed = true;
          finish();
        }
      }, TERMINATE_GRACE_MS).unref();
    },
  };
}
