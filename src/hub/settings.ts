/**
 * Where the Hugging Face hub is and how to talk to it, from the same
 * environment variables huggingface_hub reads (constants.py), so candela and
 * Python share one cache and one login.
 */

import { readFileSync } from 'node:fs'
import { homedir } from 'node:os'
import { join } from 'node:path'

export interface HubSettings {
  /** Base URL of the hub (`HF_ENDPOINT`, default https://huggingface.co), without a trailing slash. */
  endpoint: string
  /** Bearer token (`HF_TOKEN`, else the file `huggingface-cli login` wrote), or undefined. */
  token: string | undefined
  /** `HF_HUB_OFFLINE`: never make a request; use what the cache holds. */
  offline: boolean
  /** The hub cache (`HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`). */
  cacheDir: string
}

const TRUE_VALUES = new Set(['1', 'ON', 'YES', 'TRUE'])
const isTrue = (v: string | undefined): boolean => v !== undefined && TRUE_VALUES.has(v.toUpperCase())

const expandHome = (p: string): string => (p === '~' || p.startsWith('~/') ? join(homedir(), p.slice(1)) : p)

export function hubSettings(env: NodeJS.ProcessEnv = process.env): HubSettings {
  const hfHome = expandHome(env.HF_HOME || join(env.XDG_CACHE_HOME || join(homedir(), '.cache'), 'huggingface'))
  const cacheDir = expandHome(env.HF_HUB_CACHE || env.HUGGINGFACE_HUB_CACHE || join(hfHome, 'hub'))
  const endpoint = (env.HF_ENDPOINT || 'https://huggingface.co').replace(/\/+$/, '')
  return {
    endpoint,
    token: readToken(env, hfHome),
    offline: isTrue(env.HF_HUB_OFFLINE) || isTrue(env.TRANSFORMERS_OFFLINE),
    cacheDir,
  }
}

function readToken(env: NodeJS.ProcessEnv, hfHome: string): string | undefined {
  const fromEnv = env.HF_TOKEN || env.HUGGING_FACE_HUB_TOKEN
  if (fromEnv) return fromEnv.trim()
  try {
    const t = readFileSync(expandHome(env.HF_TOKEN_PATH || join(hfHome, 'token')), 'utf8').trim()
    return t || undefined
  } catch {
    return undefined
  }
}
