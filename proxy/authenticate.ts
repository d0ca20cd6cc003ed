// Authentication and authorisation of one client: the password is a tenant
// token; the token, the route and the start-up parameters must all agree on
// one orchestra before any byte goes upstream. The order of checks matters:
// the token is verified before the route is consulted, so an unauthenticated
// client learns nothing about which orchestras exist.

import { SUBDOMAIN_PATTERN, type RouteAnswer, type UpstreamRoute } from '../common/internal-api.js';
import type { ClientReader } from './client-reader.js';
import { ControlPlaneUnavailable } from './control-plane-client.js';
import { Refusal } from './refusals.js';
import type { RouteCache } from './route-cache.js';
import type { TokenVerifier, VerifiedToken } from './token-verifier.js';
import { MAX_PASSWORD_PACKET, authenticationCleartextPassword } from './wire.js';


export interface AuthorizedSession {
  subdomain: string;
  token: VerifiedToken;
  route: RouteAnswer & { upstream: UpstreamRoute };
}

export interface AuthenticateDeps {
  verifier: TokenVerifier;
  routes: RouteCache;
}

/** Checks that need nothing but the start-up packet; run before asking for a password. */
export function checkStartupParameters(params: ReadonlyMap<string, string>): { subdomain: string } {
  const user = params.get('user');
  if (!user) throw new Refusal('missing_user');
  const replication = params.get('replication');
  if (replication !== undefined && !/^(false|off|no|0)$/i.test(replication)) throw new Refusal('replication_refused');
  return { subdomain: user };
}

export async function authenticate(
  reader: ClientReader,
  params: ReadonlyMap<string, string>,
  subdomain: string,
  deps: AuthenticateDeps,
): Promise<AuthorizedSession> {
  reader.socket.write(authenticationCleartextPassword());
  const password = await readPassword(reader);
  const token = await deps.verifier.verify(password);

  if (!SUBDOMAIN_PATTERN.test(subdomain)) throw new Refusal('unknown_orchestra', 'user is not a valid subdomain');
  let route: RouteAnswer | null;
  try {
    route = await deps.routes.get(subdomain);
  } catch (e) {
    if (e instanceof ControlPlaneUnavailable) throw new Refusal('control_plane_unavailable', e.message);
    throw e;
  }
  if (!route) throw new Refusal('unknown_orchestra');
  if (token.orchestraId !== route.orchestraId) throw new Refusal('token_other_orchestra', `token for ${token.orchestraId}`);
  if (route.revokedJtis.includes(token.jti)) throw new Refusal('token_revoked');
  const database = params.get('database') ?? subdomain;
  if (database !== subdomain) throw new Refusal('wrong_database', `database "${database}"`);
  if (route.status === 'deleted') throw new Refusal('orchestra_deleted');
  if (route.status !== 'active') throw new Refusal('orchestra_not_active', `status ${route.status}`);
  if (!route.isolationOk) throw new Refusal('isolation_violation', route.isolationDetail ?? undefined);
  if (!route.upstream) throw new Refusal('orchestra_not_active', 'no upstream assigned');
  return { subdomain, token, route: route as AuthorizedSession['route'] };
}

async function readPassword(reader: ClientReader): Promise<string> {
  const header = await reader.read(5);
  const length = header.readInt32BE(1);
  if (header[0] !== 0x70 /* 'p' */) throw new Refusal('password_packet_invalid', `message type ${header[0]}`);
  if (length < 5 || length > MAX_PASSWORD_PACKET) throw new Refusal('password_packet_invalid', `length ${length}`);
  const body = await reader.read(length - 4);
  // PasswordMessage is a C string: exactly one NUL, at the end.
  if (body[body.length - 1] !== 0 || body.indexOf(0) !== body.length - 1) {
    throw new Refusal('password_packet_invalid', 'password not NUL-terminated');
  }
  return body.toString('utf8', 0, body.length - 1);
}
