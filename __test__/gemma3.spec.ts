/**
 * Gemma 3's language model end to end on the gemma3-tiny fixture
 * (scripts/make_gemma3_fixture.py; transformers' greedy tokens in
 * reference.json; sliding window 6, shorter than every prompt):
 * generate() on plain prompts (BOS added, as transformers' tokenizer call
 * does), engine.chat (the rendered Gemma 3 template, which writes its own
 * <bos>), both with prefill split into 5-token steps, and the OpenAI server.
 */

import test from 'ava'
import { readFileSync } from 'node:fs'
import { join } from 'node:path'

import { Engine } from '../src/index.js'
import type { ChatMessage } from '../src/index.js'
import { fixture } from './helpers.js'
import { extra, startTestServer } from './server-helpers.js'
import type { TestServer } from './server-helpers.js'

interface Prompt {
  text: string
  input_ids: number[]
  greedy_ids: number[]
}
interface Chat {
  messages: ChatMessage[]
  input_ids: number[]
  greedy_ids: number[]
}
const dir = fixture('gemma3-tiny')
const ref = JSON.parse(readFileSync(join(dir, 'reference.json'), 'utf8')) as { prompts: Prompt[]; chat: Chat }
const greedy = { maxTokens: 16, temperature: 0, ignoreEos: true }

let engine: Engine
let s: TestServer
test.before(async () => {
  engine = await Engine.load({ model: dir, dtype: 'f32', maxModelLen: 128, maxNumBatchedTokens: 5 })
  s = await startTestServer({ load: { model: dir, dtype: 'f32', maxModelLen: 128 }, servedModelName: 'tiny-gemma3' })
})
test.after.always(async () => {
  await engine?.close()
  await s?.server.close()
})

test.serial('engine: generate and chat give transformers\' greedy tokens', async (t) => {
  t.is(engine.info.architecture, 'Gemma3ForCausalLM')
  const outs = await engine.generate(ref.prompts.map((p) => p.text), greedy)
  t.deepEqual(
    outs.map((o) => o.tokenIds),
    ref.prompts.map((p) => p.greedy_ids),
  )
  const chat = await engine.chat(ref.chat.messages, greedy)
  t.deepEqual(chat.tokenIds, ref.chat.greedy_ids)
  t.is(chat.usage.promptTokens, ref.chat.input_ids.length)
})

test.serial('server: chat completion gives transformers\' greedy text', async (t) => {
  const res = await s.client.chat.completions.create({
    ...extra({ model: 'tiny-gemma3', max_tokens: 16, temperature: 0, ignore_eos: true }),
    messages: ref.chat.messages as never,
  })
  t.is(res.choices[0]!.message.content, await engine.detokenize(ref.chat.greedy_ids))
  t.is(res.usage!.prompt_tokens, ref.chat.input_ids.length)
})
