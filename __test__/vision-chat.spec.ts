/**
 * Images and video end to end on the qwen2-vl-tiny and qwen2_5-vl-tiny
 * fixtures (tiny random Qwen2-VL / Qwen2.5-VL; transformers' greedy tokens
 * in reference.json): every image / video part form, generate with the
 * model's own placeholders, the processor / encoder / prefix caches, uuids,
 * per-request processor options, and errors. The tiny models' words are
 * meaningless; what is checked is that the pipeline reproduces the reference.
 */

import test from 'ava'
import { readFileSync } from 'node:fs'
import { join } from 'node:path'
import { pathToFileURL } from 'node:url'

import { Engine, MediaError } from '../src/index.js'
import type { ChatMessage } from '../src/index.js'
import { FIXTURES, fixture } from './helpers.js'

interface Case {
  media: Array<string | string[]>
  messages: Array<{ role: string; content: Array<{ type: string; text?: string }> }>
  input_ids: number[]
  greedy_ids: number[]
}
type Ref = { cases: Record<'one_image' | 'two_images' | 'video', Case> }

const dir = fixture('qwen2-vl-tiny')
const dir25 = fixture('qwen2_5-vl-tiny')
const ref = JSON.parse(readFileSync(join(dir, 'reference.json'), 'utf8')) as Ref
const ref25 = JSON.parse(readFileSync(join(dir25, 'reference.json'), 'utf8')) as Ref
const file = (d: string, f: string): Buffer => readFileSync(join(d, f))
const imageA = file(dir, 'image_a.png')
const imageB = file(dir, 'image_b.png')
const frames = [0, 1, 2, 3].map((i) => file(dir, `frame_${i}.png`))
const greedy = { maxTokens: 8, temperature: 0, ignoreEos: true }

type Part = Record<string, unknown>

/** A case's messages with its k-th media part given as `part(k)`. */
function messages(c: Case, part: (k: number) => Part): ChatMessage[] {
  let k = 0
  return c.messages.map((m) => ({
    role: m.role,
    content: m.content.map((p) => (p.type === 'text' ? p : part(k++))),
  })) as ChatMessage[]
}

const dataUrl = (b: Buffer): string => `data:image/png;base64,${b.toString('base64')}`

let engine: Engine
test.before(async () => {
  engine = await Engine.load({
    model: dir,
    dtype: 'f32',
    maxModelLen: 512,
    maxNumBatchedTokens: 16,
    limitMmPerPrompt: { image: 2, video: 1 },
    allowedLocalMediaPath: FIXTURES,
  })
})
test.after.always(async () => {
  await engine?.close()
})

test.serial('every image part form gives transformers\' greedy tokens', async (t) => {
  t.is(engine.info.architecture, 'Qwen2VLForConditionalGeneration')
  t.deepEqual(engine.info.modalities, ['image', 'video'])
  const one = ref.cases.one_image
  const forms: Array<[string, (k: number) => Part]> = [
    ['image_url data:', () => ({ type: 'image_url', image_url: { url: dataUrl(imageA) } })],
    ['image_url file:', () => ({ type: 'image_url', image_url: { url: pathToFileURL(join(dir, 'image_a.png')).href } })],
    ['image bytes', () => ({ type: 'image', image: imageA })],
    ['image_pil', () => ({ type: 'image_pil', image_pil: new Uint8Array(imageA) })],
  ]
  for (const [name, part] of forms) {
    const out = await engine.chat(messages(one, part), greedy)
    t.deepEqual(out.tokenIds, one.greedy_ids, name)
    t.is(out.usage.promptTokens, one.input_ids.length, name)
  }
  // Two images interleaved with text, each where its part stands.
  const two = ref.cases.two_images
  const out = await engine.chat(messages(two, (k) => ({ type: 'image', image: k === 0 ? imageA : imageB })), greedy)
  t.deepEqual(out.tokenIds, two.greedy_ids)
})

test.serial('a video as frames, and generate with the model\'s own placeholders', async (t) => {
  const video = ref.cases.video
  const out = await engine.chat(messages(video, () => ({ type: 'video', video: frames })), greedy)
  t.deepEqual(out.tokenIds, video.greedy_ids)
  const two = ref.cases.two_images
  const prompt = engine.applyChatTemplate(messages(two, () => ({ type: 'image', image: null })))
  const [gen] = await engine.generate({ prompt, multiModalData: { image: [imageA, imageB] } }, greedy)
  t.deepEqual(gen!.tokenIds, two.greedy_ids)
  const vprompt = engine.applyChatTemplate(messages(video, () => ({ type: 'video', video: null })))
  const [vgen] = await engine.generate({ prompt: vprompt, multiModalData: { video: [frames] } }, greedy)
  t.deepEqual(vgen!.tokenIds, video.greedy_ids)
  const err = await t.throwsAsync(engine.generate({ prompt, multiModalData: { image: [imageA] } }, greedy))
  t.regex(err!.message, /image/)
})

test.serial('a repeated image skips preprocessing and the vision tower; a uuid alone reuses it', async (t) => {
  const one = ref.cases.one_image
  const part = () => ({ type: 'image_url', image_url: { url: dataUrl(imageA) }, uuid: 'sku-a' })
  const first = await engine.chat(messages(one, part), greedy)
  const before = engine.stats()
  // Other text in front: the prefix cache misses, the media caches hit.
  const msgs = messages(one, part)
  msgs.unshift({ role: 'system', content: 'Look closely.' })
  const again = await engine.chat(msgs, greedy)
  t.is(again.tokenIds.length, 8)
  const after = engine.stats()
  t.is(after.encoderRuns, before.encoderRuns, 'no vision tower run for a known image')
  t.is(after.processorCacheHits, before.processorCacheHits + 1)
  t.is(after.encoderCacheHits, before.encoderCacheHits + 1)
  // uuid-only: no data, same tokens.
  const byRef = await engine.chat(messages(one, () => ({ type: 'image_url', image_url: null, uuid: 'sku-a' })), greedy)
  t.deepEqual(byRef.tokenIds, first.tokenIds)
  const miss = await t.throwsAsync(engine.chat(messages(one, () => ({ type: 'image_url', image_url: null, uuid: 'sku-never' })), greedy))
  t.true(miss instanceof MediaError)
  t.is((miss as MediaError).status, 400)
  t.regex(miss!.message, /sku-never/)
})

test.serial('a different image with the same text gives different logits and no KV reuse past it', async (t) => {
  const one = ref.cases.one_image
  const params = { ...greedy, logprobs: true }
  const a = await engine.chat(messages(one, () => ({ type: 'image', image: imageA })), params)
  const before = engine.stats()
  // A frame of the clip, never sent as an image before.
  const b = await engine.chat(messages(one, () => ({ type: 'image', image: frames[2] })), params)
  t.notDeepEqual(a.logprobs?.[0]?.logprob, b.logprobs?.[0]?.logprob)
  t.is(engine.stats().encoderRuns, before.encoderRuns + 1)
  // Only the text before the image may come from the prefix cache.
  t.true(b.usage.cachedTokens < 16, `cached ${b.usage.cachedTokens}`)
})

test.serial('processor options change the item (and its hash); bad ones are a 400', async (t) => {
  const one = ref.cases.one_image
  const small = await engine.chat(messages(one, () => ({ type: 'image', image: imageA })), { ...greedy, mmProcessorKwargs: { max_pixels: 28 * 28 * 4 } })
  // 120x90 within 3136 pixels: 56x28, 2 merged tokens instead of 12.
  t.is(small.usage.promptTokens, one.input_ids.length - 10)
  const perPart = await engine.chat(messages(one, () => ({ type: 'image', image: imageA, max_pixels: 28 * 28 * 4 })), greedy)
  t.deepEqual(perPart.tokenIds, small.tokenIds)
  const bad = await t.throwsAsync(engine.chat(messages(one, () => ({ type: 'image', image: imageA })), { ...greedy, mmProcessorKwargs: { max_pixels: -3 } }))
  t.true(bad instanceof MediaError)
  t.is((bad as MediaError).status, 400)
  t.regex(bad!.message, /max_pixels/)
  const unknown = await t.throwsAsync(engine.chat(messages(one, () => ({ type: 'image', image: imageA })), { ...greedy, mmProcessorKwargs: { size: 3 } }))
  t.regex(unknown!.message, /unknown processor kwarg "size"/)
})

test.serial('video files (MP4 / WebM) decode and run end to end', async (t) => {
  for (const f of ['clip_h264.mp4', 'clip_vp9.webm']) {
    const data = readFileSync(join(FIXTURES, 'vision', f))
    const out = await engine.chat([{ role: 'user', content: [{ type: 'video', video: data }, { type: 'text', text: 'What happens?' }] }], {
      ...greedy,
      mmProcessorKwargs: { max_pixels: 28 * 28 * 8, fps: 2 },
    })
    t.is(out.tokenIds.length, 8, f)
    t.true(out.usage.promptTokens > 30, `${f}: the clip became video tokens`)
  }
})

test.serial('bad media is a clear MediaError and never takes the engine down', async (t) => {
  const ask = (part: Part) => engine.chat([{ role: 'user', content: [part as never, { type: 'text', text: 'Hi' }] }], greedy)
  const corrupt = await t.throwsAsync(ask({ type: 'image', image: Buffer.concat([imageA.subarray(0, 60), Buffer.alloc(64)]) }))
  t.true(corrupt instanceof MediaError)
  t.is((corrupt as MediaError).status, 422, corrupt!.message)
  const notImage = await t.throwsAsync(ask({ type: 'image', image: Buffer.from('plain text, not an image') }))
  t.is((notImage as MediaError).status, 422)
  const noFrames = await t.throwsAsync(ask({ type: 'video', video: [] }))
  t.is((noFrames as MediaError).status, 400)
  const three = await t.throwsAsync(engine.chat([{ role: 'user', content: [
    { type: 'image', image: imageA }, { type: 'image', image: imageA }, { type: 'image', image: imageB },
  ] as never }], greedy))
  t.is(three!.message, 'At most 2 image(s) may be provided in one prompt.')
  const ok = await engine.chat(messages(ref.cases.one_image, () => ({ type: 'image', image: imageA })), greedy)
  t.deepEqual(ok.tokenIds, ref.cases.one_image.greedy_ids)
})

test('Qwen2.5-VL (window attention, time-scaled video positions) matches transformers', async (t) => {
  // No processor cache: a uuid alone then relies on the encoder cache only.
  const e = await Engine.load({ model: dir25, dtype: 'f32', maxModelLen: 512, mmProcessorCacheGb: 0 })
  try {
    t.is(e.info.architecture, 'Qwen2_5_VLForConditionalGeneration')
    const c = ref25.cases
    const one = await e.chat(messages(c.one_image, () => ({ type: 'image', image: imageA })), greedy)
    t.deepEqual(one.tokenIds, c.one_image.greedy_ids)
    const two = await e.chat(messages(c.two_images, (k) => ({ type: 'image', image: k === 0 ? imageA : imageB })), greedy)
    t.deepEqual(two.tokenIds, c.two_images.greedy_ids)
    const video = await e.chat(messages(c.video, () => ({ type: 'video', video: frames, uuid: 'clip' })), greedy)
    t.deepEqual(video.tokenIds, c.video.greedy_ids)
    const runs = e.stats().encoderRuns
    const byRef = await e.chat(messages(c.video, () => ({ type: 'video', video: null, uuid: 'clip' })), greedy)
    t.deepEqual(byRef.tokenIds, c.video.greedy_ids)
    t.is(e.stats().encoderRuns, runs)
    t.is(e.stats().processorCacheQueries, 0)
  } finally {
    await e.close()
  }
})

test('a text-only model refuses images with a 400 naming the part', async (t) => {
  const text = await Engine.load({ model: fixture('qwen2-tiny') })
  try {
    const err = await t.throwsAsync(text.chat([{ role: 'user', content: [{ type: 'image', image: imageA }] }], greedy))
    t.true(err instanceof MediaError)
    t.is((err as MediaError).status, 400)
    t.regex(err!.message, /messages\[0\]\.content\[0\].*does not accept image/)
  } finally {
    await text.close()
  }
})
