#!/usr/bin/env node
// Time to first token of an image request (a 1024x768 JPEG) with cold and
// warm media caches. Prints a table and writes JSON to benchmark/results/.
//
//   npm run build && node benchmark/vision-ttft.mjs
//   node benchmark/vision-ttft.mjs --model path/to/Qwen2-VL-2B-Instruct --runs 5
//   node benchmark/vision-ttft.mjs --model DIR --quantization q4_k --kv-cache-bytes 1073741824 --runs 0
//     (--runs 0: the first request alone, as a user's first one; the report
//     has the load time, the file-free RSS after it and the peak RSS)
//
// Cases (each request alone on the engine):
//   cold        new uuid each run: decode + preprocess, vision tower, full prefill
//   media warm  same image, other text in front: processor + encoder caches hit,
//               the prefix cache misses (the whole prompt is prefilled)
//   warm        the same request again: every cache hits
// max_pixels defaults to Qwen2-VL's own 28*28*1280, so the image keeps about
// its size (1036x756: 3996 patches, 999 image tokens).
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs'
import { cpus, totalmem } from 'node:os'
import { basename, dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { parseArgs } from 'node:util'

import { Engine } from '../dist/index.js'
import { peakRssMiB } from './lib/common.mjs'

const root = join(dirname(fileURLToPath(import.meta.url)), '..')
const { values } = parseArgs({
  options: {
    model: { type: 'string', default: join(root, 'fixtures', 'qwen2-vl-tiny') },
    image: { type: 'string', default: join(root, 'fixtures', 'vision', 'photo_1024x768.jpg') },
    'max-pixels': { type: 'string', default: String(28 * 28 * 1280) },
    runs: { type: 'string', default: '5' },
    quantization: { type: 'string' },
    'kv-cache-bytes': { type: 'string' },
    out: { type: 'string' },
  },
})
const runs = Number(values.runs)
const image = readFileSync(values.image)
const engine = await Engine.load({
  model: values.model,
  maxModelLen: 4096,
  ...(values.quantization && { quantization: values.quantization }),
  ...(values['kv-cache-bytes'] && { kvCacheBytes: Number(values['kv-cache-bytes']) }),
})
const loaded = { loadSeconds: engine.info.loadSeconds, anonRssMiB: Math.round(engine.info.anonRssBytes / 2 ** 20) }
const params = { maxTokens: 1, temperature: 0, ignoreEos: true, mmProcessorKwargs: { max_pixels: Number(values['max-pixels']) } }
const ask = (uuid, text) => [{ role: 'user', content: [{ type: 'image', image, uuid }, { type: 'text', text }] }]

async function ttft(messages) {
  const start = performance.now()
  for await (const chunk of engine.chatStream(messages, params)) {
    if (chunk.tokenIds.length > 0) return performance.now() - start
  }
  throw new Error('no token')
}

const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]
const first = await ttft(ask('warmup', 'Describe the picture.')) // first-call costs (allocations, thread pool)
const results = runs > 0 ? { cold: [], mediaWarm: [], warm: [] } : { first: [first] }
for (let i = 0; i < runs; i++) {
  results.cold.push(await ttft(ask(`cold-${i}`, 'Describe the picture.')))
  results.mediaWarm.push(await ttft([{ role: 'system', content: `Run ${i}.` }, ...ask(`cold-${i}`, 'Describe the picture.')]))
  results.warm.push(await ttft(ask(`cold-${i}`, 'Describe the picture.')))
}
const [probe] = await engine.generate(
  { prompt: '<|vision_start|><|image_pad|><|vision_end|>', multiModalData: { image: [image] }, multiModalUuids: { image: [runs > 0 ? 'cold-0' : 'warmup'] } },
  params,
)
const promptTokens = probe.usage.promptTokens
const stats = engine.stats()
await engine.close()

const rows = Object.entries(results).map(([name, xs]) => ({ case: name, medianMs: +median(xs).toFixed(1), minMs: +Math.min(...xs).toFixed(1) }))
console.table(rows)
const report = {
  model: basename(values.model),
  image: `${basename(values.image)} (${image.length} bytes)`,
  maxPixels: Number(values['max-pixels']),
  imagePromptTokens: promptTokens,
  quantization: values.quantization ?? null,
  ...loaded,
  peakRssMiB: peakRssMiB(),
  runs,
  results: rows,
  encoderRuns: stats.encoderRuns,
  machine: { cpus: cpus().length, cpu: cpus()[0]?.model, memoryGb: +(totalmem() / 2 ** 30).toFixed(1), node: process.version },
  date: new Date().toISOString(),
}
const out = values.out ?? join(root, 'benchmark', 'results', `vision-ttft-${report.model}.json`)
mkdirSync(dirname(out), { recursive: true })
writeFileSync(out, JSON.stringify(report, null, 2) + '\n')
console.log(JSON.stringify(report))
console.log(`wrote ${out}`)
