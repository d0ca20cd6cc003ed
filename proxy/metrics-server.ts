// METRICS_LISTEN: /metrics for Prometheus, /healthz (process alive) and
// /readyz (accepting sessions: keys loaded, not draining) for orchestrators.

import { createServer, type Server } from 'node:http';
import type { Registry } from 'prom-client';
import type { ListenAddress } from '../common/listen-address.js';

export async function startMetricsServer(addr: ListenAddress, registry: Registry, ready: () => boolean): Promise<Server> {
  const server = createServer((req, res) => {
    const path = (req.url ?? '/').split('?')[0];
    if (path === '/metrics') {
      registry.metrics().then(
        (body) => res.writeHead(200, { 'content-type': registry.contentType }).end(body),
        (e: Error) => res.writeHead(500).end(e.message),
      );
    } else if (path === '/healthz') {
      res.writeHead(200, { 'content-type': 'application/json' }).end('{"ok":true}');
    } else if (path === '/readyz') {
      const ok = ready();
      res.writeHead(ok ? 200 : 503, { 'content-type': 'application/json' }).end(JSON.stringify({ ready: ok }));
    } else {
      res.writeHead(404).end();
    }
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(addr.port, addr.host, () => {
      server.off('error', reject);
      resolve();
    });
  });
  return server;
}
