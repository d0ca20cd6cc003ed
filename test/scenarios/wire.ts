// test/fixtures/wire.ts for any proxy address: containers are reached at the
// Docker host, not always 127.0.0.1.

import net from 'node:net';
import pg from 'pg';

export { keyOf } from '../fixtures/wire.js';

/** Sends a CancelRequest on a connection of its own, as libpq does. */
export function sendCancel(host: string, port: number, processId: number, secretKey: number): Promise<void> {
  return new Promise((resolve, reject) => {
    const s = net.connect(port, host, () => {
      const b = Buffer.alloc(16);
      b.writeInt32BE(16, 0);
      b.writeInt32BE(80877102, 4);
      b.writeInt32BE(processId, 8);
      b.writeInt32BE(secretKey, 12);
      s.end(b);
    });
    s.on('close', () => resolve());
    s.on('error', reject);
  });
}

/** Writes bytes and collects everything until the server closes (or 5 s pass). */
export function rawExchange(host: string, port: number, bytes: Buffer): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    const s = net.connect(port, host, () => s.write(bytes));
    s.on('data', (d) => chunks.push(d));
    s.on('close', () => resolve(Buffer.concat(chunks)));
    s.on('error', reject);
    s.setTimeout(5_000, () => s.destroy());
  });
}

/** Runs SQL as a superuser on a server of the stack. */
export async function adminQuery(url: string, sql: string, params: unknown[] = []): Promise<pg.QueryResult> {
  const c = new pg.Client({ connectionString: url });
  await c.connect();
  try {
    return await c.query(sql, params);
  } finally {
    await c.end();
  }
}

/** Connects a pg client through a proxy; the caller ends it. */
export async function connect(config: pg.ClientConfig): Promise<pg.Client> {
  const c = new pg.Client(config);
  c.on('error', () => {});
  await c.connect();
  return c;
}

/** The SQLSTATE a connection attempt is refused with, or null when it connects. */
export async function refusalOf(config: pg.ClientConfig): Promise<string | null> {
  const c = new pg.Client(config);
  c.on('error', () => {});
  try {
    await c.connect();
    await c.end();
    return null;
  } catch (e) {
    return (e as { code?: string }).code ?? `no-sqlstate: ${(e as Error).message}`;
  }
}
