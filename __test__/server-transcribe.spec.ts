/**
 * POST /v1/audio/transcriptions (and /translations) with the official `openai`
 * client on the whisper-tiny-random fixture: every response_format, long
 * audio in 30 s windows, batching of concurrent requests, and errors in
 * OpenAI's shape.
 */

import { readFileSync } from 'node:fs'
import { join } from 'node:path'

import test from 'ava'
import OpenAI, { toFile } from 'openai'

import { FIXTURES, fixture } from './helpers.js'
import { startTestServer } from './server-helpers.js'
import type { TestServer } from './server-helpers.js'

const MODEL = fixture('whisper-tiny-random')
const WAV = readFileSync(join(FIXTURES, 'audio', 'speech_16k.wav'))
const ref = JSON.parse(readFileSync(join(MODEL, 'reference.json'), 'utf8')) as {
  cases: Record<string, { greedy_ids: number[]; text: string }>
}

/** A 16 kHz mono PCM16 WAV of the clip repeated `times` times. */
function repeatedWav(times: number): Buffer {
  const data = WAV.subarray(44)
  const body = Buffer.concat(Array<Buffer>(times).fill(data))
  const head = Buffer.from(WAV.subarray(0, 44))
  head.writeUInt32LE(36 + body.length, 4)
  head.writeUInt32LE(body.length, 40)
  return Buffer.concat([head, body])
}

let s: TestServer
test.before(async () => {
  t0check()
  s = await startTestServer({ load: { model: MODEL, dtype: 'f32' }, servedModelName: 'whisper-tiny' })
})
test.after.always(async () => {
  await s?.server.close()
})

/** The fixture's WAV is plain PCM with a 44-byte header (repeatedWav relies on it). */
function t0check(): void {
  if (WAV.toString('ascii', 36, 40) !== 'data') throw new Error('speech_16k.wav has extra chunks')
}

const file = async (bytes: Buffer = WAV, name = 'speech.wav') => toFile(bytes, name, { type: 'audio/wav' })

test.serial('json and verbose_json give transformers\' greedy text, with segments', async (t) => {
  const res = await s.client.audio.transcriptions.create({ file: await file(), model: 'whisper-tiny', language: 'en' })
  t.is(res.text, ref.cases.en_transcribe!.text.trim())
  const v = await s.client.audio.transcriptions.create({
    file: await file(),
    model: 'whisper-tiny',
    language: 'en',
    response_format: 'verbose_json',
    timestamp_granularities: ['segment'],
  })
  t.is(v.text, res.text)
  t.is(v.language, 'english')
  t.true(Math.abs(v.duration - 3.24) < 1e-9)
  t.is(v.segments!.length, 1)
  t.deepEqual(v.segments![0]!.tokens, ref.cases.en_transcribe!.greedy_ids)
  t.like(v.segments![0], { id: 0, seek: 0, start: 0, end: 3.24 })
  t.true(v.segments![0]!.avg_logprob < 0)
  // Without a language the model detects one; verbose_json names it.
  const detected = await s.client.audio.transcriptions.create({ file: await file(), model: 'whisper-tiny', response_format: 'verbose_json' })
  t.is(detected.language, 'norwegian')
})

test.serial('text, srt and vtt formats; translations', async (t) => {
  const text = await s.client.audio.transcriptions.create({ file: await file(), model: 'whisper-tiny', language: 'en', response_format: 'text' })
  t.is(text as unknown as string, `${ref.cases.en_transcribe!.text.trim()}\n`)
  const srt = (await s.client.audio.transcriptions.create({
    file: await file(),
    model: 'whisper-tiny',
    language: 'en',
    response_format: 'srt',
  })) as unknown as string
  t.true(srt.startsWith('1\n00:00:00,000 --> 00:00:03,240\n'), srt)
  const vtt = (await s.client.audio.transcriptions.create({
    file: await file(),
    model: 'whisper-tiny',
    language: 'en',
    response_format: 'vtt',
  })) as unknown as string
  t.true(vtt.startsWith('WEBVTT\n\n00:00:00.000 --> 00:00:03.240\n'), vtt)
  // Translations (no language field in OpenAI's API): detected language, <|translate|>.
  const tr = (await s.client.audio.translations.create({ file: await file(), model: 'whisper-tiny', response_format: 'verbose_json' })) as unknown as {
    segments: Array<{ tokens: number[] }>
  }
  const direct = await s.server.transcriber!.transcribe(WAV, { task: 'translate' })
  t.deepEqual(tr.segments[0]!.tokens, direct.segments[0]!.tokens)
  const transcribed = await s.server.transcriber!.transcribe(WAV)
  t.notDeepEqual(direct.segments[0]!.tokens, transcribed.segments[0]!.tokens)
})

test.serial('long files are transcribed in 30 s windows', async (t) => {
  const long = repeatedWav(11) // 35.6 s
  const v = await s.client.audio.transcriptions.create({
    file: await file(long, 'long.wav'),
    model: 'whisper-tiny',
    language: 'en',
    response_format: 'verbose_json',
  })
  t.true(v.duration > 35)
  t.is(v.segments!.length, 2)
  t.true(v.segments![0]!.end > 29 && v.segments![0]!.end <= 30)
  t.is(v.segments![1]!.start, v.segments![0]!.end)
  t.is(v.text, v.segments!.map((x) => x.text).join(' '))
  const srt = (await s.client.audio.transcriptions.create({
    file: await file(long, 'long.wav'),
    model: 'whisper-tiny',
    language: 'en',
    response_format: 'srt',
  })) as unknown as string
  t.regex(srt, /^1\n00:00:00,000 --> 00:00:[23]\d,\d{3}\n.+\n\n2\n00:00:[23]\d,\d{3} --> 00:00:35,\d{3}\n/s)
})

test.serial('concurrent requests share batches', async (t) => {
  const before = s.server.transcriber!.stats().maxBatch
  const prompts = ['one', 'two three', 'four five six']
  const all = await Promise.all(
    prompts.map(async (prompt) => s.client.audio.transcriptions.create({ file: await file(), model: 'whisper-tiny', language: 'en', prompt })),
  )
  t.is(all.length, 3)
  for (const r of all) t.true(r.text.length > 0)
  t.true(s.server.transcriber!.stats().maxBatch >= 2, `max batch before ${before}, after ${s.server.transcriber!.stats().maxBatch}`)
})

test.serial('errors come back in OpenAI\'s shape with the right status', async (t) => {
  const corrupt = await t.throwsAsync(
    s.client.audio.transcriptions.create({ file: await file(Buffer.from('RIFF\x24\x00\x00\x00WAVEfmt nonsense!'), 'bad.wav'), model: 'whisper-tiny' }),
    { instanceOf: OpenAI.APIError },
  )
  t.is(corrupt.status, 422)
  t.is((corrupt.error as { code?: string }).code, 'invalid_media')
  const empty = await t.throwsAsync(s.client.audio.transcriptions.create({ file: await file(Buffer.alloc(0), 'empty.wav'), model: 'whisper-tiny' }), {
    instanceOf: OpenAI.APIError,
  })
  t.is(empty.status, 400)
  const lang = await t.throwsAsync(s.client.audio.transcriptions.create({ file: await file(), model: 'whisper-tiny', language: 'xx' }), {
    instanceOf: OpenAI.APIError,
  })
  t.is(lang.status, 400)
  t.is((lang.error as { param?: string }).param, 'language')
  const model = await t.throwsAsync(s.client.audio.transcriptions.create({ file: await file(), model: 'whisper-large' }), {
    instanceOf: OpenAI.APIError,
  })
  t.is(model.status, 404)
  const fmt = await t.throwsAsync(
    s.client.audio.transcriptions.create({ file: await file(), model: 'whisper-tiny', response_format: 'mp3' as never }),
    { instanceOf: OpenAI.APIError },
  )
  t.is(fmt.status, 400)
  t.is((fmt.error as { param?: string }).param, 'response_format')
  const chat = await t.throwsAsync(s.client.chat.completions.create({ model: 'whisper-tiny', messages: [{ role: 'user', content: 'hi' }] }), {
    instanceOf: OpenAI.APIError,
  })
  t.is(chat.status, 400)
  t.regex(chat.message, /audio\/transcriptions/)
  // Not multipart: a JSON body.
  const res = await fetch(`${s.base}/v1/audio/transcriptions`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ model: 'whisper-tiny' }),
  })
  t.is(res.status, 400)
  const body = (await res.json()) as { error: { message: string; type: string } }
  t.is(body.error.type, 'invalid_request_error')
  // No file part.
  const form = new FormData()
  form.append('model', 'whisper-tiny')
  const noFile = await fetch(`${s.base}/v1/audio/transcriptions`, { method: 'POST', body: form })
  t.is(noFile.status, 400)
  t.is(((await noFile.json()) as { error: { param: string } }).error.param, 'file')
})

test.serial('transcriptions and translations map each refused input to its status and code', async (t) => {
  const routes = [
    ['transcriptions', (f: Awaited<ReturnType<typeof file>>, extra: Record<string, unknown> = {}) => s.client.audio.transcriptions.create({ file: f, model: 'whisper-tiny', ...extra })],
    ['translations', (f: Awaited<ReturnType<typeof file>>, extra: Record<string, unknown> = {}) => s.client.audio.translations.create({ file: f, model: 'whisper-tiny', ...extra })],
  ] as const
  for (const [route, call] of routes) {
    for (const [what, body, status, code] of [
      ['undecodable audio', Buffer.from('plainly not audio, not even close'), 422, 'invalid_media'],
      ['empty audio', Buffer.alloc(0), 400, 'invalid_media'],
    ] as const) {
      const err = await t.throwsAsync(call(await file(body, 'x.wav')), { instanceOf: OpenAI.APIError })
      t.is(err.status, status, `${route}: ${what}`)
      const e = err.error as { code?: string; message?: string; type?: string }
      t.is(e.code, code, `${route}: ${what}`)
      t.notRegex(e.message ?? '', /^\[/, `${route}: ${what}: no prefix left in the message`)
    }
    const temp = await t.throwsAsync(call(await file(), { temperature: -1 }), { instanceOf: OpenAI.APIError })
    t.is(temp.status, 400, `${route}: bad temperature`)
  }
})

test.serial('the models route lists the Whisper model', async (t) => {
  const list = await s.client.models.list()
  t.deepEqual(
    list.data.map((m) => m.id),
    ['whisper-tiny'],
  )
  const card = await s.client.models.retrieve('whisper-tiny')
  t.is((card as unknown as { max_model_len: number }).max_model_len, 64)
})
