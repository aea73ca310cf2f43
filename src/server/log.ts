/**
 * The server's log: one line per event. JSON lines when the output is not a
 * terminal (for log collectors), short readable lines when it is.
 */

export type LogFields = Record<string, string | number | boolean | null | undefined>

export interface Logger {
  info(msg: string, fields?: LogFields): void
  error(msg: string, fields?: LogFields): void
}

export interface LoggerOptions {
  /** JSON lines (default: when `stream` is not a TTY). */
  json?: boolean
  /** Where lines go (default: stdout). */
  stream?: { write(s: string): unknown; isTTY?: boolean }
}

function textValue(v: string | number | boolean | null): string {
  return typeof v === 'string' && /[\s"=]/.test(v) ? JSON.stringify(v) : String(v)
}

export function createLogger(options: LoggerOptions = {}): Logger {
  const stream = options.stream ?? process.stdout
  const json = options.json ?? stream.isTTY !== true
  const line = (level: 'info' | 'error', msg: string, fields: LogFields = {}): void => {
    const defined = Object.entries(fields).filter((e): e is [string, string | number | boolean | null] => e[1] !== undefined)
    if (json) {
      stream.write(`${JSON.stringify({ time: new Date().toISOString(), level, msg, ...Object.fromEntries(defined) })}\n`)
    } else {
      const time = new Date().toTimeString().slice(0, 8)
      const rest = defined.map(([k, v]) => `${k}=${textValue(v)}`).join(' ')
      stream.write(`${time} ${level === 'error' ? 'ERROR ' : ''}${msg}${rest ? ` ${rest}` : ''}\n`)
    }
  }
  return { info: (m, f) => line('info', m, f), error: (m, f) => line('error', m, f) }
}

/** A logger that drops everything. */
export const silentLogger: Logger = { info() {}, error() {} }
