// The incident, reproduced on the embedded backend: a legacy central database
// in which two orchestras share one database URL and a third reaches the same
// database through another host name. After import all three are refused at
// connect (08004); the audit lists the sharing; the fix keeps the oldest.
// The scenario bodies live in test/scenarios/incident.ts; test/containers/
// runs the same ones on containers.

import { asTarget, startStack, type Stack } from '../fixtures/stack.js';
import { incidentSuite } from '../scenarios/incident.js';
import { runSuites } from '../scenarios/registry.js';
import type { Target } from '../scenarios/target.js';

let stack: Stack | undefined;

runSuites<Target>([incidentSuite], {
  backend: 'embedded',
  async start() {
    stack = await startStack();
    return asTarget(stack);
  },
  async stop() {
    await stack?.stop();
  },
});
