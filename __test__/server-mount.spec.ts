// The API mounted under a prefix in a user's own Express app (createApp),
// called with the official openai client whose baseURL is under that prefix.
import test from 'ava'
import express from 'express'
import type { Server } from 'node:http'
import type { AddressInfo } from 'node:net'
import OpenAI from 'openai'

import { createApp } from '../dist/server/index.js'
import type { CandelaApp } from '../dist/server/index.js'
import { fixture } from './helpers.js'

let candela: CandelaApp
let server: Server
let base: string
let client: OpenAI

test.before(async () => {
  candela = await createApp({ load: { model: fixture('llama-tiny') }, servedModelName: 'tiny', logger: false })
  const app = express()
  // The user's own middleware and routes around the mounted API.
  app.use(express.json())
  app.get('/', (_req, res) => {
    res.send('my app')
  })
  app.use('/api/llm', candela.app)
  app.get('/after', (_req, res) => {
    res.json({ mine: true })
  })
  server = app.listen(0, '127.0.0.1')
  await new Promise<void>((resolve) => server.once('listening', () => resolve()))
  base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`
  client = new OpenAI({ baseURL: `${base}/api/llm/v1`, apiKey: 'unused', maxRetries: 0 })
  await candela.ready
})

test.after.always(async () => {
  await candela?.close()
  await new Promise<void>((resolve) => (server ? server.close(() => resolve()) : resolve()))
})

test('the openai client chats, streams and lists models under the prefix', async (t) => {
  const models = await client.models.list()
  t.deepEqual(
    models.data.map((m) => m.id),
    ['tiny'],
  )
  const res = await client.chat.completions.create({ model: 'tiny', messages: [{ role: 'user', content: 'Hi' }], max_tokens: 4, temperature: 0 })
  t.is(res.choices[0]!.message.role, 'assistant')
  // The same answer as the engine gives directly.
  const direct = await candela.engine!.chat([{ role: 'user', content: 'Hi' }], { maxTokens: 4, temperature: 0 })
  t.is(res.choices[0]!.message.content, direct.text)
  let streamed = ''
  for await (const chunk of await client.chat.completions.create({ model: 'tiny', messages: [{ role: 'user', content: 'Hi' }], max_tokens: 4, temperature: 0, stream: true })) {
    streamed += chunk.choices[0]?.delta.content ?? ''
  }
  t.is(streamed, direct.text)
})

test('errors under the prefix are OpenAI errors; the user app keeps its own routes', async (t) => {
  const err = await t.throwsAsync(client.chat.completions.create({ model: 'nope', messages: [{ role: 'user', content: 'Hi' }] }))
  t.true(err instanceof OpenAI.NotFoundError, err?.message)
  const tooMany = await t.throwsAsync(client.chat.completions.create({ model: 'tiny', messages: [{ role: 'user', content: 'Hi' }], max_tokens: 10 ** 6 }))
  t.like(tooMany, { status: 400, code: 'context_length_exceeded', param: 'max_tokens' })
  const tokenized = (await (await fetch(`${base}/api/llm/tokenize`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ prompt: 'Hello world' }) })).json()) as { tokens: number[] }
  t.deepEqual(tokenized.tokens, await candela.engine!.tokenize('Hello world'))
  const missing = await fetch(`${base}/api/llm/nowhere`)
  t.is(missing.status, 404)
  t.like(await missing.json(), { error: { code: 'not_found' } })
  t.is(await (await fetch(`${base}/`)).text(), 'my app')
  t.deepEqual(await (await fetch(`${base}/after`)).json(), { mine: true })
})
