/**
 * The pino logger factory. JSON by default; `pretty` for people at a terminal. Every credential
 * field is redacted here, by config, so that no module has to remember to.
 */
import { pino, type Logger, type LoggerOptions } from 'pino';

export type { Logger };

export const REDACT_PATHS = [
  'password',
  '*.password',
  'token',
  '*.token',
  'authorization',
  '*.authorization',
  'headers.authorization',
  'req.headers.authorization',
  'req.headers.cookie',
  'res.headers["set-cookie"]',
  'config.upstreams.*.password',
];

export interface LogOptions {
  level?: string;
  format?: 'json' | 'pretty';
  /** Where lines go; stderr by default so that stdout stays for command output. */
  destination?: NodeJS.WritableStream | number;
}

export function createLogger(options: LogOptions = {}): Logger {
  const base: LoggerOptions = {
    level: options.level ?? 'info',
    base: { service: 'pullcache' },
    redact: { paths: REDACT_PATHS, censor: '[redacted]' },
  };
  if (options.format === 'pretty') {
    return pino({
      ...base,
      transport: {
        target: 'pino-pretty',
        options: {
          destination: typeof options.destination === 'number' ? options.destination : 2,
          colorize: true,
        },
      },
    });
  }
  const destination = options.destination ?? 2;
  return pino(
    base,
    typeof destination === 'number'
      ? pino.destination({ fd: destination, sync: false })
      : destination,
  );
}

/** A logger that writes nothing, for tests and library use. */
export function silentLogger(): Logger {
  return pino({ level: 'silent' });
}
