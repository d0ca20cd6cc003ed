// Backend messages the proxy itself writes to clients. Everything else on the
// wire after start-up is relayed byte for byte; these are the only messages we
// originate, so they are built here and nowhere else.

export const PROTOCOL_3_0 = 196608; // 3 << 16
export const SSL_REQUEST_CODE = 80877103;
export const GSSENC_REQUEST_CODE = 80877104;
export const CANCEL_REQUEST_CODE = 80877102;

/** Postgres' own cap (MAX_STARTUP_PACKET_LENGTH); anything larger is an attack or a bug. */
export const MAX_STARTUP_PACKET = 10_000;
/** A token is a JWT of a few hundred bytes; 8 KiB leaves room without letting 1 MB "passwords" in. */
export const MAX_PASSWORD_PACKET = 8_192;

/** One protocol message: type byte, int32 length (itself included), body. */
export function message(type: string, body: Buffer): Buffer {
  const out = Buffer.allocUnsafe(5 + body.length);
  out.write(type, 0, 'latin1');
  out.writeInt32BE(4 + body.length, 1);
  body.copy(out, 5);
  return out;
}

function int32(n: number): Buffer {
  const b = Buffer.allocUnsafe(4);
  b.writeInt32BE(n, 0);
  return b;
}

function cstring(s: string): Buffer {
  return Buffer.concat([Buffer.from(s, 'utf8'), Buffer.from([0])]);
}

export const authenticationOk = (): Buffer => message('R', int32(0));
export const authenticationCleartextPassword = (): Buffer => message('R', int32(3));

export function backendKeyData(processId: number, secretKey: number): Buffer {
  const body = Buffer.allocUnsafe(8);
  body.writeInt32BE(processId, 0);
  body.writeInt32BE(secretKey, 4);
  return message('K', body);
}

export const readyForQuery = (status: 'I' | 'T' | 'E' = 'I'): Buffer => message('Z', Buffer.from(status, 'latin1'));

/** NegotiateProtocolVersion: the newest minor version we speak and the `_pq_.` options we do not know. */
export function negotiateProtocolVersion(minor: number, unsupported: readonly string[]): Buffer {
  return message('v', Buffer.concat([int32(minor), int32(unsupported.length), ...unsupported.map(cstring)]));
}

export interface ErrorFields {
  severity: 'FATAL' | 'ERROR';
  sqlstate: string;
  message: string;
  detail?: string;
  hint?: string;
}

export function errorResponse(f: ErrorFields): Buffer {
  const parts: Buffer[] = [];
  const field = (code: string, value: string): void => {
    parts.push(Buffer.from(code, 'latin1'), cstring(value));
  };
  field('S', f.severity);
  field('V', f.severity); // non-localised severity, as Postgres 9.6+ sends
  field('C', f.sqlstate);
  field('M', f.message);
  if (f.detail) field('D', f.detail);
  if (f.hint) field('H', f.hint);
  parts.push(Buffer.from([0]));
  return message('E', Buffer.concat(parts));
}
