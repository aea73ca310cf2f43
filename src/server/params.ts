/**
 * Request bodies (snake_case, validated by ./schemas) -> engine parameters
 * (camelCase). Fields the engine cannot honour yet are refused here with a
 * 400 rather than silently ignored, since they would change the output.
 */

import type { ChatParams, SamplingParams } from '../types.js'
import { badRequest } from './errors.js'
import type { ChatCompletionRequest, CompletionRequest } from './schemas.js'

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
  return p
}

/** Engine parameters of a chat completion request. */
export function chatParams(body: ChatCompletionRequest): ChatParams {
  const rf = body.response_format
  if (rf != null && rf.type !== 'text') {
    throw badRequest(
      `response_format ${JSON.stringify(rf.type)} is not supported yet (structured output is not available); only {"type": "text"}`,
      'response_format',
      'unsupported_parameter',
    )
  }
  const choice = body.tool_choice
  if (choice != null && choice !== 'none' && choice !== 'auto') {
    throw badRequest('tool_choice other than "none" or "auto" is not supported yet', 'tool_choice', 'unsupported_parameter')
  }
  const p: ChatParams = sampling(body, body.max_completion_tokens ?? body.max_tokens)
  if (body.top_logprobs != null && body.logprobs !== true) {
    throw badRequest('top_logprobs needs logprobs: true', 'top_logprobs')
  }
  if (body.logprobs === true) {
    p.logprobs = true
    p.topLogprobs = body.top_logprobs ?? 0
  }
  // tool_choice "none" means: do not offer the tools to the model at all.
  if (body.tools != null && body.tools.length > 0 && choice !== 'none') p.tools = body.tools
  if (body.chat_template_kwargs != null) p.chatTemplateKwargs = body.chat_template_kwargs
  if (body.add_generation_prompt != null) p.addGenerationPrompt = body.add_generation_prompt
  return p
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
  // Completions take logprobs as a count of alternatives per token.
  if (body.logprobs != null) {
    p.logprobs = true
    p.topLogprobs = body.logprobs
  }
  return p
}
