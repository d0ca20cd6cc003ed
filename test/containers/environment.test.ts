// Runs without Docker: the container stack configures the roles as
// docker-compose.yml does (same variables, same values once the .env secrets
// are filled in), adds only what it documents, and each role accepts it.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { loadControlPlaneConfig, loadProxyConfig } from '../../common/config.js';
import { REPO_ROOT, composeEnvironment, type StackSecrets } from '../fixtures/container-stack.js';

const secrets: StackSecrets = {
  postgresPassword: 'a'.repeat(64),
  adminToken: 'admin-token-0123456789abcdef',
  proxyToken: 'proxy-token-0123456789abcdef',
  encryptionKey: Buffer.alloc(32, 7).toString('base64'),
};
const dotEnv: Record<string, string> = {
  POSTGRES_PASSWORD: secrets.postgresPassword,
  ADMIN_TOKEN: secrets.adminToken,
  PROXY_TOKEN: secrets.proxyToken,
  ENCRYPTION_KEY: secrets.encryptionKey,
};

/** `environment:` of one service of docker-compose.yml (a plain block mapping), secrets interpolated. */
function composeServiceEnv(service: string): Record<string, string> {
  const lines = readFileSync(join(REPO_ROOT, 'docker-compose.yml'), 'utf8').split('\n');
  const start = lines.indexOf(`  ${service}:`);
  assert.ok(start >= 0, `service ${service} in docker-compose.yml`);
  const env: Record<string, string> = {};
  let inEnv = false;
  for (const line of lines.slice(start + 1)) {
    if (/^ {0,2}\S/.test(line)) break; // next service
    if (/^ {4}\S/.test(line)) {
      inEnv = line.trim() === 'environment:';
      continue;
    }
    const m = /^ {6}([A-Z_][A-Z0-9_]*):\s*(.*)$/.exec(line);
    if (inEnv && m) {
      const raw = m[2]!.replace(/^"(.*)"$/, '$1');
      env[m[1]!] = raw.replace(/\$\{([A-Z_]+)(:\?[^}]*)?\}/g, (_, name: string) => dotEnv[name] ?? `<unset ${name}>`);
    }
  }
  assert.ok(Object.keys(env).length > 0, `environment of ${service}`);
  return env;
}

const env = composeEnvironment(secrets);

test('the control-plane container gets docker-compose.yml’s environment, plus only the documented test additions', () => {
  const compose = composeServiceEnv('control-plane');
  const additions = Object.fromEntries(env.testAdditions.controlPlane.map((k) => [k, env.controlPlane[k]]));
  assert.deepEqual(env.controlPlane, { ...compose, ...additions });
});

test('each proxy container gets docker-compose.yml’s proxy environment, plus only the documented test additions', () => {
  for (const service of ['proxy-1', 'proxy-2']) {
    const compose = composeServiceEnv(service);
    const additions = Object.fromEntries(env.testAdditions.proxy.map((k) => [k, env.proxy[k]]));
    assert.deepEqual(env.proxy, { ...compose, ...additions }, service);
  }
});

test('each role accepts the container environment as its configuration', () => {
  const cp = loadControlPlaneConfig(env.controlPlane);
  assert.equal(cp.adminToken, secrets.adminToken);
  const proxy = loadProxyConfig(env.proxy);
  assert.equal(proxy.controlPlaneUrl.replace(/\/+$/, ''), 'http://control-plane:8080');
});
