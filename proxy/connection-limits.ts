// Per-orchestra connection caps (maxConnections). This in-process counter is
// exact for a single proxy; with REDIS_URL the shared lease counter of the bus
// takes its place so the cap holds across instances.

export interface ConnectionLimiter {
  /** A release function when under the cap, or null when the cap is reached. */
  acquire(orchestraId: string, max: number | null): Promise<(() => void) | null>;
  /** Slots this instance holds for an orchestra right now. */
  held(orchestraId: string): number;
}

export class LocalConnectionLimiter implements ConnectionLimiter {
  private readonly counts = new Map<string, number>();

  held(orchestraId: string): number {
    return this.counts.get(orchestraId) ?? 0;
  }

  async acquire(orchestraId: string, max: number | null): Promise<(() => void) | null> {
    const n = this.counts.get(orchestraId) ?? 0;
    if (max !== null && n >= max) return null;
    this.counts.set(orchestraId, n + 1);
    let released = false;
    return () => {
      if (released) return;
      released = true;
      const left = (this.counts.get(orchestraId) ?? 1) - 1;
      if (left <= 0) this.counts.delete(orchestraId);
      else this.counts.set(orchestraId, left);
    };
  }
}
