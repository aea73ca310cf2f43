/**
 * llama.cpp's GGUF + mmproj pair of gemma3-vision-tiny (fixtures/gguf, made
 * by llama.cpp's converters: scripts/make_gguf_fixtures.py) against the
 * safetensors folder it came from, through Engine.load({ model, mmproj }) and
 * the OpenAI server with the `openai` client. GGUF stores neither Gemma 3's
 * layer kinds nor query_pre_attn_scalar (llama.cpp derives them), so the
 * folder compared is the fixture with those two fields as the GGUF implies.
 * LLaVA-1.5's pair (a SentencePiece tokenizer in its text GGUF) against
 * transformers' greedy tokens of the llava-tiny fixture.
 */

import test from 'ava'
import { copyFileSync, readFileSync, readdirSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'

import { Engine, LoadError } from '../src/index.js'
import type { ChatMessage } from '../src/index.js'
import { fixture, tempDir } from './helpers.js'
import { extra, startTestServer } from './server-helpers.js'
import type { TestServer } from './server-helpers.js'

interface Case {
  media: string[]
  messages: Array<{ role: string; content: Array<{ type: string; text?: string }> }>
}
const dir = fixture('gemma3-vision-tiny')
const text = join(fixture('gguf'), 'gemma3-vision-tiny-f16.gguf')
const mmproj = join(fixture('gguf'), 'mmproj-gemma3-vision-tiny-f16.gguf')
const ref = JSON.parse(readFileSync(join(dir, 'reference.json'), 'utf8')) as { cases: Record<string, Case> }
const dataUrl = (f: string): string => `data:image/png;base64,${readFileSync(join(dir, f)).toString('base64')}`
const greedy = { maxTokens: 8, temperature: 0, ignoreEos: true }
const messages = (c: Case): ChatMessage[] => {
  let k = 0
  return c.messages.map((m) => ({
    role: m.role,
    content: m.content.map((p) => (p.type === 'text' ? p : { type: 'image_url', image_url: { url: dataUrl(c.media[k++]!) } })),
  })) as ChatMessage[]
}
const opts = { dtype: 'f32', maxModelLen: 256, maxNumBatchedTokens: 20, limitMmPerPrompt: { image: 2 } } as const

let folder: string
let want: Record<string, number[]>
let s: TestServer
test.before(async () => {
  folder = tempDir('gemma3-gguf-folder-')
  for (const f of readdirSync(dir)) if (f !== 'config.json') copyFileSync(join(dir, f), join(folder, f))
  const config = JSON.parse(readFileSync(join(dir, 'config.json'), 'utf8')) as { text_config: Record<string, unknown> }
  const t = config.text_config
  t.query_pre_attn_scalar = t.head_dim
  t.layer_types = Array.from({ length: t.num_hidden_layers as number }, (_, i) => (i % 6 < 5 ? 'sliding_attention' : 'full_attention'))
  writeFileSync(join(folder, 'config.json'), JSON.stringify(config))
  const e = await Engine.load({ model: folder, ...opts })
  want = {}
  for (const [name, c] of Object.entries(ref.cases)) want[name] = (await e.chat(messages(c), greedy)).tokenIds
  await e.close()
  s = await startTestServer({ load: { model: text, mmproj, ...opts }, servedModelName: 'gguf-gemma3' })
})
test.after.always(async () => {
  await s?.server.close()
})

test.serial('Engine.load({ model, mmproj }) gives the folder\'s greedy tokens', async (t) => {
  await using engine = await Engine.load({ model: text, mmproj, ...opts })
  t.is(engine.info.architecture, 'Gemma3ForConditionalGeneration')
  t.deepEqual(engine.info.modalities, ['image'])
  for (const [name, c] of Object.entries(ref.cases)) {
    t.deepEqual((await engine.chat(messages(c), greedy)).tokenIds, want[name], name)
  }
})

test.serial('the server with an mmproj answers the openai client as the folder does', async (t) => {
  const e = await Engine.load({ model: text, mmproj, ...opts })
  try {
    for (const [name, c] of Object.entries(ref.cases)) {
      const res = await s.client.chat.completions.create({
        ...extra({ model: 'gguf-gemma3', max_tokens: 8, temperature: 0, ignore_eos: true }),
        messages: messages(c) as never,
      })
      t.is(res.choices[0]!.message.content, await e.detokenize(want[name]!), name)
    }
  } finally {
    await e.close()
  }
})

interface LlavaCase extends Case {
  greedy_ids: number[]
  chat_greedy_ids: number[]
}
test.serial('a LLaVA-1.5 pair gives transformers\' greedy tokens', async (t) => {
  const llava = fixture('llava-tiny')
  const lref = JSON.parse(readFileSync(join(llava, 'reference.json'), 'utf8')) as { cases: Record<string, LlavaCase> }
  await using engine = await Engine.load({
    model: join(fixture('gguf'), 'llava-tiny-f16.gguf'),
    mmproj: join(fixture('gguf'), 'mmproj-llava-tiny-f16.gguf'),
    ...opts,
  })
  t.is(engine.info.architecture, 'LlavaForConditionalGeneration')
  t.deepEqual(engine.info.modalities, ['image'])
  for (const [name, c] of Object.entries(lref.cases)) {
    const images = c.media.map((f) => readFileSync(join(llava, f)))
    const withImages = (part: (k: number) => Record<string, unknown>): ChatMessage[] => {
      let k = 0
      return c.messages.map((m) => ({ role: m.role, content: m.content.map((p) => (p.type === 'text' ? p : part(k++))) })) as ChatMessage[]
    }
    const url = (k: number): string => `data:image/png;base64,${images[k]!.toString('base64')}`
    t.deepEqual((await engine.chat(withImages((k) => ({ type: 'image_url', image_url: { url: url(k) } })), greedy)).tokenIds, c.chat_greedy_ids, name)
    const prompt = await engine.applyChatTemplate(withImages(() => ({ type: 'image', image: null })))
    const [gen] = await engine.generate({ prompt, multiModalData: { image: images } }, greedy)
    t.deepEqual(gen!.tokenIds, c.greedy_ids, name)
  }
})

test.serial('a mismatched pair is a LoadError naming both files', async (t) => {
  const other = join(fixture('gguf'), 'mmproj-llava-tiny-f16.gguf')
  const err = await t.throwsAsync(Engine.load({ model: text, mmproj: other }), { instanceOf: LoadError })
  t.is((err as LoadError).code, 'load_failed')
  t.regex(err!.message, /gemma3-vision-tiny-f16\.gguf.*mmproj-llava-tiny-f16\.gguf.*do not match/)
  await t.throwsAsync(Engine.load({ model: text, mmproj: 42 as never }), { message: /mmproj must be a path/ })
})
