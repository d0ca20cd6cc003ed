// Structured logs: one JSON object per line on stdout, so operators can ship
// them to any collector without a parser of ours.

export type LogLevel = 'debug' | 'info' | 'warn' | 'error';
const RANK: Record<LogLevel, number> = { debug: 10, info: 20, warn: 30, error: 40 };

export type LogFields = Record<string, unknown>;

export interface Logger {
  debug(msg: string, fields?: LogFields): void;
  info(msg: string, fields?: LogFields): void;
  warn(msg: string, fields?: LogFields): void;
  error(msg: string, fields?: LogFields): void;
  child(fields: LogFields): Logger;
}

export interface LoggerOptions {
  level?: LogLevel;
  /** Where lines go; tests and `stagedoor dev` may capture them. */
  write?: (line: string) => void;
}

function levelFromEnv(): LogLevel {
  const v = process.env.LOG_LEVEL;
  return v === 'debug' || v === 'info' || v === 'warn' || v === 'error' ? v : 'info';
}

export function createLogger(base: LogFields, opts: LoggerOptions = {}): Logger {
  const min = RANK[opts.level ?? levelFromEnv()];
  const write = opts.write ?? ((line: string) => process.stdout.write(line + '\n'));
  const emit = (level: LogLevel, msg: string, fields?: LogFields): void => {
    if (RANK[level] < min) return;
    const record: LogFields = { ts: new Date().toISOString(), level, ...base, msg, ...fields };
    write(JSON.stringify(record, errorReplacer));
  };
  return {
    debug: (m, f) => emit('debug', m, f),
    info: (m, f) => emit('info', m, f),
    warn: (m, f) => emit('warn', m, f),
    error: (m, f) => emit('error', m, f),
    child: (fields) => createLogger({ ...base, ...fields }, opts),
  };
}

/** Errors have no enumerable fields; log their message and code instead of `{}`. */
function errorReplacer(_key: string, value: unknown): unknown {
  if (value instanceof Error) {
    const code = (value as { code?: unknown }).code;
    return code === undefined ? { message: value.message } : { message: value.message, code };
  }
  return value;
}

/** A logger that drops everything, for library use and tests that do not care. */
export const silentLogger: Logger = createLogger({}, { level: 'error', write: () => {} });
