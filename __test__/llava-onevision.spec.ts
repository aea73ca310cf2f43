/**
 * LLaVA-OneVision end to end on the llava-onevision-tiny fixture
 * (scripts/make_llava_onevision_fixture.py; transformers' greedy tokens in
 * reference.json): engine.chat with images (tiled anyres when alone in
 * their prompt, base images only when several share it) and a video as
 * frames, generate({ prompt, multiModalData }) (vLLM's offline form), the
 * media caches and uuids, limitMmPerPrompt, and the OpenAI server with
 * image_url and video_url content parts.
 */

import test from 'ava'
import { readFileSync } from 'node:fs'
import { join } from 'node:path'

import { Engine, MediaError } from '../src/index.js'
import type { ChatMessage } from '../src/index.js'
import { fixture } from './helpers.js'
import { extra, startTestServer } from './server-helpers.js'
import type { TestServer } from './server-helpers.js'

interface Case {
  media?: string[]
  video?: string[]
  messages: Array<{ role: string; content: Array<{ type: string; text?: string }> }>
  input_ids: number[]
  greedy_ids: number[]
}
const dir = fixture('llava-onevision-tiny')
const ref = JSON.parse(readFileSync(join(dir, 'reference.json'), 'utf8')) as { cases: Record<string, Case> }
const read = (f: string): Buffer => readFileSync(join(dir, f))
const dataUrl = (f: string): string => `data:image/png;base64,${read(f).toString('base64')}`
const clip = readFileSync(join(fixture('vision'), 'clip_h264.mp4'))
const clipUrl = `data:video/mp4;base64,${clip.toString('base64')}`
const greedy = { maxTokens: 8, temperature: 0, ignoreEos: true }

/** A case's messages with its k-th image part given as `image(k-th file)`, its video as `video()`. */
const messages = (c: Case, image: (f: string) => Record<string, unknown>, video: () => Record<string, unknown>): ChatMessage[] => {
  let k = 0
  return c.messages.map((m) => ({
    role: m.role,
    content: m.content.map((p) => (p.type === 'text' ? p : p.type === 'image' ? image(c.media![k++]!) : video())),
  })) as ChatMessage[]
}
const frames = (c: Case): Buffer[] => c.video!.map(read)
const asParts = (c: Case): ChatMessage[] =>
  messages(c, (f) => ({ type: 'image_url', image_url: { url: dataUrl(f) } }), () => ({ type: 'video', video: frames(c) }))

let engine: Engine
let s: TestServer
const load = { model: dir, dtype: 'f32' as const, maxModelLen: 512, limitMmPerPrompt: { image: 2, video: 1 } }
test.before(async () => {
  engine = await Engine.load({ ...load, maxNumBatchedTokens: 16 })
  s = await startTestServer({ load, servedModelName: 'tiny-onevision' })
})
test.after.always(async () => {
  await engine?.close()
  await s?.server.close()
})

test.serial('engine: chat and generate give transformers\' greedy tokens (images and a video)', async (t) => {
  t.is(engine.info.architecture, 'LlavaOnevisionForConditionalGeneration')
  t.deepEqual([...engine.info.modalities].sort(), ['image', 'video'])
  for (const [name, c] of Object.entries(ref.cases)) {
    const out = await engine.chat(asParts(c), greedy)
    t.deepEqual(out.tokenIds, c.greedy_ids, name)
    t.is(out.usage.promptTokens, c.input_ids.length, name)
    const prompt = await engine.applyChatTemplate(messages(c, () => ({ type: 'image', image: null }), () => ({ type: 'video', video: null })))
    const multiModalData = { ...(c.media && { image: c.media.map(read) }), ...(c.video && { video: [frames(c)] }) }
    const [gen] = await engine.generate({ prompt, multiModalData }, greedy)
    t.deepEqual(gen!.tokenIds, c.greedy_ids, name)
  }
})

test.serial('a repeated image skips preprocessing and the tower; a uuid alone reuses it', async (t) => {
  const c = ref.cases.wide_image!
  const part = (f: string) => ({ type: 'image_url', image_url: { url: dataUrl(f) }, uuid: 'ov-a' })
  const video = () => ({ type: 'video', video: null })
  const first = await engine.chat(messages(c, part, video), greedy)
  t.deepEqual(first.tokenIds, c.greedy_ids)
  const before = engine.stats()
  const msgs = messages(c, part, video)
  msgs.unshift({ role: 'system', content: 'Look closely.' })
  await engine.chat(msgs, greedy)
  const after = engine.stats()
  t.is(after.encoderRuns, before.encoderRuns, 'no tower run for a known image')
  t.is(after.processorCacheHits, before.processorCacheHits + 1)
  const byRef = await engine.chat(messages(c, () => ({ type: 'image_url', image_url: null, uuid: 'ov-a' }), video), greedy)
  t.deepEqual(byRef.tokenIds, c.greedy_ids)
  const miss = await t.throwsAsync(engine.chat(messages(c, () => ({ type: 'image_url', image_url: null, uuid: 'ov-never' }), video), greedy))
  t.true(miss instanceof MediaError)
  t.is((miss as MediaError).status, 400)
  t.regex(miss!.message, /ov-never/)
})

test.serial('an image cached alone (tiled) is not reused in a multi-image prompt, where it is processed apart', async (t) => {
  const c = ref.cases.two_images!
  const alone = ref.cases.wide_image!
  const part = (f: string) => ({ type: 'image_url', image_url: { url: dataUrl(f) }, uuid: `ov-multi-${f}` })
  const video = () => ({ type: 'video', video: null })
  t.deepEqual((await engine.chat(messages(alone, part, video), greedy)).tokenIds, alone.greedy_ids)
  // The first image by uuid alone: held only as a tiled single image.
  const byRef = (f: string) => (f === c.media![0] ? { type: 'image_url', image_url: null, uuid: `ov-multi-${f}` } : part(f))
  const miss = await t.throwsAsync(engine.chat(messages(c, byRef, video), greedy))
  t.true(miss instanceof MediaError)
  t.regex(miss!.message, /ov-multi-image_a\.png/)
  t.deepEqual((await engine.chat(messages(c, part, video), greedy)).tokenIds, c.greedy_ids)
  t.deepEqual((await engine.chat(messages(c, byRef, video), greedy)).tokenIds, c.greedy_ids, 'by uuid in a multi-image prompt')
})

test.serial('limitMmPerPrompt: a third image is refused', async (t) => {
  const c = ref.cases.wide_image!
  const part = { type: 'image_url', image_url: { url: dataUrl(c.media![0]!) } }
  const err = await t.throwsAsync(engine.chat([{ role: 'user', content: [part, part, part, { type: 'text', text: 'Three?' }] }] as ChatMessage[], greedy))
  t.true(err instanceof MediaError)
  t.regex(err!.message, /At most 2 image/)
})

test.serial('server: image_url and video_url content parts', async (t) => {
  const params = extra({ model: 'tiny-onevision', max_tokens: 8, temperature: 0, ignore_eos: true })
  for (const name of ['wide_image', 'tall_image']) {
    const c = ref.cases[name]!
    const msgs = messages(c, (f) => ({ type: 'image_url', image_url: { url: dataUrl(f) } }), () => ({}))
    const res = await s.client.chat.completions.create({ ...params, messages: msgs as never })
    t.is(res.choices[0]!.message.content, await engine.detokenize(c.greedy_ids), name)
    t.is(res.usage!.prompt_tokens, c.input_ids.length, name)
  }
  // A video file: its frames (4 of the clip's 10, spread as transformers'
  // sample_frames does) give the library's answer over HTTP.
  const c = ref.cases.video!
  const kwargs = { num_frames: 4 }
  const lib = await engine.chat(messages(c, () => ({}), () => ({ type: 'video_url', video_url: { url: clipUrl } })), { ...greedy, mmProcessorKwargs: kwargs })
  const msgs = messages(c, () => ({}), () => ({ type: 'video_url', video_url: { url: clipUrl } }))
  const res = await s.client.chat.completions.create(extra({ ...params, messages: msgs as never, mm_processor_kwargs: kwargs }))
  t.is(res.choices[0]!.message.content, lib.text)
  // 4 frames x 4x4 pooled patches + 1 newline <video> tokens, in place of one.
  t.is(res.usage!.prompt_tokens, c.input_ids.length)
})
