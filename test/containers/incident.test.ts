// test/integration/isolation.test.ts's scenarios (the incident: import,
// refusal at connect, audit, fix) on containers. The legacy URLs name the
// tenant server as the gateway's containers reach it (`tenant`, and
// `tenant-alias` for the second host name). Skipped, with the reason, when
// Docker is not reachable.

import { startContainerStack, type ContainerStack } from '../fixtures/container-stack.js';
import { incidentSuite } from '../scenarios/incident.js';
import { runSuites } from '../scenarios/registry.js';
import type { Target } from '../scenarios/target.js';
import { containerSkipReason } from './skip.js';

let stack: ContainerStack | undefined;

runSuites<Target>([incidentSuite], {
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
