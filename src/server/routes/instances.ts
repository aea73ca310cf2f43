/**
 * The control plane, by uid: POST /v1/instances launches a model (202 at
 * once; it loads in the background), GET /v1/instances lists the hosted
 * models with their status and download progress, GET /v1/instances/:uid
 * describes one, DELETE /v1/instances/:uid terminates it. Engine options are
 * the serve flags' names in snake_case (max_model_len, kv_cache_memory,
 * limit_mm_per_prompt...), read by the same parsers as the flags.
 */

import type { RequestHandler } from 'express'
import { z } from 'zod'

import { existsSync } from 'node:fs'
import { resolve } from 'node:path'

import { modelLoadOptions } from '../../cli/serve.js'
import type { Quantization } from '../../types.js'
import { QUANTIZATIONS } from '../../validate.js'
import { UsageError } from '../../cli/usage.js'
import type { AppContext } from '../context.js'
import { parseBody } from '../context.js'
import { parseHubReference } from '../../hub/index.js'
import { hasQuantTag } from '../../hub/select.js'
import { badRequest } from '../errors.js'

const OptionValue = z.union([z.string(), z.number(), z.boolean(), z.array(z.string()), z.record(z.string(), z.unknown())])

export const LaunchRequest = z
  .object({
    model: z.string().min(1),
    uid: z.string().min(1).optional(),
    served_model_name: z.union([z.string().min(1), z.array(z.string().min(1)).min(1)]).optional(),
    format: z.enum(['safetensors', 'gguf']).optional(),
    quantization: z.string().min(1).optional(),
  })
  .catchall(OptionValue)

/** What a launch loads: the model argument, and a quantization to apply at load. */
export interface LaunchTarget {
  model: string
  quantizeAtLoad?: Quantization
}

/**
 * The model argument for a format and quantization. A GGUF repo holds one
 * file per quantization, so a repo id with either becomes
 * `hf:org/name[:QUANT]`; a local GGUF file must already be that
 * quantization; a safetensors checkpoint (a folder, or a repo with format
 * "safetensors") is quantized at load to one of {@link QUANTIZATIONS}.
 */
export function modelFor(model: string, format: 'safetensors' | 'gguf' | undefined, quantization: string | undefined): LaunchTarget {
  const quant = quantization?.toLowerCase() === 'none' ? undefined : quantization
  const atLoad = (): LaunchTarget => {
    const q = quant!.toLowerCase() as Quantization
    if (QUANTIZATIONS.includes(q)) return { model, quantizeAtLoad: q }
    throw badRequest(
      `quantization ${JSON.stringify(quant)}: ${model} is a safetensors checkpoint, quantized at load to one of ${QUANTIZATIONS.join(', ')}` +
        ' (GGUF quantizations such as Q4_K_M pick a file of a GGUF repo)',
      'quantization',
    )
  }
  const ref = parseHubReference(model)
  const local = existsSync(resolve(model))
  if (ref && !local) {
    if (format === 'safetensors') return quant === undefined ? { model } : atLoad()
    if (ref.gguf || format === 'gguf' || quant !== undefined) {
      if (ref.revision !== 'main') throw badRequest(`${model}: a GGUF repo is picked by quantization, not by revision`, 'model')
      const q = quant ?? ref.quant
      return { model: `hf:${ref.repo}${q ? `:${q}` : ''}` }
    }
    return { model }
  }
  const isGguf = model.toLowerCase().endsWith('.gguf')
  if (format !== undefined && (format === 'gguf') !== isGguf) {
    throw badRequest(`${model} is ${isGguf ? 'a GGUF file' : 'not a GGUF file'}, not format ${JSON.stringify(format)}`, 'format')
  }
  if (quant === undefined) return { model }
  if (!isGguf) return atLoad()
  if (!hasQuantTag(model, quant)) {
    throw badRequest(`quantization ${JSON.stringify(quant)}: ${model} is a GGUF file of another quantization`, 'quantization')
  }
  return { model }
}

/** A body field -> the flag's (name, value): `max_model_len: 4096` -> `['max-model-len', '4096']`. */
function optionEntry(key: string, value: z.infer<typeof OptionValue>): [string, string | string[]] {
  const name = key.replace(/_/g, '-')
  if (Array.isArray(value)) return [name, value]
  if (typeof value === 'object') return [name, JSON.stringify(value)]
  return [name, String(value)]
}

export function launchInstance(ctx: AppContext): RequestHandler {
  return async (req, res) => {
    const { model: given, uid, served_model_name: served, format, quantization, ...rest } = parseBody(LaunchRequest, req.body)
    const { model, quantizeAtLoad } = modelFor(given, format, quantization)
    let load
    try {
      load = modelLoadOptions([
        ...Object.entries(rest).map(([k, v]) => optionEntry(k, v)),
        ...(quantizeAtLoad ? [['quantization', quantizeAtLoad] as const] : []),
      ])
    } catch (err) {
      if (!(err instanceof UsageError)) throw err
      // The flag parsers name flags (--max-model-len); the API's fields are snake_case.
      throw badRequest(err.message.replace(/--([a-z-]+)/g, (_m, f: string) => f.replace(/-/g, '_')), null, 'invalid_option')
    }
    const { host } = await ctx.models.launch({
      model,
      uid: uid ?? given,
      ...(served !== undefined ? { servedModelName: typeof served === 'string' ? [served] : served } : {}),
      load,
    })
    res.status(202).json(host.describe())
  }
}

export function listInstances(ctx: AppContext): RequestHandler {
  return (_req, res) => {
    res.json({ object: 'list', data: ctx.models.list().map((h) => h.describe()) })
  }
}

export function describeInstance(ctx: AppContext): RequestHandler {
  return (req, res) => {
    res.json(ctx.models.get(String(req.params.uid)).describe())
  }
}

export function terminateInstance(ctx: AppContext): RequestHandler {
  return async (req, res) => {
    const uid = String(req.params.uid)
    await ctx.models.terminate(uid)
    res.json({ uid, terminated: true })
  }
}
