/**
 * The routes Xinference's Python client (`xinference-client`) calls, so its
 * `Client(url).launch_model(...)`, `get_model(uid).chat(...)`,
 * `list_models()` and `terminate_model(uid)` drive candela:
 *
 *   GET    /v1/cluster/auth       {auth}: whether to send the API key
 *   POST   /v1/models             launch_model; answers once loaded unless ?wait_ready=false
 *   DELETE /v1/models/{uid}       terminate_model
 * (GET /v1/models and /v1/models/{uid} are OpenAI's, with Xinference's fields
 * added; chat goes to /v1/chat/completions.)
 *
 * Launch fields that only place or package the model in an Xinference
 * cluster are accepted and ignored; those that would change the results
 * without a candela meaning are a 400; the rest are candela's engine options.
 */

import type { RequestHandler } from 'express'

import { modelLoadOptions } from '../../cli/serve.js'
import { UsageError } from '../../cli/usage.js'
import type { LoadOptions } from '../../types.js'
import type { AppContext } from '../context.js'
import { badRequest } from '../errors.js'
import type { LaunchSpec } from '../model-pool.js'
import { modelFor } from './instances.js'

/** Cluster placement and packaging: no meaning in one candela process, no effect on results. */
const IGNORED = new Set([
  'model_engine',
  'model_size_in_billions',
  'request_limits',
  'worker_ip',
  'gpu_idx',
  'replica_config',
  'enable_virtual_env',
  'virtual_env_packages',
  'virtual_env_find_links',
  'envs',
  'wait_ready',
])

/** Xinference's model formats -> candela's. */
const FORMATS: Record<string, 'safetensors' | 'gguf'> = { pytorch: 'safetensors', safetensors: 'safetensors', ggufv2: 'gguf', gguf: 'gguf' }

const isSet = (v: unknown): boolean => v !== undefined && v !== null

/** An Xinference launch_model payload -> what candela launches. */
export function xinferenceLaunchSpec(body: Record<string, unknown>): LaunchSpec {
  const str = (k: string): string | undefined => {
    const v = body[k]
    if (!isSet(v)) return undefined
    if (typeof v !== 'string' || v === '') throw badRequest(`${k} must be a non-empty string`, k)
    return v
  }
  const modelType = str('model_type') ?? 'LLM'
  if (modelType !== 'LLM') throw badRequest(`model_type ${JSON.stringify(modelType)}: candela hosts LLMs (model_type "LLM")`, 'model_type')
  const given = str('model_path') ?? str('model_name')
  if (!given) throw badRequest('model_name (a model folder, .gguf file or Hugging Face repo id) or model_path is required', 'model_name')
  const format = str('model_format')
  if (format !== undefined && !(format in FORMATS)) {
    throw badRequest(`model_format ${JSON.stringify(format)} is not supported (candela loads safetensors / pytorch folders and GGUF files)`, 'model_format')
  }
  const { model, quantizeAtLoad } = modelFor(given, format === undefined ? undefined : FORMATS[format], str('quantization'))
  for (const [k, ok] of [
    ['replica', (v: unknown) => v === 1],
    ['n_worker', (v: unknown) => v === 1],
    ['peft_model_config', (v: unknown) => !isSet(v)],
    ['enable_thinking', (v: unknown) => !isSet(v)],
  ] as const) {
    if (isSet(body[k]) && !ok(body[k])) throw badRequest(`${k} ${JSON.stringify(body[k])} is not supported by candela`, k)
  }
  const options: Array<[string, string | string[]]> = quantizeAtLoad ? [['quantization', quantizeAtLoad]] : []
  const nGpu = body.n_gpu
  if (nGpu === null || nGpu === 0) options.push(['device', 'cpu'])
  else if (nGpu === 1) options.push(['device', 'cuda'])
  else if (isSet(nGpu) && nGpu !== 'auto') throw badRequest(`n_gpu ${JSON.stringify(nGpu)}: candela runs a model on one device (n_gpu null, 0, 1 or "auto")`, 'n_gpu')
  const handled = new Set(['model_type', 'model_path', 'model_name', 'model_uid', 'model_format', 'quantization', 'replica', 'n_worker', 'peft_model_config', 'enable_thinking', 'n_gpu'])
  for (const [k, v] of Object.entries(body)) {
    if (handled.has(k) || IGNORED.has(k) || !isSet(v)) continue
    options.push([k.replace(/_/g, '-'), Array.isArray(v) ? v.map(String) : typeof v === 'object' ? JSON.stringify(v) : String(v)])
  }
  let load: Omit<LoadOptions, 'model'>
  try {
    load = modelLoadOptions(options)
  } catch (err) {
    if (!(err instanceof UsageError)) throw err
    throw badRequest(err.message.replace(/--([a-z-]+)/g, (_m, f: string) => f.replace(/-/g, '_')), null, 'invalid_option')
  }
  return { model, load, uid: str('model_uid') ?? given }
}

export function clusterAuth(ctx: AppContext): RequestHandler {
  return (_req, res) => {
    res.json({ auth: ctx.apiKey !== undefined })
  }
}

export function xinferenceLaunch(ctx: AppContext): RequestHandler {
  return async (req, res) => {
    const body = req.body as unknown
    if (typeof body !== 'object' || body === null || Array.isArray(body)) throw badRequest('the request body must be a JSON object')
    const { host, ready } = await ctx.models.launch(xinferenceLaunchSpec(body as Record<string, unknown>))
    if (req.query.wait_ready !== 'false' && req.query.wait_ready !== 'False') {
      try {
        await ready
      } catch (err) {
        throw badRequest(`model ${host.uid} failed to load: ${err instanceof Error ? err.message : String(err)}`, null, 'model_load_failed')
      }
    }
    res.json({ model_uid: host.uid })
  }
}

export function xinferenceTerminate(ctx: AppContext): RequestHandler {
  return async (req, res) => {
    await ctx.models.terminate(String(req.params.uid))
    res.json({})
  }
}
