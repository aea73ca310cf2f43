// OpenAI's Responses API on `candela serve` (llama-tiny fixture), driven by
// the official client's responses.create / responses.stream / responses.parse.
import test from 'ava'
import OpenAI from 'openai'
import { zodTextFormat } from 'openai/helpers/zod'
import { z } from 'zod'

import type { TestServer } from './server-helpers.js'
import { extra, startTestServer } from './server-helpers.js'
import { fixture } from './helpers.js'

const MODEL = 'llama-tiny'
let t0: TestServer

test.before(async () => {
  t0 = await startTestServer({ load: { model: fixture('llama-tiny') }, servedModelName: MODEL })
})

test.after.always(async () => {
  await t0?.server.close()
})

const Item = z.object({ name: z.string().max(6), count: z.number().int().min(0).max(9), ok: z.boolean() })

test('responses.create answers as the chat route does, and previous_response_id continues the conversation', async (t) => {
  const r = await t0.client.responses.create({ model: MODEL, instructions: 'Be terse.', input: 'Hi there', max_output_tokens: 8, temperature: 0 })
  t.is(r.object, 'response')
  t.regex(r.id, /^resp-/)
  t.is(r.model, MODEL)
  t.is(r.output[0]!.type, 'message')
  // The same conversation through the chat route gives the same text.
  const chat = await t0.client.chat.completions.create({
    model: MODEL,
    messages: [
      { role: 'system', content: 'Be terse.' },
      { role: 'user', content: 'Hi there' },
    ],
    max_tokens: 8,
    temperature: 0,
  })
  t.is(r.output_text, chat.choices[0]!.message.content ?? '')
  t.is(r.usage!.input_tokens, chat.usage!.prompt_tokens)
  t.is(r.usage!.output_tokens, chat.usage!.completion_tokens)
  t.is(r.status, chat.choices[0]!.finish_reason === 'length' ? 'incomplete' : 'completed')
  if (r.status === 'incomplete') t.deepEqual(r.incomplete_details, { reason: 'max_output_tokens' })
  // The follow-up's prompt holds the first turn (its input and its answer).
  const next = await t0.client.responses.create({ model: MODEL, previous_response_id: r.id, input: 'And?', max_output_tokens: 4, temperature: 0 })
  t.is(next.previous_response_id, r.id)
  t.true(next.usage!.input_tokens > r.usage!.input_tokens + r.usage!.output_tokens - 4, `${next.usage!.input_tokens}`)
  const again = await t0.client.responses.retrieve(r.id)
  t.is(again.id, r.id)
  t.deepEqual(again.output, r.output)
  await t.throwsAsync(t0.client.responses.retrieve('resp-nope'), { instanceOf: OpenAI.NotFoundError })
  await t.throwsAsync(t0.client.responses.create({ model: MODEL, input: 'x', previous_response_id: 'resp-nope' }), { instanceOf: OpenAI.NotFoundError })
})

test('responses.parse with zodTextFormat: text.format is enforced', async (t) => {
  const r = await t0.client.responses.parse({ model: MODEL, input: 'An item', text: { format: zodTextFormat(Item, 'item') }, temperature: 1, max_output_tokens: 200 })
  t.is(r.status, 'completed')
  t.true(Item.safeParse(r.output_parsed).success, r.output_text)
})

test('responses.stream sends the typed event sequence and its final response matches the deltas', async (t) => {
  const stream = t0.client.responses.stream({ model: MODEL, input: 'An item', text: { format: zodTextFormat(Item, 'item') }, temperature: 1, max_output_tokens: 200 })
  const types: string[] = []
  let deltas = ''
  let last = -1
  for await (const ev of stream) {
    types.push(ev.type)
    t.true(ev.sequence_number > last)
    last = ev.sequence_number
    if (ev.type === 'response.output_text.delta') deltas += ev.delta
  }
  const final = await stream.finalResponse()
  t.is(final.output_text, deltas)
  t.true(Item.safeParse(JSON.parse(deltas)).success)
  t.deepEqual(types.slice(0, 4), ['response.created', 'response.in_progress', 'response.output_item.added', 'response.content_part.added'])
  t.deepEqual(types.slice(-4), ['response.output_text.done', 'response.content_part.done', 'response.output_item.done', 'response.completed'])
  t.true(types.slice(4, -4).every((x) => x === 'response.output_text.delta'))
  // Cut short by max_output_tokens: the stream ends with response.incomplete.
  const cut = await t0.client.responses.create({ model: MODEL, input: 'Tell me a story', max_output_tokens: 3, stream: true, ...extra({ temperature: 0 }) })
  let end: OpenAI.Responses.ResponseStreamEvent | undefined
  for await (const ev of cut) end = ev
  t.is(end?.type, 'response.incomplete')
})

test('function tools: a forced call comes back as a function_call item, whole and streamed', async (t) => {
  const tools: OpenAI.Responses.Tool[] = [
    {
      type: 'function',
      name: 'get_weather',
      description: 'Weather in a city',
      strict: true,
      parameters: { type: 'object', properties: { city: { type: 'string', minLength: 1, maxLength: 8 } }, required: ['city'], additionalProperties: false },
    },
  ]
  const r = await t0.client.responses.create({ model: MODEL, input: 'Weather?', tools, tool_choice: { type: 'function', name: 'get_weather' }, temperature: 1, max_output_tokens: 100 })
  const call = r.output.find((o) => o.type === 'function_call') as OpenAI.Responses.ResponseFunctionToolCall
  t.is(call.name, 'get_weather')
  t.regex(call.call_id, /^call_/)
  const city = (JSON.parse(call.arguments) as { city: string }).city
  t.true([...city].length >= 1 && [...city].length <= 8)
  // The call's output goes back as an input item.
  const next = await t0.client.responses.create({
    model: MODEL,
    previous_response_id: r.id,
    input: [{ type: 'function_call_output', call_id: call.call_id, output: 'sunny' }],
    max_output_tokens: 4,
    temperature: 0,
  })
  t.is(next.output[0]!.type, 'message')
  const stream = t0.client.responses.stream({ model: MODEL, input: 'Weather?', tools, tool_choice: 'required', temperature: 1, max_output_tokens: 300 })
  // `required` may make several calls: each item's deltas add up to its arguments.
  const deltas = new Map<string, string>()
  for await (const ev of stream) {
    if (ev.type === 'response.function_call_arguments.delta') deltas.set(ev.item_id, (deltas.get(ev.item_id) ?? '') + ev.delta)
  }
  const final = await stream.finalResponse()
  const calls = final.output.filter((o) => o.type === 'function_call') as OpenAI.Responses.ResponseFunctionToolCall[]
  t.true(calls.length >= 1)
  for (const c of calls) {
    t.is(deltas.get(c.id!) ?? '', c.arguments)
    t.truthy(JSON.parse(c.arguments).city)
  }
})
