// Scale out on the embedded backend: two `stagedoor proxy` processes, one
// control plane, a real redis-server. The scenario bodies live in
// test/scenarios/two-proxies.ts; test/containers/ runs the same ones on
// containers (proxy-1 and proxy-2 of docker-compose.yml).

import { startTwoProxyStack, type TwoProxyStack } from '../fixtures/stack.js';
import { runSuites } from '../scenarios/registry.js';
import { twoProxiesSuite } from '../scenarios/two-proxies.js';

runSuites<TwoProxyStack>([twoProxiesSuite], {
  backend: 'embedded',
  start: () => startTwoProxyStack(),
  async stop(target) {
    await target?.stop();
  },
});
