// Control-plane side of invalidation: every change that may alter a proxy's
// decision (orchestra changed, token revoked, mapping changed) is published
// here. Proxies follow it over GET /v1/internal/events; with REDIS_URL the
// same events also go out on Redis for instances that listen there.

import { EventEmitter } from 'node:events';
import type { BusEvent } from '../common/internal-api.js';

export interface EventSink {
  publish(e: BusEvent): void;
}

export class EventBus implements EventSink {
  private readonly emitter = new EventEmitter();
  private readonly extraSinks: EventSink[] = [];

  constructor() {
    // Every connected proxy is a listener.
    this.emitter.setMaxListeners(0);
  }

  addSink(s: EventSink): void {
    this.extraSinks.push(s);
  }

  publish(e: BusEvent): void {
    this.emitter.emit('event', e);
    for (const s of this.extraSinks) s.publish(e);
  }

  subscribe(fn: (e: BusEvent) => void): () => void {
    this.emitter.on('event', fn);
    return () => this.emitter.off('event', fn);
  }

  get subscribers(): number {
    return this.emitter.listenerCount('event');
  }
}
