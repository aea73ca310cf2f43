/**
 * Input checks of the public API. Each failure throws a {@link ValidationError}
 * whose message names the field and the value; the Rust side checks again.
 */

import { toJSONSchema } from 'zod'

import { ValidationError } from './errors.js'
import { MODALITIES, pendingFromData } from './media/index.js'
import type { Modality, PendingPart } from './media/index.js'
import type { NativeRequest, NativeSamplingParams, NativeStructuredOutputs } from './native.js'
import type { ChatParams, Device, LoadOptions, PromptInput, Quantization, SamplingParams } from './types.js'

/** The block formats a safetensors checkpoint can be quantized to at load. */
export const QUANTIZATIONS: readonly Quantization[] = ['q8_0', 'q6_k', 'q5_k', 'q4_k', 'q4_0']

const fail = (msg: string): never => {
  throw new ValidationError(msg)
}

const show = (v: unknown): string => {
  if (typeof v === 'string') return JSON.stringify(v)
  if (typeof v === 'number' || typeof v === 'boolean' || v === null || v === undefined) return String(v)
  try {
    const s = JSON.stringify(v)
    return s === undefined ? typeof v : s.length > 60 ? `${s.slice(0, 57)}...` : s
  } catch {
    return typeof v
  }
}

const isObject = (v: unknown): v is Record<string, unknown> =>
  typeof v === 'object' && v !== null && !Array.isArray(v)

function checkKeys(obj: Record<string, unknown>, allowed: readonly string[], what: string): void {
  for (const key of Object.keys(obj)) {
    if (!allowed.includes(key)) {
      const camel = key.replace(/_([a-z])/g, (_, c: string) => c.toUpperCase())
      const hint = camel !== key && allowed.includes(camel) ? ` (did you mean ${camel}?)` : ''
      fail(`unknown ${what} ${JSON.stringify(key)}${hint}`)
    }
  }
}

function int(name: string, v: unknown, min: number, max = Number.MAX_SAFE_INTEGER): number {
  if (typeof v !== 'number' || !Number.isInteger(v)) return fail(`${name} must be an integer, got ${show(v)}`)
  if (v < min) return fail(`${name} must be at least ${min}, got ${v}`)
  if (v > max) return fail(`${name} must be at most ${max}, got ${v}`)
  return v
}

function real(name: string, v: unknown, check: (x: number) => boolean, range: string): number {
  if (typeof v !== 'number' || !Number.isFinite(v)) return fail(`${name} must be a finite number, got ${show(v)}`)
  if (!check(v)) return fail(`${name} must be ${range}, got ${v}`)
  return v
}

function bool(name: string, v: unknown): boolean {
  if (typeof v !== 'boolean') return fail(`${name} must be true or false, got ${show(v)}`)
  return v
}

const LOAD_KEYS = [
  'model',
  'onDownloadProgress',
  'device',
  'dtype',
  'quantization',
  'mmproj',
  'maxNumSeqs',
  'threads',
  'maxNumBatchedTokens',
  'kvCacheBytes',
  'gpuMemoryUtilization',
  'enablePrefixCaching',
  'blockSize',
  'maxModelLen',
  'chatTemplate',
  'limitMmPerPrompt',
  'allowedLocalMediaPath',
  'allowedMediaDomains',
  'allowPrivateMediaUrls',
  'resolveMediaHost',
  'mmProcessorCacheGb',
  'encoderCacheTokens',
  'mediaIoKwargs',
  'enableMmEmbeds',
] as const

/** Check {@link LoadOptions}; the device defaults to `'cpu'`. */
export function validateLoadOptions(opts: unknown): LoadOptions & { device: Device } {
  if (opts === undefined) opts = {}
  if (!isObject(opts)) return fail(`load options must be an object, got ${show(opts)}`)
  checkKeys(opts, LOAD_KEYS, 'load option')
  const o = opts as LoadOptions
  if (o.model !== undefined && (typeof o.model !== 'string' || o.model.trim() === '')) {
    fail(`model must be a path to a model folder or .gguf file, or a Hugging Face repo id, got ${show(o.model)}`)
  }
  if (o.onDownloadProgress !== undefined && typeof o.onDownloadProgress !== 'function') {
    fail(`onDownloadProgress must be a function, got ${show(o.onDownloadProgress)}`)
  }
  const device = o.device ?? 'cpu'
  if (device !== 'cpu' && device !== 'cuda' && device !== 'auto') {
    fail(`device must be 'cpu', 'cuda' or 'auto', got ${show(device)}`)
  }
  const gmu = o.gpuMemoryUtilization
  if (gmu !== undefined && !(typeof gmu === 'number' && gmu > 0 && gmu <= 1)) {
    fail(`gpuMemoryUtilization must be a number in (0, 1], got ${show(gmu)}`)
  }
  if (o.dtype !== undefined && !['auto', 'f32', 'f16', 'bf16'].includes(o.dtype)) {
    fail(`dtype must be 'auto', 'f32', 'f16' or 'bf16', got ${show(o.dtype)}`)
  }
  if (o.quantization !== undefined && !(QUANTIZATIONS as readonly unknown[]).includes(o.quantization)) {
    fail(`quantization must be one of ${QUANTIZATIONS.join(', ')}, got ${show(o.quantization)}`)
  }
  if (o.mmproj !== undefined && (typeof o.mmproj !== 'string' || o.mmproj.trim() === '')) {
    fail(`mmproj must be a path to an mmproj .gguf file, got ${show(o.mmproj)}`)
  }
  if (o.maxNumSeqs !== undefined) int('maxNumSeqs', o.maxNumSeqs, 1, 4096)
  if (o.threads !== undefined) int('threads', o.threads, 1, 1024)
  if (o.maxNumBatchedTokens !== undefined) int('maxNumBatchedTokens', o.maxNumBatchedTokens, 1, 1 << 24)
  if (o.kvCacheBytes !== undefined) int('kvCacheBytes', o.kvCacheBytes, 1)
  if (o.enablePrefixCaching !== undefined) bool('enablePrefixCaching', o.enablePrefixCaching)
  if (o.blockSize !== undefined) int('blockSize', o.blockSize, 1, 1024)
  if (o.maxModelLen !== undefined) int('maxModelLen', o.maxModelLen, 2, 1 << 24)
  if (o.chatTemplate !== undefined && typeof o.chatTemplate !== 'string') {
    fail(`chatTemplate must be a string, got ${show(o.chatTemplate)}`)
  }
  if (o.limitMmPerPrompt !== undefined) {
    if (!isObject(o.limitMmPerPrompt)) fail(`limitMmPerPrompt must be an object like { audio: 1 }, got ${show(o.limitMmPerPrompt)}`)
    for (const [k, v] of Object.entries(o.limitMmPerPrompt)) {
      if (!(MODALITIES as readonly string[]).includes(k)) fail(`limitMmPerPrompt.${k}: unknown modality (image, video, audio)`)
      int(`limitMmPerPrompt.${k}`, v, 0)
    }
  }
  if (o.allowedLocalMediaPath !== undefined && (typeof o.allowedLocalMediaPath !== 'string' || o.allowedLocalMediaPath === '')) {
    fail(`allowedLocalMediaPath must be a directory path, got ${show(o.allowedLocalMediaPath)}`)
  }
  if (o.allowedMediaDomains !== undefined) {
    const d = o.allowedMediaDomains
    if (!Array.isArray(d) || !d.every((h) => typeof h === 'string' && /^[A-Za-z0-9.:_-]+$/.test(h))) {
      fail(`allowedMediaDomains must be an array of host names like ['upload.wikimedia.org'], got ${show(d)}`)
    }
  }
  if (o.allowPrivateMediaUrls !== undefined) bool('allowPrivateMediaUrls', o.allowPrivateMediaUrls)
  if (o.resolveMediaHost !== undefined && typeof o.resolveMediaHost !== 'function') {
    fail(`resolveMediaHost must be a function (hostname) => Promise<{ address, family }[]>, got ${show(o.resolveMediaHost)}`)
  }
  if (o.mmProcessorCacheGb !== undefined && !(typeof o.mmProcessorCacheGb === 'number' && o.mmProcessorCacheGb >= 0)) {
    fail(`mmProcessorCacheGb must be a number >= 0, got ${show(o.mmProcessorCacheGb)}`)
  }
  if (o.encoderCacheTokens !== undefined) int('encoderCacheTokens', o.encoderCacheTokens, 0)
  if (o.mediaIoKwargs !== undefined) validateMediaIoKwargs(o.mediaIoKwargs)
  if (o.enableMmEmbeds !== undefined) bool('enableMmEmbeds', o.enableMmEmbeds)
  return { ...o, device }
}

/** `mediaIoKwargs`: `{ image?: { rgbaBackgroundColor? }, video?: { frameRecovery? } }`. */
function validateMediaIoKwargs(kw: unknown): void {
  if (!isObject(kw)) return fail(`mediaIoKwargs must be an object like { image: { rgbaBackgroundColor: [0, 0, 0] } }, got ${show(kw)}`)
  checkKeys(kw, ['image', 'video'], 'mediaIoKwargs key')
  if (kw.image !== undefined) {
    if (!isObject(kw.image)) fail(`mediaIoKwargs.image must be an object, got ${show(kw.image)}`)
    const image = kw.image as Record<string, unknown>
    checkKeys(image, ['rgbaBackgroundColor'], 'mediaIoKwargs.image key')
    const c = image.rgbaBackgroundColor
    if (c !== undefined) {
      if (!Array.isArray(c) || c.length !== 3) {
        fail(`mediaIoKwargs.image.rgbaBackgroundColor must be [r, g, b], got ${show(c)}`)
      }
      ;(c as unknown[]).forEach((v, i) => int(`mediaIoKwargs.image.rgbaBackgroundColor[${i}]`, v, 0, 255))
    }
  }
  if (kw.video !== undefined) {
    if (!isObject(kw.video)) fail(`mediaIoKwargs.video must be an object, got ${show(kw.video)}`)
    const video = kw.video as Record<string, unknown>
    checkKeys(video, ['frameRecovery'], 'mediaIoKwargs.video key')
    if (video.frameRecovery !== undefined) bool('mediaIoKwargs.video.frameRecovery', video.frameRecovery)
  }
}

const SAMPLING_KEYS = [
  'maxTokens',
  'temperature',
  'topP',
  'topK',
  'minP',
  'seed',
  'n',
  'repetitionPenalty',
  'presencePenalty',
  'frequencyPenalty',
  'stop',
  'stopTokenIds',
  'ignoreEos',
  'logprobs',
  'topLogprobs',
  'minTokens',
  'skipSpecialTokens',
  'signal',
  'mmProcessorKwargs',
  'structuredOutputs',
] as const

const CHAT_KEYS = [...SAMPLING_KEYS, 'chatTemplateKwargs', 'tools', 'addGenerationPrompt', 'responseFormat'] as const

/** Check sampling params and convert them to the native shape. */
export function validateSamplingParams(params: unknown, opts: { chat: boolean }): NativeSamplingParams {
  if (params === undefined) params = {}
  if (!isObject(params)) return fail(`params must be an object, got ${show(params)}`)
  checkKeys(params, opts.chat ? CHAT_KEYS : SAMPLING_KEYS, 'parameter')
  const p = params as SamplingParams
  const out: NativeSamplingParams = {}
  if (p.maxTokens !== undefined) out.maxTokens = int('maxTokens', p.maxTokens, 1)
  if (p.temperature !== undefined) out.temperature = real('temperature', p.temperature, (x) => x >= 0, '>= 0')
  if (p.topP !== undefined) out.topP = real('topP', p.topP, (x) => x > 0 && x <= 1, 'in (0, 1]')
  if (p.topK !== undefined) out.topK = int('topK', p.topK, -1)
  if (p.minP !== undefined) out.minP = real('minP', p.minP, (x) => x >= 0 && x <= 1, 'in [0, 1]')
  if (p.seed !== undefined) out.seed = int('seed', p.seed, 0)
  if (p.n !== undefined) out.n = int('n', p.n, 1, 256)
  if (p.repetitionPenalty !== undefined) {
    out.repetitionPenalty = real('repetitionPenalty', p.repetitionPenalty, (x) => x > 0, '> 0')
  }
  if (p.presencePenalty !== undefined) {
    out.presencePenalty = real('presencePenalty', p.presencePenalty, (x) => x >= -2 && x <= 2, 'in [-2, 2]')
  }
  if (p.frequencyPenalty !== undefined) {
    out.frequencyPenalty = real('frequencyPenalty', p.frequencyPenalty, (x) => x >= -2 && x <= 2, 'in [-2, 2]')
  }
  if (p.stop !== undefined) {
    const stops = typeof p.stop === 'string' ? [p.stop] : p.stop
    if (!Array.isArray(stops)) return fail(`stop must be a string or an array of strings, got ${show(p.stop)}`)
    for (const s of stops) {
      if (typeof s !== 'string' || s.length === 0) fail(`stop strings must be non-empty strings, got ${show(s)}`)
    }
    out.stop = [...stops]
  }
  if (p.stopTokenIds !== undefined) {
    if (!Array.isArray(p.stopTokenIds)) return fail(`stopTokenIds must be an array of token ids, got ${show(p.stopTokenIds)}`)
    out.stopTokenIds = p.stopTokenIds.map((t) => int('stopTokenIds[]', t, 0, 0xffffffff))
  }
  if (p.ignoreEos !== undefined) out.ignoreEos = bool('ignoreEos', p.ignoreEos)
  if (p.logprobs !== undefined) bool('logprobs', p.logprobs)
  if (p.topLogprobs !== undefined) {
    int('topLogprobs', p.topLogprobs, 0, 20)
    if (p.logprobs === false) fail('topLogprobs needs logprobs: true')
  }
  if (p.logprobs === true || p.topLogprobs !== undefined) out.logprobs = p.topLogprobs ?? 0
  if (p.minTokens !== undefined) {
    out.minTokens = int('minTokens', p.minTokens, 0)
    if (out.maxTokens !== undefined && out.minTokens > out.maxTokens) {
      fail(`minTokens (${out.minTokens}) must not exceed maxTokens (${out.maxTokens})`)
    }
  }
  if (p.skipSpecialTokens !== undefined) out.skipSpecialTokens = bool('skipSpecialTokens', p.skipSpecialTokens)
  if (p.signal !== undefined && !(p.signal instanceof AbortSignal)) {
    fail(`signal must be an AbortSignal, got ${show(p.signal)}`)
  }
  // Checked by the native processor (names and ranges); here only the shape.
  if (p.mmProcessorKwargs !== undefined && !isObject(p.mmProcessorKwargs)) {
    fail(`mmProcessorKwargs must be an object like { max_pixels: 1003520 }, got ${show(p.mmProcessorKwargs)}`)
  }
  const structured = structuredOutputsOf(p, opts.chat ? (params as ChatParams).responseFormat : undefined)
  if (structured) out.structuredOutputs = structured
  return out
}

const isZod = (v: unknown): boolean => isObject(v) && '_zod' in v

/** A JSON schema given as an object or a zod 4 schema, as a plain JSON Schema. */
function jsonSchemaOf(v: unknown, name: string): Record<string, unknown> {
  if (isZod(v)) {
    try {
      return toJSONSchema(v as Parameters<typeof toJSONSchema>[0]) as Record<string, unknown>
    } catch (err) {
      return fail(`${name}: the zod schema cannot be converted to JSON Schema: ${(err as Error).message}`)
    }
  }
  if (isObject(v) && '_def' in v && typeof (v as { parse?: unknown }).parse === 'function') {
    return fail(`${name}: zod 3 schemas are not supported; use zod 4 or a JSON Schema object`)
  }
  if (!isObject(v)) return fail(`${name} must be a JSON Schema object or a zod schema, got ${show(v)}`)
  return v
}

const STRUCTURED_KEYS = ['json', 'jsonObject', 'regex', 'choice', 'grammar'] as const

/**
 * The native constraint of `structuredOutputs` or `responseFormat` (at most
 * one of them), with the field name its compile errors should carry.
 */
function structuredOutputsOf(p: SamplingParams, rf: ChatParams['responseFormat']): NativeStructuredOutputs | undefined {
  const so = p.structuredOutputs
  if (so !== undefined && rf !== undefined) fail('give structuredOutputs or responseFormat, not both')
  if (so !== undefined) {
    if (!isObject(so)) return fail(`structuredOutputs must be an object like { regex: '[0-9]+' }, got ${show(so)}`)
    checkKeys(so, STRUCTURED_KEYS, 'structuredOutputs key')
    const given = STRUCTURED_KEYS.filter((k) => so[k] !== undefined && so[k] !== false)
    if (given.length !== 1) fail(`structuredOutputs needs exactly one of ${STRUCTURED_KEYS.join(', ')}`)
    const key = given[0]!
    const param = `structuredOutputs.${key}`
    const v = so[key]
    switch (key) {
      case 'json':
        return { json: jsonSchemaOf(v, param), param }
      case 'jsonObject':
        if (v !== true) fail(`${param} must be true`)
        return { json: { type: 'object' }, param }
      case 'regex':
      case 'grammar':
        if (typeof v !== 'string' || v === '') fail(`${param} must be a non-empty string, got ${show(v)}`)
        return key === 'regex' ? { regex: v as string, param } : { grammar: v as string, param }
      case 'choice':
        if (!Array.isArray(v) || v.length === 0 || !v.every((c) => typeof c === 'string')) {
          fail(`${param} must be a non-empty array of strings, got ${show(v)}`)
        }
        return { choice: [...(v as string[])], param }
    }
  }
  if (rf === undefined) return undefined
  if (isZod(rf)) return { json: jsonSchemaOf(rf, 'responseFormat'), param: 'responseFormat' }
  if (!isObject(rf)) return fail(`responseFormat must be { type: 'text' | 'json_object' | 'json_schema', ... }, got ${show(rf)}`)
  switch (rf.type) {
    case 'text':
      return undefined
    case 'json_object':
      return { json: { type: 'object' }, param: 'responseFormat' }
    case 'json_schema': {
      const js = (rf as { jsonSchema?: unknown }).jsonSchema
      if (isZod(js)) return { json: jsonSchemaOf(js, 'responseFormat.jsonSchema'), param: 'responseFormat.jsonSchema' }
      if (!isObject(js)) return fail(`responseFormat.jsonSchema must be { name, schema, strict? } or a zod schema, got ${show(js)}`)
      checkKeys(js, ['name', 'description', 'schema', 'strict'], 'responseFormat.jsonSchema key')
      if (js.schema === undefined) fail('responseFormat.jsonSchema.schema is required')
      return { json: jsonSchemaOf(js.schema, 'responseFormat.jsonSchema.schema'), param: 'responseFormat.jsonSchema.schema' }
    }
    default:
      return fail(`responseFormat.type must be 'text', 'json_object' or 'json_schema', got ${show((rf as { type?: unknown }).type)}`)
  }
}

/** Check one prompt of {@link Engine.generate} and convert it to a native request. */
/** Keys a prompt object may carry besides its text or ids. */
const MM_KEYS = ['multiModalData', 'multiModalUuids']

/** The media of a prompt object (`multiModalData` / `multiModalUuids`), as pending parts. */
export function validatePromptMedia(input: unknown, where = 'prompt'): PendingPart[] {
  if (!isObject(input) || input.multiModalData === undefined) {
    if (isObject(input) && input.multiModalUuids !== undefined) fail(`${where}.multiModalUuids needs multiModalData`)
    return []
  }
  const data = input.multiModalData
  if (!isObject(data)) return fail(`${where}.multiModalData must be an object like { audio: [...] }`)
  for (const k of Object.keys(data)) {
    if (!(MODALITIES as readonly string[]).includes(k)) fail(`${where}.multiModalData.${k}: unknown modality (image, video, audio)`)
  }
  const uuids = input.multiModalUuids
  if (uuids !== undefined && !isObject(uuids)) fail(`${where}.multiModalUuids must be an object like { audio: ['id', null] }`)
  return pendingFromData(data as Partial<Record<Modality, unknown>>, uuids as Partial<Record<Modality, Array<string | null>>>)
}

export function validatePrompt(input: unknown, where = 'prompt'): NativeRequest {
  if (typeof input === 'string') return { prompt: input }
  if (!isObject(input)) return fail(`${where} must be a string, { prompt } or { promptTokenIds }, got ${show(input)}`)
  if ('prompt' in input && 'promptTokenIds' in input) fail(`${where} must have prompt or promptTokenIds, not both`)
  if ('prompt' in input) {
    checkKeys(input, ['prompt', ...MM_KEYS], `key in ${where}`)
    if (typeof input.prompt !== 'string') return fail(`${where}.prompt must be a string, got ${show(input.prompt)}`)
    return { prompt: input.prompt }
  }
  if ('promptTokenIds' in input) {
    checkKeys(input, ['promptTokenIds', ...MM_KEYS], `key in ${where}`)
    const ids = input.promptTokenIds
    if (!Array.isArray(ids) || ids.length === 0) {
      return fail(`${where}.promptTokenIds must be a non-empty array of token ids, got ${show(ids)}`)
    }
    return { promptTokenIds: ids.map((t) => int(`${where}.promptTokenIds[]`, t, 0, 0xffffffff)) }
  }
  return fail(`${where} must be a string, { prompt } or { promptTokenIds }, got ${show(input)}`)
}

/** Normalise a list of prompts (one prompt or an array). */
export function validatePrompts(prompts: unknown): NativeRequest[] {
  if (Array.isArray(prompts)) {
    if (prompts.length === 0) fail('prompts must not be empty')
    return prompts.map((p, i) => validatePrompt(p, `prompts[${i}]`))
  }
  return [validatePrompt(prompts as PromptInput)]
}

const ROLES = ['system', 'developer', 'user', 'assistant', 'tool'] as const

/**
 * Check chat messages; text-part arrays are joined into one string (the form
 * every text-only chat template accepts).
 */
/**
 * Called for each non-text content part: returns what the chat template
 * sees instead (or throws). Without it, only text parts are accepted.
 */
export type MediaPartHook = (part: Record<string, unknown>, path: string) => Record<string, unknown>

export function validateMessages(messages: unknown, onMedia?: MediaPartHook): Array<Record<string, unknown>> {
  if (!Array.isArray(messages)) return fail(`messages must be an array of { role, content }, got ${show(messages)}`)
  if (messages.length === 0) fail('messages must not be empty')
  return messages.map((m: unknown, i) => {
    const at = `messages[${i}]`
    if (!isObject(m)) return fail(`${at} must be an object with role and content, got ${show(m)}`)
    if (!('role' in m)) fail(`${at} has no role`)
    if (typeof m.role !== 'string' || !(ROLES as readonly string[]).includes(m.role)) {
      fail(`${at}.role must be one of ${ROLES.join(', ')}; got ${show(m.role)}`)
    }
    const msg: Record<string, unknown> = { ...m }
    const content = m.content
    const hasToolCalls = Array.isArray(m.tool_calls) && m.tool_calls.length > 0
    if (content === undefined || content === null) {
      if (!(m.role === 'assistant' && hasToolCalls)) fail(`${at} has no content`)
      msg.content = null
    } else if (typeof content === 'string') {
      // as is
    } else if (Array.isArray(content)) {
      let hasMedia = false
      const parts = content.map((part: unknown, j): Record<string, unknown> => {
        const pat = `${at}.content[${j}]`
        if (!isObject(part) || typeof part.type !== 'string') return fail(`${pat} must be a { type, ... } content part`)
        if (part.type !== 'text') {
          if (!onMedia) return fail(`${pat}: content type ${show(part.type)} is not supported by this model (text only)`)
          hasMedia = true
          return onMedia(part, pat)
        }
        if (typeof part.text !== 'string') return fail(`${pat}.text must be a string`)
        return { type: 'text', text: part.text }
      })
      // Text-only content is joined (every template takes a string); with
      // media the parts stay a list, as multimodal templates expect.
      msg.content = hasMedia ? parts : parts.map((p) => p.text as string).join('\n')
    } else {
      fail(`${at}.content must be a string or an array of text parts, got ${show(content)}`)
    }
    if (m.name !== undefined && typeof m.name !== 'string') fail(`${at}.name must be a string`)
    if (hasToolCalls) msg.tool_calls = (m.tool_calls as unknown[]).map(withParsedArguments)
    return msg
  })
}

/**
 * OpenAI sends a tool call's `function.arguments` as JSON text; chat
 * templates (Qwen, Llama 3.x, Mistral) expect the object, as transformers
 * and vLLM hand it to them. Text that is not a JSON object stays as it is.
 */
function withParsedArguments(call: unknown): unknown {
  if (!isObject(call) || !isObject(call.function) || typeof call.function.arguments !== 'string') return call
  try {
    const args: unknown = JSON.parse(call.function.arguments)
    return isObject(args) ? { ...call, function: { ...call.function, arguments: args } } : call
  } catch {
    return call
  }
}

/** Check the chat-only fields of {@link ChatParams}. */
export function validateChatExtras(params: ChatParams | undefined): Pick<
  NativeRequest,
  'chatTemplateKwargs' | 'tools' | 'addGenerationPrompt'
> {
  const out: Pick<NativeRequest, 'chatTemplateKwargs' | 'tools' | 'addGenerationPrompt'> = {}
  if (!params) return out
  if (params.chatTemplateKwargs !== undefined) {
    if (!isObject(params.chatTemplateKwargs)) fail(`chatTemplateKwargs must be an object, got ${show(params.chatTemplateKwargs)}`)
    out.chatTemplateKwargs = params.chatTemplateKwargs
  }
  if (params.tools !== undefined) {
    if (!Array.isArray(params.tools) || !params.tools.every(isObject)) fail('tools must be an array of objects')
    out.tools = params.tools
  }
  if (params.addGenerationPrompt !== undefined) out.addGenerationPrompt = bool('addGenerationPrompt', params.addGenerationPrompt)
  return out
}
