#!/usr/bin/env node
// What one cold image costs in each vision tower, candela beside transformers,
// on checkpoints whose towers have released shapes (prepare-towers.py: CLIP
// ViT-L/14 at 336 px for LLaVA-1.5, SigLIP so400m at 384 px tiles for
// LLaVA-OneVision and at 896 px for Gemma 3,
// Qwen2-VL-2B's ViT at 896 px) and the fixtures' tiny language models.
//
//   npm run build && node benchmark/towers.mjs [--towers llava-1.5-tower,gemma3-tower] [--runs 3]
//
// candela, per tower (each request alone, one token out):
//   cold        new uuid: decode + preprocess + tower + prefill
//   media warm  same image (processor and encoder caches hit), new text: prefill only
//   image path  cold - media warm: what the image itself costs
// transformers (workers/hf_tower.py, f32): processor, get_image_features
// (tower + projector) and the first forward pass; its cold = processor + forward.
import { spawnSync } from 'node:child_process'
import { mkdirSync, mkdtempSync, readFileSync, writeFileSync } from 'node:fs'
import { cpus, loadavg, tmpdir } from 'node:os'
import { join } from 'node:path'
import { parseArgs } from 'node:util'

import { Engine } from '../dist/index.js'
import { checkBuilt, ensureVenv, venvPython } from './lib/bootstrap.mjs'
import { BENCH_DIR, MODELS_DIR, RESULTS_DIR, median } from './lib/common.mjs'

const ALL = ['llava-1.5-tower', 'llava-onevision-tower', 'gemma3-tower', 'qwen2-vl-tower']
const { values } = parseArgs({
  options: {
    towers: { type: 'string', default: ALL.join(',') },
    runs: { type: 'string', default: '3' },
    threads: { type: 'string', default: '2' },
    engines: { type: 'string', default: 'candela,transformers' },
  },
})
const towers = values.towers.split(',')
const engines = new Set(values.engines.split(','))
const runs = Number(values.runs)
const threads = Number(values.threads)
const TEXT = 'Describe the picture.'

checkBuilt()
ensureVenv()
for (const name of towers) {
  if (!ALL.includes(name)) throw new Error(`unknown tower ${name} (have ${ALL.join(', ')})`)
  const r = spawnSync(venvPython(), [join(BENCH_DIR, 'prepare-towers.py'), '--out', MODELS_DIR, '--only', name], { stdio: 'inherit' })
  if (r.status !== 0) throw new Error(`prepare-towers.py --only ${name} failed`)
}

async function candela(dir) {
  const engine = await Engine.load({ model: dir, threads })
  const image = readFileSync(join(dir, 'bench-image.png'))
  const ask = (uuid, text) => [{ role: 'user', content: [{ type: 'image', image, uuid }, { type: 'text', text }] }]
  const ttft = async (messages) => {
    const start = performance.now()
    for await (const chunk of engine.chatStream(messages, { maxTokens: 1, temperature: 0, ignoreEos: true })) {
      if (chunk.tokenIds.length > 0) return performance.now() - start
    }
    throw new Error('no token')
  }
  await ttft(ask('warmup', TEXT))
  const cold = []
  const warm = []
  for (let i = 0; i < runs; i++) {
    cold.push(await ttft(ask(`cold-${i}-${Date.now()}`, TEXT)))
    warm.push(await ttft(ask('warmup', `${TEXT} (${i})`)))
  }
  await engine.close()
  return { cold: median(cold), mediaWarm: median(warm), image: median(cold) - median(warm) }
}

function transformers(dir) {
  const tmp = mkdtempSync(join(tmpdir(), 'towers-'))
  const spec = join(tmp, 'spec.json')
  const out = join(tmp, 'out.json')
  writeFileSync(spec, JSON.stringify({ model: dir, image: join(dir, 'bench-image.png'), text: TEXT, runs, threads }))
  const r = spawnSync(venvPython(), [join(BENCH_DIR, 'workers', 'hf_tower.py'), spec, out], { stdio: 'inherit' })
  if (r.status !== 0) throw new Error(`hf_tower.py failed on ${dir}`)
  const res = JSON.parse(readFileSync(out, 'utf8')).runs
  const m = (k) => median(res.map((x) => x[k]))
  return { processor: m('processor_ms'), tower: m('tower_ms'), forward: m('forward_ms'), cold: m('cold_ms'), tokens: res[0].prompt_tokens }
}

const rows = []
for (const name of towers) {
  const dir = join(MODELS_DIR, name)
  const row = { tower: name }
  if (engines.has('candela')) row.candela = await candela(dir)
  if (engines.has('transformers')) row.transformers = transformers(dir)
  rows.push(row)
  console.error(`[towers] ${name}: ${JSON.stringify(row)}`)
}

const ms = (x) => (x == null ? '—' : `${Math.round(x)}`)
const lines = [
  `CPU: ${cpus()[0].model}, ${cpus().length} logical CPUs, ${threads} threads; load average ${loadavg().map((x) => x.toFixed(1)).join(' ')}`,
  '',
  '| tower | candela cold ms | candela image path ms | transformers cold ms | transformers tower ms | cold ratio (candela ÷ transformers) |',
  '|---|---|---|---|---|---|',
  ...rows.map((r) => {
    const ratio = r.candela && r.transformers ? (r.candela.cold / r.transformers.cold).toFixed(2) : '—'
    return `| ${r.tower} | ${ms(r.candela?.cold)} | ${ms(r.candela?.image)} | ${ms(r.transformers?.cold)} | ${ms(r.transformers?.tower)} | ${ratio} |`
  }),
]
console.log(lines.join('\n'))
mkdirSync(RESULTS_DIR, { recursive: true })
writeFileSync(join(RESULTS_DIR, 'towers.json'), JSON.stringify({ date: new Date().toISOString(), rows, threads, runs }, null, 2))
