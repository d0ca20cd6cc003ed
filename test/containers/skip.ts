// When the container variants run: when a Docker engine answers (probed in a
// child process, bounded to 5 s). Otherwise every container scenario is
// reported SKIPPED with a reason that names Docker; the same scenarios still
// run on the embedded backend (test/integration/*).

import { dockerUnavailableReason } from '../fixtures/postgres.js';

/** null when the container variants can run, else the skip reason */
export async function containerSkipReason(): Promise<string | null> {
  if (process.env.STAGEDOOR_TEST_BACKEND === 'embedded') {
    return 'container variant not run: STAGEDOOR_TEST_BACKEND=embedded (Docker not used); the embedded variant runs in test/integration/';
  }
  const reason = await dockerUnavailableReason();
  return reason === null ? null : `container variant needs a Docker engine: ${reason}; the embedded variant runs in test/integration/`;
}
