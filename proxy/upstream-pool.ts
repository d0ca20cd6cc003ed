// Upstream reuse: authenticated upstream connections kept after a client
// leaves, for the next client of the SAME orchestra with the SAME start-up
// parameters (so `options`, application_name or a search_path never leak from
// one client to another), reset with DISCARD ALL before they are stored.
// Connections never cross orchestras: the key starts with the orchestra id
// and the upstream's address and credential. Idle connections close after
// UPSTREAM_IDLE_TIMEOUT, at most UPSTREAM_IDLE_MAX per orchestra are kept,
// and every one of an orchestra is closed when its route changes.
//
// This is what makes connect-per-request clients cheap: a new Postgres backend
// costs ~25 ms here, a reused one a reset round trip.

import { createHash } from 'node:crypto';
import type { Socket } from 'node:net';
import type { UpstreamRoute } from '../common/internal-api.js';
import type { UpstreamSession } from './upstream-connect.js';
import { message } from './wire.js';

export interface IdleUpstream {
  session: UpstreamSession;
  orchestraId: string;
  key: string;
}

interface Parked extends IdleUpstream {
  timer: NodeJS.Timeout;
  onLoss: () => void;
}

const RESET_TIMEOUT_MS = 2_000;
// Query('DISCARD ALL'): drops prepared statements, temp tables, LISTENs,
// advisory locks and session settings (RESET ALL back to the start-up values).
const DISCARD_ALL = message('Q', Buffer.from('DISCARD ALL\0', 'utf8'));

export interface UpstreamPoolOptions {
  idleTimeoutMs: number;
  maxIdlePerOrchestra: number;
  onReuse?: (orchestraId: string) => void;
  onDiscard?: (reason: 'reset_failed' | 'idle_timeout' | 'over_cap' | 'route_changed' | 'lost') => void;
}

export class UpstreamPool {
  private readonly idle = new Map<string, Parked[]>(); // key → stack (most recent last)
  private readonly perOrchestra = new Map<string, number>();

  constructor(private readonly opts: UpstreamPoolOptions) {}

  get enabled(): boolean {
    return this.opts.maxIdlePerOrchestra > 0;
  }

  /** The reuse key: orchestra, upstream address and credential, and every start-up parameter. */
  static keyFor(orchestraId: string, upstream: UpstreamRoute, params: ReadonlyMap<string, string>): string {
    const h = createHash('sha256');
    h.update(`${orchestraId}\0${upstream.host}\0${upstream.port}\0${upstream.database}\0${upstream.user}\0${upstream.password}\0${upstream.sslmode}`);
    for (const [k, v] of [...params].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))) h.update(`\0${k}\0${v}`);
    return `${orchestraId}:${h.digest('base64url')}`;
  }

  /** An idle connection for this key, or null. */
  take(key: string): UpstreamSession | null {
    const stack = this.idle.get(key);
    while (stack && stack.length > 0) {
      const p = stack.pop()!;
      this.unpark(p);
      if (stack.length === 0) this.idle.delete(key);
      if (p.session.socket.destroyed) continue;
      this.opts.onReuse?.(p.orchestraId);
      return p.session;
    }
    return null;
  }

  /**
   * Resets an upstream a client left idle and parks it; destroys it when that
   * fails or when keeping it would exceed `maxIdle` (the idle cap, lowered by
   * the caller so that kept plus active connections stay within the
   * orchestra's maxConnections).
   */
  async giveBack(u: IdleUpstream, socket: Socket, maxIdle = this.opts.maxIdlePerOrchestra): Promise<void> {
    const cap = Math.min(maxIdle, this.opts.maxIdlePerOrchestra);
    if (!this.enabled || (this.perOrchestra.get(u.orchestraId) ?? 0) >= cap) {
      socket.destroy();
      this.opts.onDiscard?.('over_cap');
      return;
    }
    if (!(await reset(socket))) {
      socket.destroy();
      this.opts.onDiscard?.('reset_failed');
      return;
    }
    if ((this.perOrchestra.get(u.orchestraId) ?? 0) >= cap) {
      socket.destroy();
      this.opts.onDiscard?.('over_cap');
      return;
    }
    const parked: Parked = {
      ...u,
      session: { ...u.session, socket, rest: Buffer.alloc(0) },
      timer: setTimeout(() => this.discard(parked, 'idle_timeout'), this.opts.idleTimeoutMs),
      // An idle upstream that speaks (a FATAL at server shutdown) or closes is gone.
      onLoss: () => this.discard(parked, 'lost'),
    };
    parked.timer.unref();
    socket.on('data', parked.onLoss);
    socket.on('close', parked.onLoss);
    socket.on('error', parked.onLoss);
    socket.resume();
    const stack = this.idle.get(u.key) ?? [];
    stack.push(parked);
    this.idle.set(u.key, stack);
    this.perOrchestra.set(u.orchestraId, (this.perOrchestra.get(u.orchestraId) ?? 0) + 1);
  }

  /** Closes idle connections of an orchestra (any start-up parameters, oldest first) until at most `keep` remain. */
  trim(orchestraId: string, keep: number): void {
    let idle = this.perOrchestra.get(orchestraId) ?? 0;
    if (idle <= keep) return;
    for (const [key, stack] of this.idle) {
      if (!key.startsWith(`${orchestraId}:`)) continue;
      while (stack.length > 0 && idle > keep) {
        this.discard(stack[0]!, 'over_cap');
        idle--;
      }
      if (idle <= keep) return;
    }
  }

  /** Closes every idle connection of an orchestra (its route changed or it was suspended). */
  dropOrchestra(orchestraId: string): void {
    for (const [key, stack] of this.idle) {
      if (!key.startsWith(`${orchestraId}:`)) continue;
      for (const p of [...stack]) this.discard(p, 'route_changed');
    }
  }

  closeAll(): void {
    for (const stack of [...this.idle.values()]) for (const p of [...stack]) this.discard(p, 'route_changed');
  }

  get idleCount(): number {
    let n = 0;
    for (const c of this.perOrchestra.values()) n += c;
    return n;
  }

  private discard(p: Parked, reason: 'idle_timeout' | 'route_changed' | 'lost' | 'over_cap'): void {
    const stack = this.idle.get(p.key);
    const i = stack?.indexOf(p) ?? -1;
    if (i < 0) return;
    stack!.splice(i, 1);
    if (stack!.length === 0) this.idle.delete(p.key);
    this.unpark(p);
    p.session.socket.destroy();
    this.opts.onDiscard?.(reason);
  }

  private unpark(p: Parked): void {
    clearTimeout(p.timer);
    const s = p.session.socket;
    s.off('data', p.onLoss);
    s.off('close', p.onLoss);
    s.off('error', p.onLoss);
    s.pause();
    const left = (this.perOrchestra.get(p.orchestraId) ?? 1) - 1;
    if (left <= 0) this.perOrchestra.delete(p.orchestraId);
    else this.perOrchestra.set(p.orchestraId, left);
  }
}

/**
 * Sends DISCARD ALL and reads up to ReadyForQuery 'I'. Anything unexpected (an
 * ErrorResponse, a transaction still open, silence) means the connection is
 * not clean enough to hand to another client.
 */
function reset(socket: Socket): Promise<boolean> {
  return new Promise((resolve) => {
    let buf: Buffer = Buffer.alloc(0);
    let ok = true;
    const finish = (result: boolean): void => {
      clearTimeout(timer);
      socket.off('data', onData);
      socket.off('close', onGone);
      socket.off('error', onGone);
      socket.pause();
      resolve(result);
    };
    const onGone = (): void => finish(false);
    const onData = (chunk: Buffer): void => {
      buf = buf.length ? Buffer.concat([buf, chunk]) : chunk;
      while (buf.length >= 5) {
        const len = buf.readInt32BE(1);
        if (len < 4 || len > 1_000_000) return finish(false);
        if (buf.length < 1 + len) return;
        const type = buf[0];
        if (type === 0x45 /* E */) ok = false;
        if (type === 0x5a /* Z */) return finish(ok && buf[5] === 0x49 /* I */ && buf.length === 1 + len);
        buf = buf.subarray(1 + len);
      }
    };
    const timer = setTimeout(() => finish(false), RESET_TIMEOUT_MS);
    socket.on('data', onData);
    socket.on('close', onGone);
    socket.on('error', onGone);
    socket.resume();
    socket.write(DISCARD_ALL);
  });
}
