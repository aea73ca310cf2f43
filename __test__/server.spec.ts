// The OpenAI-compatible server on the llama-tiny fixture, driven by the
// official `openai` client (and raw fetch where the wire format itself is
// the point). Greedy unless a test is about sampling.
import test from 'ava'
import OpenAI from 'openai'

import type { TestServer } from './server-helpers.js'
import { extra, metricsText, parsePrometheus, post, sample, sseEvents, startTestServer, until } from './server-helpers.js'
import { fixture, reference } from './helpers.js'

const ref = reference('llama-tiny')
const MODEL = 'llama-tiny'
let t0: TestServer

test.before(async () => {
  t0 = await startTestServer({ load: { model: fixture('llama-tiny') }, servedModelName: MODEL })
})

test.after.always(async () => {
  await t0?.server.close()
})

const user = (content: string) => [{ role: 'user' as const, content }]
const greedy = { temperature: 0, ignore_eos: true }

// Serial tests look at the engine's counters; ava runs them first, one at a time.
const engineIdle = async (): Promise<boolean> => {
  const m = await metricsText(t0.base)
  return sample(m, 'candela_kv_blocks_used') === 0 && sample(m, 'candela_requests_running') === 0 && sample(m, 'candela_requests_waiting') === 0
}

test.serial('a client that disconnects mid-stream aborts its request and frees its KV blocks', async (t) => {
  const before = await metricsText(t0.base)
  const finishedBefore = sample(before, 'candela_requests_finished_total')!
  const stream = await t0.client.chat.completions.create(
    extra({ model: MODEL, messages: user('Tell me a long story'), max_tokens: 2000, stream: true as const, ...greedy }),
  )
  let chunks = 0
  let busy = false
  for await (const _ of stream) {
    if (++chunks === 3) {
      const m = await metricsText(t0.base)
      busy = sample(m, 'candela_kv_blocks_used')! > 0 && sample(m, 'candela_requests_running') === 1
      stream.controller.abort()
    }
  }
  t.true(busy, 'the request held KV blocks while it streamed')
  t.true(await until(engineIdle, 2000), 'blocks freed and nothing running after the disconnect')
  const after = await metricsText(t0.base)
  t.true(sample(after, 'candela_requests_finished_total')! > finishedBefore)
  // Far fewer tokens than the 2000 asked for were generated.
  t.true(sample(after, 'candela_generation_tokens_total')! - sample(before, 'candela_generation_tokens_total')! < 1000)
  t.is(sample(after, 'candela_http_requests_total', { route: '/v1/chat/completions', status: '499' }), 1)
})

test.serial('a non-streaming request is aborted when its client goes away', async (t) => {
  const ac = new AbortController()
  const pending = fetch(`${t0.base}/v1/completions`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ model: MODEL, prompt: 'Once upon a time', max_tokens: 2000, ...greedy }),
    signal: ac.signal,
  })
  pending.catch(() => {})
  t.true(await until(async () => sample(await metricsText(t0.base), 'candela_kv_blocks_used')! > 0, 2000))
  ac.abort()
  await t.throwsAsync(pending, { any: true })
  t.true(await until(engineIdle, 2000))
})

test.serial('/metrics is Prometheus text and its counters move', async (t) => {
  const res = await fetch(`${t0.base}/metrics`)
  t.is(res.status, 200)
  t.regex(res.headers.get('content-type') ?? '', /^text\/plain; version=0\.0\.4/)
  const before = parsePrometheus(await res.text())
  const types = before.types
  t.is(types.get('candela_http_requests_total'), 'counter')
  t.is(types.get('candela_http_request_duration_seconds'), 'histogram')
  t.is(types.get('candela_time_to_first_token_seconds'), 'histogram')
  t.is(types.get('candela_prompt_tokens_total'), 'counter')
  t.is(types.get('candela_generation_tokens_total'), 'counter')
  t.is(types.get('candela_preemptions_total'), 'counter')
  for (const g of ['running', 'waiting']) t.is(types.get(`candela_requests_${g}`), 'gauge')
  for (const g of ['used', 'free', 'total']) t.is(types.get(`candela_kv_blocks_${g}`), 'gauge')
  t.is(types.get('candela_prefix_cache_hit_rate'), 'gauge')

  const text0 = await metricsText(t0.base)
  const prompt = 'The same long prompt, twice, so the second one hits the prefix cache. '.repeat(4)
  for (let i = 0; i < 2; i++) {
    await t0.client.completions.create(extra({ model: MODEL, prompt, max_tokens: 3, ...greedy }))
  }
  const text1 = await metricsText(t0.base)
  const delta = (name: string, labels: Record<string, string> = {}): number =>
    (sample(text1, name, labels) ?? 0) - (sample(text0, name, labels) ?? 0)
  t.is(delta('candela_http_requests_total', { route: '/v1/completions', method: 'POST', status: '200' }), 2)
  t.is(delta('candela_http_request_duration_seconds_count', { route: '/v1/completions' }), 2)
  t.is(delta('candela_time_to_first_token_seconds_count', { route: '/v1/completions' }), 2)
  t.is(delta('candela_generation_tokens_total'), 6)
  t.true(delta('candela_prompt_tokens_total') > 0)
  t.true(delta('candela_prefix_cache_hits_total') > 0, 'the repeated prompt hit the prefix cache')
  t.true(sample(text1, 'candela_prefix_cache_hit_rate')! > 0)
  t.is(sample(text1, 'candela_kv_blocks_used')! + sample(text1, 'candela_kv_blocks_free')!, sample(text1, 'candela_kv_blocks_total')!)
  // The scrape itself is counted too.
  t.true(delta('candela_http_requests_total', { route: '/metrics', method: 'GET', status: '200' }) >= 1)
})

test('GET /v1/models lists the served model; /version and /health answer', async (t) => {
  const models = await t0.client.models.list()
  t.deepEqual(
    models.data.map((m) => m.id),
    [MODEL],
  )
  t.is(models.data[0]!.object, 'model')
  t.is((models.data[0] as unknown as { max_model_len: number }).max_model_len, 2048)
  const one = await t0.client.models.retrieve(MODEL)
  t.is(one.id, MODEL)
  const err = await t.throwsAsync(t0.client.models.retrieve('gpt-4'))
  t.true(err instanceof OpenAI.NotFoundError)
  t.deepEqual(await (await fetch(`${t0.base}/health`)).json(), { status: 'ok' })
  const v = (await (await fetch(`${t0.base}/version`)).json()) as { version: string }
  t.regex(v.version, /^\d+\.\d+\.\d+/)
})

test('chat completion: the same answer as the engine, in OpenAI shape', async (t) => {
  const res = await t0.client.chat.completions.create(
    extra({ model: MODEL, messages: ref.chat.messages, max_tokens: 6, ...greedy }),
  )
  const direct = await t0.server.engine!.chat(ref.chat.messages, { maxTokens: 6, temperature: 0, ignoreEos: true })
  t.regex(res.id, /^chatcmpl-/)
  t.is(res.object, 'chat.completion')
  t.is(res.model, MODEL)
  t.true(Number.isInteger(res.created))
  t.is(res.choices.length, 1)
  const c = res.choices[0]!
  t.is(c.index, 0)
  t.is(c.message.role, 'assistant')
  t.is(c.message.content, direct.text)
  t.is(c.finish_reason, 'length')
  t.is(c.logprobs, null)
  t.deepEqual(res.usage && { p: res.usage.prompt_tokens, c: res.usage.completion_tokens, t: res.usage.total_tokens }, {
    p: ref.chat.input_ids.length,
    c: 6,
    t: ref.chat.input_ids.length + 6,
  })
})

test('chat streaming: a role chunk, content chunks, a finish chunk, then [DONE]', async (t) => {
  const body = { model: MODEL, messages: user('Hello there'), max_tokens: 8, stream: true, ...greedy }
  const res = await post(`${t0.base}/v1/chat/completions`, body)
  t.is(res.status, 200)
  t.regex(res.headers.get('content-type') ?? '', /^text\/event-stream/)
  const events = sseEvents(res.text)
  t.is(events.at(-1)?.data, '[DONE]')
  const chunks = events.slice(0, -1).map((e) => JSON.parse(e.data!))
  const ids = new Set(chunks.map((c) => c.id))
  t.is(ids.size, 1)
  for (const c of chunks) {
    t.is(c.object, 'chat.completion.chunk')
    t.is(c.model, MODEL)
    t.is(c.choices.length, 1)
    t.false('usage' in c, 'no usage field without include_usage')
  }
  t.deepEqual(chunks[0].choices[0].delta, { role: 'assistant', content: '' })
  const last = chunks.at(-1).choices[0]
  t.deepEqual(last.delta, {})
  t.is(last.finish_reason, 'length')
  const middle = chunks.slice(1, -1)
  t.true(middle.length > 0)
  for (const c of middle) {
    t.deepEqual(Object.keys(c.choices[0].delta), ['content'])
    t.is(c.choices[0].finish_reason, null)
  }
  const streamed = middle.map((c) => c.choices[0].delta.content).join('')
  const whole = await t0.client.chat.completions.create(extra({ model: MODEL, messages: user('Hello there'), max_tokens: 8, ...greedy }))
  t.is(streamed, whole.choices[0]!.message.content!)
})

test('chat streaming through the openai client, with include_usage', async (t) => {
  const stream = await t0.client.chat.completions.create(
    extra({
      model: MODEL,
      messages: user('Count to five'),
      max_tokens: 7,
      stream: true as const,
      stream_options: { include_usage: true },
      ...greedy,
    }),
  )
  const chunks = []
  for await (const chunk of stream) chunks.push(chunk)
  const last = chunks.at(-1)!
  t.deepEqual(last.choices, [])
  t.is(last.usage?.completion_tokens, 7)
  t.true((last.usage?.prompt_tokens ?? 0) > 0)
  t.is(last.usage?.total_tokens, (last.usage?.prompt_tokens ?? 0) + 7)
  for (const c of chunks.slice(0, -1)) t.is(c.usage, null)
  t.is(chunks.at(-2)!.choices[0]!.finish_reason, 'length')
})

test('completions: greedy text matches the reference; prompts as strings, lists and token ids', async (t) => {
  const p = ref.prompts[0]!
  const one = await t0.client.completions.create(extra({ model: MODEL, prompt: p.text, max_tokens: 16, ...greedy }))
  t.is(one.object, 'text_completion')
  t.regex(one.id, /^cmpl-/)
  t.is(one.choices[0]!.text, p.greedy_text)
  t.is(one.choices[0]!.finish_reason, 'length')
  t.is(one.usage?.prompt_tokens, p.input_ids.length)
  t.is(one.usage?.completion_tokens, 16)

  const q = ref.prompts[1]!
  const two = await t0.client.completions.create(extra({ model: MODEL, prompt: [p.text, q.text], max_tokens: 4, ...greedy }))
  t.deepEqual(
    two.choices.map((c) => c.index),
    [0, 1],
  )
  t.is(two.choices[0]!.text, one.choices[0]!.text.slice(0, two.choices[0]!.text.length))
  const [alone] = await t0.server.engine!.generate(q.text, { maxTokens: 4, temperature: 0, ignoreEos: true })
  t.is(two.choices[1]!.text, alone!.text)
  t.is(two.usage?.prompt_tokens, p.input_ids.length + q.input_ids.length)
  t.is(two.usage?.completion_tokens, 8)

  const ids = await t0.client.completions.create(extra({ model: MODEL, prompt: p.input_ids, max_tokens: 16, ...greedy }))
  t.is(ids.choices[0]!.text, p.greedy_text)

  const echo = await t0.client.completions.create(extra({ model: MODEL, prompt: p.text, max_tokens: 4, echo: true, ...greedy }))
  t.true(echo.choices[0]!.text.startsWith(p.text))
})

test('completions streaming with include_usage', async (t) => {
  const p = ref.prompts[0]!
  const stream = await t0.client.completions.create(
    extra({ model: MODEL, prompt: p.text, max_tokens: 16, stream: true as const, stream_options: { include_usage: true }, ...greedy }),
  )
  let text = ''
  let finish: string | null = null
  let usage
  for await (const c of stream) {
    if (c.usage) usage = c.usage
    for (const ch of c.choices) {
      text += ch.text
      finish = ch.finish_reason ?? finish
    }
  }
  t.is(text, p.greedy_text)
  t.is(finish, 'length')
  t.is(usage?.completion_tokens, 16)
})

test('n=2 gives two choices, streamed and not', async (t) => {
  const params = { model: MODEL, messages: user('Hi'), max_tokens: 6, n: 2, temperature: 1, seed: 3, ignore_eos: true }
  const res = await t0.client.chat.completions.create(extra(params))
  t.deepEqual(
    res.choices.map((c) => c.index),
    [0, 1],
  )
  t.is(res.usage?.completion_tokens, 12)
  const stream = await t0.client.chat.completions.create(extra({ ...params, stream: true as const }))
  const texts = ['', '']
  const roles = [0, 0]
  const finishes = [0, 0]
  for await (const c of stream) {
    const ch = c.choices[0]!
    if (ch.delta.role === 'assistant') roles[ch.index]!++
    texts[ch.index] += ch.delta.content ?? ''
    if (ch.finish_reason) finishes[ch.index]!++
  }
  t.deepEqual(roles, [1, 1])
  t.deepEqual(finishes, [1, 1])
  t.deepEqual(texts, [res.choices[0]!.message.content, res.choices[1]!.message.content], 'same seed, same samples')
  const cmpl = await t0.client.completions.create(extra({ model: MODEL, prompt: ['a', 'b'], n: 2, max_tokens: 2, ...greedy }))
  t.deepEqual(
    cmpl.choices.map((c) => c.index),
    [0, 1, 2, 3],
  )
})

test('stop strings end the text and are not part of it', async (t) => {
  const p = ref.prompts[0]!
  const mid = Math.floor(p.greedy_text.length / 2)
  const stop = p.greedy_text.slice(mid, mid + 4)
  const cut = p.greedy_text.indexOf(stop)
  t.true(cut > 0)
  const res = await t0.client.completions.create(extra({ model: MODEL, prompt: p.text, max_tokens: 16, stop, ...greedy }))
  t.is(res.choices[0]!.text, p.greedy_text.slice(0, cut))
  t.is(res.choices[0]!.finish_reason, 'stop')
  t.is((res.choices[0] as unknown as { stop_reason: string }).stop_reason, stop)
  const many = await t0.client.completions.create(
    extra({ model: MODEL, prompt: p.text, max_tokens: 16, stop: ['\u0000never', stop], ...greedy }),
  )
  t.is(many.choices[0]!.text, p.greedy_text.slice(0, cut))
})

test('a seed makes sampling reproducible', async (t) => {
  const ask = (seed: number) =>
    t0.client.chat.completions.create(extra({ model: MODEL, messages: user('Hi'), max_tokens: 12, temperature: 1, seed, ignore_eos: true }))
  const [a, b, c] = await Promise.all([ask(1234), ask(1234), ask(99)])
  t.is(a.choices[0]!.message.content, b.choices[0]!.message.content)
  t.not(a.choices[0]!.message.content, c.choices[0]!.message.content)
})

test('logprobs: chat and completions formats', async (t) => {
  const res = await t0.client.chat.completions.create(
    extra({ model: MODEL, messages: user('Hi'), max_tokens: 4, logprobs: true, top_logprobs: 3, ...greedy }),
  )
  const content = res.choices[0]!.logprobs!.content!
  t.is(content.length, 4)
  for (const c of content) {
    t.true(c.logprob <= 0)
    t.deepEqual(c.bytes, [...Buffer.from(c.token, 'utf8')])
    t.is(c.top_logprobs.length, 3)
    t.is(c.top_logprobs[0]!.token, c.token, 'greedy picks the most likely token')
  }
  const cmpl = await t0.client.completions.create(extra({ model: MODEL, prompt: 'Hello', max_tokens: 3, logprobs: 2, ...greedy }))
  const lp = cmpl.choices[0]!.logprobs!
  t.is(lp.tokens!.length, 3)
  t.is(lp.token_logprobs!.length, 3)
  t.deepEqual(lp.text_offset, [0, lp.tokens![0]!.length, lp.tokens![0]!.length + lp.tokens![1]!.length])
  for (const top of lp.top_logprobs!) t.is(Object.keys(top).length, 2)
  // Streamed logprobs come with their content chunks.
  const stream = await t0.client.chat.completions.create(
    extra({ model: MODEL, messages: user('Hi'), max_tokens: 4, logprobs: true, stream: true as const, ...greedy }),
  )
  let n = 0
  for await (const c of stream) n += c.choices[0]?.logprobs?.content?.length ?? 0
  t.is(n, 4)
})

test('unknown OpenAI fields are ignored and null means "not given"', async (t) => {
  const res = await post(`${t0.base}/v1/chat/completions`, {
    model: MODEL,
    messages: [{ role: 'user', content: 'Hi', some_future_field: 1 }],
    max_tokens: 2,
    temperature: null,
    stop: null,
    store: false,
    metadata: { a: 'b' },
    parallel_tool_calls: true,
    response_format: { type: 'text' },
    a_field_nobody_knows: { x: 1 },
  })
  t.is(res.status, 200, res.text)
  t.is(res.json.choices[0].message.role, 'assistant')
  // `model` may be left out: the served model answers.
  const anon = await post(`${t0.base}/v1/completions`, { prompt: 'Hi', max_tokens: 1 })
  t.is(anon.status, 200, anon.text)
  t.is(anon.json.model, MODEL)
})

test('message roles and content parts reach the chat template', async (t) => {
  const res = await post(`${t0.base}/v1/chat/completions`, {
    model: MODEL,
    messages: [
      { role: 'system', content: [{ type: 'text', text: 'Be brief.' }] },
      { role: 'user', content: [{ type: 'text', text: 'Hi' }, { type: 'text', text: 'there' }] },
      { role: 'assistant', content: '', tool_calls: [{ id: 'c1', type: 'function', function: { name: 'f', arguments: '{}' } }] },
      { role: 'tool', tool_call_id: 'c1', content: '42' },
      { role: 'assistant', content: [{ type: 'refusal', refusal: 'No.' }] },
      { role: 'developer', content: 'Go on.' },
    ],
    max_tokens: 2,
  })
  t.is(res.status, 200, res.text)
})

test('bad requests: OpenAI errors with the offending param', async (t) => {
  const url = `${t0.base}/v1/chat/completions`
  const ok = { model: MODEL, messages: user('Hi'), max_tokens: 2 }
  const cases: Array<[unknown, number, string | null, RegExp]> = [
    [{ ...ok, temperature: 'hot' }, 400, 'temperature', /expected number/],
    [{ ...ok, max_tokens: 0 }, 400, 'max_tokens', /./],
    [{ ...ok, n: 1.5 }, 400, 'n', /int/],
    [{ ...ok, top_p: 1.5 }, 400, 'top_p', /./],
    [{ ...ok, stop: [1, 2] }, 400, 'stop[0]', /string/],
    [{ ...ok, messages: [] }, 400, 'messages', /./],
    [{ ...ok, messages: [{ role: 'wizard', content: 'x' }] }, 400, 'messages[0].role', /"user"/],
    [{ ...ok, messages: [{ role: 'user', content: 42 }] }, 400, 'messages[0].content', /./],
    [{ ...ok, messages: [{ role: 'user', content: [{ type: 'text', text: 7 }] }] }, 400, 'messages[0].content[0].text', /string/],
    [{ ...ok, messages: [{ role: 'user', content: [{ type: 'hologram' }] }] }, 400, 'messages[0].content[0].type', /image_url/],
    [{ ...ok, messages: [{ role: 'user', content: [{ type: 'image_url' }] }] }, 400, 'messages[0].content[0].image_url', /uuid/],
    [{ ...ok, response_format: { type: 'json_schema', json_schema: { name: 'x' } } }, 400, 'response_format.json_schema.schema', /./],
    [{ ...ok, logit_bias: { '1': 5 } }, 400, 'logit_bias', /not supported/],
    [{ ...ok, top_logprobs: 2 }, 400, 'top_logprobs', /logprobs/],
    [{ ...ok, min_tokens: 5, max_tokens: 2 }, 400, 'min_tokens', /max_tokens/],
    [{ ...ok, messages: user('hi '.repeat(3000)) }, 400, 'messages', /maximum length/],
    [[1, 2], 400, null, /JSON object/],
  ]
  for (const [body, status, param, message] of cases) {
    const res = await post(url, body)
    const what = JSON.stringify(body).slice(0, 120)
    t.is(res.status, status, what)
    t.regex(res.headers.get('content-type') ?? '', /application\/json/, what)
    t.deepEqual(Object.keys(res.json.error).sort(), ['code', 'message', 'param', 'type'], what)
    t.is(res.json.error.type, 'invalid_request_error', what)
    t.is(res.json.error.param, param, what)
    t.regex(res.json.error.message, message, what)
  }
  const cmpl = await post(`${t0.base}/v1/completions`, { model: MODEL, prompt: 5 })
  t.is(cmpl.status, 400)
  t.is(cmpl.json.error.param, 'prompt')
  // Through the official client: a typed BadRequestError carrying the param.
  const err = await t.throwsAsync(t0.client.chat.completions.create(extra({ ...ok, temperature: 'hot' as unknown as number })))
  t.true(err instanceof OpenAI.BadRequestError)
  t.is((err as InstanceType<typeof OpenAI.BadRequestError>).param, 'temperature')
})

test('media content parts validate, reach the engine and get a clear 400 from a text-only model', async (t) => {
  const parts = [
    { type: 'image_url', image_url: { url: 'https://example.com/cat.png', detail: 'low' }, uuid: 'cat-1' },
    { type: 'image_url', uuid: 'cat-1' },
    { type: 'video_url', video_url: { url: 'https://example.com/v.mp4' } },
    { type: 'input_audio', input_audio: { data: 'UklGRg==', format: 'wav' } },
    { type: 'audio_url', audio_url: { url: 'data:audio/wav;base64,UklGRg==' } },
    { type: 'image_embeds', image_embeds: 'AAAA' },
  ]
  for (const part of parts) {
    const res = await post(`${t0.base}/v1/chat/completions`, {
      model: MODEL,
      messages: [{ role: 'system', content: 'x' }, { role: 'user', content: [{ type: 'text', text: 'What is this?' }, part] }],
      max_tokens: 2,
    })
    t.is(res.status, 400, JSON.stringify(part))
    t.is(res.json.error.param, 'messages[1].content[1]', JSON.stringify(part))
    // The message names the modality the model lacks.
    t.regex(res.json.error.message, new RegExp(/image|video|audio/.exec(part.type)![0]), JSON.stringify(part))
  }
})

test('unknown model -> 404, malformed JSON -> 400, unknown route -> 404, all as JSON', async (t) => {
  const err = await t.throwsAsync(t0.client.chat.completions.create({ model: 'gpt-4o', messages: user('Hi'), max_tokens: 2 }))
  t.true(err instanceof OpenAI.NotFoundError)
  const nf = err as InstanceType<typeof OpenAI.NotFoundError>
  t.is(nf.status, 404)
  t.is(nf.code, 'model_not_found')
  t.is(nf.param, 'model')
  const bad = await post(`${t0.base}/v1/chat/completions`, '{"model": "llama-tiny", "messages": [')
  t.is(bad.status, 400)
  t.is(bad.json.error.code, 'invalid_json')
  t.notRegex(bad.text, /<html|<pre/i)
  const route = await fetch(`${t0.base}/v1/embeddings`, { method: 'POST', body: '{}' })
  t.is(route.status, 404)
  t.is(((await route.json()) as { error: { type: string } }).error.type, 'invalid_request_error')
})

test('one log line per request, with id, route, status, tokens and latency', async (t) => {
  const res = await post(`${t0.base}/v1/completions`, { model: MODEL, prompt: 'Hello', max_tokens: 3, ...greedy }, { 'x-request-id': 'trace-abc-123' })
  t.is(res.headers.get('x-request-id'), 'trace-abc-123')
  t.true(await until(async () => t0.logs.some((l) => l.id === 'trace-abc-123')))
  const lines = t0.logs.filter((l) => l.id === 'trace-abc-123')
  t.is(lines.length, 1)
  const line = lines[0]!
  const promptTokens = (await t0.server.engine!.tokenize('Hello')).length
  t.like(line, { level: 'info', msg: 'request', method: 'POST', route: '/v1/completions', status: 200, prompt_tokens: promptTokens, completion_tokens: 3 })
  t.is(typeof line.latency_ms, 'number')
  t.is(typeof line.time, 'string')
  // A generated id when the caller sends none.
  const other = await post(`${t0.base}/v1/completions`, { model: MODEL, prompt: 'Hello', max_tokens: 1 })
  t.regex(other.headers.get('x-request-id') ?? '', /^req-[0-9a-f]{16}$/)
})

test('32 concurrent streaming requests all complete', async (t) => {
  const texts = await Promise.all(
    Array.from({ length: 32 }, async (_, i) => {
      const stream = await t0.client.chat.completions.create(
        extra({ model: MODEL, messages: user(`Request number ${i}`), max_tokens: 8, stream: true as const, ...greedy }),
      )
      let text = ''
      let finish: string | null = null
      for await (const c of stream) {
        text += c.choices[0]?.delta.content ?? ''
        finish = c.choices[0]?.finish_reason ?? finish
      }
      return { text, finish }
    }),
  )
  t.is(texts.length, 32)
  for (const r of texts) {
    t.is(r.finish, 'length')
    t.true(r.text.length > 0)
  }
})

test('a max_tokens above what the context leaves is a 400 worded as vLLM words it, for chat and completions', async (t) => {
  const chat = await post(`${t0.base}/v1/chat/completions`, { model: MODEL, messages: user('Hi'), max_completion_tokens: 10 ** 9 })
  t.is(chat.status, 400)
  t.regex(
    chat.json.error.message,
    /^'max_tokens' or 'max_completion_tokens' is too large: 1000000000\. This model's maximum context length is 2048 tokens and your request has (\d+) input tokens \(1000000000 > 2048 - \1\)\.$/,
  )
  t.is(chat.json.error.param, 'max_tokens')
  const err = await t.throwsAsync(t0.client.completions.create({ model: MODEL, prompt: 'Hello there', max_tokens: 2047 }))
  t.true(err instanceof OpenAI.BadRequestError)
  t.regex(err!.message, /'max_tokens' or 'max_completion_tokens' is too large: 2047\. .* \(2047 > 2048 - \d+\)\./)
  // What fits still runs.
  const ok = await t0.client.completions.create({ model: MODEL, prompt: 'Hello there', max_tokens: 3, ...greedy })
  t.is(ok.usage?.completion_tokens, 3)
})

test('/tokenize and /detokenize answer in vLLM shapes, with the tokens transformers gives', async (t) => {
  const p = ref.prompts[0]!
  const a = await post(`${t0.base}/tokenize`, { model: MODEL, prompt: p.text })
  t.is(a.status, 200)
  t.deepEqual(a.json, { count: p.input_ids.length, max_model_len: 2048, tokens: p.input_ids, token_strs: null })
  const chat = await post(`${t0.base}/tokenize`, { messages: ref.chat.messages, return_token_strs: true })
  t.deepEqual(chat.json.tokens, ref.chat.input_ids)
  t.is(chat.json.count, ref.chat.input_ids.length)
  t.is(chat.json.token_strs.join(''), ref.chat.rendered)
  const d = await post(`${t0.base}/detokenize`, { model: MODEL, tokens: p.input_ids })
  t.deepEqual(d.json, { prompt: p.text })
  const bad = await post(`${t0.base}/detokenize`, { tokens: [10 ** 8] })
  t.is(bad.status, 400)
  t.regex(bad.json.error.message, /out of range/)
  t.is((await post(`${t0.base}/tokenize`, { text: 'x' })).status, 400)
  t.is((await post(`${t0.base}/tokenize`, { model: 'other', prompt: 'x' })).status, 404)
})

test('/openapi.json describes the routes with the request schemas the server validates with', async (t) => {
  const res = await fetch(`${t0.base}/openapi.json`)
  t.is(res.status, 200)
  const doc = (await res.json()) as any
  t.is(doc.openapi, '3.1.0')
  for (const path of ['/v1/chat/completions', '/v1/completions', '/tokenize', '/detokenize', '/v1/models', '/health', '/metrics']) t.truthy(doc.paths[path], path)
  const chat = doc.paths['/v1/chat/completions'].post.requestBody.content['application/json'].schema
  t.deepEqual(chat.required, ['messages'])
  for (const field of ['messages', 'max_completion_tokens', 'response_format', 'structured_outputs', 'tools', 'tool_choice', 'parallel_tool_calls']) {
    t.truthy(chat.properties[field], field)
  }
  t.truthy(doc.paths['/v1/completions'].post.requestBody.content['application/json'].schema.properties.prompt)
})
