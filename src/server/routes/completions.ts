/** POST /v1/completions (the legacy text completion API). */

import type { RequestHandler } from 'express'

import type { Engine } from '../../engine.js'
import type { PromptInput } from '../../types.js'
import { Run, parseBody } from '../context.js'
import type { AppContext } from '../context.js'
import { badRequest } from '../errors.js'
import { completionLogprobs, responseId } from '../openai.js'
import { completionParams } from '../params.js'
import { collectChoices, mergeStreams } from '../runs.js'
import type { ChoiceEvent } from '../runs.js'
import { CompletionRequest } from '../schemas.js'

/** The request's prompts: one string, strings, token ids, or lists of token ids. */
function promptsOf(prompt: CompletionRequest['prompt']): PromptInput[] {
  if (typeof prompt === 'string') return [prompt]
  if (prompt.every((p): p is number => typeof p === 'number')) return [{ promptTokenIds: prompt }]
  return (prompt as Array<string | number[]>).map((p) => (typeof p === 'string' ? p : { promptTokenIds: p }))
}

const promptText = async (engine: Engine, p: PromptInput): Promise<string> =>
  typeof p === 'string' ? p : 'prompt' in p ? p.prompt : engine.detokenize(p.promptTokenIds, { skipSpecialTokens: false })

export function completions(ctx: AppContext): RequestHandler {
  return async (req, res) => {
    const body = parseBody(CompletionRequest, req.body)
    const host = ctx.models.select(body.model)
    const model = host.resolveModel(body.model)
    const engine = host.engine()
    const params = completionParams(body)
    if (body.echo === true && params.logprobs) {
      throw badRequest('echo with logprobs is not supported (prompt logprobs are not available)', 'echo', 'unsupported_parameter')
    }
    const prompts = promptsOf(body.prompt)
    const n = params.n ?? 1
    const run = new Run(ctx, req, res, 'prompt')
    const echo = body.echo === true ? await Promise.all(prompts.map((p) => promptText(engine, p))) : undefined
    const events = mergeStreams(
      prompts.map((p) => engine.generateStream(p, { ...params, signal: run.signal })),
      n,
    )
    const head = { id: responseId('cmpl'), object: 'text_completion', created: run.created, model, system_fingerprint: null }
    const wantLogprobs = params.logprobs === true
    await run.answer(async () => {
      if (body.stream === true) {
        await stream(run, events, head, { echo, n, wantLogprobs, includeUsage: body.stream_options?.include_usage === true })
        return
      }
      const prefixes = Array.from({ length: prompts.length * n }, (_, i) => echo?.[Math.floor(i / n)] ?? '')
      const choices = await collectChoices(events, run.tally, prefixes)
      res.json({
        ...head,
        choices: choices.map((c, index) => ({
          index,
          text: c.text,
          logprobs: wantLogprobs ? completionLogprobs(c.logprobs, 0) : null,
          finish_reason: c.finishReason,
          stop_reason: c.stopReason,
        })),
        usage: run.tally.usage(),
      })
    })
  }
}

async function stream(
  run: Run,
  events: AsyncIterable<ChoiceEvent>,
  head: object,
  o: { echo: string[] | undefined; n: number; wantLogprobs: boolean; includeUsage: boolean },
): Promise<void> {
  const chunk = (choice: object): object => ({ ...head, choices: [choice], ...(o.includeUsage ? { usage: null } : {}) })
  // Characters sent per choice so far: the logprobs' text_offset.
  const sent = new Map<number, number>()
  await run.streamEvents(events, head, o.includeUsage, async (ev, send) => {
    const index = ev.choice
    if (!sent.has(index)) {
      const prefix = o.echo?.[ev.prompt] ?? ''
      sent.set(index, prefix.length)
      if (prefix !== '') await send(chunk({ index, text: prefix, logprobs: null, finish_reason: null }))
    }
    const c = ev.chunk
    const at = sent.get(index)!
    const logprobs = o.wantLogprobs && c.logprobs && c.logprobs.length > 0 ? completionLogprobs(c.logprobs, at) : null
    if (c.text !== '' || logprobs) {
      sent.set(index, at + c.text.length)
      await send(chunk({ index, text: c.text, logprobs, finish_reason: null }))
    }
    if (c.finishReason) {
      await send(chunk({ index, text: '', logprobs: null, finish_reason: c.finishReason, stop_reason: c.stopReason ?? null }))
    }
  })
}
