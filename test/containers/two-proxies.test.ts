// test/integration/multi-instance.test.ts's scenarios on containers:
// docker-compose.yml's proxy-1 and proxy-2 sharing redis:7 and one control
// plane. Skipped, with the reason, when Docker is not reachable.

import { startContainerStack, type ContainerStack } from '../fixtures/container-stack.js';
import { runSuites } from '../scenarios/registry.js';
import { twoProxiesSuite } from '../scenarios/two-proxies.js';
import { containerSkipReason } from './skip.js';

runSuites<ContainerStack>([twoProxiesSuite], {
  backend: 'containers',
  skip: await containerSkipReason(),
  start: () => startContainerStack({ proxies: 2 }),
  async stop(target) {
    await target?.stop();
  },
});
