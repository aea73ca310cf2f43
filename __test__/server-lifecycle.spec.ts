// The server around requests: loading (503 until ready), a failed load,
// the API key, the body limit, SSE keep-alives while a request waits, an
// error after a stream started, and shutting down.
import { writeFileSync } from 'node:fs'
import { createServer } from 'node:net'
import { join } from 'node:path'
import type { AddressInfo } from 'node:net'

import test from 'ava'
import OpenAI from 'openai'

import { Engine } from '../dist/index.js'
import { startServer } from '../dist/server/index.js'
import { fixture, tempDir } from './helpers.js'
import { extra, post, sseEvents, startTestServer } from './server-helpers.js'

const chatBody = (extraFields: Record<string, unknown> = {}) => ({
  messages: [{ role: 'user', content: 'Hi' }],
  max_tokens: 2,
  ...extraFields,
})

test('the server listens while the model loads: 503 in OpenAI shape, then 200', async (t) => {
  // qwen2-tiny takes long enough to load (its large vocabulary) to be seen loading.
  const { server, base } = await startTestServer({ load: { model: fixture('qwen2-tiny') } }, false)
  try {
    const health = await fetch(`${base}/health`)
    t.is(health.status, 503)
    const body = (await health.json()) as { error: Record<string, unknown> }
    t.like(body.error, { type: 'server_error', code: 'model_loading', param: null })
    const chat = await post(`${base}/v1/chat/completions`, chatBody())
    t.is(chat.status, 503)
    t.is(chat.json.error.code, 'model_loading')
    // Metrics and version do not wait for the model.
    t.is((await fetch(`${base}/metrics`)).status, 200)
    t.is((await fetch(`${base}/version`)).status, 200)
    await server.ready
    t.is((await fetch(`${base}/health`)).status, 200)
    t.is((await post(`${base}/v1/chat/completions`, chatBody())).status, 200)
    t.deepEqual(server.modelNames, [fixture('qwen2-tiny')])
  } finally {
    await server.close()
  }
})

test('a model that fails to load: ready rejects and /health says why', async (t) => {
  const broken = tempDir('candela-broken-')
  writeFileSync(join(broken, 'config.json'), '{not json')
  const { server, base } = await startTestServer({ load: { model: broken } }, false)
  try {
    await t.throwsAsync(server.ready)
    const res = await fetch(`${base}/health`)
    t.is(res.status, 503)
    const body = (await res.json()) as { error: { code: string; message: string } }
    t.is(body.error.code, 'model_load_failed')
    t.regex(body.error.message, /^the model failed to load: /)
  } finally {
    await server.close()
  }
})

test('bad options fail before the port is taken', async (t) => {
  await t.throwsAsync(startServer({ load: { model: '/no/such/model' }, port: 0, logger: false }), {
    message: /^model path not found: \/no\/such\/model/,
  })
  await t.throwsAsync(startServer({ load: { model: fixture('README.md') }, port: 0, logger: false }), {
    message: /README\.md is not a model: give a model folder/,
  })
  await t.throwsAsync(startServer({ load: { model: fixture('llama-tiny'), maxNumSeqs: 0 }, port: 0, logger: false }), {
    message: /maxNumSeqs must be at least 1/,
  })
})

test('a port in use is a clear error', async (t) => {
  const blocker = createServer()
  await new Promise<void>((r) => blocker.listen(0, '127.0.0.1', r))
  const port = (blocker.address() as AddressInfo).port
  try {
    await t.throwsAsync(startServer({ load: { model: fixture('llama-tiny') }, port, logger: false }), {
      message: `cannot listen on 127.0.0.1:${port}: the port is already in use (pick another with --port)`,
    })
  } finally {
    blocker.close()
  }
})

test('with an API key every /v1 route needs it; probes do not; bodies over the limit get 413', async (t) => {
  const key = 'sk-candela-test'
  const { server, base, client } = await startTestServer({ load: { model: fixture('llama-tiny') }, apiKey: key, maxBodyBytes: 4096 })
  try {
    const ok = await client.chat.completions.create(extra({ model: fixture('llama-tiny'), messages: [{ role: 'user', content: 'Hi' }], max_tokens: 2 }))
    t.is(ok.choices.length, 1)

    const wrong = new OpenAI({ baseURL: `${base}/v1`, apiKey: 'sk-wrong', maxRetries: 0 })
    const err = await t.throwsAsync(wrong.models.list())
    t.true(err instanceof OpenAI.AuthenticationError)
    t.is((err as InstanceType<typeof OpenAI.AuthenticationError>).code, 'invalid_api_key')

    const none = await post(`${base}/v1/chat/completions`, chatBody())
    t.is(none.status, 401)
    t.is(none.headers.get('www-authenticate'), 'Bearer')
    t.like(none.json.error, { type: 'invalid_request_error', code: 'invalid_api_key' })
    // Refused before the body is read: no 413 and no 400 for a bad body without a key.
    t.is((await post(`${base}/v1/chat/completions`, '{oops')).status, 401)
    t.is((await fetch(`${base}/v1/models`, { headers: { authorization: `Bearer ${key}x` } })).status, 401)
    t.is((await fetch(`${base}/v1/models`, { headers: { authorization: `Bearer ${key}` } })).status, 200)

    for (const path of ['/health', '/metrics', '/version']) t.is((await fetch(`${base}${path}`)).status, 200, path)

    const big = await post(`${base}/v1/chat/completions`, chatBody({ messages: [{ role: 'user', content: 'x'.repeat(5000) }] }), {
      authorization: `Bearer ${key}`,
    })
    t.is(big.status, 413)
    t.like(big.json.error, { type: 'invalid_request_error', code: 'request_too_large' })
    t.regex(big.json.error.message, /4096 bytes/)
  } finally {
    await server.close()
  }
})

test('a streaming request that waits for the engine gets keep-alive comments, then its chunks', async (t) => {
  // One sequence at a time: the second request waits while the first one generates.
  const { server, base } = await startTestServer({ load: { model: fixture('llama-tiny'), maxNumSeqs: 1 }, keepAliveMs: 25 })
  try {
    const engine = server.engine!
    const first = post(`${base}/v1/completions`, { prompt: 'Once upon a time', max_tokens: 300, ignore_eos: true })
    while (engine.stats().running === 0) await new Promise((r) => setTimeout(r, 5))
    const second = await post(`${base}/v1/completions`, { prompt: 'Hello', max_tokens: 3, ignore_eos: true, stream: true })
    t.is((await first).status, 200)
    t.is(second.status, 200)
    const events = sseEvents(second.text)
    const firstData = events.findIndex((e) => e.data !== undefined)
    t.true(firstData >= 2, `keep-alives before the first chunk: ${firstData}`)
    for (const e of events.slice(0, firstData)) t.is(e.comment, 'keep-alive')
    t.is(events.at(-1)?.data, '[DONE]')
    const text = events
      .filter((e) => e.data !== undefined && e.data !== '[DONE]')
      .map((e) => JSON.parse(e.data!).choices[0].text)
      .join('')
    t.true(text.length > 0)
  } finally {
    await server.close()
  }
})

test('an error after the stream started is sent as a data: {"error"} event', async (t) => {
  // The server does not own this engine; closing it under a running stream makes the stream fail.
  // n: 8 keeps the engine busy ~9 s (one sample of 1500 tokens takes ~1.6 s on llama-tiny), so
  // on a loaded machine the stream cannot finish before the close lands.
  const engine = await Engine.load({ model: fixture('llama-tiny') })
  const { server, base } = await startTestServer({ engine, servedModelName: 'tiny' })
  try {
    const res = await fetch(`${base}/v1/chat/completions`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ model: 'tiny', messages: [{ role: 'user', content: 'Tell me a story' }], max_tokens: 1500, n: 8, ignore_eos: true, stream: true }),
    })
    t.is(res.status, 200)
    const reader = res.body!.getReader()
    const decoder = new TextDecoder()
    let text = ''
    let closed = false
    for (;;) {
      const { value, done } = await reader.read()
      if (done) break
      text += decoder.decode(value, { stream: true })
      // Two data events (role, first content) are in: pull the engine away.
      if (!closed && (text.match(/^data: /gm) ?? []).length >= 2) {
        closed = true
        await engine.close()
      }
    }
    const events = sseEvents(text)
    t.is(events.at(-1)?.data, '[DONE]')
    const error = JSON.parse(events.at(-2)!.data!) as { error: { message: string; type: string; code: string } }
    t.like(error.error, { type: 'server_error', code: 'shutting_down' })
    t.regex(error.error.message, /engine was closed/)
  } finally {
    await server.close()
    await engine.close()
  }
})

test('close() ends open streams with a shutting-down error and closes the engine the server loaded', async (t) => {
  const { server, base } = await startTestServer({ load: { model: fixture('llama-tiny') } })
  const engine = server.engine!
  // n: 8 so the stream cannot finish before the close lands (see above).
  const res = await fetch(`${base}/v1/completions`, {
    method: 'POST',
    body: JSON.stringify({ prompt: 'Once', max_tokens: 1500, n: 8, ignore_eos: true, stream: true }),
  })
  const reader = res.body!.getReader()
  await reader.read()
  await server.close()
  let rest = ''
  for (;;) {
    const r = await reader.read()
    if (r.done) break
    rest += new TextDecoder().decode(r.value)
  }
  t.regex(rest, /"code":"shutting_down"/)
  t.true(engine.closed)
  await t.throwsAsync(fetch(`${base}/health`))
})
