// The walking skeleton, as a user meets it: real clients (psql and pg)
// through the proxy to real PostgreSQL, every refusal with its SQLSTATE, and
// provisioning through the API, on the embedded backend. The scenario bodies
// live in test/scenarios/ (gateway.ts, provisioning.ts); test/containers/
// runs the same ones on containers.

import { asTarget, startStack, type Stack } from '../fixtures/stack.js';
import { gatewaySuite } from '../scenarios/gateway.js';
import { provisioningSuite } from '../scenarios/provisioning.js';
import { runSuites } from '../scenarios/registry.js';
import type { Target } from '../scenarios/target.js';

let stack: Stack | undefined;

runSuites<Target>([gatewaySuite, provisioningSuite], {
  backend: 'embedded',
  async start() {
    stack = await startStack();
    return asTarget(stack);
  },
  async stop() {
    await stack?.stop();
  },
});
