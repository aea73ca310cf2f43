/**
 * Images and video through the HTTP API with the official `openai` client, on
 * the qwen2-vl-tiny fixture: image_url parts (data: URLs, interleaved, also
 * streamed), video_url, uuids, mm_processor_kwargs, media errors in OpenAI's
 * error shape, and the media cache metrics.
 */

import test from 'ava'
import { readFileSync } from 'node:fs'
import { join } from 'node:path'
import OpenAI from 'openai'

import { FIXTURES, fixture, readF32, writeSafetensors } from './helpers.js'
import { extra, parsePrometheus, startTestServer } from './server-helpers.js'
import type { TestServer } from './server-helpers.js'

interface Case {
  input_ids: number[]
  greedy_ids: number[]
}
const dir = fixture('qwen2-vl-tiny')
const ref = JSON.parse(readFileSync(join(dir, 'reference.json'), 'utf8')) as { cases: Record<'one_image' | 'two_images', Case> }
const png = (f: string): string => `data:image/png;base64,${readFileSync(join(dir, f)).toString('base64')}`
const imageA = png('image_a.png')
const imageB = png('image_b.png')

type Part = OpenAI.Chat.Completions.ChatCompletionContentPart
type Message = OpenAI.Chat.Completions.ChatCompletionMessageParam

const image = (url: string | null, uuid?: string): Part =>
  ({ type: 'image_url', image_url: url === null ? null : { url }, ...(uuid ? { uuid } : {}) }) as Part
const oneImage = (p: Part): Message[] => [{ role: 'user', content: [p, { type: 'text', text: 'Describe this image.' }] }]
const twoImages = (a: Part, b: Part): Message[] => [
  { role: 'user', content: [{ type: 'text', text: 'Compare' }, a, { type: 'text', text: 'with' }, b, { type: 'text', text: 'Which one is brighter?' }] },
]
const params = extra({ model: 'tiny-vl', max_tokens: 8, temperature: 0, ignore_eos: true })

let s: TestServer
let expected: { one: string; two: string }
test.before(async () => {
  s = await startTestServer({ load: { model: dir, dtype: 'f32', maxModelLen: 512, limitMmPerPrompt: { image: 2, video: 1 } }, servedModelName: 'tiny-vl' })
  const engine = s.server.engine!
  expected = { one: await engine.detokenize(ref.cases.one_image.greedy_ids), two: await engine.detokenize(ref.cases.two_images.greedy_ids) }
})
test.after.always(async () => {
  await s?.server.close()
})

test.serial('image_url parts answer transformers\' greedy text, interleaved and streamed', async (t) => {
  const res = await s.client.chat.completions.create({ ...params, messages: oneImage(image(imageA)) })
  t.is(res.choices[0]!.message.content, expected.one)
  t.is(res.usage!.prompt_tokens, ref.cases.one_image.input_ids.length)
  const two = await s.client.chat.completions.create({ ...params, messages: twoImages(image(imageA), image(imageB)) })
  t.is(two.choices[0]!.message.content, expected.two)
  const stream = await s.client.chat.completions.create({ ...params, messages: twoImages(image(imageA), image(imageB)), stream: true })
  let text = ''
  for await (const chunk of stream) text += chunk.choices[0]?.delta.content ?? ''
  t.is(text, expected.two)
})

test.serial('a video_url (MP4 data: URL) runs; mm_processor_kwargs shape the media', async (t) => {
  const mp4 = readFileSync(join(FIXTURES, 'vision', 'clip_h264.mp4')).toString('base64')
  const video = { type: 'video_url', video_url: { url: `data:video/mp4;base64,${mp4}` } } as unknown as Part
  const res = await s.client.chat.completions.create(
    extra({ ...params, messages: [{ role: 'user', content: [video, { type: 'text', text: 'What happens?' }] }], mm_processor_kwargs: { max_pixels: 28 * 28 * 8 } }),
  )
  t.is(res.choices[0]!.finish_reason, 'length')
  t.true(res.usage!.prompt_tokens > 30)
  const small = await s.client.chat.completions.create(extra({ ...params, messages: oneImage(image(imageA)), mm_processor_kwargs: { max_pixels: 28 * 28 * 4 } }))
  t.is(small.usage!.prompt_tokens, ref.cases.one_image.input_ids.length - 10)
  const bad = await t.throwsAsync(s.client.chat.completions.create(extra({ ...params, messages: oneImage(image(imageA)), mm_processor_kwargs: { fps: 'fast' } })))
  t.true(bad instanceof OpenAI.BadRequestError)
  t.regex((bad as InstanceType<typeof OpenAI.APIError>).message, /fps/)
})

test.serial('a uuid alone reuses an image; an unknown uuid is a 400 naming it; metrics count the media caches', async (t) => {
  const before = parsePrometheus(await (await fetch(`${s.base}/metrics`)).text())
  const value = (m: ReturnType<typeof parsePrometheus>, name: string) => m.samples.find((x) => x.name === name)?.value ?? 0
  await s.client.chat.completions.create({ ...params, messages: oneImage(image(imageB, 'img-b')) })
  const res = await s.client.chat.completions.create({ ...params, messages: oneImage(image(null, 'img-b')) })
  const direct = await s.client.chat.completions.create({ ...params, messages: oneImage(image(imageB)) })
  t.is(res.choices[0]!.message.content, direct.choices[0]!.message.content)
  const err = await t.throwsAsync(s.client.chat.completions.create({ ...params, messages: oneImage(image(null, 'nobody-sent-this')) }))
  t.true(err instanceof OpenAI.BadRequestError)
  t.regex((err as InstanceType<typeof OpenAI.APIError>).message, /nobody-sent-this/)
  const after = parsePrometheus(await (await fetch(`${s.base}/metrics`)).text())
  t.true(value(after, 'candela_processor_cache_hits_total') >= value(before, 'candela_processor_cache_hits_total') + 1)
  // img-b (uuid-keyed) once; the same bytes without a uuid were encoded by an earlier test.
  t.is(value(after, 'candela_encoder_runs_total') - value(before, 'candela_encoder_runs_total'), 1)
})

test.serial('a corrupt image is a 422, too many images a 400, in OpenAI\'s shape', async (t) => {
  const post = async (messages: unknown) => {
    const r = await fetch(`${s.base}/v1/chat/completions`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ model: 'tiny-vl', max_tokens: 2, messages }),
    })
    return { status: r.status, body: (await r.json()) as { error: { message: string; type: string } } }
  }
  const corrupt = await post(oneImage(image(`data:image/png;base64,${Buffer.from('\x89PNG\r\n\x1a\nbroken').toString('base64')}`)))
  t.is(corrupt.status, 422, corrupt.body.error.message)
  t.truthy(corrupt.body.error.type)
  const three = await post([{ role: 'user', content: [image(imageA), image(imageA), image(imageB)] }])
  t.is(three.status, 400)
  t.is(three.body.error.message, 'At most 2 image(s) may be provided in one prompt.')
  const ok = await s.client.chat.completions.create({ ...params, messages: oneImage(image(imageA)) })
  t.is(ok.choices[0]!.message.content, expected.one)
})

test('image_embeds: base64 safetensors over HTTP give the image\'s text; bad ones and the flag off are 400s', async (t) => {
  const { data } = readF32(join(dir, 'reference.safetensors'), 'one_image.item0.embeds')
  const f32 = new Uint8Array(data.buffer, data.byteOffset, data.byteLength)
  const grid = new Uint8Array(BigInt64Array.from([1n, 6n, 8n]).buffer)
  const b64 = (tensors: Parameters<typeof writeSafetensors>[0]) => writeSafetensors(tensors).toString('base64')
  const withGrid = b64({ image_embeds: { dtype: 'F32', shape: [12, 16], data: f32 }, image_grid_thw: { dtype: 'I64', shape: [3], data: grid } })
  const bare = b64({ image_embeds: { dtype: 'F32', shape: [12, 16], data: f32 } })
  const embeds = (image_embeds: string, more: Record<string, unknown> = {}): Part => ({ type: 'image_embeds', image_embeds, ...more }) as unknown as Part
  const badRequest = async (server: TestServer, p: Part, re: RegExp) => {
    const err = await t.throwsAsync(server.client.chat.completions.create({ ...params, messages: oneImage(p) }))
    t.true(err instanceof OpenAI.BadRequestError, err?.message)
    t.is((err as InstanceType<typeof OpenAI.APIError>).status, 400)
    t.regex(err!.message, re)
  }
  // The shared server was started without --enable-mm-embeds.
  await badRequest(s, embeds(withGrid), /image_embeds parts are disabled.*--enable-mm-embeds/)
  const on = await startTestServer({ load: { model: dir, dtype: 'f32', maxModelLen: 512, enableMmEmbeds: true }, servedModelName: 'tiny-vl' })
  try {
    const a = await on.client.chat.completions.create({ ...params, messages: oneImage(embeds(withGrid)) })
    t.is(a.choices[0]!.message.content, expected.one)
    t.is(a.usage!.prompt_tokens, ref.cases.one_image.input_ids.length)
    // The grid beside the blob, as [[t, h, w]].
    const b = await on.client.chat.completions.create({ ...params, messages: oneImage(embeds(bare, { image_grid_thw: [[1, 6, 8]] })) })
    t.is(b.choices[0]!.message.content, expected.one)
    await badRequest(on, embeds(bare, { image_grid_thw: [1, 4, 8] }), /12 feature tokens but image_grid_thw \[1, 4, 8\] gives 8/)
    const narrow = b64({ image_embeds: { dtype: 'BF16', shape: [12, 8], data: new Uint8Array(12 * 8 * 2) }, image_grid_thw: { dtype: 'I64', shape: [3], data: grid } })
    await badRequest(on, embeds(narrow), /hidden size 8 but the model's hidden size is 16/)
    const ints = b64({ image_embeds: { dtype: 'I64', shape: [12, 16], data: new Uint8Array(12 * 16 * 8) } })
    await badRequest(on, embeds(ints, { image_grid_thw: [1, 6, 8] }), /float tensor.*got dtype I64/)
    await badRequest(on, embeds('%%% not base64'), /image_embeds is not valid base64/)
    const ok = await on.client.chat.completions.create({ ...params, messages: oneImage(image(imageA)) })
    t.is(ok.choices[0]!.message.content, expected.one)
  } finally {
    await on.server.close()
  }
})

test('frame_recovery says how many sampled frames it lost: headers, a log line, the library result', async (t) => {
  // 10 VP8 key frames at 5 fps; the 4th one's start code is broken.
  const webm = readFileSync(join(FIXTURES, 'vision', 'clip_vp8_key.webm'))
  const starts = [...webm.keys()].filter((i) => webm[i] === 0x9d && webm[i + 1] === 0x01 && webm[i + 2] === 0x2a)
  t.is(starts.length, 10)
  const broken = Buffer.from(webm)
  broken[starts[3]!] = 0
  const video = { type: 'video_url', video_url: { url: `data:video/webm;base64,${broken.toString('base64')}` } } as unknown as Part
  const messages: Message[] = [{ role: 'user', content: [video, { type: 'text', text: 'What happens?' }] }]
  // fps 5 picks all 10 frames.
  const body = extra({ ...params, messages, mm_processor_kwargs: { fps: 5, max_pixels: 28 * 28 * 4 } })
  const rec = await startTestServer({
    load: { model: dir, dtype: 'f32', maxModelLen: 512, mediaIoKwargs: { video: { frameRecovery: true } } },
    servedModelName: 'tiny-vl',
  })
  try {
    const { response } = await rec.client.chat.completions.create(body).withResponse()
    t.is(response.status, 200)
    t.is(response.headers.get('x-candela-video-frames-dropped'), '1')
    t.is(response.headers.get('x-candela-video-frames-recovered'), '0')
    t.true(rec.logs.some((l) => l.msg === 'video frame recovery' && l.dropped === 1 && l.recovered === 0), JSON.stringify(rec.logs))
    // Streamed: the first chunk carries the count, before the answer opens.
    const stream = await rec.client.chat.completions.create({ ...body, stream: true }).withResponse()
    t.is(stream.response.headers.get('x-candela-video-frames-dropped'), '1')
    for await (const _ of stream.data) void _
    // The library: the result and the first streamed chunk.
    const engine = rec.server.engine!
    const lib = [{ role: 'user' as const, content: [{ type: 'video' as const, video: broken }, { type: 'text' as const, text: 'What happens?' }] }]
    const out = await engine.chat(lib, { maxTokens: 2, mmProcessorKwargs: { fps: 5, max_pixels: 28 * 28 * 4 } })
    t.deepEqual(out.videoFrames, { recovered: 0, dropped: 1 })
    const chunks = []
    for await (const c of engine.chatStream(lib, { maxTokens: 2, mmProcessorKwargs: { fps: 5, max_pixels: 28 * 28 * 4 } })) chunks.push(c)
    t.deepEqual(chunks[0]!.videoFrames, { recovered: 0, dropped: 1 })
    t.true(chunks.slice(1).every((c) => c.videoFrames === undefined))
    // An intact video says nothing.
    const whole = await engine.chat([{ role: 'user', content: [{ type: 'video', video: webm }, { type: 'text', text: 'What happens?' }] }], { maxTokens: 2 })
    t.is(whole.videoFrames, undefined)
    // Without frame_recovery the same file is a 422.
    const err = await t.throwsAsync(s.client.chat.completions.create(body))
    t.is((err as { status?: number }).status, 422)
  } finally {
    await rec.server.close()
  }
})
