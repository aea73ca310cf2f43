#!/usr/bin/env node
// Per-step cost of grammar-constrained sampling (structured outputs): the
// same batch of B concurrent requests decoded with and without a JSON
// schema, reported as milliseconds per engine step. The masks are computed
// on the rayon pool while the forward runs, so on a model whose forward
// takes longer than the masks the difference should vanish; on a tiny
// fixture (a large vocabulary, almost no forward) it shows the masks' whole
// cost.
//
//   node benchmark/structured-outputs.mjs                      # fixtures/qwen2-tiny, batches 1 and 32
//   node benchmark/structured-outputs.mjs --model path --batch 1,8,32 --max-tokens 64
import { cpus } from 'node:os'
import { parseArgs } from 'node:util'

import { Engine } from '../dist/index.js'

const { values } = parseArgs({
  options: {
    model: { type: 'string', default: new URL('../fixtures/qwen2-tiny', import.meta.url).pathname },
    batch: { type: 'string', default: '1,32' },
    'max-tokens': { type: 'string', default: '64' },
    repeats: { type: 'string', default: '3' },
  },
})

// Open-ended JSON (an array of objects with free strings and integers):
// every step has a real mask to compute and the output rarely ends early.
const SCHEMA = {
  type: 'array',
  items: {
    type: 'object',
    properties: { name: { type: 'string' }, count: { type: 'integer' }, tags: { type: 'array', items: { type: 'string' } } },
    required: ['name', 'count', 'tags'],
  },
}
const maxTokens = Number(values['max-tokens'])
const engine = await Engine.load({ model: values.model, maxNumSeqs: 64 })
const messages = [{ role: 'user', content: 'List some items as JSON.' }]

/** One round of `batch` concurrent chats: ms per engine step, ms per generated token, tokens per request. */
async function round(batch, constrained) {
  const base = { maxTokens, temperature: 1, ignoreEos: true }
  const before = engine.stats()
  const start = performance.now()
  const outs = await Promise.all(
    Array.from({ length: batch }, (_, i) =>
      engine.chat(messages, { ...base, seed: i, ...(constrained ? { structuredOutputs: { json: SCHEMA } } : {}) }),
    ),
  )
  const ms = performance.now() - start
  const steps = engine.stats().steps - before.steps
  const total = outs.reduce((a, o) => a + o.usage.completionTokens, 0)
  return { msPerStep: ms / steps, msPerToken: ms / total, tokens: total / batch }
}

console.log(`model ${values.model} (vocab ${engine.info.vocabSize}), ${cpus().length} CPUs, ${maxTokens} tokens per request`)
await round(1, true) // warm-up: builds the grammar compiler (reads the vocabulary once)
// Constrained outputs may end early (a complete grammar), leaving later steps
// with fewer sequences: ms per generated token is the fairer comparison then.
console.log('batch | plain ms/step | json ms/step | plain ms/token | json ms/token | json tokens/request')
for (const batch of values.batch.split(',').map(Number)) {
  const plain = []
  const json = []
  for (let r = 0; r < Number(values.repeats); r++) {
    plain.push(await round(batch, false))
    json.push(await round(batch, true))
  }
  const median = (xs, k) => xs.map((x) => x[k]).sort((a, b) => a - b)[Math.floor(xs.length / 2)]
  const toks = json.reduce((a, x) => a + x.tokens, 0) / json.length
  const cells = [median(plain, 'msPerStep'), median(json, 'msPerStep'), median(plain, 'msPerToken'), median(json, 'msPerToken')]
  console.log(`${batch} | ${cells.map((c) => c.toFixed(3)).join(' | ')} | ${toks.toFixed(1)}`)
}
await engine.close()
