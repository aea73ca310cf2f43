/**
 * Request bodies (snake_case, validated by ./schemas) -> engine parameters
 * (camelCase). Fields the engine cannot honour yet are refused here with a
 * 400 rather than silently ignored, since they would change the output.
 */

import type { ChatParams, SamplingParams, StructuredOutputs } from '../types.js'
import { badRequest } from './errors.js'
import { forcedToolSchema } from './tools.js'
import type { ToolCallParserName, ToolMode } from './tools.js'
import type { ChatCompletionRequest, CompletionRequest, StructuredOutputs as StructuredOutputsBody } from './schemas.js'

type Common = ChatCompletionRequest | CompletionRequest

function sampling(body: Common, maxTokens: number | null | undefined): SamplingParams {
  if (body.logit_bias != null && Object.keys(body.logit_bias).length > 0) {
    throw badRequest('logit_bias is not supported yet', 'logit_bias', 'unsupported_parameter')
  }
  const p: SamplingParams = {}
  const set = <K extends keyof SamplingParams>(k: K, v: SamplingParams[K] | null | undefined): void => {
    if (v !== null && v !== undefined) p[k] = v
  }
  set('maxTokens', maxTokens)
  set('temperature', body.temperature)
  set('topP', body.top_p)
  set('topK', body.top_k)
  set('minP', body.min_p)
  set('n', body.n)
  set('seed', body.seed)
  set('stop', body.stop)
  set('stopTokenIds', body.stop_token_ids)
  set('presencePenalty', body.presence_penalty)
  set('frequencyPenalty', body.frequency_penalty)
  set('repetitionPenalty', body.repetition_penalty)
  set('minTokens', body.min_tokens)
  set('ignoreEos', body.ignore_eos)
  set('skipSpecialTokens', body.skip_special_tokens)
  set('mmProcessorKwargs', body.mm_processor_kwargs)
  if (p.minTokens !== undefined && p.maxTokens !== undefined && p.minTokens > p.maxTokens) {
    throw badRequest(`min_tokens (${p.minTokens}) must not exceed max_tokens (${p.maxTokens})`, 'min_tokens')
  }
  const structured = structuredOutputs(body)
  if (structured) p.structuredOutputs = structured
  return p
}

/**
 * The request's output constraint: vLLM's `structured_outputs` or OpenAI's
 * `response_format` (not both). The engine names the field in its errors
 * (a schema it cannot compile), in the spelling the client used.
 */
function structuredOutputs(body: Common): StructuredOutputs | undefined {
  const so = body.structured_outputs
  const rf = body.response_format
  if (so != null && rf != null && rf.type !== 'text') {
    throw badRequest('give structured_outputs or response_format, not both', 'structured_outputs')
  }
  if (so == null) return undefined
  const given = (Object.keys(so) as Array<keyof StructuredOutputsBody>).filter((k) => so[k] != null && so[k] !== false)
  if (given.length !== 1) {
    throw badRequest('structured_outputs needs exactly one of json, json_object, regex, choice, grammar', 'structured_outputs')
  }
  if (so.json != null) {
    if (typeof so.json !== 'string') return { json: so.json }
    try {
      const parsed: unknown = JSON.parse(so.json)
      if (typeof parsed === 'object' && parsed !== null && !Array.isArray(parsed)) return { json: parsed as Record<string, unknown> }
    } catch {
      // answered below
    }
    throw badRequest('structured_outputs.json: not a JSON Schema object', 'structured_outputs.json')
  }
  if (so.json_object) return { jsonObject: true }
  if (so.regex != null) return { regex: so.regex }
  if (so.choice != null) return { choice: so.choice }
  return { grammar: so.grammar! }
}

/**
 * Engine parameters of a chat completion request, and how its tool calls
 * come back (none without tools). `parser`: the served model's tool-call format.
 */
export function chatParams(body: ChatCompletionRequest, parser: ToolCallParserName): { params: ChatParams; tools: ToolMode | undefined } {
  const p: ChatParams = sampling(body, body.max_completion_tokens ?? body.max_tokens)
  const rf = body.response_format
  if (rf?.type === 'json_object') p.responseFormat = { type: 'json_object' }
  if (rf?.type === 'json_schema') {
    const { name, description, schema, strict } = rf.json_schema
    p.responseFormat = { type: 'json_schema', jsonSchema: { name, schema, ...(description != null ? { description } : {}), ...(strict != null ? { strict } : {}) } }
  }
  if (body.top_logprobs != null && body.logprobs !== true) {
    throw badRequest('top_logprobs needs logprobs: true', 'top_logprobs')
  }
  if (body.logprobs === true) {
    p.logprobs = true
    p.topLogprobs = body.top_logprobs ?? 0
  }
  if (body.chat_template_kwargs != null) p.chatTemplateKwargs = body.chat_template_kwargs
  if (body.add_generation_prompt != null) p.addGenerationPrompt = body.add_generation_prompt
  return { params: p, tools: toolMode(body, p, parser) }
}

/**
 * Offer the request's tools to the template and decide how calls come
 * back: parsed from the model's own format (`auto`), or forced with a
 * grammar (`required`, a named function) so that even a model that would
 * not call a tool writes a valid call.
 */
function toolMode(body: ChatCompletionRequest, p: ChatParams, parser: ToolCallParserName): ToolMode | undefined {
  const tools = body.tools ?? []
  const choice = body.tool_choice ?? (tools.length > 0 ? 'auto' : 'none')
  if (tools.length === 0) {
    if (choice !== 'none') throw badRequest('tool_choice needs tools', 'tool_choice')
    return undefined
  }
  // "none": the model answers in text and the template does not see the tools.
  if (choice === 'none') return undefined
  p.tools = tools
  if (choice === 'auto') {
    // Mistral's [TOOL_CALLS] is a special token: keep it in the text to find the calls.
    if (parser === 'mistral' && p.skipSpecialTokens === undefined) p.skipSpecialTokens = false
    return { kind: 'auto', parser }
  }
  if (typeof choice === 'object' && !tools.some((t) => t.function.name === choice.function.name)) {
    throw badRequest(`tool_choice names ${JSON.stringify(choice.function.name)}, which is not among the tools`, 'tool_choice')
  }
  if (p.structuredOutputs !== undefined || p.responseFormat !== undefined) {
    throw badRequest('a forced tool_choice cannot be combined with response_format or structured_outputs', 'tool_choice')
  }
  p.structuredOutputs = { json: forcedToolSchema(tools, choice, body.parallel_tool_calls !== false)! }
  return choice === 'required' ? { kind: 'required' } : { kind: 'named', name: choice.function.name }
}

/** Engine parameters of a (legacy) completion request. */
export function completionParams(body: CompletionRequest): SamplingParams {
  if (body.suffix != null && body.suffix !== '') {
    throw badRequest('suffix is not supported', 'suffix', 'unsupported_parameter')
  }
  if (body.best_of != null && body.best_of !== (body.n ?? 1)) {
    throw badRequest('best_of other than n is not supported', 'best_of', 'unsupported_parameter')
  }
  const p = sampling(body, body.max_tokens)
  const rf = body.response_format
  if (rf?.type === 'json_object') p.structuredOutputs = { jsonObject: true }
  if (rf?.type === 'json_schema') p.structuredOutputs = { json: rf.json_schema.schema }
  // Completions take logprobs as a count of alternatives per token.
  if (body.logprobs != null) {
    p.logprobs = true
    p.topLogprobs = body.logprobs
  }
  return p
}
