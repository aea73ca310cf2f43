/** Command-line mistakes and the parsers of flag values shared by the commands. */

import { existsSync, readFileSync, statSync } from 'node:fs'
import type { ParseArgsConfig } from 'node:util'

/** A mistake in the command line: one line on stderr with a pointer to --help, exit code 2. */
export class UsageError extends Error {
  override name = 'UsageError'
}

/** An integer flag value in [min, max]. */
export function intValue(flag: string, raw: string, min = 0, max = Number.MAX_SAFE_INTEGER): number {
  const v = Number(raw)
  if (raw.trim() === '' || !Number.isInteger(v)) throw new UsageError(`--${flag} expects an integer, got ${JSON.stringify(raw)}`)
  if (v < min || v > max) throw new UsageError(`--${flag} must be between ${min} and ${max}, got ${v}`)
  return v
}

const UNITS: Record<string, number> = {
  '': 1,
  b: 1,
  k: 1e3,
  kb: 1e3,
  m: 1e6,
  mb: 1e6,
  g: 1e9,
  gb: 1e9,
  t: 1e12,
  tb: 1e12,
  kib: 2 ** 10,
  mib: 2 ** 20,
  gib: 2 ** 30,
  tib: 2 ** 40,
}

/** A size: plain bytes (`1073741824`) or with a unit (`512MB`, `4GiB`, `1.5G`). */
export function bytesValue(flag: string, raw: string): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$/i.exec(raw)
  const unit = m ? UNITS[m[2]!.toLowerCase()] : undefined
  if (!m || unit === undefined) {
    throw new UsageError(`--${flag} expects a size in bytes like 1073741824, 512MB or 4GiB, got ${JSON.stringify(raw)}`)
  }
  const v = Math.floor(Number(m[1]) * unit)
  if (v < 1) throw new UsageError(`--${flag} must be at least 1 byte, got ${JSON.stringify(raw)}`)
  return v
}

/**
 * A chat template given as a file path or inline. A value that names an
 * existing file is read; one that looks like Jinja (`{{` or `{%`) is used as
 * it is; anything else is a missing file.
 */
export function chatTemplateValue(flag: string, raw: string): string {
  if (existsSync(raw) && statSync(raw).isFile()) {
    try {
      return readFileSync(raw, 'utf8')
    } catch (err) {
      throw new UsageError(`cannot read --${flag} ${raw}: ${(err as Error).message}`)
    }
  }
  if (raw.includes('{{') || raw.includes('{%')) return raw
  throw new UsageError(`--${flag}: no such file ${JSON.stringify(raw)} (give a template file or an inline Jinja template)`)
}

export type Options = NonNullable<ParseArgsConfig['options']>
export type Values = Record<string, string | boolean | string[] | undefined>

/** One subcommand of `candela`. */
export interface Command {
  summary: string
  usage: string
  options: Options
  /** Rewrite the arguments before parsing (e.g. flags that take several values). */
  rewriteArgs?(args: string[]): string[]
  run(positionals: string[], values: Values): Promise<number>
}
