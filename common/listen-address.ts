// `host:port` parsing for the *_LISTEN variables, with IPv6 in brackets as
// URLs write it ("[::1]:6432").

export interface ListenAddress {
  host: string;
  port: number;
}

export function parseListenAddress(value: string, name: string): ListenAddress {
  const m = /^(?:\[([0-9a-fA-F:.]+)\]|([^:[\]]+)):(\d{1,5})$/.exec(value.trim());
  if (!m) throw new Error(`${name} must look like host:port (e.g. 127.0.0.1:6432), got "${value}"`);
  const port = Number(m[3]);
  if (port > 65535) throw new Error(`${name}: port ${port} is out of range`);
  return { host: (m[1] ?? m[2]) as string, port };
}

export function formatListenAddress(a: ListenAddress): string {
  return a.host.includes(':') ? `[${a.host}]:${a.port}` : `${a.host}:${a.port}`;
}
