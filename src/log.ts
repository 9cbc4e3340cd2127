// One line per event on stderr: time, level, the component, the message, then key=value
// fields. Plain text because operators read it in a terminal or journald first.

export type Level = 'debug' | 'info' | 'warn' | 'error';
const ORDER: Record<Level, number> = { debug: 10, info: 20, warn: 30, error: 40 };

export type Fields = Record<string, string | number | boolean | bigint | undefined | null>;

export interface Logger {
  debug(msg: string, fields?: Fields): void;
  info(msg: string, fields?: Fields): void;
  warn(msg: string, fields?: Fields): void;
  error(msg: string, fields?: Fields): void;
  child(component: string): Logger;
}

function formatField(value: Fields[string]): string {
  const text = String(value);
  return /[\s"=]/.test(text) || text === '' ? JSON.stringify(text) : text;
}

export function createLogger(component = 'updraft', minLevel: Level = (process.env.UPDRAFT_LOG_LEVEL as Level) || 'info'): Logger {
  const min = ORDER[minLevel] ?? ORDER.info;
  const emit = (level: Level, msg: string, fields?: Fields) => {
    if (ORDER[level] < min) return;
    let line = `${new Date().toISOString()} ${level.toUpperCase().padEnd(5)} ${component}: ${msg}`;
    if (fields) {
      for (const key of Object.keys(fields)) {
        const value = fields[key];
        if (value !== undefined) line += ` ${key}=${formatField(value)}`;
      }
    }
    process.stderr.write(line + '\n');
  };
  return {
    debug: (m, f) => emit('debug', m, f),
    info: (m, f) => emit('info', m, f),
    warn: (m, f) => emit('warn', m, f),
    error: (m, f) => emit('error', m, f),
    child: (name) => createLogger(`${component}.${name}`, minLevel),
  };
}

/** The message of anything thrown, for log lines and error bodies. */
export function errorMessage(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}
