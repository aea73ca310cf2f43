/**
 * POST /v1/responses and GET /v1/responses/{id}: OpenAI's Responses API
 * over the chat machinery. A request is translated into a chat completion
 * request (instructions as the system message, input items as messages,
 * `text.format` as `response_format`, flat function tools as chat tools), so
 * structured outputs and tool calls work as they do on the chat route; the
 * answer comes back as output items, whole or as OpenAI's typed stream
 * events. Responses are kept in memory (the most recent
 * {@link RESPONSE_STORE_SIZE}) for `previous_response_id` and GET.
 */

import type { RequestHandler } from 'express'

import { toEngineMessages } from '../content.js'
import { Run, parseBody } from '../context.js'
import type { AppContext } from '../context.js'
import { ApiError } from '../errors.js'
import { responseId } from '../openai.js'
import { chatParams } from '../params.js'
import { collectChoices, mergeStreams } from '../runs.js'
import type { ChoiceEvent } from '../runs.js'
import { ChatCompletionRequest, ResponsesRequest } from '../schemas.js'
import type { ChatMessage as WireMessage, ResponseInputItem } from '../schemas.js'
import { ToolCallStreamer, toolCallId, toolCallParserFor, toolCallsOf } from '../tools.js'
import type { ParsedToolCall, ToolMode } from '../tools.js'

/** How many responses are kept for `previous_response_id` and GET. */
export const RESPONSE_STORE_SIZE = 1000

interface Stored {
  response: Record<string, unknown>
  /** The conversation so far (input and output), as chat messages, for a follow-up. */
  messages: WireMessage[]
}

/** The most recent responses, oldest dropped first. */
export class ResponseStore {
  readonly #map = new Map<string, Stored>()
  constructor(private readonly limit = RESPONSE_STORE_SIZE) {}
  get(id: string): Stored | undefined {
    return this.#map.get(id)
  }
  put(id: string, s: Stored): void {
    this.#map.set(id, s)
    while (this.#map.size > this.limit) this.#map.delete(this.#map.keys().next().value!)
  }
}

type Body = ResponsesRequest

/** A tool call of the answer with the id the client answers it by. */
interface OutCall {
  callId: string
  name: string
  arguments: string
}

/**
 * Input items as chat messages; consecutive function calls form one
 * assistant turn, with empty content rather than null (templates without
 * tool support then still render it).
 */
function inputMessages(input: Body['input']): WireMessage[] {
  if (typeof input === 'string') return [{ role: 'user', content: input }]
  const out: WireMessage[] = []
  for (const item of input as ResponseInputItem[]) {
    if (item.type === 'function_call') {
      const call = { id: item.call_id, type: 'function', function: { name: item.name, arguments: item.arguments } }
      const last = out.at(-1)
      if (last?.role === 'assistant' && last.tool_calls) last.tool_calls.push(call)
      else out.push({ role: 'assistant', content: '', tool_calls: [call] } as WireMessage)
    } else if (item.type === 'function_call_output') {
      out.push({ role: 'tool', content: item.output, tool_call_id: item.call_id })
    } else if (typeof item.content === 'string') {
      out.push({ role: item.role, content: item.content } as WireMessage)
    } else {
      const parts = item.content.map((p) => {
        if (p.type === 'input_text' || p.type === 'output_text') return { type: 'text' as const, text: p.text }
        if (p.type === 'refusal') return { type: 'text' as const, text: p.refusal }
        return { type: 'image_url' as const, image_url: { url: p.image_url, ...(p.detail != null ? { detail: p.detail } : {}) } }
      })
      out.push({ role: item.role, content: parts } as WireMessage)
    }
  }
  return out
}

/** The chat completion request a Responses request stands for. */
function chatBody(body: Body, history: WireMessage[]): unknown {
  const messages: WireMessage[] = [
    ...(body.instructions != null ? [{ role: 'system' as const, content: body.instructions }] : []),
    ...history,
    ...inputMessages(body.input),
  ]
  const format = body.text?.format
  const choice = body.tool_choice
  return {
    model: body.model,
    messages,
    max_completion_tokens: body.max_output_tokens,
    temperature: body.temperature,
    top_p: body.top_p,
    user: body.user,
    response_format:
      format?.type === 'json_schema'
        ? { type: 'json_schema', json_schema: { name: format.name, schema: format.schema, description: format.description, strict: format.strict } }
        : format,
    tools: body.tools?.map((t) => ({ type: 'function', function: { name: t.name, description: t.description, parameters: t.parameters, strict: t.strict } })),
    tool_choice: typeof choice === 'object' && choice !== null ? { type: 'function', function: { name: choice.name } } : choice,
    parallel_tool_calls: body.parallel_tool_calls,
  }
}

const messageItem = (id: string, text: string, status: string): object => ({
  id,
  type: 'message',
  status,
  role: 'assistant',
  content: status === 'in_progress' ? [] : [{ type: 'output_text', text, annotations: [] }],
})

const callItem = (id: string, c: { callId: string; name: string; arguments: string }, status: string): object => ({
  id,
  type: 'function_call',
  status,
  call_id: c.callId,
  name: c.name,
  arguments: c.arguments,
})

export function createResponse(ctx: AppContext, store: ResponseStore): RequestHandler {
  return async (req, res) => {
    const body = parseBody(ResponsesRequest, req.body)
    const host = ctx.models.select(body.model)
    const model = host.resolveModel(body.model)
    const engine = host.engine()
    const previous = body.previous_response_id != null ? store.get(body.previous_response_id) : undefined
    if (body.previous_response_id != null && !previous) {
      throw new ApiError(404, `Previous response with id '${body.previous_response_id}' not found.`, { param: 'previous_response_id', code: 'not_found' })
    }
    const chat = parseBody(ChatCompletionRequest, chatBody(body, previous?.messages ?? []))
    const { params, tools } = chatParams(chat, ctx.toolCallParser ?? toolCallParserFor(engine.info.chatTemplate))
    const parallel = body.parallel_tool_calls !== false
    const run = new Run(ctx, req, res, 'input')
    const events = mergeStreams([engine.chatStream(toEngineMessages(chat.messages), { ...params, signal: run.signal })], 1)
    const id = responseId('resp')
    const base = {
      id,
      object: 'response',
      created_at: run.created,
      error: null,
      instructions: body.instructions ?? null,
      max_output_tokens: body.max_output_tokens ?? null,
      model,
      parallel_tool_calls: parallel,
      previous_response_id: body.previous_response_id ?? null,
      temperature: body.temperature ?? null,
      text: { format: body.text?.format ?? { type: 'text' } },
      tool_choice: body.tool_choice ?? 'auto',
      tools: (body.tools ?? []).map((t) => ({ ...t, strict: t.strict ?? null, description: t.description ?? null, parameters: t.parameters ?? null })),
      top_p: body.top_p ?? null,
      truncation: 'disabled',
      metadata: body.metadata ?? {},
      store: body.store !== false,
    }
    const usage = () => {
      const u = run.tally.usage()
      return {
        input_tokens: u.prompt_tokens,
        input_tokens_details: { cached_tokens: u.prompt_tokens_details.cached_tokens },
        output_tokens: u.completion_tokens,
        output_tokens_details: { reasoning_tokens: 0 },
        total_tokens: u.total_tokens,
      }
    }
    const finish = (output: object[], text: string | null, calls: OutCall[], reason: string): Record<string, unknown> => {
      const response = {
        ...base,
        status: reason === 'length' ? 'incomplete' : 'completed',
        incomplete_details: reason === 'length' ? { reason: 'max_output_tokens' } : null,
        output,
        usage: usage(),
      }
      if (response.store) {
        const toolCalls = calls.map((c) => ({ id: c.callId, type: 'function', function: { name: c.name, arguments: c.arguments } }))
        const answer = { role: 'assistant', content: text ?? '', ...(toolCalls.length > 0 ? { tool_calls: toolCalls } : {}) }
        const history = [...(previous?.messages ?? []), ...inputMessages(body.input), answer as WireMessage]
        store.put(id, { response, messages: history })
      }
      return response
    }
    await run.answer(async () => {
      if (body.stream === true) {
        await streamResponse(run, events, base, tools, parallel, finish)
        return
      }
      const [c] = await collectChoices(events, run.tally, [''])
      const parsed = tools ? toolCallsOf(c!.text, tools, parallel) : { content: c!.text, calls: [] as ParsedToolCall[] }
      const calls: OutCall[] = parsed.calls.map((x) => ({ callId: toolCallId(), ...x }))
      const output: object[] = []
      if (parsed.content !== null || calls.length === 0) output.push(messageItem(responseId('msg'), parsed.content ?? '', 'completed'))
      for (const call of calls) output.push(callItem(responseId('fc'), call, 'completed'))
      res.json(finish(output, parsed.content, calls, c!.finishReason))
    })
  }
}

/** OpenAI's typed event sequence for one streamed response. */
async function streamResponse(
  run: Run,
  events: AsyncIterable<ChoiceEvent>,
  base: object,
  tools: ToolMode | undefined,
  parallel: boolean,
  finish: (output: object[], text: string | null, calls: OutCall[], reason: string) => Record<string, unknown>,
): Promise<void> {
  let seq = 0
  const streamer = tools ? new ToolCallStreamer(tools, parallel) : undefined
  const output: object[] = []
  let message: { id: string; index: number; text: string } | undefined
  const calls = new Map<number, { id: string; index: number; callId: string; name: string; arguments: string }>()
  let reason = 'stop'
  await run.streamEvents(events, base, false, async (ev, send) => {
    const emit = (type: string, fields: object): Promise<void> => send({ type, sequence_number: seq++, ...fields })
    if (seq === 0) {
      const response = { ...base, status: 'in_progress', incomplete_details: null, output: [], usage: null }
      await emit('response.created', { response })
      await emit('response.in_progress', { response })
    }
    const c = ev.chunk
    const deltas = streamer ? [...streamer.push(c.text), ...(c.finishReason ? streamer.end() : [])] : c.text !== '' ? [{ content: c.text }] : []
    for (const d of deltas) {
      if ('content' in d) {
        if (!message) {
          message = { id: responseId('msg'), index: output.length, text: '' }
          output.push({})
          await emit('response.output_item.added', { output_index: message.index, item: messageItem(message.id, '', 'in_progress') })
          await emit('response.content_part.added', { item_id: message.id, output_index: message.index, content_index: 0, part: { type: 'output_text', text: '', annotations: [] } })
        }
        message.text += d.content
        await emit('response.output_text.delta', { item_id: message.id, output_index: message.index, content_index: 0, delta: d.content, logprobs: [] })
      } else {
        const t = d.toolCall
        let call = calls.get(t.index)
        if (!call) {
          call = { id: responseId('fc'), index: output.length, callId: t.id ?? toolCallId(), name: t.name ?? '', arguments: '' }
          calls.set(t.index, call)
          output.push({})
          await emit('response.output_item.added', { output_index: call.index, item: callItem(call.id, { ...call, arguments: '' }, 'in_progress') })
        }
        if (t.arguments !== '') {
          call.arguments += t.arguments
          await emit('response.function_call_arguments.delta', { item_id: call.id, output_index: call.index, delta: t.arguments })
        }
      }
    }
    if (!c.finishReason) return
    reason = c.finishReason
    const hasCalls = calls.size > 0
    if (!message && !hasCalls) {
      // An empty answer is still one (empty) message.
      message = { id: responseId('msg'), index: output.length, text: '' }
      output.push({})
      await emit('response.output_item.added', { output_index: message.index, item: messageItem(message.id, '', 'in_progress') })
      await emit('response.content_part.added', { item_id: message.id, output_index: message.index, content_index: 0, part: { type: 'output_text', text: '', annotations: [] } })
    }
    if (message) {
      const part = { type: 'output_text', text: message.text, annotations: [] }
      await emit('response.output_text.done', { item_id: message.id, output_index: message.index, content_index: 0, text: message.text, logprobs: [] })
      await emit('response.content_part.done', { item_id: message.id, output_index: message.index, content_index: 0, part })
      output[message.index] = messageItem(message.id, message.text, 'completed')
      await emit('response.output_item.done', { output_index: message.index, item: output[message.index] })
    }
    for (const call of calls.values()) {
      await emit('response.function_call_arguments.done', { item_id: call.id, output_index: call.index, name: call.name, arguments: call.arguments })
      output[call.index] = callItem(call.id, call, 'completed')
      await emit('response.output_item.done', { output_index: call.index, item: output[call.index] })
    }
    const response = finish(output, message ? message.text : null, [...calls.values()], reason)
    await emit(reason === 'length' ? 'response.incomplete' : 'response.completed', { response })
  })
}

export function retrieveResponse(ctx: AppContext, store: ResponseStore): RequestHandler {
  return (req, res) => {
    ctx.models.select(undefined).resolveModel(undefined)
    const id = String(req.params.id)
    const s = store.get(id)
    if (!s) throw new ApiError(404, `Response with id '${id}' not found.`, { param: 'response_id', code: 'not_found' })
    res.json(s.response)
  }
}
