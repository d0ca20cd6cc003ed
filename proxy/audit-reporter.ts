// Connection audit records (accept, refusal, close) leave the hot path at
// once: they are queued here and posted to the control plane in batches. The
// queue is bounded; when the control plane stays unreachable the oldest
// records are dropped and counted (stagedoor_audit_events_dropped_total),
// never silently.

import type { Logger } from '../common/log.js';
import type { ConnectionEventRecord } from './control-plane-client.js';

export interface AuditReporterOptions {
  post: (events: readonly ConnectionEventRecord[]) => Promise<void>;
  onDropped: (n: number) => void;
  log: Logger;
  maxQueued?: number;
  batchSize?: number;
  intervalMs?: number;
}

export class AuditReporter {
  private queue: ConnectionEventRecord[] = [];
  private timer: NodeJS.Timeout;
  private sending: Promise<void> | null = null;
  private readonly maxQueued: number;
  private readonly batchSize: number;

  constructor(private readonly opts: AuditReporterOptions) {
    this.maxQueued = opts.maxQueued ?? 100_000;
    this.batchSize = opts.batchSize ?? 500;
    this.timer = setInterval(() => void this.flush(), opts.intervalMs ?? 500);
    this.timer.unref();
  }

  record(e: ConnectionEventRecord): void {
    this.queue.push(e);
    if (this.queue.length > this.maxQueued) {
      const drop = this.queue.length - this.maxQueued;
      this.queue.splice(0, drop);
      this.opts.onDropped(drop);
    }
  }

  get pending(): number {
    return this.queue.length;
  }

  /** Sends everything queued; on failure the batch goes back to the front of the queue. */
  flush(): Promise<void> {
    if (this.sending) return this.sending;
    if (this.queue.length === 0) return Promise.resolve();
    this.sending = (async () => {
      while (this.queue.length > 0) {
        const batch = this.queue.splice(0, this.batchSize);
        try {
          await this.opts.post(batch);
        } catch (e) {
          this.queue.unshift(...batch);
          this.opts.log.warn('audit events not delivered, will retry', { queued: this.queue.length, error: e });
          return;
        }
      }
    })().finally(() => {
      this.sending = null;
    });
    return this.sending;
  }

  /** On shutdown: try to deliver what is left, for at most `timeoutMs`. */
  async close(timeoutMs = 5_000): Promise<void> {
    clearInterval(this.timer);
    const deadline = Date.now() + timeoutMs;
    while (this.queue.length > 0 && Date.now() < deadline) {
      await this.flush();
      if (this.queue.length > 0) await new Promise((r) => setTimeout(r, 200));
    }
    if (this.queue.length > 0) {
      this.opts.onDropped(this.queue.length);
      this.opts.log.error('audit events lost at shutdown: control plane unreachable', { lost: this.queue.length });
      this.queue = [];
    }
  }
}
