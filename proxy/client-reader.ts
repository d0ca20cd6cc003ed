// The only place that reads untrusted bytes from a client before the session
// is handed over to the relay. Reads are exact-length, bounded by the caller,
// and fail as soon as the socket goes away or the start-up deadline passes, so
// a slow or silent client can never hold a pending read forever.

import type { Socket } from 'node:net';

/** The client closed or broke the connection; nothing can be written back. */
export class ClientGone extends Error {
  constructor(cause?: unknown) {
    super('client went away', { cause });
  }
}

interface PendingRead {
  n: number;
  resolve: (b: Buffer) => void;
  reject: (e: Error) => void;
}

export class ClientReader {
  private chunks: Buffer[] = [];
  private length = 0;
  private pending: PendingRead | null = null;
  private failure: Error | null = null;
  private readonly onData = (chunk: Buffer): void => this.push(chunk);
  private readonly onEnd = (): void => this.fail(new ClientGone());
  private readonly onError = (e: Error): void => this.fail(new ClientGone(e));

  constructor(
    private current: Socket,
    /** Most bytes we are willing to buffer ahead of the reader (a flood is cut off). */
    private readonly maxBuffered: number,
  ) {
    this.listen(current);
  }

  get socket(): Socket {
    return this.current;
  }

  get buffered(): number {
    return this.length;
  }

  /** Resolves with exactly n bytes. */
  read(n: number): Promise<Buffer> {
    if (this.failure) return Promise.reject(this.failure);
    if (this.length >= n) return Promise.resolve(this.take(n));
    return new Promise((resolve, reject) => {
      this.pending = { n, resolve, reject };
      this.current.resume();
    });
  }

  /** Rejects the pending read (and every later one) with err. */
  fail(err: Error): void {
    if (this.failure) return;
    this.failure = err;
    const p = this.pending;
    this.pending = null;
    p?.reject(err);
  }

  /** Stops reading and returns what was read ahead; the socket is left paused and listener-free. */
  detach(): Buffer {
    this.unlisten(this.current);
    this.current.pause();
    const rest = this.length === 0 ? Buffer.alloc(0) : Buffer.concat(this.chunks, this.length);
    this.chunks = [];
    this.length = 0;
    return rest;
  }

  /** After a TLS upgrade: continue on the new socket (the old one must have nothing buffered). */
  switchTo(socket: Socket): void {
    this.unlisten(this.current);
    this.current = socket;
    this.listen(socket);
  }

  private listen(s: Socket): void {
    s.on('data', this.onData);
    s.on('end', this.onEnd);
    s.on('close', this.onEnd);
    s.on('error', this.onError);
  }

  private unlisten(s: Socket): void {
    s.off('data', this.onData);
    s.off('end', this.onEnd);
    s.off('close', this.onEnd);
    s.off('error', this.onError);
  }

  private push(chunk: Buffer): void {
    this.chunks.push(chunk);
    this.length += chunk.length;
    if (this.length > this.maxBuffered) {
      // A client that streams more than a start-up exchange can hold is not a client.
      this.current.pause();
      this.fail(new ClientGone(new Error('start-up flood')));
      return;
    }
    const p = this.pending;
    if (p && this.length >= p.n) {
      this.pending = null;
      p.resolve(this.take(p.n));
    }
    // Read-ahead is allowed only while someone waits; otherwise apply backpressure.
    if (!this.pending) this.current.pause();
  }

  private take(n: number): Buffer {
    const all = this.chunks.length === 1 ? this.chunks[0]! : Buffer.concat(this.chunks, this.length);
    const out = all.subarray(0, n);
    const rest = all.subarray(n);
    this.chunks = rest.length ? [rest] : [];
    this.length = rest.length;
    return out;
  }
}
