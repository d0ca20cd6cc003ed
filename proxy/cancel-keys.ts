// The BackendKeyData a client sees is ours, never the upstream's: a random
// (processId, secretKey) pair that maps to the real key of the real upstream.
// A CancelRequest is forwarded only when both halves match a live session, so
// a guessed or stale key cancels nothing.

import { randomBytes } from 'node:crypto';

export interface CancelTarget {
  orchestraId: string;
  /** performs the cancel against the real upstream */
  cancel: () => Promise<boolean>;
}

export class CancelKeys {
  private readonly byKey = new Map<string, CancelTarget>();

  /** Issues a fresh key for a session; `release` when the session ends. */
  issue(target: CancelTarget): { processId: number; secretKey: number; release: () => void } {
    for (;;) {
      const raw = randomBytes(8);
      // Positive process ids: some clients print or parse them as pids.
      const processId = raw.readInt32BE(0) & 0x7fffffff;
      const secretKey = raw.readInt32BE(4);
      const k = keyOf(processId, secretKey);
      if (this.byKey.has(k)) continue;
      this.byKey.set(k, target);
      return { processId, secretKey, release: () => this.byKey.delete(k) };
    }
  }

  lookup(processId: number, secretKey: number): CancelTarget | undefined {
    return this.byKey.get(keyOf(processId, secretKey));
  }

  get size(): number {
    return this.byKey.size;
  }
}

const keyOf = (p: number, s: number): string => `${p}:${s}`;
