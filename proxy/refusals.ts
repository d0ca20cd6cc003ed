// Every way the proxy says no, in one table: the SQLSTATE on the wire, the
// message a human reads, and the reason recorded in the audit log and in the
// metrics. Nothing else in the proxy writes an error text, so the wire, the
// audit log and the metrics cannot disagree (PRODUCT.md "Refusals").
//
// Messages never name another orchestra, an upstream host or a secret: a
// refusal is read by whoever is on the other end of the socket.

export const REFUSALS = {
  malformed_packet: { sqlstate: '08P01', message: 'invalid start-up packet' },
  unsupported_protocol: { sqlstate: '08P01', message: 'unsupported frontend protocol: stagedoor speaks protocol 3.0' },
  plaintext_after_ssl_request: { sqlstate: '08P01', message: 'received unencrypted data after the SSL request' },
  auth_timeout: { sqlstate: '08P01', message: 'start-up and authentication did not finish in time' },
  password_packet_invalid: { sqlstate: '08P01', message: 'expected a password message' },
  missing_user: { sqlstate: '28000', message: 'no user name in the start-up packet: the user is the orchestra subdomain' },
  tls_required: { sqlstate: '28000', message: 'TLS is required: connect with sslmode=require' },
  replication_refused: { sqlstate: '28000', message: 'replication connections are not supported through stagedoor' },
  unknown_orchestra: { sqlstate: '28000', message: 'unknown orchestra' },
  orchestra_deleted: { sqlstate: '28000', message: 'unknown orchestra' },
  token_missing: { sqlstate: '28P01', message: 'password authentication failed: the password must be a stagedoor token' },
  token_invalid: { sqlstate: '28P01', message: 'password authentication failed: the token is not valid' },
  token_expired: { sqlstate: '28P01', message: 'password authentication failed: the token has expired' },
  token_revoked: { sqlstate: '28P01', message: 'password authentication failed: the token has been revoked' },
  token_other_orchestra: { sqlstate: '28P01', message: 'password authentication failed: the token was not issued for this orchestra' },
  wrong_database: { sqlstate: '3D000', message: 'database does not exist: the database name must be the orchestra subdomain' },
  orchestra_not_active: { sqlstate: '57P03', message: 'the orchestra is not active' },
  control_plane_unavailable: { sqlstate: '57P03', message: 'the gateway cannot reach its control plane; try again shortly' },
  isolation_violation: { sqlstate: '08004', message: "refused: this orchestra's database is shared with another orchestra (isolation violation); an operator must resolve it" },
  upstream_unavailable: { sqlstate: '08006', message: "could not connect to the orchestra's database" },
  connection_limit: { sqlstate: '53300', message: 'too many connections for this orchestra' },
  internal_error: { sqlstate: 'XX000', message: 'internal error in the gateway' },
  shutting_down: { sqlstate: '57P01', message: 'the gateway is shutting down' },
  session_revoked: { sqlstate: '57P01', message: 'terminating connection: the token has been revoked' },
  session_expired: { sqlstate: '57P01', message: 'terminating connection: the token has expired' },
  session_orchestra_changed: { sqlstate: '57P01', message: 'terminating connection: the orchestra was suspended, deleted or moved' },
} as const satisfies Record<string, { sqlstate: string; message: string }>;

export type RefusalReason = keyof typeof REFUSALS;

/** A decision to refuse, carried up to the one place that writes it to the wire and the audit log. */
export class Refusal extends Error {
  readonly sqlstate: string;
  constructor(
    readonly reason: RefusalReason,
    /** extra detail for the audit log only (never sent to the client) */
    readonly auditDetail?: string,
  ) {
    super(REFUSALS[reason].message);
    this.sqlstate = REFUSALS[reason].sqlstate;
  }
}
