// The second line of defence: the audit every AUDIT_INTERVAL, exported as
// stagedoor_isolation_violations{kind}, each new violation logged and, with
// ALERT_WEBHOOK_URL, posted as JSON.

import { Gauge, type Registry } from 'prom-client';
import type { Logger } from '../common/log.js';
import type { AuditLog } from './audit-log.js';
import { runIsolationAudit, type AuditDeps, type AuditReport, type Violation, type ViolationKind } from './isolation-audit.js';

const KINDS: ViolationKind[] = ['shared_upstream', 'shared_fingerprint', 'missing_database', 'central_schema_leak', 'orchestra_schema_leak', 'cross_access', 'marker_mismatch', 'unreachable'];

export class IsolationMonitor {
  private readonly gauge: Gauge<'kind'>;
  private known = new Set<string>();
  private timer: NodeJS.Timeout | null = null;
  private running: Promise<AuditReport> | null = null;
  lastReport: AuditReport | null = null;

  constructor(
    private readonly deps: AuditDeps,
    private readonly audit: AuditLog,
    private readonly log: Logger,
    registry: Registry,
    private readonly webhookUrl: string | undefined,
  ) {
    this.gauge = new Gauge({ name: 'stagedoor_isolation_violations', help: 'Isolation violations found by the last audit, by kind', labelNames: ['kind'], registers: [registry] });
    for (const k of KINDS) this.gauge.set({ kind: k }, 0);
  }

  start(intervalMs: number): void {
    this.timer = setInterval(() => void this.run().catch((e: unknown) => this.log.error('isolation audit failed', { error: e })), intervalMs);
    this.timer.unref();
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
  }

  /** Runs the audit (concurrent callers share one run) and updates metrics and alerts. */
  run(): Promise<AuditReport> {
    if (!this.running) {
      this.running = runIsolationAudit(this.deps)
        .then((r) => this.record(r))
        .finally(() => {
          this.running = null;
        });
    }
    return this.running;
  }

  private async record(report: AuditReport): Promise<AuditReport> {
    this.lastReport = report;
    for (const k of KINDS) this.gauge.set({ kind: k }, report.violations.filter((v) => v.kind === k).length);
    const keys = new Set(report.violations.map(keyOf));
    const fresh = report.violations.filter((v) => !this.known.has(keyOf(v)));
    this.known = keys;
    for (const v of fresh) {
      this.log.error('isolation violation', { kind: v.kind, orchestras: v.orchestras, detail: v.detail });
      this.audit.record({ kind: 'isolation.violation', subdomain: v.orchestras[0] ?? null, reason: `${v.kind}: ${v.detail}`, detail: { orchestras: v.orchestras } });
    }
    if (fresh.length && this.webhookUrl) await this.alert(fresh);
    return report;
  }

  private async alert(violations: Violation[]): Promise<void> {
    try {
      const res = await fetch(this.webhookUrl!, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ text: `stagedoor: ${violations.length} new isolation violation(s)`, violations }),
        signal: AbortSignal.timeout(5_000),
      });
      if (!res.ok) this.log.warn('alert webhook answered an error', { status: res.status });
    } catch (e) {
      this.log.warn('alert webhook unreachable', { error: e });
    }
  }
}

function keyOf(v: Violation): string {
  return `${v.kind}|${v.orchestras.join(',')}|${v.detail}`;
}
