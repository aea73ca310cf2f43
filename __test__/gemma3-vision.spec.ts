/**
 * Gemma 3 with images end to end on the gemma3-vision-tiny fixture
 * (scripts/make_gemma3_vision_fixture.py; transformers' greedy tokens in
 * reference.json, from the rendered template tokenized without added special
 * tokens: the template writes <bos>): engine.chat and the OpenAI server with
 * image_url data: URLs, and generate({ prompt, multiModalData }) with the
 * rendered prompt less its <bos> (the tokenizer adds it), prefill in 20-token
 * steps that stop before an image they cannot hold; pan-and-scan crops
 * (scripts/make_gemma3_pan_and_scan_reference.py) through mmProcessorKwargs
 * and the OpenAI client's mm_processor_kwargs.
 */

import test from 'ava'
import { readFileSync } from 'node:fs'
import { join } from 'node:path'

import { Engine } from '../src/index.js'
import type { ChatMessage } from '../src/index.js'
import { fixture } from './helpers.js'
import { extra, startTestServer } from './server-helpers.js'
import type { TestServer } from './server-helpers.js'

interface Case {
  media: string[]
  messages: Array<{ role: string; content: Array<{ type: string; text?: string }> }>
  rendered: string
  input_ids: number[]
  greedy_ids: number[]
}
const dir = fixture('gemma3-vision-tiny')
const ref = JSON.parse(readFileSync(join(dir, 'reference.json'), 'utf8')) as { cases: Record<string, Case> }
const dataUrl = (f: string): string => `data:image/png;base64,${readFileSync(join(dir, f)).toString('base64')}`
const greedy = { maxTokens: 8, temperature: 0, ignoreEos: true }

/** A case's messages with its k-th image part given as `part(f)` of its file. */
const messages = (c: Case, part: (f: string) => Record<string, unknown>): ChatMessage[] => {
  let k = 0
  return c.messages.map((m) => ({
    role: m.role,
    content: m.content.map((p) => (p.type === 'text' ? p : part(c.media[k++]!))),
  })) as ChatMessage[]
}

let engine: Engine
let s: TestServer
test.before(async () => {
  engine = await Engine.load({ model: dir, dtype: 'f32', maxModelLen: 256, maxNumBatchedTokens: 20, limitMmPerPrompt: { image: 2 } })
  s = await startTestServer({ load: { model: dir, dtype: 'f32', maxModelLen: 256, limitMmPerPrompt: { image: 2 } }, servedModelName: 'tiny-gemma3' })
})
test.after.always(async () => {
  await engine?.close()
  await s?.server.close()
})

test.serial('engine: chat and generate give transformers\' greedy tokens', async (t) => {
  t.is(engine.info.architecture, 'Gemma3ForConditionalGeneration')
  t.deepEqual(engine.info.modalities, ['image'])
  for (const [name, c] of Object.entries(ref.cases)) {
    const out = await engine.chat(messages(c, (f) => ({ type: 'image_url', image_url: { url: dataUrl(f) } })), greedy)
    t.deepEqual(out.tokenIds, c.greedy_ids, name)
    t.is(out.usage.promptTokens, c.input_ids.length, name)
    const rendered = await engine.applyChatTemplate(messages(c, () => ({ type: 'image', image: null })))
    t.is(rendered, c.rendered, name)
    const images = c.media.map((f) => readFileSync(join(dir, f)))
    const prompt = rendered.replace(/^<bos>/, '')
    const [gen] = await engine.generate({ prompt, multiModalData: { image: images } }, greedy)
    t.deepEqual(gen!.tokenIds, c.greedy_ids, name)
  }
})

test.serial('server: image_url data: URLs give transformers\' greedy text', async (t) => {
  const params = extra({ model: 'tiny-gemma3', max_tokens: 8, temperature: 0, ignore_eos: true })
  for (const [name, c] of Object.entries(ref.cases)) {
    const msgs = messages(c, (f) => ({ type: 'image_url', image_url: { url: dataUrl(f) } }))
    const res = await s.client.chat.completions.create({ ...params, messages: msgs as never })
    t.is(res.choices[0]!.message.content, await engine.detokenize(c.greedy_ids), name)
    t.is(res.usage!.prompt_tokens, c.input_ids.length, name)
  }
})

/** Pan-and-scan references (scripts/make_gemma3_pan_and_scan_reference.py): each case with its kwargs. */
const pas = JSON.parse(readFileSync(join(dir, 'reference_pan_and_scan.json'), 'utf8')) as {
  cases: Record<string, Case & { kwargs: Record<string, unknown>; crops: number[] }>
}

test.serial('pan-and-scan crops through mmProcessorKwargs: transformers\' greedy tokens', async (t) => {
  for (const [name, c] of Object.entries(pas.cases)) {
    const msgs = messages(c, (f) => ({ type: 'image_url', image_url: { url: dataUrl(f) } }))
    const out = await engine.chat(msgs, { ...greedy, mmProcessorKwargs: c.kwargs })
    t.deepEqual(out.tokenIds, c.greedy_ids, name)
    t.is(out.usage.promptTokens, c.input_ids.length, name)
    const res = await s.client.chat.completions.create({
      ...extra({ model: 'tiny-gemma3', max_tokens: 8, temperature: 0, ignore_eos: true, mm_processor_kwargs: c.kwargs }),
      messages: msgs as never,
    })
    t.is(res.choices[0]!.message.content, await engine.detokenize(c.greedy_ids), name)
    t.is(res.usage!.prompt_tokens, c.input_ids.length, name)
  }
})

test.serial('server: invalid pan-and-scan kwargs are 400s', async (t) => {
  const c = pas.cases['wide']!
  const msgs = messages(c, (f) => ({ type: 'image_url', image_url: { url: dataUrl(f) } }))
  for (const [kwargs, pattern] of [
    [{ do_pan_and_scan: 'yes' }, /do_pan_and_scan must be true or false/],
    [{ do_pan_and_scan: true, pan_and_scan_min_crop_size: 0 }, /pan_and_scan_min_crop_size must be a positive integer/],
    [{ do_pan_and_scan: true, pan_and_scan_max_num_crops: 1000 }, /at most 64/],
    [{ pan_and_scan_crops: 2 }, /unknown processor kwarg/],
  ] as const) {
    const err = await t.throwsAsync(
      s.client.chat.completions.create({
        ...extra({ model: 'tiny-gemma3', max_tokens: 2, mm_processor_kwargs: kwargs }),
        messages: msgs as never,
      }),
    )
    t.is((err as { status?: number }).status, 400, JSON.stringify(kwargs))
    t.regex(err!.message, pattern)
  }
})
