/**
 * Pieces of OpenAI's response objects built from engine results: ids,
 * usage and the two logprobs formats (chat and legacy completions).
 * Finish reasons pass as the engine gives them: OpenAI's `stop` and
 * `length`, or `abort` / `error` as vLLM reports them.
 */

import { randomBytes } from 'node:crypto'

import type { TokenLogprob } from '../types.js'

/** `chatcmpl-<24 hex>`, `cmpl-...`: unique per response, as OpenAI's. */
export const responseId = (prefix: string): string => `${prefix}-${randomBytes(12).toString('hex')}`

export interface OpenAIUsage {
  prompt_tokens: number
  completion_tokens: number
  total_tokens: number
  prompt_tokens_details: { cached_tokens: number }
}

export function usageOf(prompt: number, completion: number, cached: number): OpenAIUsage {
  return {
    prompt_tokens: prompt,
    completion_tokens: completion,
    total_tokens: prompt + completion,
    prompt_tokens_details: { cached_tokens: cached },
  }
}

const bytesOf = (s: string): number[] => [...Buffer.from(s, 'utf8')]

export interface ChatLogprobs {
  content: Array<{
    token: string
    logprob: number
    bytes: number[]
    top_logprobs: Array<{ token: string; logprob: number; bytes: number[] }>
  }>
  refusal: null
}

export function chatLogprobs(lps: TokenLogprob[]): ChatLogprobs {
  return {
    content: lps.map((lp) => ({
      token: lp.token,
      logprob: lp.logprob,
      bytes: bytesOf(lp.token),
      top_logprobs: lp.topLogprobs.map((t) => ({ token: t.token, logprob: t.logprob, bytes: bytesOf(t.token) })),
    })),
    refusal: null,
  }
}

export interface CompletionLogprobs {
  tokens: string[]
  token_logprobs: number[]
  top_logprobs: Array<Record<string, number>>
  text_offset: number[]
}

/** Legacy format; `offset` is where this piece starts in the choice's text. */
export function completionLogprobs(lps: TokenLogprob[], offset: number): CompletionLogprobs {
  const out: CompletionLogprobs = { tokens: [], token_logprobs: [], top_logprobs: [], text_offset: [] }
  let at = offset
  for (const lp of lps) {
    out.tokens.push(lp.token)
    out.token_logprobs.push(lp.logprob)
    out.top_logprobs.push(Object.fromEntries(lp.topLogprobs.map((t) => [t.token, t.logprob])))
    out.text_offset.push(at)
    at += lp.token.length
  }
  return out
}
