/**
 * What a model argument names: the built-in default model, a local folder or
 * `.gguf` file, or a Hugging Face repo (`org/name[:revision]`,
 * `hf:org/name[:quant]`) found in or fetched into the shared HF cache. A
 * local path wins over a repo id that happens to have the same spelling.
 */

import { closeSync, existsSync, openSync, readSync, statSync } from 'node:fs'
import { join, resolve } from 'node:path'

import { ensureDefaultModel } from './default-model.js'
import { LoadError } from './errors.js'
import { findModel, isHubReference } from './hub/index.js'
import type { DownloadProgress } from './hub/index.js'

export interface ModelSource {
  /** The folder or `.gguf` file to load. */
  path: string
  /** The repo id, for a model from the hub. */
  repo?: string
  /** The GGUF's multimodal projector from the same repo, when it has one. */
  mmproj?: string
}

export interface LocateOptions {
  /** Download progress of a hub model's files. */
  onDownloadProgress?: (p: DownloadProgress) => void
  /** Lines about fetching the default model. */
  log?: (line: string) => void
  /** Stops a hub download. */
  signal?: AbortSignal
}

/** Whether `model` can name a model without touching the network: 'default', an existing path or a repo id. */
export function isModelArgument(model: string | undefined): boolean {
  return model === undefined || model === 'default' || existsSync(resolve(model)) || isHubReference(model)
}

export function modelNotFound(model: string): LoadError {
  return new LoadError(
    `model path not found: ${model} (give a model folder, a .gguf file, a Hugging Face repo id like org/name, or 'default' for SmolLM2-135M-Instruct)`,
    { code: 'model_not_found' },
  )
}

/**
 * Why an existing local path cannot be a model, else undefined. The loader
 * takes a folder with config.json (safetensors + tokenizer.json beside it)
 * or a GGUF file; anything else is refused before a load is started.
 */
export function notAModel(path: string): string | undefined {
  const hint = 'give a model folder (config.json, tokenizer.json, safetensors weights) or a .gguf file'
  const full = resolve(path)
  if (statSync(full).isDirectory()) return existsSync(join(full, 'config.json')) ? undefined : `${path} is not a model folder: it has no config.json (${hint})`
  if (!full.toLowerCase().endsWith('.gguf')) return `${path} is not a model: ${hint}`
  const magic = Buffer.alloc(4)
  const fd = openSync(full, 'r')
  try {
    readSync(fd, magic, 0, 4, 0)
  } finally {
    closeSync(fd)
  }
  return magic.toString('latin1') === 'GGUF' ? undefined : `${path} is not a GGUF file (it does not start with the GGUF magic)`
}

export async function locateModel(model: string | undefined, options: LocateOptions = {}): Promise<ModelSource> {
  if (model === undefined || model === 'default') return { path: await ensureDefaultModel(options.log ? { log: options.log } : {}) }
  const local = resolve(model)
  if (existsSync(local)) return { path: local }
  if (!isHubReference(model)) throw modelNotFound(model)
  const m = await findModel(model, {
    ...(options.onDownloadProgress ? { onProgress: options.onDownloadProgress } : {}),
    ...(options.signal ? { signal: options.signal } : {}),
  })
  return { path: m.path, repo: m.repo, ...(m.mmproj ? { mmproj: m.mmproj } : {}) }
}
