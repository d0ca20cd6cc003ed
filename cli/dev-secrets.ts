// `stagedoor dev` keeps what it generates under STAGEDOOR_DATA_DIR, so a
// restart finds the same admin token, keys, certificate and ports (orchestra
// upstream addresses include the tenant server's port).

import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { TokenSigner } from '../control-plane/signing-keys.js';

const execFileP = promisify(execFile);

export interface DevState {
  adminToken: string;
  encryptionKey: string;
  tokenSigningKey: string;
  centralPassword: string;
  tenantPassword: string;
  centralPort?: number;
  tenantPort?: number;
}

export async function loadDevState(dataDir: string): Promise<DevState> {
  // Searchable by others: embedded Postgres runs as the postgres user below it; the secrets inside are 0600.
  mkdirSync(dataDir, { recursive: true, mode: 0o755 });
  const file = join(dataDir, 'state.json');
  if (existsSync(file)) return JSON.parse(readFileSync(file, 'utf8')) as DevState;
  const state: DevState = {
    adminToken: `sd_admin_${randomBytes(24).toString('base64url')}`,
    encryptionKey: randomBytes(32).toString('base64'),
    tokenSigningKey: JSON.stringify(await TokenSigner.generateJwk()),
    centralPassword: randomBytes(18).toString('base64url'),
    tenantPassword: randomBytes(18).toString('base64url'),
  };
  saveDevState(dataDir, state);
  return state;
}

export function saveDevState(dataDir: string, state: DevState): void {
  writeFileSync(join(dataDir, 'state.json'), JSON.stringify(state, null, 2) + '\n', { mode: 0o600 });
}

/** A self-signed certificate for the proxy (CN and SANs localhost / 127.0.0.1 / ::1), made once. */
export async function ensureDevCertificate(dataDir: string): Promise<{ cert: string; key: string }> {
  const dir = join(dataDir, 'tls');
  const cert = join(dir, 'proxy.crt');
  const key = join(dir, 'proxy.key');
  if (existsSync(cert) && existsSync(key)) return { cert, key };
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  try {
    await execFileP('openssl', [
      'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-days', '3650',
      '-subj', '/CN=localhost', '-addext', 'subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1',
      '-keyout', key, '-out', cert,
    ]);
  } catch (e) {
    throw new Error(`could not generate the dev TLS certificate with openssl (${(e as Error).message}); install openssl or set TLS_CERT_FILE and TLS_KEY_FILE`);
  }
  return { cert, key };
}
