/** POST /v1/chat/completions */

import type { RequestHandler } from 'express'

import { toEngineMessages } from '../content.js'
import { Run, parseBody } from '../context.js'
import type { AppContext } from '../context.js'
import { chatLogprobs, responseId } from '../openai.js'
import { chatParams } from '../params.js'
import { collectChoices, mergeStreams } from '../runs.js'
import type { ChoiceEvent } from '../runs.js'
import { ChatCompletionRequest } from '../schemas.js'

export function chatCompletions(ctx: AppContext): RequestHandler {
  return async (req, res) => {
    const body = parseBody(ChatCompletionRequest, req.body)
    const host = ctx.models.select(body.model)
    const model = host.resolveModel(body.model)
    const engine = host.engine()
    const params = chatParams(body)
    const messages = toEngineMessages(body.messages)
    const n = params.n ?? 1
    const run = new Run(ctx, req, res, 'messages')
    const events = mergeStreams([engine.chatStream(messages, { ...params, signal: run.signal })], n)
    const id = responseId('chatcmpl')
    const wantLogprobs = body.logprobs === true
    await run.answer(async () => {
      if (body.stream === true) {
        const head = { id, object: 'chat.completion.chunk', created: run.created, model, system_fingerprint: null }
        await stream(run, events, head, n, wantLogprobs, body.stream_options?.include_usage === true)
        return
      }
      const choices = await collectChoices(events, run.tally, Array<string>(n).fill(''))
      res.json({
        id,
        object: 'chat.completion',
        created: run.created,
        model,
        system_fingerprint: null,
        choices: choices.map((c, index) => ({
          index,
          message: { role: 'assistant', content: c.text, refusal: null },
          logprobs: wantLogprobs ? chatLogprobs(c.logprobs) : null,
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
  n: number,
  wantLogprobs: boolean,
  includeUsage: boolean,
): Promise<void> {
  // With include_usage every chunk carries `usage: null` but the last, as OpenAI sends them.
  const chunk = (choices: object[]): object => ({
    ...head,
    choices,
    ...(includeUsage ? { usage: null } : {}),
  })
  let started = false
  await run.streamEvents(events, head, includeUsage, async (ev, send) => {
    if (!started) {
      started = true
      for (let index = 0; index < n; index++) {
        await send(chunk([{ index, delta: { role: 'assistant', content: '' }, logprobs: null, finish_reason: null }]))
      }
    }
    const c = ev.chunk
    const logprobs = wantLogprobs && c.logprobs && c.logprobs.length > 0 ? chatLogprobs(c.logprobs) : null
    if (c.text !== '' || logprobs) {
      await send(chunk([{ index: ev.choice, delta: { content: c.text }, logprobs, finish_reason: null }]))
    }
    if (c.finishReason) {
      await send(
        chunk([{ index: ev.choice, delta: {}, logprobs: null, finish_reason: c.finishReason, stop_reason: c.stopReason ?? null }]),
      )
    }
  })
}
