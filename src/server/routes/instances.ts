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

import { modelLoadOptions } from '../../cli/serve.js'
import { UsageError } from '../../cli/usage.js'
import type { AppContext } from '../context.js'
import { parseBody } from '../context.js'
import { badRequest } from '../errors.js'

const OptionValue = z.union([z.string(), z.number(), z.boolean(), z.array(z.string()), z.record(z.string(), z.unknown())])

export const LaunchRequest = z
  .object({
    model: z.string().min(1),
    uid: z.string().min(1).optional(),
    served_model_name: z.union([z.string().min(1), z.array(z.string().min(1)).min(1)]).optional(),
  })
  .catchall(OptionValue)

/** A body field -> the flag's (name, value): `max_model_len: 4096` -> `['max-model-len', '4096']`. */
function optionEntry(key: string, value: z.infer<typeof OptionValue>): [string, string | string[]] {
  const name = key.replace(/_/g, '-')
  if (Array.isArray(value)) return [name, value]
  if (typeof value === 'object') return [name, JSON.stringify(value)]
  return [name, String(value)]
}

export function launchInstance(ctx: AppContext): RequestHandler {
  return async (req, res) => {
    const { model, uid, served_model_name: served, ...rest } = parseBody(LaunchRequest, req.body)
    let load
    try {
      load = modelLoadOptions(Object.entries(rest).map(([k, v]) => optionEntry(k, v)))
    } catch (err) {
      if (!(err instanceof UsageError)) throw err
      // The flag parsers name flags (--max-model-len); the API's fields are snake_case.
      throw badRequest(err.message.replace(/--([a-z-]+)/g, (_m, f: string) => f.replace(/-/g, '_')), null, 'invalid_option')
    }
    const { host } = await ctx.models.launch({
      model,
      ...(uid !== undefined ? { uid } : {}),
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
