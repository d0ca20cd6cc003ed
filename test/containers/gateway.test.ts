// test/integration/proxy.test.ts's scenarios (connecting, the wire protocol,
// cancel, isolation, refusals, provisioning) on containers: postgres:16 for
// the central and tenant servers, redis:7, the gateway image built from the
// Dockerfile for the control plane and the proxy, configured as in
// docker-compose.yml. Skipped, with the reason, when Docker is not reachable.

import { startContainerStack, type ContainerStack } from '../fixtures/container-stack.js';
import { gatewaySuite } from '../scenarios/gateway.js';
import { provisioningSuite } from '../scenarios/provisioning.js';
import { runSuites } from '../scenarios/registry.js';
import type { Target } from '../scenarios/target.js';
import { containerSkipReason } from './skip.js';

let stack: ContainerStack | undefined;

runSuites<Target>([gatewaySuite, provisioningSuite], {
  backend: 'containers',
  skip: await containerSkipReason(),
  async start() {
    stack = await startContainerStack({ proxies: 1 });
    return stack;
  },
  async stop() {
    await stack?.stop();
  },
});
