// Every relayed session, indexed so that a revocation, a suspension or a
// shutdown can find and end the right ones at once.

import type { RefusalReason } from './refusals.js';

export interface LiveSession {
  readonly id: number;
  readonly orchestraId: string;
  readonly subdomain: string;
  readonly jti: string;
  readonly upstreamAddress: string | null;
  terminate(reason: RefusalReason): void;
}

export class LiveSessions {
  private readonly sessions = new Map<number, LiveSession>();
  private nextId = 1;

  newId(): number {
    return this.nextId++;
  }

  add(s: LiveSession): void {
    this.sessions.set(s.id, s);
  }

  remove(id: number): void {
    this.sessions.delete(id);
  }

  get size(): number {
    return this.sessions.size;
  }

  /** Ends every session that matches; returns how many. */
  terminateWhere(match: (s: LiveSession) => boolean, reason: RefusalReason): number {
    let n = 0;
    for (const s of [...this.sessions.values()]) {
      if (match(s)) {
        s.terminate(reason);
        n++;
      }
    }
    return n;
  }

  /** Orchestras with at least one live session, to re-check after missed events. */
  orchestras(): Map<string, string> {
    const out = new Map<string, string>();
    for (const s of this.sessions.values()) out.set(s.orchestraId, s.subdomain);
    return out;
  }

  /** Resolves when no session is left, or after timeoutMs (whichever comes first). */
  whenEmpty(timeoutMs: number): Promise<void> {
    if (this.sessions.size === 0) return Promise.resolve();
    return new Promise((resolve) => {
      const started = Date.now();
      const t = setInterval(() => {
        if (this.sessions.size === 0 || Date.now() - started >= timeoutMs) {
          clearInterval(t);
          resolve();
        }
      }, 50);
      t.unref();
    });
  }
}
