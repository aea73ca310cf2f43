// Quantization at load: `Engine.load({ quantization })` and
// `candela serve --quantization` on a safetensors fixture.
import { parseArgs } from 'node:util'

import { readFileSync } from 'node:fs'
import { totalmem } from 'node:os'

import test, { type ExecutionContext } from 'ava'

import { Engine, type LoadOptions, type LoadProgress } from '../dist/index.js'
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

/** Progress reports of a load: from 0, growing, ending at the total once. */
function checkProgress(t: ExecutionContext, seen: LoadProgress[]): void {
  t.true(seen.length >= 2, `${seen.length} reports`)
  const total = seen[0]!.totalParameters
  t.true(total > 0)
  t.is(seen[0]!.loadedParameters, 0)
  for (let i = 1; i < seen.length; i++) {
    t.is(seen[i]!.totalParameters, total)
    t.true(seen[i]!.loadedParameters > seen[i - 1]!.loadedParameters, `report ${i} does not grow`)
  }
  t.is(seen.at(-1)!.loadedParameters, total)
}

test('load progress: growing reports ending at the total; load time and file-free RSS reported', async (t) => {
  for (const [model, quantization] of [
    ['llama-tiny', 'q4_k'],
    ['llama-tiny.gguf', undefined],
  ] as const) {
    const seen: LoadProgress[] = []
    const engine = await Engine.load({ model: fixture(model), quantization, onLoadProgress: (p) => seen.push(p) })
    try {
      checkProgress(t, seen)
      t.true(engine.info.loadSeconds > 0 && engine.info.loadSeconds < 600)
      const rss = engine.info.anonRssBytes
      if (process.platform === 'linux') t.true(rss !== null && rss > 1 << 20 && rss < totalmem(), `anonRssBytes ${rss}`)
      else t.true(rss === null || rss > 0)
    } finally {
      await engine.close()
    }
  }
  // A listener that throws does not fail the load.
  const engine = await Engine.load({
    model: fixture('llama-tiny'),
    onLoadProgress: () => {
      throw new Error('listener bug')
    },
  })
  await engine.close()
  t.pass()
})

test('towers quantized only when asked: the image path moves a little, the load reports the same checkpoint', async (t) => {
  const image = readFileSync(fixture('qwen2-vl-tiny/image_a.png'))
  const ask = async (opts: LoadOptions) => {
    const seen: LoadProgress[] = []
    const engine = await Engine.load({ model: fixture('qwen2-vl-tiny'), ...opts, onLoadProgress: (p) => seen.push(p) })
    try {
      checkProgress(t, seen)
      // Scored against one fixed token: the first one the f32 model picks.
      const out = await engine.chat([{ role: 'user', content: [{ type: 'image', image }, { type: 'text', text: 'What is it?' }] }], {
        maxTokens: 1,
        temperature: 0,
        ignoreEos: true,
        logprobs: true,
        topLogprobs: 20,
      })
      return { top: out.logprobs![0]!.topLogprobs, total: seen[0]!.totalParameters }
    } finally {
      await engine.close()
    }
  }
  const f32 = await ask({})
  const lm = await ask({ quantization: 'q8_0' })
  const towers = await ask({ quantization: 'q8_0', quantizationTowers: true })
  t.is(lm.total, f32.total)
  t.is(towers.total, f32.total)
  const token = f32.top[0]!.tokenId
  const lp = (r: typeof f32) => r.top.find((x) => x.tokenId === token)?.logprob
  // The towers' quantization changes the image features, so the scores move
  // off the LM-only quantization's; both stay near f32 (q8_0).
  t.not(lp(towers), lp(lm))
  for (const r of [lm, towers]) t.true(Math.abs(lp(r)! - lp(f32)!) < 0.5, `${lp(r)} vs ${lp(f32)}`)
  await t.throwsAsync(Engine.load({ model: fixture('qwen2-vl-tiny'), quantizationTowers: true }), {
    message: /quantizationTowers needs quantization/,
  })
  await t.throwsAsync(Engine.load({ model: fixture('llama-tiny'), quantization: 'q8_0', quantizationTowers: 'yes' as never }), {
    message: /quantizationTowers must be true or false/,
  })
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
  t.deepEqual(parse(['m', '--quantization', 'q8_0', '--quantization-towers']).load, { model: 'm', quantization: 'q8_0', quantizationTowers: true })
  t.throws(() => parse(['m', '--quantization', 'int4']), { message: /--quantization must be one of q8_0, q6_k, q5_k, q4_k, q4_0, got "int4"/ })
})
