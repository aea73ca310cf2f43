/**
 * The engine streams behind one HTTP request: a chat is one stream, a
 * completion with a list of prompts is one stream per prompt. Both endpoints,
 * streaming or not, read the same merged sequence of events.
 */

import type { FinishReason, StreamChunk, TokenLogprob } from '../types.js'
import { usageOf } from './openai.js'
import type { OpenAIUsage } from './openai.js'

export interface ChoiceEvent {
  /** Which prompt of the request. */
  prompt: number
  /** OpenAI's choice index: prompt * n + sample. */
  choice: number
  chunk: StreamChunk
}

/**
 * Interleave the prompts' streams as their chunks arrive. The caller ends
 * the streams (their shared AbortSignal) when it stops early or one fails.
 */
export async function* mergeStreams(streams: Array<AsyncIterable<StreamChunk>>, n: number): AsyncGenerator<ChoiceEvent> {
  if (streams.length === 1) {
    for await (const chunk of streams[0]!) yield { prompt: 0, choice: chunk.index, chunk }
    return
  }
  type Step = { i: number; r: IteratorResult<StreamChunk> }
  const its = streams.map((s) => s[Symbol.asyncIterator]())
  const pending = new Map<number, Promise<Step>>()
  const pull = (i: number): void => {
    const p = its[i]!.next().then((r) => ({ i, r }))
    // Handled here so a stream that fails after another one did is no unhandled rejection.
    p.catch(() => {})
    pending.set(i, p)
  }
  its.forEach((_, i) => pull(i))
  while (pending.size > 0) {
    const { i, r } = await Promise.race(pending.values())
    if (r.done) {
      pending.delete(i)
      continue
    }
    pull(i)
    yield { prompt: i, choice: i * n + r.value.index, chunk: r.value }
  }
}

/** Token accounting over a request's events (all prompts, all samples). */
export class UsageTally {
  readonly #prompts = new Map<number, { tokens: number; cached: number }>()
  completionTokens = 0
  /** ms from the request's start to its first generated token, once there is one. */
  firstTokenMs: number | undefined
  /** Video frames `frame_recovery` replaced or left out, all prompts together. */
  readonly videoFrames = { recovered: 0, dropped: 0 }

  constructor(
    private readonly startedAt: number,
    private readonly onFirstToken: (ms: number) => void = () => {},
    private readonly onVideoFrames: (lost: { recovered: number; dropped: number }) => void = () => {},
  ) {}

  add(ev: ChoiceEvent): void {
    const lost = ev.chunk.videoFrames
    if (lost) {
      this.videoFrames.recovered += lost.recovered
      this.videoFrames.dropped += lost.dropped
      this.onVideoFrames(this.videoFrames)
    }
    if (ev.chunk.tokenIds.length > 0) {
      if (this.firstTokenMs === undefined) {
        this.firstTokenMs = performance.now() - this.startedAt
        this.onFirstToken(this.firstTokenMs)
      }
      this.completionTokens += ev.chunk.tokenIds.length
    }
    const u = ev.chunk.usage
    if (u && !this.#prompts.has(ev.prompt)) this.#prompts.set(ev.prompt, { tokens: u.promptTokens, cached: u.cachedTokens })
  }

  get promptTokens(): number {
    let s = 0
    for (const p of this.#prompts.values()) s += p.tokens
    return s
  }

  usage(): OpenAIUsage {
    let cached = 0
    for (const p of this.#prompts.values()) cached += p.cached
    return usageOf(this.promptTokens, this.completionTokens, cached)
  }
}

/** One choice of a non-streamed response, put together from its chunks. */
export interface CollectedChoice {
  text: string
  logprobs: TokenLogprob[]
  finishReason: FinishReason
  stopReason: string | null
}

/** Read every event into per-choice results; `prefixes[i]` starts choice i's text (echo). */
export async function collectChoices(
  events: AsyncIterable<ChoiceEvent>,
  tally: UsageTally,
  prefixes: string[],
): Promise<CollectedChoice[]> {
  const choices: CollectedChoice[] = prefixes.map((text) => ({ text, logprobs: [], finishReason: 'abort', stopReason: null }))
  for await (const ev of events) {
    tally.add(ev)
    const c = choices[ev.choice]!
    c.text += ev.chunk.text
    if (ev.chunk.logprobs) c.logprobs.push(...ev.chunk.logprobs)
    if (ev.chunk.finishReason) {
      c.finishReason = ev.chunk.finishReason
      c.stopReason = ev.chunk.stopReason ?? null
    }
  }
  return choices
}
