/**
 * Audio through the HTTP API with the official `openai` client, on the
 * qwen2-audio-tiny fixture: input_audio / audio_url parts (also streamed),
 * uuids, media errors with OpenAI's error shape, and the media cache metrics.
 */

import test from 'ava'
import { readFileSync } from 'node:fs'
import { join } from 'node:path'
import OpenAI from 'openai'

import { fixture } from './helpers.js'
import { extra, parsePrometheus, startTestServer } from './server-helpers.js'
import type { TestServer } from './server-helpers.js'

const dir = fixture('qwen2-audio-tiny')
const ref = JSON.parse(readFileSync(join(dir, 'reference.json'), 'utf8')) as { greedy_ids: number[] }
const clip1 = readFileSync(join(dir, 'clip1.wav')).toString('base64')
const clip2 = readFileSync(join(dir, 'clip2.wav')).toString('base64')

type Part = OpenAI.Chat.Completions.ChatCompletionContentPart

function conversation(a: Part, b: Part): OpenAI.Chat.Completions.ChatCompletionMessageParam[] {
  return [
    { role: 'user', content: [a, { type: 'text', text: 'What is this sound?' }] },
    { role: 'assistant', content: 'A chirp.' },
    { role: 'user', content: [b, { type: 'text', text: 'And this one?' }] },
  ]
}

const audio = (data: string, uuid?: string): Part => ({ type: 'input_audio', input_audio: { data, format: 'wav' }, ...(uuid ? { uuid } : {}) }) as Part
const params = extra({ model: 'tiny-audio', max_tokens: 8, temperature: 0, ignore_eos: true })

let s: TestServer
let expectedText: string
test.before(async () => {
  s = await startTestServer({ load: { model: dir, dtype: 'f32', limitMmPerPrompt: { audio: 2 } }, servedModelName: 'tiny-audio' })
  const engine = s.server.engine!
  expectedText = await engine.detokenize(ref.greedy_ids)
})
test.after.always(async () => {
  await s?.server.close()
})

test.serial('chat with input_audio parts answers transformers\' greedy text, streamed or not', async (t) => {
  const res = await s.client.chat.completions.create({ ...params, messages: conversation(audio(clip1), audio(clip2)) })
  t.is(res.choices[0]!.message.content, expectedText)
  t.true(res.usage!.prompt_tokens > 100)
  const stream = await s.client.chat.completions.create({ ...params, messages: conversation(audio(clip1), audio(clip2)), stream: true })
  let text = ''
  for await (const chunk of stream) text += chunk.choices[0]?.delta.content ?? ''
  t.is(text, expectedText)
  const byUrl = await s.client.chat.completions.create({
    ...params,
    messages: conversation(
      { type: 'audio_url', audio_url: { url: `data:audio/wav;base64,${clip1}` } } as unknown as Part,
      { type: 'audio', audio_url: `data:audio/wav;base64,${clip2}` } as unknown as Part,
    ),
  })
  t.is(byUrl.choices[0]!.message.content, expectedText)
})

test.serial('a uuid alone reuses a clip; an unknown uuid is a 400 naming it; metrics count the media caches', async (t) => {
  await s.client.chat.completions.create({ ...params, messages: conversation(audio(clip1, 'a-1'), audio(clip2, 'a-2')) })
  const ref1 = { type: 'input_audio', input_audio: null, uuid: 'a-1' } as unknown as Part
  const ref2 = { type: 'input_audio', input_audio: null, uuid: 'a-2' } as unknown as Part
  const res = await s.client.chat.completions.create({ ...params, messages: conversation(ref1, ref2) })
  t.is(res.choices[0]!.message.content, expectedText)
  const miss = { type: 'input_audio', input_audio: null, uuid: 'nobody-sent-this' } as unknown as Part
  const err = await t.throwsAsync(s.client.chat.completions.create({ ...params, messages: conversation(miss, ref2) }))
  t.true(err instanceof OpenAI.BadRequestError)
  t.regex((err as InstanceType<typeof OpenAI.APIError>).message, /nobody-sent-this/)
  const metrics = parsePrometheus(await (await fetch(`${s.base}/metrics`)).text())
  const value = (name: string) => metrics.samples.find((x) => x.name === name)?.value ?? 0
  // The uuid-only parts hit the processor cache (their prefix is cached, so the encoder is not asked).
  t.true(value('candela_processor_cache_hits_total') >= 2)
  t.true(value('candela_encoder_cache_items') >= 2)
  t.is(value('candela_encoder_runs_total'), 4, 'clip1, clip2, and the two uuid-keyed copies once each')
})

test.serial('corrupt audio is a 422, empty / too many / bad base64 a 400, all in OpenAI\'s shape', async (t) => {
  const post = async (messages: unknown) => {
    const r = await fetch(`${s.base}/v1/chat/completions`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ model: 'tiny-audio', max_tokens: 2, messages }),
    })
    return { status: r.status, body: (await r.json()) as { error: { message: string; type: string } } }
  }
  const one = (part: unknown) => [{ role: 'user', content: [part] }]
  const corrupt = await post(one({ type: 'input_audio', input_audio: { data: Buffer.from('RIFF0000WAVEjunk').toString('base64'), format: 'wav' } }))
  t.is(corrupt.status, 422, corrupt.body.error.message)
  t.truthy(corrupt.body.error.type)
  const bad64 = await post(one({ type: 'input_audio', input_audio: { data: '%%%', format: 'wav' } }))
  t.is(bad64.status, 400)
  const three = await post([{ role: 'user', content: [audio(clip1), audio(clip1), audio(clip2)] }])
  t.is(three.status, 400)
  t.is(three.body.error.message, 'At most 2 audio(s) may be provided in one prompt.')
  const fileUrl = await post(one({ type: 'audio_url', audio_url: { url: 'file:///etc/passwd' } }))
  t.is(fileUrl.status, 400)
  // The server still answers.
  const ok = await s.client.chat.completions.create({ ...params, messages: conversation(audio(clip1), audio(clip2)) })
  t.is(ok.choices[0]!.message.content, expectedText)
})
