import { randomUUID } from 'node:crypto';
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import type { RouteAnswer } from '../../common/internal-api.js';
import { ControlPlaneUnavailable, type RouteLookup } from '../../proxy/control-plane-client.js';
import { RouteCache, type CacheDecision, type RouteCacheOptions } from '../../proxy/route-cache.js';

const TTL = 5_000;
const MAX_STALE = 60_000;
const NEGATIVE_TTL = 2_000;

function route(subdomain: string, orchestraId: string = randomUUID(), patch: Partial<RouteAnswer> = {}): RouteAnswer {
  return {
    orchestraId,
    subdomain,
    status: 'active',
    maxConnections: null,
    upstream: { host: '127.0.0.1', port: 5432, database: `db_${subdomain}`, user: 'u', password: 'p', sslmode: 'disable' },
    upstreamAddress: '127.0.0.1:5432',
    isolationOk: true,
    isolationDetail: null,
    revokedJtis: [],
    ...patch,
  };
}

type Answer = RouteLookup | ControlPlaneUnavailable | Promise<RouteLookup>;

/**
 * The cache's own input: a function from subdomain to lookup. `answers` says
 * what the control plane says for each subdomain right now; it can be changed
 * between calls. Every call is recorded.
 */
function harness(opts: Partial<RouteCacheOptions> = {}) {
  let t = 1_000_000;
  const answers = new Map<string, Answer>();
  const calls: string[] = [];
  const decisions: CacheDecision[] = [];
  const cache = new RouteCache(
    async (subdomain) => {
      calls.push(subdomain);
      const a = answers.get(subdomain) ?? { found: false };
      if (a instanceof ControlPlaneUnavailable) throw a;
      return a;
    },
    { ttlMs: TTL, maxStaleMs: MAX_STALE, negativeTtlMs: NEGATIVE_TTL, now: () => t, ...opts },
    (d) => decisions.push(d),
  );
  return {
    cache,
    calls,
    decisions,
    answers,
    found: (r: RouteAnswer): RouteLookup => ({ found: true, route: r }),
    advance: (ms: number) => (t += ms),
    lastDecision: () => decisions[decisions.length - 1],
  };
}

function deferred<T>(): { promise: Promise<T>; resolve: (v: T) => void } {
  let resolve!: (v: T) => void;
  const promise = new Promise<T>((r) => (resolve = r));
  return { promise, resolve };
}

describe('fresh and expired entries', () => {
  test('the first get asks the control plane (miss); a fresh entry is then a hit without asking again', async () => {
    const h = harness();
    const r = route('acme-films');
    h.answers.set('acme-films', h.found(r));

    assert.deepEqual(await h.cache.get('acme-films'), r);
    assert.equal(h.lastDecision(), 'miss');
    h.advance(TTL - 1);
    assert.deepEqual(await h.cache.get('acme-films'), r);
    assert.equal(h.lastDecision(), 'hit');
    assert.deepEqual(h.calls, ['acme-films'], 'the fetcher was called once');
  });

  test('after the ttl the control plane is asked again (miss) and the new answer is used', async () => {
    const h = harness();
    const id = randomUUID();
    h.answers.set('acme-films', h.found(route('acme-films', id)));
    await h.cache.get('acme-films');

    const moved = route('acme-films', id, { upstreamAddress: '10.0.0.2:5432' });
    h.answers.set('acme-films', h.found(moved));
    h.advance(TTL);
    assert.deepEqual(await h.cache.get('acme-films'), moved);
    assert.equal(h.lastDecision(), 'miss');
    assert.equal(h.calls.length, 2);
  });

  test('entries are per subdomain', async () => {
    const h = harness();
    const a = route('acme-films');
    const b = route('bravo-band');
    h.answers.set('acme-films', h.found(a));
    h.answers.set('bravo-band', h.found(b));
    assert.deepEqual(await h.cache.get('acme-films'), a);
    assert.deepEqual(await h.cache.get('bravo-band'), b);
    assert.deepEqual(await h.cache.get('acme-films'), a);
    assert.deepEqual(h.calls, ['acme-films', 'bravo-band']);
  });
});

describe('unknown orchestras', () => {
  test('an unknown orchestra is null and is remembered as negative_hit for negativeTtlMs', async () => {
    const h = harness();
    assert.equal(await h.cache.get('nobody'), null);
    assert.equal(h.lastDecision(), 'miss');

    h.advance(NEGATIVE_TTL - 1);
    assert.equal(await h.cache.get('nobody'), null);
    assert.equal(h.lastDecision(), 'negative_hit');
    assert.equal(h.calls.length, 1);

    // Created meanwhile: seen once the negative entry is older than negativeTtlMs (not the longer ttl).
    const r = route('nobody');
    h.answers.set('nobody', h.found(r));
    h.advance(1);
    assert.deepEqual(await h.cache.get('nobody'), r);
    assert.equal(h.lastDecision(), 'miss');
    assert.equal(h.calls.length, 2);
  });
});

describe('control plane unavailable', () => {
  test('within maxStale a cached route is still used (stale)', async () => {
    const h = harness();
    const r = route('acme-films');
    h.answers.set('acme-films', h.found(r));
    await h.cache.get('acme-films');

    h.answers.set('acme-films', new ControlPlaneUnavailable('down'));
    h.advance(MAX_STALE - 1);
    assert.deepEqual(await h.cache.get('acme-films'), r);
    assert.equal(h.lastDecision(), 'stale');
    assert.equal(h.calls.length, 2, 'the control plane was asked first');
  });

  test('beyond maxStale the cache fails closed: ControlPlaneUnavailable (unavailable)', async () => {
    const h = harness();
    h.answers.set('acme-films', h.found(route('acme-films')));
    await h.cache.get('acme-films');

    h.answers.set('acme-films', new ControlPlaneUnavailable('down'));
    h.advance(MAX_STALE);
    await assert.rejects(h.cache.get('acme-films'), ControlPlaneUnavailable);
    assert.equal(h.lastDecision(), 'unavailable');
  });

  test('with nothing cached an unreachable control plane means ControlPlaneUnavailable (unavailable)', async () => {
    const h = harness();
    h.answers.set('acme-films', new ControlPlaneUnavailable('down'));
    await assert.rejects(h.cache.get('acme-films'), ControlPlaneUnavailable);
    assert.equal(h.lastDecision(), 'unavailable');
  });

  test('a remembered unknown orchestra is not served stale once its negative ttl is over', async () => {
    const h = harness();
    await h.cache.get('nobody');
    h.answers.set('nobody', new ControlPlaneUnavailable('down'));
    h.advance(NEGATIVE_TTL);
    await assert.rejects(h.cache.get('nobody'), ControlPlaneUnavailable);
    assert.equal(h.lastDecision(), 'unavailable');
  });
});

describe('invalidation', () => {
  test('invalidate(subdomain) forces a new fetch for that subdomain only', async () => {
    const h = harness();
    h.answers.set('acme-films', h.found(route('acme-films')));
    h.answers.set('bravo-band', h.found(route('bravo-band')));
    await h.cache.get('acme-films');
    await h.cache.get('bravo-band');

    const suspended = route('acme-films', undefined, { status: 'suspended' });
    h.answers.set('acme-films', h.found(suspended));
    h.cache.invalidate('acme-films');
    assert.deepEqual(await h.cache.get('acme-films'), suspended);
    assert.equal(h.lastDecision(), 'miss');
    await h.cache.get('bravo-band');
    assert.equal(h.lastDecision(), 'hit');
    assert.deepEqual(h.calls, ['acme-films', 'bravo-band', 'acme-films']);
  });

  test('invalidate() without a subdomain drops everything', async () => {
    const h = harness();
    h.answers.set('acme-films', h.found(route('acme-films')));
    h.answers.set('bravo-band', h.found(route('bravo-band')));
    await h.cache.get('acme-films');
    await h.cache.get('bravo-band');
    h.cache.invalidate();
    await h.cache.get('acme-films');
    await h.cache.get('bravo-band');
    assert.equal(h.calls.length, 4);
  });

  test('invalidateOrchestra(id) forces a new fetch for every subdomain of that orchestra only', async () => {
    const h = harness();
    const id = randomUUID();
    h.answers.set('acme-films', h.found(route('acme-films', id)));
    h.answers.set('acme-old', h.found(route('acme-old', id)));
    h.answers.set('bravo-band', h.found(route('bravo-band')));
    await h.cache.get('acme-films');
    await h.cache.get('acme-old');
    await h.cache.get('bravo-band');
    assert.equal(h.calls.length, 3);

    h.cache.invalidateOrchestra(id);
    await h.cache.get('acme-films');
    assert.equal(h.lastDecision(), 'miss');
    await h.cache.get('acme-old');
    assert.equal(h.lastDecision(), 'miss');
    await h.cache.get('bravo-band');
    assert.equal(h.lastDecision(), 'hit');
    assert.deepEqual(h.calls.slice(3), ['acme-films', 'acme-old']);
  });

  test('an invalidated route is not served stale when the control plane is down', async () => {
    const h = harness();
    h.answers.set('acme-films', h.found(route('acme-films')));
    await h.cache.get('acme-films');
    h.cache.invalidate('acme-films');
    h.answers.set('acme-films', new ControlPlaneUnavailable('down'));
    await assert.rejects(h.cache.get('acme-films'), ControlPlaneUnavailable);
  });
});

describe('concurrency', () => {
  test('concurrent gets for one subdomain share one fetch', async () => {
    const h = harness();
    const r = route('acme-films');
    const pending = deferred<RouteLookup>();
    h.answers.set('acme-films', pending.promise);
    const gets = Array.from({ length: 20 }, () => h.cache.get('acme-films'));
    pending.resolve(h.found(r));
    const results = await Promise.all(gets);
    assert.ok(results.every((x) => x !== null && x.orchestraId === r.orchestraId));
    assert.deepEqual(h.calls, ['acme-films']);
  });

  test('concurrent gets sharing a failed fetch all fail and the next get asks again', async () => {
    const h = harness();
    let reject!: (e: Error) => void;
    h.answers.set('acme-films', new Promise<RouteLookup>((_, rej) => (reject = rej)));
    const gets = Array.from({ length: 5 }, () => h.cache.get('acme-films'));
    reject(new ControlPlaneUnavailable('down'));
    const results = await Promise.allSettled(gets);
    assert.ok(results.every((x) => x.status === 'rejected' && x.reason instanceof ControlPlaneUnavailable));
    assert.equal(h.calls.length, 1);

    h.answers.set('acme-films', h.found(route('acme-films')));
    assert.notEqual(await h.cache.get('acme-films'), null);
    assert.equal(h.calls.length, 2);
  });

  test('an invalidation during an in-flight fetch keeps that (possibly old) answer out of the cache', async () => {
    const h = harness();
    const old = route('acme-films');
    const pending = deferred<RouteLookup>();
    h.answers.set('acme-films', pending.promise);
    const first = h.cache.get('acme-films');

    h.cache.invalidate('acme-films'); // e.g. token-revoked arrives while the lookup is on the wire
    pending.resolve(h.found(old));
    await first;

    const fresh = route('acme-films', old.orchestraId, { revokedJtis: ['j1'] });
    h.answers.set('acme-films', h.found(fresh));
    assert.deepEqual(await h.cache.get('acme-films'), fresh);
    assert.equal(h.lastDecision(), 'miss');
    assert.equal(h.calls.length, 2, 'the old answer was not cached');
  });

  test('invalidateOrchestra during an in-flight fetch also keeps that answer out of the cache', async () => {
    const h = harness();
    const old = route('acme-films');
    const pending = deferred<RouteLookup>();
    h.answers.set('acme-films', pending.promise);
    const first = h.cache.get('acme-films');
    h.cache.invalidateOrchestra(old.orchestraId);
    pending.resolve(h.found(old));
    await first;
    h.answers.set('acme-films', h.found(old));
    await h.cache.get('acme-films');
    assert.equal(h.calls.length, 2);
  });

  test('a get that starts after an invalidation does not join a fetch that started before it', async () => {
    const h = harness();
    const old = route('acme-films');
    const pending = deferred<RouteLookup>();
    h.answers.set('acme-films', pending.promise);
    const before = h.cache.get('acme-films');

    h.cache.invalidate('acme-films'); // token j1 revoked
    const fresh = route('acme-films', old.orchestraId, { revokedJtis: ['j1'] });
    h.answers.set('acme-films', h.found(fresh));
    // A connect that begins after a token-revoked / orchestra-changed event must
    // not join a lookup started before it (it would miss the revocation).
    const after = h.cache.get('acme-films');
    pending.resolve(h.found(old));
    await before;
    assert.deepEqual(await after, fresh, 'the get after the invalidation must see the post-invalidation answer');
  });
});
