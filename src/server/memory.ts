/**
 * Will a model fit? The estimate is its checkpoint's weight bytes plus its
 * KV budget (the `kvCacheBytes` asked for, else the most the engine's CPU
 * default may take: a quarter of available memory, at most 4 GiB, as
 * candela-core's machine_kv_cache_bytes; the engine then sizes the pool from
 * the model, usually smaller), against the memory available now (or what a
 * configured budget leaves after the models already hosted).
 */

import { existsSync, readFileSync, readdirSync, statSync } from 'node:fs'
import { freemem } from 'node:os'
import { join } from 'node:path'

const GIB = 2 ** 30

/** `MemAvailable` of /proc/meminfo (what the kernel can give without swapping), else Node's free memory. */
export function availableMemory(): number {
  try {
    const m = /^MemAvailable:\s+(\d+) kB$/m.exec(readFileSync('/proc/meminfo', 'utf8'))
    if (m) return Number(m[1]) * 1024
  } catch {
    // Not Linux: fall through.
  }
  return freemem()
}

/** The most the engine's KV pool takes when none is given (candela-core engine.rs machine_kv_cache_bytes). */
export function defaultKvBytes(available: number): number {
  return Math.min(Math.floor(available / 4), 4 * GIB)
}

/** Bytes of the weight files the loader reads from `path` (a .gguf file, or a folder as weights.rs picks its safetensors). */
export function checkpointBytes(path: string): number {
  const st = statSync(path)
  if (st.isFile()) return st.size
  const size = (f: string): number => (existsSync(join(path, f)) ? statSync(join(path, f)).size : 0)
  const index = join(path, 'model.safetensors.index.json')
  if (existsSync(index)) {
    try {
      const map = (JSON.parse(readFileSync(index, 'utf8')) as { weight_map?: Record<string, string> }).weight_map ?? {}
      return [...new Set(Object.values(map))].reduce((acc, f) => acc + size(f), 0)
    } catch {
      return 0
    }
  }
  if (existsSync(join(path, 'model.safetensors'))) return size('model.safetensors')
  return readdirSync(path)
    .filter((f) => f.startsWith('model') && f.endsWith('.safetensors'))
    .reduce((acc, f) => acc + size(f), 0)
}

/** `1.41 GiB`, `360.0 MiB`. */
export function formatBytes(n: number): string {
  return n >= GIB ? `${(n / GIB).toFixed(2)} GiB` : `${(n / 2 ** 20).toFixed(1)} MiB`
}

export interface FitCheck {
  weights: number
  kv: number
  available: number
}

/** Why `need` does not fit, with the numbers; undefined when it does. */
export function doesNotFit(what: string, c: FitCheck): string | undefined {
  if (c.weights + c.kv <= c.available) return undefined
  const g = formatBytes
  return (
    `${what} does not fit: its weights (${g(c.weights)}) and KV cache (${g(c.kv)}) need ${g(c.weights + c.kv)}, ` +
    `but ${g(c.available)} is available (terminate a model, or pass a smaller kv_cache_memory)`
  )
}
