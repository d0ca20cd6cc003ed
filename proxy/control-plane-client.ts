// The proxy's one window onto the control plane: plain HTTP with the proxy
// token. The proxy never holds central-database credentials (PRODUCT.md), so
// routes, keys and the event stream all come through here.

import type { BusEvent, RouteAnswer } from '../common/internal-api.js';
import type { JSONWebKeySet } from 'jose';

export class ControlPlaneUnavailable extends Error {}

export type RouteLookup = { found: true; route: RouteAnswer } | { found: false };

export interface ConnectionEventRecord {
  kind: 'connection.accepted' | 'connection.refused' | 'connection.closed';
  at: string;
  orchestraId: string | null;
  subdomain: string | null;
  jti: string | null;
  clientAddress: string | null;
  sqlstate: string | null;
  reason: string | null;
  upstreamAddress: string | null;
  durationMs?: number;
  bytesFromClient?: number;
  bytesToClient?: number;
}

export class ControlPlaneClient {
  constructor(
    readonly baseUrl: string,
    private readonly token: string,
    private readonly timeoutMs = 3_000,
  ) {}

  async route(subdomain: string): Promise<RouteLookup> {
    const res = await this.request(`/v1/internal/routes/${encodeURIComponent(subdomain)}`);
    if (res.status === 404) return { found: false };
    if (!res.ok) throw new ControlPlaneUnavailable(`route lookup answered ${res.status}`);
    return { found: true, route: (await res.json()) as RouteAnswer };
  }

  async jwks(): Promise<JSONWebKeySet> {
    const res = await this.request('/.well-known/jwks.json');
    if (!res.ok) throw new ControlPlaneUnavailable(`JWKS answered ${res.status}`);
    return (await res.json()) as JSONWebKeySet;
  }

  async postConnectionEvents(events: readonly ConnectionEventRecord[]): Promise<void> {
    const res = await this.request('/v1/internal/connection-events', {
      method: 'POST',
      body: JSON.stringify({ events }),
      headers: { 'content-type': 'application/json' },
    });
    if (!res.ok) throw new ControlPlaneUnavailable(`connection events answered ${res.status}`);
  }

  /**
   * Follows the control plane's event stream (server-sent events) until
   * `signal` aborts, reconnecting with backoff. `onReset` runs whenever the
   * stream (re)connects: events may have been missed meanwhile, so callers
   * drop what they cached.
   */
  async followEvents(onEvent: (e: BusEvent) => void, onReset: (connected: boolean) => void, signal: AbortSignal): Promise<void> {
    let backoff = 200;
    while (!signal.aborted) {
      try {
        const res = await fetch(`${this.baseUrl}/v1/internal/events`, {
          headers: { authorization: `Bearer ${this.token}`, accept: 'text/event-stream' },
          signal,
        });
        if (!res.ok || !res.body) throw new Error(`event stream answered ${res.status}`);
        onReset(true);
        backoff = 200;
        await readEventStream(res.body, onEvent);
      } catch {
        // fall through to reconnect
      }
      if (signal.aborted) break;
      onReset(false);
      await sleep(backoff, signal);
      backoff = Math.min(backoff * 2, 5_000);
    }
  }

  private async request(path: string, init: RequestInit = {}): Promise<Response> {
    try {
      return await fetch(this.baseUrl + path, {
        ...init,
        headers: { ...(init.headers as Record<string, string> | undefined), authorization: `Bearer ${this.token}` },
        signal: AbortSignal.timeout(this.timeoutMs),
      });
    } catch (e) {
      throw new ControlPlaneUnavailable(`control plane unreachable: ${(e as Error).message}`);
    }
  }
}

async function readEventStream(body: ReadableStream<Uint8Array>, onEvent: (e: BusEvent) => void): Promise<void> {
  const decoder = new TextDecoder();
  let text = '';
  for await (const chunk of body as unknown as AsyncIterable<Uint8Array>) {
    text += decoder.decode(chunk, { stream: true });
    let end: number;
    while ((end = text.indexOf('\n\n')) >= 0) {
      const block = text.slice(0, end);
      text = text.slice(end + 2);
      const data = block
        .split('\n')
        .filter((l) => l.startsWith('data:'))
        .map((l) => l.slice(5).trim())
        .join('\n');
      if (data) onEvent(JSON.parse(data) as BusEvent);
    }
    if (text.length > 1_000_000) throw new Error('event stream message too large');
  }
}

function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const t = setTimeout(resolve, ms);
    signal.addEventListener('abort', () => {
      clearTimeout(t);
      resolve();
    }, { once: true });
  });
}
