// A CancelRequest arrives on a connection of its own. Postgres never answers
// one, so neither do we: a matching key is forwarded to the real upstream, a
// wrong or stale one is dropped, and both look the same to the caller (no
// oracle for guessing keys). Per-address rate limiting stops cancel floods.

import type { CancelKeys } from './cancel-keys.js';

const BUCKET_SIZE = 20;
const REFILL_PER_SECOND = 10;

export class CancelRateLimiter {
  private readonly buckets = new Map<string, { tokens: number; at: number }>();

  allow(address: string, now = Date.now()): boolean {
    const b = this.buckets.get(address) ?? { tokens: BUCKET_SIZE, at: now };
    b.tokens = Math.min(BUCKET_SIZE, b.tokens + ((now - b.at) / 1000) * REFILL_PER_SECOND);
    b.at = now;
    const ok = b.tokens >= 1;
    if (ok) b.tokens -= 1;
    this.buckets.set(address, b);
    if (this.buckets.size > 10_000) this.prune(now);
    return ok;
  }

  private prune(now: number): void {
    for (const [k, b] of this.buckets) if (now - b.at > 10_000) this.buckets.delete(k);
  }
}

export type CancelResult = 'forwarded' | 'unknown_key' | 'rate_limited' | 'failed';

export async function handleCancel(
  keys: CancelKeys,
  limiter: CancelRateLimiter,
  clientAddress: string,
  processId: number,
  secretKey: number,
  remote?: (processId: number, secretKey: number) => Promise<boolean>,
): Promise<CancelResult> {
  if (!limiter.allow(clientAddress)) return 'rate_limited';
  const target = keys.lookup(processId, secretKey);
  if (target) return (await target.cancel()) ? 'forwarded' : 'failed';
  // Not one of ours: another proxy instance may own it (REDIS_URL).
  if (remote && (await remote(processId, secretKey))) return 'forwarded';
  return 'unknown_key';
}
