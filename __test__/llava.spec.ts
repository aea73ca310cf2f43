/**
 * LLaVA-1.5 end to end on the llava-tiny fixture (scripts/make_llava_fixture.py;
 * transformers' greedy tokens in reference.json): engine.chat and the
 * OpenAI server with image_url data: URLs (the chat form: the rendered
 * template tokenized without BOS, as apply_chat_template and vLLM's chat
 * route do), and generate({ prompt, multiModalData }) (the plain-prompt
 * form: BOS added, as transformers' processor call does).
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
  input_ids: number[]
  greedy_ids: number[]
  chat_greedy_ids: number[]
}
const dir = fixture('llava-tiny')
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
  engine = await Engine.load({ model: dir, dtype: 'f32', maxModelLen: 256, maxNumBatchedTokens: 16, limitMmPerPrompt: { image: 2 } })
  s = await startTestServer({ load: { model: dir, dtype: 'f32', maxModelLen: 256, limitMmPerPrompt: { image: 2 } }, servedModelName: 'tiny-llava' })
})
test.after.always(async () => {
  await engine?.close()
  await s?.server.close()
})

test.serial('engine: chat and generate give transformers\' greedy tokens', async (t) => {
  t.is(engine.info.architecture, 'LlavaForConditionalGeneration')
  t.deepEqual(engine.info.modalities, ['image'])
  for (const [name, c] of Object.entries(ref.cases)) {
    const out = await engine.chat(messages(c, (f) => ({ type: 'image_url', image_url: { url: dataUrl(f) } })), greedy)
    t.deepEqual(out.tokenIds, c.chat_greedy_ids, name)
    t.is(out.usage.promptTokens, c.input_ids.length - 1, name)
    const prompt = await engine.applyChatTemplate(messages(c, () => ({ type: 'image', image: null })))
    const images = c.media.map((f) => readFileSync(join(dir, f)))
    const [gen] = await engine.generate({ prompt, multiModalData: { image: images } }, greedy)
    t.deepEqual(gen!.tokenIds, c.greedy_ids, name)
  }
})

test.serial('server: image_url data: URLs give transformers\' greedy text', async (t) => {
  const params = extra({ model: 'tiny-llava', max_tokens: 8, temperature: 0, ignore_eos: true })
  for (const [name, c] of Object.entries(ref.cases)) {
    const msgs = messages(c, (f) => ({ type: 'image_url', image_url: { url: dataUrl(f) } }))
    const res = await s.client.chat.completions.create({ ...params, messages: msgs as never })
    t.is(res.choices[0]!.message.content, await engine.detokenize(c.chat_greedy_ids), name)
    t.is(res.usage!.prompt_tokens, c.input_ids.length - 1, name)
  }
})
