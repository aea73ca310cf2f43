// Structured outputs on the llama-tiny fixture: random weights, so its free
// output is noise and only the grammar can make it parse. Every schema
// feature claimed in the README is checked here, through the library and
// through `candela serve` with the official `openai` client.
import test from 'ava'
import OpenAI from 'openai'
import { zodResponseFormat } from 'openai/helpers/zod'
import { z } from 'zod'

import { Engine } from '../dist/index.js'
import type { TestServer } from './server-helpers.js'
import { extra, post, startTestServer } from './server-helpers.js'
import { fixture } from './helpers.js'

const MODEL = 'llama-tiny'
let engine: Engine
let t0: TestServer

test.before(async () => {
  engine = await Engine.load({ model: fixture('llama-tiny') })
  t0 = await startTestServer({ load: { model: fixture('llama-tiny') }, servedModelName: MODEL })
})

test.after.always(async () => {
  await engine?.close()
  await t0?.server.close()
})

const user = (content: string) => [{ role: 'user' as const, content }]

// Every feature: nested objects, required keys, enums, arrays with bounds,
// integers and numbers with ranges, string lengths and patterns, booleans,
// nullable fields and optional keys.
const Person = z.object({
  name: z.string().min(1).max(8),
  age: z.number().int().min(0).max(120),
  score: z.number().min(-1).max(1),
  role: z.enum(['admin', 'user', 'guest']),
  tags: z.array(z.enum(['a', 'b', 'c'])).min(1).max(3),
  address: z.object({ zip: z.string().regex(/^[0-9]{5}$/), city: z.string().max(6) }),
  active: z.boolean(),
  nickname: z.string().max(5).nullable(),
  note: z.string().max(4).optional(),
})
// OpenAI's strict mode (what zodResponseFormat makes) has every key required.
const StrictPerson = Person.omit({ note: true })

test('the fixture talks noise without a grammar (so the tests below can fail)', async (t) => {
  const out = await engine.chat(user('Give me a person as JSON'), { maxTokens: 60, temperature: 1, seed: 1 })
  t.throws(() => JSON.parse(out.text))
})

test('library: a zod schema as responseFormat holds for every sample, and the output ends with stop', async (t) => {
  for (const seed of [1, 2, 3]) {
    const out = await engine.chat(user('Give me a person'), {
      responseFormat: { type: 'json_schema', jsonSchema: { name: 'person', schema: Person } },
      temperature: 1,
      seed,
      n: 3,
      maxTokens: 400,
    })
    for (const s of out.outputs) {
      const parsed = Person.safeParse(JSON.parse(s.text))
      t.true(parsed.success, `${s.text}: ${parsed.error?.message}`)
      t.is(s.finishReason, 'stop')
    }
  }
})

test('library: a JSON Schema object, a bare zod schema and json_object', async (t) => {
  const schema = {
    type: 'object',
    properties: { id: { type: 'integer', minimum: 10, maximum: 99 }, kind: { const: 'x' }, list: { type: 'array', items: { type: 'boolean' }, maxItems: 2 } },
    required: ['id', 'kind', 'list'],
    additionalProperties: false,
  }
  const a = await engine.chat(user('json'), { responseFormat: { type: 'json_schema', jsonSchema: { name: 'a', schema } }, temperature: 1, seed: 4, maxTokens: 200 })
  const v = JSON.parse(a.text) as { id: number; kind: string; list: boolean[] }
  t.deepEqual(Object.keys(v).sort(), ['id', 'kind', 'list'])
  t.true(Number.isInteger(v.id) && v.id >= 10 && v.id <= 99)
  t.is(v.kind, 'x')
  t.true(v.list.length <= 2 && v.list.every((b) => typeof b === 'boolean'))
  const Small = z.object({ ok: z.boolean(), n: z.number().int().min(0).max(9) })
  const b = await engine.chat(user('json'), { responseFormat: Small, temperature: 1, seed: 5, maxTokens: 100 })
  t.true(Small.safeParse(JSON.parse(b.text)).success, b.text)
  const c = await engine.chat(user('json'), { responseFormat: { type: 'json_object' }, temperature: 0, maxTokens: 300 })
  if (c.finishReason === 'stop') {
    const obj: unknown = JSON.parse(c.text)
    t.true(typeof obj === 'object' && obj !== null && !Array.isArray(obj), c.text)
  } else {
    // Free-form JSON may run out of tokens; what came out is still a JSON object's start.
    t.regex(c.text, /^\s*\{/)
  }
})

test('library: regex, choice and a Lark grammar hold; streaming gives the same text', async (t) => {
  for (const seed of [1, 2, 3, 4]) {
    const r = await engine.generate('x', { structuredOutputs: { regex: '[a-z]{3}-[0-9]{2,4}' }, temperature: 1, seed, maxTokens: 30 })
    t.regex(r[0]!.text, /^[a-z]{3}-[0-9]{2,4}$/)
    t.is(r[0]!.finishReason, 'stop')
    const c = await engine.chat(user('pick'), { structuredOutputs: { choice: ['red', 'green', 'blue "quoted"'] }, temperature: 1, seed })
    t.true(['red', 'green', 'blue "quoted"'].includes(c.text), c.text)
    const lark = 'start: "(" num ("+" num)* ")"\nnum: /[1-9][0-9]?/'
    const l = await engine.generate('y', { structuredOutputs: { grammar: lark }, temperature: 1, seed, maxTokens: 60 })
    if (l[0]!.finishReason === 'stop') t.regex(l[0]!.text, /^\((?:[1-9][0-9]?)(?:\+[1-9][0-9]?)*\)$/)
    else t.regex(l[0]!.text, /^\((?:[1-9][0-9]?)(?:\+[1-9][0-9]?)*\+?$/)
  }
  const params = { structuredOutputs: { json: Person }, temperature: 1, seed: 9, maxTokens: 400 }
  let streamed = ''
  for await (const chunk of engine.chatStream(user('person'), params)) streamed += chunk.text
  t.is(streamed, (await engine.chat(user('person'), params)).text)
  t.true(Person.safeParse(JSON.parse(streamed)).success)
})

test('library: bad constraints are ValidationErrors that name the field', async (t) => {
  await t.throwsAsync(engine.chat(user('x'), { structuredOutputs: { regex: 'a', choice: ['b'] } }), { name: 'ValidationError' })
  await t.throwsAsync(engine.chat(user('x'), { structuredOutputs: { json: Person }, responseFormat: { type: 'json_object' } }), { message: /not both/ })
  const e = await t.throwsAsync(
    engine.chat(user('x'), { responseFormat: { type: 'json_schema', jsonSchema: { name: 'x', schema: { type: 'object', properties: { a: { $ref: '#/$defs/missing' } } } } } }),
  )
  t.regex(e!.message, /^responseFormat\.jsonSchema\.schema: .*missing/)
})

test('server: chat.completions.parse with zodResponseFormat returns a parsed, valid object', async (t) => {
  for (const seed of [11, 12]) {
    const completion = await t0.client.chat.completions.parse({
      model: MODEL,
      messages: user('Give me a person'),
      response_format: zodResponseFormat(StrictPerson, 'person'),
      temperature: 1,
      seed,
      max_completion_tokens: 400,
    })
    const msg = completion.choices[0]!.message
    t.truthy(msg.parsed, msg.content ?? '')
    t.true(StrictPerson.safeParse(msg.parsed).success)
    t.is(completion.choices[0]!.finish_reason, 'stop')
  }
})

test('server: response_format streams JSON; structured_outputs regex, choice and grammar hold', async (t) => {
  const stream = await t0.client.chat.completions.create({
    model: MODEL,
    messages: user('person'),
    response_format: zodResponseFormat(StrictPerson, 'person'),
    temperature: 1,
    seed: 3,
    max_tokens: 400,
    stream: true,
  })
  let text = ''
  let finish: string | null = null
  for await (const chunk of stream) {
    text += chunk.choices[0]?.delta.content ?? ''
    finish = chunk.choices[0]?.finish_reason ?? finish
  }
  t.true(StrictPerson.safeParse(JSON.parse(text)).success, text)
  t.is(finish, 'stop')
  const re = await t0.client.completions.create(extra({ model: MODEL, prompt: 'x', structured_outputs: { regex: '[0-9]{3}' }, temperature: 1, seed: 2, max_tokens: 10 }))
  t.regex(re.choices[0]!.text, /^[0-9]{3}$/)
  const ch = await t0.client.chat.completions.create(extra({ model: MODEL, messages: user('x'), structured_outputs: { choice: ['yes', 'no'] }, n: 4, temperature: 1, seed: 5 }))
  for (const c of ch.choices) t.true(['yes', 'no'].includes(c.message.content ?? ''))
  const g = await t0.client.chat.completions.create(
    extra({ model: MODEL, messages: user('x'), structured_outputs: { grammar: 'start: "a" "b"* "c"' }, temperature: 1, seed: 6, max_tokens: 50 }),
  )
  t.regex(g.choices[0]!.message.content ?? '', /^ab*c?$/)
  const jo = await t0.client.chat.completions.create(extra({ model: MODEL, messages: user('x'), structured_outputs: { json: '{"type":"array","items":{"type":"integer","minimum":0,"maximum":9},"minItems":2,"maxItems":2}' }, temperature: 1, seed: 1, max_tokens: 60 }))
  const arr = JSON.parse(jo.choices[0]!.message.content ?? '') as number[]
  t.is(arr.length, 2)
  t.true(arr.every((x) => Number.isInteger(x) && x >= 0 && x <= 9))
})

test('server: a schema llguidance cannot compile is a 400 naming the schema', async (t) => {
  const err = await t.throwsAsync(
    t0.client.chat.completions.create({
      model: MODEL,
      messages: user('x'),
      response_format: { type: 'json_schema', json_schema: { name: 'x', schema: { type: 'object', properties: { a: { $ref: '#/$defs/missing' } } } } },
    }),
  )
  t.true(err instanceof OpenAI.BadRequestError)
  const e = err as InstanceType<typeof OpenAI.BadRequestError>
  t.regex(e.message, /missing/)
  t.is((e.error as { param?: string }).param, 'response_format.json_schema.schema')
  const lark = await post(`${t0.base}/v1/chat/completions`, { model: MODEL, messages: user('x'), structured_outputs: { grammar: 'start: nope' } })
  t.is(lark.status, 400)
  t.is(lark.json.error.param, 'structured_outputs.grammar')
  t.regex(lark.json.error.message, /nope/)
  const two = await post(`${t0.base}/v1/chat/completions`, { model: MODEL, messages: user('x'), structured_outputs: { regex: 'a', choice: ['b'] } })
  t.is(two.status, 400)
  const both = await post(`${t0.base}/v1/chat/completions`, { model: MODEL, messages: user('x'), structured_outputs: { regex: 'a' }, response_format: { type: 'json_object' } })
  t.is(both.status, 400)
  const badType = await post(`${t0.base}/v1/chat/completions`, { model: MODEL, messages: user('x'), response_format: { type: 'yaml' } })
  t.is(badType.status, 400)
  t.is(badType.json.error.param, 'response_format.type')
})
