// Tool calling through `candela serve` on the qwen2-tiny fixture (Qwen2.5's
// chat template: Hermes-style <tool_call> blocks) with the official
// `openai` client. Random weights never call a tool on their own, so calls
// are forced: by tool_choice (the grammar writes the call), or, for the
// `auto` parser, by a structured_outputs regex that makes the model write
// the family's own <tool_call> format.
import test from 'ava'
import type OpenAI from 'openai'

import { Engine } from '../dist/index.js'
import { ToolCallStreamer, parseToolCalls, toolCallParserFor } from '../dist/server/tools.js'
import type { StreamDelta } from '../dist/server/tools.js'
import type { TestServer } from './server-helpers.js'
import { extra, post, startTestServer } from './server-helpers.js'
import { fixture } from './helpers.js'

const MODEL = 'qwen2-tiny'
let t0: TestServer

test.before(async () => {
  // f32: the tool-call answers below were written for the fixture's f32
  // arithmetic (under 'auto' its bf16 prompt rows take the bf16 matrix engine).
  t0 = await startTestServer({ load: { model: fixture('qwen2-tiny'), dtype: 'f32' }, servedModelName: MODEL })
})

test.after.always(async () => {
  await t0?.server.close()
})

const user = (content: string) => [{ role: 'user' as const, content }]

const weatherParams = {
  type: 'object',
  properties: { city: { type: 'string', minLength: 1, maxLength: 8 }, unit: { enum: ['c', 'f'] } },
  required: ['city', 'unit'],
  additionalProperties: false,
}
const tools: OpenAI.Chat.Completions.ChatCompletionTool[] = [
  { type: 'function', function: { name: 'get_weather', description: 'Weather in a city', parameters: weatherParams } },
  {
    type: 'function',
    function: { name: 'add', parameters: { type: 'object', properties: { a: { type: 'integer', minimum: 0, maximum: 99 }, b: { type: 'integer', minimum: 0, maximum: 99 } }, required: ['a', 'b'], additionalProperties: false } },
  },
]

function checkWeather(args: unknown): void {
  const a = args as { city: string; unit: string }
  if (Object.keys(a).sort().join() !== 'city,unit' || typeof a.city !== 'string' || [...a.city].length < 1 || [...a.city].length > 8 || !['c', 'f'].includes(a.unit)) {
    throw new Error(`bad get_weather arguments ${JSON.stringify(args)}`)
  }
}

test('runTools with a forced tool calls it with valid arguments, then renders the call and result back', async (t) => {
  const seen: unknown[] = []
  const runner = t0.client.chat.completions.runTools({
    model: MODEL,
    messages: user('What is the weather in Paris?'),
    tools: [
      {
        type: 'function',
        function: {
          name: 'get_weather',
          description: 'Weather in a city',
          parameters: weatherParams,
          parse: JSON.parse,
          function: (args: unknown) => {
            seen.push(args)
            return 'sunny, 21 degrees'
          },
        },
      },
    ],
    tool_choice: { type: 'function', function: { name: 'get_weather' } },
    temperature: 1,
    seed: 3,
    max_tokens: 60,
  })
  await runner.done()
  t.is(seen.length, 1)
  t.notThrows(() => checkWeather(seen[0]))
  const msgs = runner.messages
  const assistant = msgs.find((m) => m.role === 'assistant') as OpenAI.Chat.Completions.ChatCompletionAssistantMessageParam
  t.is(assistant.tool_calls?.[0]?.type, 'function')
  t.is(msgs.at(-1)?.role, 'tool')
  // The history (assistant tool_calls + tool result) goes back through the template.
  const next = await t0.client.chat.completions.create({ model: MODEL, messages: msgs, tools, max_tokens: 5, temperature: 0 })
  t.is(next.choices.length, 1)
  const engine = t0.server.engine!
  const prompt = await engine.applyChatTemplate(msgs as never, { tools: tools as never })
  // The arguments reach the template as an object (its tojson), not as a JSON string.
  t.true(prompt.includes('<tool_call>\n{"name": "get_weather", "arguments": {"'), prompt)
  t.true(prompt.includes('<tool_response>\nsunny, 21 degrees\n</tool_response>'), prompt)
})

test('tool_choice required gives valid calls, several when parallel calls are on', async (t) => {
  let calls = 0
  let most = 0
  for (const seed of [1, 2, 3, 4]) {
    const r = await t0.client.chat.completions.create({ model: MODEL, messages: user('help'), tools, tool_choice: 'required', temperature: 1, seed, max_tokens: 1500 })
    const c = r.choices[0]!
    t.is(c.finish_reason, 'tool_calls')
    t.is(c.message.content, null)
    t.true(c.message.tool_calls!.length >= 1)
    most = Math.max(most, c.message.tool_calls!.length)
    for (const tc of c.message.tool_calls! as OpenAI.Chat.Completions.ChatCompletionMessageFunctionToolCall[]) {
      t.regex(tc.id, /^call_[0-9a-f]{24}$/)
      const args: unknown = JSON.parse(tc.function.arguments)
      if (tc.function.name === 'get_weather') checkWeather(args)
      else {
        t.is(tc.function.name, 'add')
        const a = args as { a: number; b: number }
        t.true(Number.isInteger(a.a) && Number.isInteger(a.b))
      }
      calls++
    }
    const single = await t0.client.chat.completions.create({ model: MODEL, messages: user('help'), tools, tool_choice: 'required', parallel_tool_calls: false, temperature: 1, seed, max_tokens: 600 })
    t.is(single.choices[0]!.message.tool_calls!.length, 1)
  }
  t.true(calls >= 4)
  t.true(most > 1, 'some answer called several tools')
})

test('streamed tool calls arrive as OpenAI sends them: index, id and name, then argument fragments', async (t) => {
  for (const tool_choice of ['required', { type: 'function', function: { name: 'get_weather' } }] as const) {
    const stream = await t0.client.chat.completions.create({ model: MODEL, messages: user('weather?'), tools, tool_choice, temperature: 1, seed: 8, max_tokens: 600, stream: true })
    const byIndex = new Map<number, { id?: string; name?: string; args: string }>()
    let finish: string | null = null
    let content = ''
    for await (const chunk of stream) {
      const ch = chunk.choices[0]
      if (!ch) continue
      content += ch.delta.content ?? ''
      for (const tc of ch.delta.tool_calls ?? []) {
        const cur = byIndex.get(tc.index)
        if (!cur) {
          t.regex(tc.id ?? '', /^call_/, 'the first delta of a call has its id')
          t.truthy(tc.function?.name, 'and its name')
          byIndex.set(tc.index, { id: tc.id, name: tc.function?.name, args: tc.function?.arguments ?? '' })
        } else {
          t.is(tc.id, undefined, 'later deltas carry only argument fragments')
          cur.args += tc.function?.arguments ?? ''
        }
      }
      finish = ch.finish_reason ?? finish
    }
    t.is(finish, 'tool_calls')
    t.is(content, '')
    t.true(byIndex.size >= 1)
    for (const call of byIndex.values()) {
      const args: unknown = JSON.parse(call.args)
      if (call.name === 'get_weather') t.notThrows(() => checkWeather(args))
    }
  }
})

test('auto: calls the model writes in its own <tool_call> format are parsed, whole and streamed', async (t) => {
  // The regex makes the random model write a Hermes tool call after some text.
  const regex = 'Sure\\. <tool_call>\\n\\{"name": "get_weather", "arguments": \\{"city": "[a-z]{1,6}", "unit": "c"\\}\\}\\n</tool_call>'
  const body = extra({ model: MODEL, messages: user('weather?'), tools, temperature: 1, seed: 4, max_tokens: 80, structured_outputs: { regex } })
  const r = await t0.client.chat.completions.create(body)
  const c = r.choices[0]!
  t.is(c.finish_reason, 'tool_calls')
  t.is(c.message.content, 'Sure. ')
  const call = c.message.tool_calls![0]! as OpenAI.Chat.Completions.ChatCompletionMessageFunctionToolCall
  t.is(call.function.name, 'get_weather')
  t.notThrows(() => checkWeather(JSON.parse(call.function.arguments)))
  const stream = await t0.client.chat.completions.create({ ...body, stream: true })
  let content = ''
  let args = ''
  let name: string | undefined
  let finish: string | null = null
  for await (const chunk of stream) {
    const ch = chunk.choices[0]
    if (!ch) continue
    content += ch.delta.content ?? ''
    for (const tc of ch.delta.tool_calls ?? []) {
      name ??= tc.function?.name
      args += tc.function?.arguments ?? ''
    }
    finish = ch.finish_reason ?? finish
  }
  t.is(content, 'Sure. ')
  t.is(name, 'get_weather')
  t.is(args, call.function.arguments)
  t.is(finish, 'tool_calls')
  // tool_choice none: the same text stays content.
  const none = await t0.client.chat.completions.create({ ...body, tool_choice: 'none' })
  t.regex(none.choices[0]!.message.content ?? '', /^Sure\. <tool_call>/)
  t.is(none.choices[0]!.message.tool_calls, undefined)
})

test('bad tool requests are 400s', async (t) => {
  const unknown = await post(`${t0.base}/v1/chat/completions`, { model: MODEL, messages: user('x'), tools, tool_choice: { type: 'function', function: { name: 'nope' } } })
  t.is(unknown.status, 400)
  t.is(unknown.json.error.param, 'tool_choice')
  const noTools = await post(`${t0.base}/v1/chat/completions`, { model: MODEL, messages: user('x'), tool_choice: 'required' })
  t.is(noTools.status, 400)
  const badName = await post(`${t0.base}/v1/chat/completions`, { model: MODEL, messages: user('x'), tools: [{ type: 'function', function: { name: 'a b' } }] })
  t.is(badName.status, 400)
  const both = await post(`${t0.base}/v1/chat/completions`, { model: MODEL, messages: user('x'), tools, tool_choice: 'required', response_format: { type: 'json_object' } })
  t.is(both.status, 400)
})

test('the parser is read off the chat template', async (t) => {
  t.is(toolCallParserFor(t0.server.engine!.info.chatTemplate), 'hermes')
  t.is(toolCallParserFor('{{ "[TOOL_CALLS]" }}'), 'mistral')
  t.is(toolCallParserFor('<|start_header_id|>{{ "<|python_tag|>" }}'), 'llama3_json')
  t.is(toolCallParserFor(null), 'hermes')
})

test('family parsers: Hermes, Llama 3.x JSON and Mistral, and text that is no call', (t) => {
  t.deepEqual(parseToolCalls('Hi <tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call><tool_call>{"name": "g", "arguments": {}}</tool_call>', 'hermes'), {
    content: 'Hi ',
    calls: [
      { name: 'f', arguments: '{"x":1}' },
      { name: 'g', arguments: '{}' },
    ],
  })
  t.deepEqual(parseToolCalls('{"name": "f", "parameters": {"x": "a;b"}}; {"name": "g", "parameters": {}}', 'llama3_json').calls, [
    { name: 'f', arguments: '{"x":"a;b"}' },
    { name: 'g', arguments: '{}' },
  ])
  t.deepEqual(parseToolCalls('ok [TOOL_CALLS][{"name": "f", "arguments": {"x": 2}}]', 'mistral'), { content: 'ok ', calls: [{ name: 'f', arguments: '{"x":2}' }] })
  t.deepEqual(parseToolCalls('[TOOL_CALLS]f[ARGS]{"x": 3}', 'mistral').calls, [{ name: 'f', arguments: '{"x":3}' }])
  for (const parser of ['hermes', 'llama3_json', 'mistral'] as const) {
    t.deepEqual(parseToolCalls('just text {', parser), { content: 'just text {', calls: [] })
  }
  // A broken call stays text.
  t.deepEqual(parseToolCalls('<tool_call>{"name": </tool_call>', 'hermes').calls, [])
})

test('the streamer holds back what may start a call and splits nothing else', (t) => {
  const run = (pieces: string[], parser: 'hermes' | 'llama3_json' | 'mistral'): StreamDelta[] => {
    const s = new ToolCallStreamer({ kind: 'auto', parser })
    return [...pieces.flatMap((p) => s.push(p)), ...s.end()]
  }
  const text = (ds: StreamDelta[]) => ds.map((d) => ('content' in d ? d.content : '')).join('')
  const calls = (ds: StreamDelta[]) => ds.flatMap((d) => ('toolCall' in d ? [d.toolCall] : []))
  const h = run(['a <to', 'ol_c', 'all>{"name": "f", "argu', 'ments": {}}</tool', '_call> '], 'hermes')
  t.is(text(h), 'a ')
  t.like(calls(h), [{ index: 0, name: 'f', arguments: '' }, { index: 0, arguments: '{}' }])
  t.is(text(run(['a <to', 'x'], 'hermes')), 'a <tox')
  t.is(text(run(['<', 'b>'], 'hermes')), '<b>')
  const l = run([' {"name": "f",', ' "parameters": {"y": 1}}'], 'llama3_json')
  t.like(calls(l), [{ name: 'f' }, { arguments: '{"y":1}' }])
  t.is(text(run(['hello {'], 'llama3_json')), 'hello {')
  const r = new ToolCallStreamer({ kind: 'required' })
  const out = [...'[{"name": "f", "parameters": {"s": "}]"}}, {"name": "g", "parameters": {}}]'.split('').flatMap((c) => r.push(c)), ...r.end()]
  t.like(calls(out), [{ index: 0, name: 'f' }, { index: 0, arguments: '{"s":"}]"}' }, { index: 1, name: 'g' }, { index: 1, arguments: '{}' }])
})

test('library: tool_calls arguments given as JSON text reach the template as objects', async (t) => {
  const engine = await Engine.load({ model: fixture('qwen2-tiny'), dtype: 'f32' })
  try {
    const prompt = await engine.applyChatTemplate([
      { role: 'user', content: 'hi' },
      { role: 'assistant', content: null, tool_calls: [{ id: 'c1', type: 'function', function: { name: 'f', arguments: '{"x": 1}' } }] },
      { role: 'tool', content: '42', tool_call_id: 'c1' },
    ])
    t.true(prompt.includes('{"name": "f", "arguments": {"x": 1}}'), prompt)
  } finally {
    await engine.close()
  }
})
