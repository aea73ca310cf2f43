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

import { Engine, MediaError, ValidationError } from '../src/index.js'
import type { ChatMessage } from '../src/index.js'
import { FIXTURES, fixture, readF32, writeSafetensors } from './helpers.js'

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
  const prompt = await engine.applyChatTemplate(messages(two, () => ({ type: 'image', image: null })))
  const [gen] = await engine.generate({ prompt, multiModalData: { image: [imageA, imageB] } }, greedy)
  t.deepEqual(gen!.tokenIds, two.greedy_ids)
  const vprompt = await engine.applyChatTemplate(messages(video, () => ({ type: 'video', video: null })))
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
  const unknown = await t.throwsAsync(engine.chat(messages(one, () => ({ type: 'image', image: imageA })), { ...greedy, mmProcessorKwargs: { size: 3 } as never }))
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

test('mediaIoKwargs: transparent pixels are composited over the configured colour', async (t) => {
  // 45x37 RGBA with transparent and half-transparent pixels.
  const rgba = readFileSync(join(FIXTURES, 'vision', 'rgba_alpha.png'))
  const ask = (e: Engine) =>
    e.chat([{ role: 'user', content: [{ type: 'image', image: rgba }, { type: 'text', text: 'Describe this image.' }] }], {
      maxTokens: 3,
      temperature: 0,
      ignoreEos: true,
      logprobs: true,
    })
  const black = await Engine.load({ model: dir, dtype: 'f32', maxModelLen: 512, mediaIoKwargs: { image: { rgbaBackgroundColor: [0, 0, 0] }, video: { frameRecovery: true } } })
  const white = await Engine.load({ model: dir, dtype: 'f32', maxModelLen: 512, mediaIoKwargs: { image: { rgbaBackgroundColor: [255, 255, 255] } } })
  try {
    const [b, w, d] = await Promise.all([ask(black), ask(white), ask(engine)])
    const gap = (x: typeof b, y: typeof b) => Math.max(...x.logprobs!.map((l, i) => Math.abs(l.logprob - y.logprobs![i]!.logprob)))
    t.log(`black vs white logprob gap ${gap(b, w)}`)
    t.true(gap(b, w) > 1e-3, `black and white backgrounds give different pixels (logprob gap ${gap(b, w)})`)
    // White is the default (the shared engine chunks prefill differently: float noise only).
    t.deepEqual(d.tokenIds, w.tokenIds)
    t.true(gap(d, w) < 1e-4, `default vs white gap ${gap(d, w)}`)
    // An opaque image does not care.
    const one = ref.cases.one_image
    const opaque = await black.chat(messages(one, () => ({ type: 'image', image: imageA })), greedy)
    t.deepEqual(opaque.tokenIds, one.greedy_ids)
  } finally {
    await Promise.all([black.close(), white.close()])
  }
  const load = (mediaIoKwargs: unknown) => Engine.load({ model: dir, mediaIoKwargs } as never)
  for (const [kw, msg] of [
    [{ image: { rgbaBackgroundColor: [0, 0, 256] } }, /^mediaIoKwargs\.image\.rgbaBackgroundColor\[2\] must be at most 255, got 256$/],
    [{ image: { rgbaBackgroundColor: [-1, 0, 0] } }, /^mediaIoKwargs\.image\.rgbaBackgroundColor\[0\] must be at least 0, got -1$/],
    [{ image: { rgbaBackgroundColor: [0.5, 0, 0] } }, /rgbaBackgroundColor\[0\] must be an integer/],
    [{ image: { rgbaBackgroundColor: [0, 0] } }, /rgbaBackgroundColor must be \[r, g, b\], got \[0,0\]/],
    [{ image: { rgba_background_color: [0, 0, 0] } }, /unknown mediaIoKwargs\.image key "rgba_background_color" \(did you mean rgbaBackgroundColor\?\)/],
    [{ video: { frameRecovery: 'yes' } }, /mediaIoKwargs\.video\.frameRecovery must be true or false/],
    [{ audio: {} }, /unknown mediaIoKwargs key "audio"/],
  ] as Array<[unknown, RegExp]>) {
    const err = await t.throwsAsync(load(kw), { instanceOf: ValidationError })
    t.regex(err!.message, msg)
  }
})

const refEmbeds = join(dir, 'reference.safetensors')
/** transformers' vision-tower output for image_a (grid 1x6x8) and image_b (grid 1x8x4). */
const embedsA = readF32(refEmbeds, 'one_image.item0.embeds')
const embedsB = readF32(refEmbeds, 'two_images.item1.embeds')
const gridA: [number, number, number] = [1, 6, 8]
const gridB: [number, number, number] = [1, 8, 4]
const f32Bytes = (a: Float32Array): Uint8Array => new Uint8Array(a.buffer, a.byteOffset, a.byteLength)
const i64Bytes = (v: number[]): Uint8Array => new Uint8Array(BigInt64Array.from(v.map(BigInt)).buffer)

test('image_embeds: precomputed vision embeddings give the same greedy tokens as the image', async (t) => {
  const e = await Engine.load({ model: dir, dtype: 'f32', maxModelLen: 512, enableMmEmbeds: true })
  try {
    const one = ref.cases.one_image
    t.deepEqual(embedsA.shape, [12, 16])
    const runs = e.stats().encoderRuns
    const direct = await e.chat(
      messages(one, () => ({ type: 'image_embeds', image_embeds: { data: embedsA.data, shape: [12, 16] }, image_grid_thw: gridA })),
      greedy,
    )
    t.deepEqual(direct.tokenIds, one.greedy_ids)
    t.is(direct.usage.promptTokens, one.input_ids.length)
    // A safetensors blob holding the grid too ((1, 3) int64), as bytes.
    const blob = writeSafetensors({
      image_embeds: { dtype: 'F32', shape: [12, 16], data: f32Bytes(embedsA.data) },
      image_grid_thw: { dtype: 'I64', shape: [1, 3], data: i64Bytes(gridA) },
    })
    const fromBlob = await e.chat(messages(one, () => ({ type: 'image_embeds', image_embeds: blob })), greedy)
    t.deepEqual(fromBlob.tokenIds, one.greedy_ids)
    t.is(e.stats().encoderRuns, runs, 'the vision tower never ran')
    // Mixed with an image, each in its place: embeddings for the second image.
    const two = ref.cases.two_images
    const mixed = await e.chat(
      messages(two, (k) =>
        k === 0
          ? { type: 'image', image: imageA }
          : { type: 'image_embeds', image_embeds: { data: embedsB.data, shape: [8, 16] }, image_grid_thw: gridB },
      ),
      greedy,
    )
    t.deepEqual(mixed.tokenIds, two.greedy_ids)
    // The same as the engine gets from the image itself.
    const image = await e.chat(messages(one, () => ({ type: 'image', image: imageA })), greedy)
    t.deepEqual(image.tokenIds, direct.tokenIds)
  } finally {
    await e.close()
  }
})

test('image_embeds: wrong shapes, dtypes or grids are 400s naming expected vs got; off is a 400 naming the option', async (t) => {
  const e = await Engine.load({ model: dir, dtype: 'f32', maxModelLen: 512, enableMmEmbeds: true })
  const one = ref.cases.one_image
  const ask = (part: Part, on: Engine = e) => on.chat(messages(one, () => part), greedy)
  const rejects = async (p: Promise<unknown>, re: RegExp) => {
    const err = await t.throwsAsync(p)
    t.true(err instanceof MediaError, err?.message)
    t.is((err as MediaError).status, 400, err?.message)
    t.regex(err!.message, re)
  }
  try {
    const floats = (shape: [number, number], grid: number[]) =>
      ({ type: 'image_embeds', image_embeds: { data: new Float32Array(shape[0] * shape[1]), shape }, image_grid_thw: grid })
    // 12 rows, but a 1x6x4 grid makes 6 tokens.
    await rejects(ask(floats([12, 16], [1, 6, 4])), /image_embeds has 12 feature tokens but image_grid_thw \[1, 6, 4\] gives 6/)
    await rejects(ask(floats([12, 8], gridA)), /hidden size 8 but the model's hidden size is 16 \(expected shape \(12, 16\)\)/)
    const intBlob = writeSafetensors({ image_embeds: { dtype: 'I32', shape: [12, 16], data: new Uint8Array(12 * 16 * 4) } })
    await rejects(ask({ type: 'image_embeds', image_embeds: intBlob, image_grid_thw: gridA }), /must be a float tensor \(F32, F16 or BF16\), got dtype I32/)
    const f16Wrong = writeSafetensors({ image_embeds: { dtype: 'F16', shape: [10, 16], data: new Uint8Array(10 * 16 * 2) } })
    await rejects(ask({ type: 'image_embeds', image_embeds: f16Wrong, image_grid_thw: gridA }), /10 feature tokens but image_grid_thw \[1, 6, 8\] gives 12/)
    const noGrid = writeSafetensors({ image_embeds: { dtype: 'F32', shape: [12, 16], data: f32Bytes(embedsA.data) } })
    await rejects(ask({ type: 'image_embeds', image_embeds: noGrid }), /needs image_grid_thw/)
    await rejects(ask({ type: 'image_embeds', image_embeds: Buffer.from('not safetensors') , image_grid_thw: gridA }), /not a valid safetensors blob/)
    const misnamed = writeSafetensors({ embeds: { dtype: 'F32', shape: [12, 16], data: f32Bytes(embedsA.data) } })
    await rejects(ask({ type: 'image_embeds', image_embeds: misnamed, image_grid_thw: gridA }), /no tensor named "image_embeds"/)
    await rejects(ask(floats([12, 16], [1, 6])), /image_grid_thw must be three positive integers/)
    // The part's grid wins over the blob's: here the part's is wrong.
    const withGrid = writeSafetensors({
      image_embeds: { dtype: 'F32', shape: [12, 16], data: f32Bytes(embedsA.data) },
      image_grid_thw: { dtype: 'I64', shape: [3], data: i64Bytes(gridA) },
    })
    await rejects(ask({ type: 'image_embeds', image_embeds: withGrid, image_grid_thw: gridB }), /12 feature tokens but image_grid_thw \[1, 8, 4\] gives 8/)
    // Off (the shared engine has no enableMmEmbeds).
    await rejects(ask(floats([12, 16], gridA), engine), /image_embeds parts are disabled; load the engine with enableMmEmbeds: true \(candela serve --enable-mm-embeds\)/)
    // None of that hurt the engine.
    const ok = await ask({ type: 'image_embeds', image_embeds: withGrid })
    t.deepEqual(ok.tokenIds, one.greedy_ids)
  } finally {
    await e.close()
  }
  await t.throwsAsync(Engine.load({ model: dir, enableMmEmbeds: 'yes' } as never), { message: /enableMmEmbeds must be true or false/ })
})
