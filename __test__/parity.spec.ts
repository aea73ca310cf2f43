// Greedy generation on the tiny fixture checkpoints must reproduce the token
// ids Hugging Face transformers produced (fixtures/<name>/reference.json).
import test from 'ava'

import { Engine } from '../dist/index.js'
import { fixture, reference } from './helpers.js'

const CASES: Array<{ model: string; ref: string }> = [
  { model: 'llama-tiny', ref: 'llama-tiny' },
  { model: 'llama-tiny.gguf', ref: 'llama-tiny' },
  { model: 'llama3-tiny', ref: 'llama3-tiny' },
  { model: 'qwen2-tiny', ref: 'qwen2-tiny' },
  { model: 'qwen3-tiny', ref: 'qwen3-tiny' },
]

for (const { model, ref: refName } of CASES) {
  test(`${model}: greedy ids match transformers`, async (t) => {
    const ref = reference(refName)
    // f32: the reference's arithmetic (16-bit fixtures under 'auto' take the
    // bf16 engine for prompt rows where the CPU has one: AMX, AMD AVX512-BF16).
    const engine = await Engine.load({ model: fixture(model), maxNumSeqs: 8, dtype: 'f32' })
    try {
      t.is(engine.info.architecture, ref.architecture)
      // Each prompt alone, from its token ids.
      for (const p of ref.prompts) {
        const [out] = await engine.generate({ promptTokenIds: p.input_ids }, { maxTokens: 16, temperature: 0, ignoreEos: true })
        t.deepEqual(out!.tokenIds, p.greedy_ids, `prompt ${JSON.stringify(p.text)}`)
        t.is(out!.finishReason, 'length')
        t.is(out!.usage.promptTokens, p.input_ids.length)
        t.is(out!.usage.completionTokens, 16)
      }
      // The same prompts as text, batched together: same ids.
      const outs = await engine.generate(
        ref.prompts.map((p) => ({ prompt: p.text })),
        { maxTokens: 16, temperature: 0, ignoreEos: true },
      )
      t.is(outs.length, ref.prompts.length)
      outs.forEach((o, i) => t.deepEqual(o.tokenIds, ref.prompts[i]!.greedy_ids, `batched prompt ${i}`))
    } finally {
      await engine.close()
    }
  })
}

test('llama-tiny: tokenizer matches transformers', async (t) => {
  const ref = reference('llama-tiny')
  const engine = await Engine.load({ model: fixture('llama-tiny') })
  try {
    for (const p of ref.prompts) t.deepEqual(await engine.tokenize(p.text), p.input_ids)
    t.is(await engine.detokenize(ref.prompts[0]!.greedy_ids), ref.prompts[0]!.greedy_text)
    t.deepEqual(await engine.tokenize(ref.chat.rendered, { addSpecialTokens: false }), ref.chat.input_ids)
  } finally {
    await engine.close()
  }
})
