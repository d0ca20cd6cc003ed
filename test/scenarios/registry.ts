// The scenario registry: suites of scenarios, each a sentence of the contract
// with a body that takes a target (test/scenarios/target.ts). The embedded
// test files (test/integration/*) and the container ones (test/containers/*)
// both register them with runSuite, one node:test test per scenario, so the
// two backends report the same names and counts.
//
// A scenario that cannot run honestly on containers says why in
// `embeddedOnly`; on containers it is reported SKIPPED with that reason.

import { after, before, describe, test } from 'node:test';
import type { Backend, Target } from './target.js';
import { waitUntil } from '../fixtures/wait.js';

export interface Scenario<T, C> {
  /** the test name: a sentence of the contract */
  name: string;
  run(target: T, context: C): Promise<void>;
  /** why it runs on the embedded backend only (containers skip it with this reason) */
  embeddedOnly?: string;
}

export interface ScenarioGroup<T, C> {
  name: string;
  scenarios: Array<Scenario<T, C>>;
}

export interface Suite<T extends Target, C> {
  /** what the suite is about, for reports */
  name: string;
  /** run once on a fresh stack before the scenarios: the orchestras and worlds they share */
  setup(target: T): Promise<C>;
  groups: Array<ScenarioGroup<T, C>>;
}

export function defineSuite<T extends Target, C>(suite: Suite<T, C>): Suite<T, C> {
  return suite;
}

export interface RunOptions<T> {
  backend: Backend;
  /** starts the stack (once, before every scenario) */
  start(): Promise<T>;
  /** stops everything start() started */
  stop(target: T | undefined): Promise<void>;
  /** when set, every scenario is reported SKIPPED with this reason and nothing is started */
  skip?: string | null;
}

/**
 * Registers one describe per group and one test per scenario, for every suite,
 * around one stack (the suites' setups run in order once it has started).
 */
export function runSuites<T extends Target>(suites: Array<Suite<T, any>>, opts: RunOptions<T>): void {
  let target: T | undefined;
  const contexts = new Map<Suite<T, unknown>, unknown>();
  const skipAll = opts.skip ?? undefined;
  if (!skipAll) {
    before(async () => {
      target = await opts.start();
      for (const suite of suites) contexts.set(suite, await suite.setup(target));
    });
    after(async () => {
      await opts.stop(target);
    });
  }
  for (const suite of suites) {
    for (const group of suite.groups) {
      describe(group.name, () => {
        for (const s of group.scenarios) {
          const skip = skipAll ?? (opts.backend === 'containers' && s.embeddedOnly ? `embedded backend only: ${s.embeddedOnly}` : undefined);
          test(s.name, skip ? { skip } : {}, async () => {
            if (target === undefined || !contexts.has(suite)) throw new Error(`the ${opts.backend} stack did not start`);
            await s.run(target, contexts.get(suite));
          });
        }
      });
    }
  }
}

/** Polls until cond() holds (bounded), for effects that have no event to await; throws when it never does. */
export async function waitFor(cond: () => Promise<boolean>, timeoutMs = 5_000): Promise<void> {
  if (!(await waitUntil(cond, timeoutMs))) throw new Error('condition not met in time');
}

export const delay = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
