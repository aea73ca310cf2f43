// Quantization at load: `Engine.load({ quantization })` and
// `candela serve --quantization` on a safetensors fixture.
import { parseArgs } from 'node:util'

import test from 'ava'

import { Engine } from '../dist/index.js'
import { serveCommand, serveConfig } from '../dist/cli/serve.js'
import { fixture, reference } from './helpers.js'

test('llama-tiny quantized to q8_0 at load: reported, and the same greedy ids alone and batched', async (t) => {
  const ref = reference('llama-tiny')
  const engine = await Engine.load({ model: fixture('llama-tiny'), quantization: 'q8_0' })
  const params = { maxTokens: 16, temperature: 0, ignoreEos: true }
  try {
    t.is(engine.info.quantization, 'q8_0')
    t.true(engine.info.loadSeconds > 0)
    const alone = []
    for (const p of ref.prompts) {
      const [out] = await engine.generate({ promptTokenIds: p.input_ids }, params)
      t.is(out!.tokenIds.length, 16)
      alone.push(out!.tokenIds)
    }
    const batched = await engine.generate(ref.prompts.map((p) => ({ promptTokenIds: p.input_ids })), params)
    t.deepEqual(batched.map((o) => o.tokenIds), alone)
  } finally {
    await engine.close()
  }
  const plain = await Engine.load({ model: fixture('llama-tiny') })
  try {
    t.is(plain.info.quantization, null)
  } finally {
    await plain.close()
  }
})

test('bad quantizations are rejected before loading', async (t) => {
  await t.throwsAsync(Engine.load({ model: fixture('llama-tiny'), quantization: 'q3_xs' as never }), {
    message: /quantization must be one of q8_0, q6_k, q5_k, q4_k, q4_0, got "q3_xs"/,
  })
  await t.throwsAsync(Engine.load({ model: fixture('llama-tiny.gguf'), quantization: 'q4_k' }), {
    message: /GGUF file, quantized already/,
  })
})

test('serve --quantization', (t) => {
  const parse = (args: string[]) => {
    const { values, positionals } = parseArgs({ args, options: serveCommand.options, allowPositionals: true, strict: true })
    return serveConfig(positionals, values as Parameters<typeof serveConfig>[1], {})
  }
  t.deepEqual(parse(['m', '--quantization', 'Q4_K']).load, { model: 'm', quantization: 'q4_k' })
  t.throws(() => parse(['m', '--quantization', 'int4']), { message: /--quantization must be one of q8_0, q6_k, q5_k, q4_k, q4_0, got "int4"/ })
})
