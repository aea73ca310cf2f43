#!/usr/bin/env node
// candela side of every workload, in its own process (so its peak RSS is its own).
//   node benchmark/workers/candela.mjs SPEC.json OUT.json
// SPEC: { task, model, load: LoadOptions, ...task fields }; OUT: the task's result
// plus loadS and peakRssMiB (VmHWM of this process).
import { readFileSync } from 'node:fs'

import { Engine } from '../../dist/index.js'
import { peakRssMiB, round, workerIo } from '../lib/common.mjs'
import { Rec, closedLoop, offlineStats, servingStats, singleStats } from '../lib/streams.mjs'

const [spec, write] = workerIo()
const greedy = (maxTokens) => ({ maxTokens, temperature: 0, ignoreEos: true })

const t0 = performance.now()
const engine = await Engine.load({ model: spec.model, device: spec.device ?? 'cpu', threads: spec.threads, ...spec.load })
const loadS = (performance.now() - t0) / 1000

/** Stream one token-id prompt; returns its Rec. */
async function stream(ids, maxTokens) {
  const rec = new Rec()
  for await (const chunk of engine.generateStream({ promptTokenIds: ids }, greedy(maxTokens))) rec.add(chunk.tokenIds.length)
  return rec
}

async function warmup() {
  if (spec.warmup) await engine.generate({ promptTokenIds: spec.warmup }, greedy(4))
}

const tasks = {
  async tokenize() {
    return { ids: await engine.tokenize(spec.text, { addSpecialTokens: false }) }
  },

  // Free-running greedy tokens, and (teacher forcing) the argmax after
  // prompt + forced[0..i) for each i: one 1-token request per position.
  async greedy() {
    const [out] = await engine.generate({ promptTokenIds: spec.prompt }, greedy(spec.maxTokens))
    const forcedArgmax = []
    for (let i = 0; i < (spec.forced?.length ?? 0); i++) {
      const [o] = await engine.generate({ promptTokenIds: spec.prompt.concat(spec.forced.slice(0, i)) }, greedy(1))
      forcedArgmax.push(o.tokenIds[0])
    }
    return { tokenIds: out.tokenIds, forcedArgmax }
  },

  async single() {
    await warmup()
    const rec = await stream(spec.prompt, spec.maxTokens)
    return singleStats(rec, spec.prompt.length)
  },

  async offline() {
    await warmup()
    const start = performance.now()
    const outs = await engine.generate(
      spec.prompts.map((ids) => ({ promptTokenIds: ids })),
      greedy(spec.maxTokens),
    )
    const wallS = (performance.now() - start) / 1000
    const out = outs.reduce((a, o) => a + o.tokenIds.length, 0)
    return { ...offlineStats(spec.prompts, out, wallS), preemptions: engine.stats().preemptions }
  },

  // The in-process twin of the HTTP serving run (same closed loop, no HTTP).
  async serving() {
    await warmup()
    const levels = []
    for (const lv of spec.levels) {
      const { recs, t0: a, t1: b } = await closedLoop(lv.prompts, lv.concurrency, (ids) => stream(ids, spec.maxTokens))
      levels.push({ concurrency: lv.concurrency, ...servingStats(recs, a, b) })
    }
    return { levels }
  },

  async prefix() {
    await warmup()
    let cached = 0
    const { recs, t0: a, t1: b } = await closedLoop(spec.prompts, spec.concurrency, async (ids) => {
      const rec = new Rec()
      for await (const chunk of engine.generateStream({ promptTokenIds: ids }, greedy(spec.maxTokens))) {
        rec.add(chunk.tokenIds.length)
        if (chunk.usage) cached += chunk.usage.cachedTokens
      }
      return rec
    })
    const st = engine.stats()
    const inp = spec.prompts.reduce((s, p) => s + p.length, 0)
    return {
      ...servingStats(recs, a, b),
      promptTokens: inp,
      cachedTokens: cached,
      prefillTokens: inp - cached,
      prefixCacheHits: st.prefixCacheHits,
      prefixCacheQueries: st.prefixCacheQueries,
    }
  },

  async multimodal() {
    const image = readFileSync(spec.image)
    const warmImage = readFileSync(spec.warmupImage)
    const params = { ...greedy(spec.maxTokens), mmProcessorKwargs: { max_pixels: spec.maxPixels } }
    const ask = (img, uuid, text, system) => [
      ...(system ? [{ role: 'system', content: system }] : []),
      { role: 'user', content: [{ type: 'image', image: img, uuid }, { type: 'text', text }] },
    ]
    let promptTokens = null
    const one = async (messages) => {
      const rec = new Rec()
      for await (const chunk of engine.chatStream(messages, params)) {
        rec.add(chunk.tokenIds.length)
        if (chunk.usage) promptTokens = chunk.usage.promptTokens
      }
      return rec
    }
    await one(ask(warmImage, 'warmup', spec.text)) // first-call costs, another image
    const cold = await one(ask(image, 'img-0', spec.text))
    const mediaWarm = await one(ask(image, 'img-0', spec.text, 'Answer briefly.'))
    const warm = await one(ask(image, 'img-0', spec.text))
    const { recs, t0: a, t1: b } = await closedLoop(
      Array.from({ length: spec.concurrent }, (_, i) => i),
      spec.concurrent,
      (i) => one(ask(image, `conc-${i}`, spec.text)),
    )
    const conc = servingStats(recs, a, b)
    const st = engine.stats()
    return {
      promptTokens,
      coldTtftMs: round(cold.ttftMs, 2),
      mediaWarmTtftMs: round(mediaWarm.ttftMs, 2),
      warmTtftMs: round(warm.ttftMs, 2),
      concurrent: spec.concurrent,
      concWallS: conc.wallS,
      concImagesPerS: round(spec.concurrent / conc.wallS, 3),
      concTtftP50Ms: conc.ttftP50Ms,
      concTtftP99Ms: conc.ttftP99Ms,
      encoderRuns: st.encoderRuns,
    }
  },
}

const result = await tasks[spec.task]()
const rssNow = /VmRSS:\s+(\d+) kB/.exec(readFileSync('/proc/self/status', 'utf8'))
result.rssAtEndMiB = rssNow ? round(Number(rssNow[1]) / 1024, 1) : null
const info = engine.info
await engine.close()
// RssAnon right after the load (the engine's own report; absent in builds before it existed).
const anonRssAfterLoadMiB = typeof info.anonRssBytes === 'number' ? round(info.anonRssBytes / 2 ** 20, 1) : null
write({ engine: 'candela', task: spec.task, model: info.name, architecture: info.architecture, device: info.device, loadS: round(loadS, 2), anonRssAfterLoadMiB, ...result, peakRssMiB: peakRssMiB() })
