#!/usr/bin/env node
// Decode throughput of candela on one model: 1 stream, then N concurrent
// streams, each generating a fixed number of tokens (ignoreEos) from the same
// fixed prompt. Prints a table and writes JSON to benchmark/results/.
//
//   npm run bench                        # default model (SmolLM2-135M-Instruct Q4_1)
//   npm run bench -- --model path/to/model --concurrency 1,8 --max-tokens 128
import { mkdirSync, writeFileSync } from 'node:fs'
import { cpus, totalmem } from 'node:os'
import { parseArgs } from 'node:util'

import { Engine } from '../dist/index.js'

const { values } = parseArgs({
  options: {
    model: { type: 'string', default: 'default' },
    concurrency: { type: 'string', default: '1,8' },
    'max-tokens': { type: 'string', default: '128' },
    warmup: { type: 'string', default: '1' },
    out: { type: 'string' },
  },
})

const PROMPT =
  'Write a detailed, friendly explanation of how a refrigerator keeps food cold, ' +
  'covering the compressor, the refrigerant and the heat exchangers.'
const maxTokens = Number(values['max-tokens'])
const levels = values.concurrency.split(',').map(Number)

const t0 = performance.now()
const engine = await Engine.load({ model: values.model })
const loadS = (performance.now() - t0) / 1000
const messages = [{ role: 'user', content: PROMPT }]
const params = { maxTokens, temperature: 0, ignoreEos: true }

async function oneStream() {
  const start = performance.now()
  let first = 0
  let tokens = 0
  for await (const chunk of engine.chatStream(messages, params)) {
    if (tokens === 0 && chunk.tokenIds.length > 0) first = performance.now()
    tokens += chunk.tokenIds.length
  }
  const end = performance.now()
  return { tokens, ttftMs: first - start, totalMs: end - start }
}

for (let i = 0; i < Number(values.warmup); i++) await engine.chat(messages, { ...params, maxTokens: 8 })

const rows = []
for (const c of levels) {
  const start = performance.now()
  const streams = await Promise.all(Array.from({ length: c }, oneStream))
  const wall = (performance.now() - start) / 1000
  const tokens = streams.reduce((a, s) => a + s.tokens, 0)
  const ttft = streams.map((s) => s.ttftMs).sort((a, b) => a - b)
  rows.push({
    concurrency: c,
    tokens,
    wallS: +wall.toFixed(3),
    tokensPerS: +(tokens / wall).toFixed(1),
    perStreamTokensPerS: +(tokens / wall / c).toFixed(1),
    ttftMsMedian: +ttft[Math.floor(ttft.length / 2)].toFixed(1),
  })
}

const info = engine.info
const promptTokens = (await engine.tokenize(await engine.applyChatTemplate(messages), { addSpecialTokens: false })).length
await engine.close()

const result = {
  engine: 'candela',
  model: info.name,
  architecture: info.architecture,
  device: info.device,
  promptTokens,
  maxTokens,
  loadS: +loadS.toFixed(2),
  machine: { cpus: cpus().length, cpuModel: cpus()[0]?.model, memGiB: +(totalmem() / 2 ** 30).toFixed(1), node: process.version },
  date: new Date().toISOString(),
  rows,
}

console.log(
  `candela throughput: ${info.name} on ${info.device}, ${promptTokens}-token prompt, ${maxTokens} tokens per stream (load ${result.loadS}s)`,
)
console.log('')
console.log('streams | tokens | wall s | tok/s total | tok/s per stream | TTFT ms (median)')
console.log('------: | -----: | -----: | ----------: | ---------------: | ---------------:')
for (const r of rows) {
  console.log(`${r.concurrency} | ${r.tokens} | ${r.wallS} | ${r.tokensPerS} | ${r.perStreamTokensPerS} | ${r.ttftMsMedian}`)
}
mkdirSync(new URL('./results/', import.meta.url), { recursive: true })
const out = values.out ?? new URL(`./results/throughput-${info.name}.json`, import.meta.url)
writeFileSync(out, `${JSON.stringify(result, null, 2)}\n`)
console.log(`\nwrote ${out instanceof URL ? out.pathname : out}`)
