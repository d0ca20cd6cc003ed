// A bounded queue that sends its items in batches, off the caller's path: the
// proxy's connection audit records (to the control plane) and the control
// plane's audit log (to the central database) both go through it. While the
// destination is down the queue holds up to `maxQueued` items; beyond that the
// oldest are dropped and reported through `onDropped`, never silently. A
// batch stays at the front of the queue while it is being sent (so `pending`
// counts it) and is removed only once sent; a failed one is retried.

export interface BatchQueueOptions<T> {
  send: (batch: T[]) => Promise<void>;
  onDropped: (n: number, when: 'overflow' | 'close') => void;
  onSendFailed: (error: unknown, queued: number) => void;
  maxQueued: number;
  batchSize: number;
  intervalMs: number;
}

export class BatchQueue<T> {
  private queue: T[] = [];
  private sending: Promise<void> | null = null;
  /** items at the front of the queue that the running send carries */
  private inFlight = 0;
  private readonly timer: NodeJS.Timeout;
  /** items dropped so far (overflow or lost at close) */
  dropped = 0;

  constructor(private readonly opts: BatchQueueOptions<T>) {
    this.timer = setInterval(() => void this.flush(), opts.intervalMs);
    this.timer.unref();
  }

  push(item: T): void {
    this.queue.push(item);
    if (this.queue.length > this.opts.maxQueued) {
      const n = this.queue.length - this.opts.maxQueued;
      this.queue.splice(0, n);
      // Dropped items may be ones being sent: they no longer sit at the front.
      this.inFlight = Math.max(0, this.inFlight - n);
      this.drop(n, 'overflow');
    }
  }

  get pending(): number {
    return this.queue.length;
  }

  /** Sends everything queued; concurrent callers share one run; stops at the first failure. */
  flush(): Promise<void> {
    if (this.sending) return this.sending;
    if (this.queue.length === 0) return Promise.resolve();
    this.sending = (async () => {
      while (this.queue.length > 0) {
        const batch = this.queue.slice(0, this.opts.batchSize);
        this.inFlight = batch.length;
        try {
          await this.opts.send(batch);
          this.queue.splice(0, this.inFlight);
        } catch (e) {
          this.opts.onSendFailed(e, this.queue.length);
          return;
        } finally {
          this.inFlight = 0;
        }
      }
    })().finally(() => {
      this.sending = null;
    });
    return this.sending;
  }

  /** On shutdown: keeps trying for at most timeoutMs; what is still queued then is lost (and reported). */
  async close(timeoutMs: number): Promise<void> {
    clearInterval(this.timer);
    const deadline = Date.now() + timeoutMs;
    while (this.queue.length > 0 && Date.now() < deadline) {
      await this.flush();
      if (this.queue.length > 0) await new Promise((r) => setTimeout(r, 200));
    }
    if (this.queue.length > 0) {
      const n = this.queue.length;
      this.queue = [];
      this.drop(n, 'close');
    }
  }

  private drop(n: number, when: 'overflow' | 'close'): void {
    this.dropped += n;
    this.opts.onDropped(n, when);
  }
}
