// Connection audit records (accept, refusal, close) leave the hot path at
// once: they are queued and posted to the control plane in batches. When the
// control plane stays unreachable the oldest records are dropped and counted
// (stagedoor_audit_events_dropped_total), never silently.

import { BatchQueue } from '../common/batch-queue.js';
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
  private readonly queue: BatchQueue<ConnectionEventRecord>;

  constructor(opts: AuditReporterOptions) {
    this.queue = new BatchQueue({
      send: opts.post,
      onDropped: (n, when) => {
        opts.onDropped(n);
        if (when === 'close') opts.log.error('audit events lost at shutdown: control plane unreachable', { lost: n });
      },
      onSendFailed: (error, queued) => opts.log.warn('audit events not delivered, will retry', { queued, error }),
      maxQueued: opts.maxQueued ?? 100_000,
      batchSize: opts.batchSize ?? 500,
      intervalMs: opts.intervalMs ?? 500,
    });
  }

  record(e: ConnectionEventRecord): void {
    this.queue.push(e);
  }

  get pending(): number {
    return this.queue.pending;
  }

  flush(): Promise<void> {
    return this.queue.flush();
  }

  /** On shutdown: try to deliver what is left, for at most `timeoutMs`. */
  close(timeoutMs = 5_000): Promise<void> {
    return this.queue.close(timeoutMs);
  }
}
