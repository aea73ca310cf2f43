#!/usr/bin/env node
// node-llama-cpp (llama.cpp) side of the workloads, in its own process.
//   node benchmark/workers/llamacpp.mjs SPEC.json OUT.json
// In-process API only (node-llama-cpp has no HTTP server): one LlamaContext whose
// `sequences` = the number of requests in flight; node-llama-cpp batches the
// sequences' evaluations into shared llama_decode calls. Greedy = temperature 0;
// "ignore EOS" = we stop after maxTokens generated tokens ourselves (evaluate()
// does not stop at EOS).
import { getLlama } from 'node-llama-cpp'

import { peakRssMiB, round, workerIo } from '../lib/common.mjs'
import { Rec, closedLoop, offlineStats, servingStats, singleStats } from '../lib/streams.mjs'

const [spec, write] = workerIo()
const threads = spec.threads ?? 2
const cuda = spec.device === 'cuda'

const t0 = performance.now()
const llama = await getLlama({ gpu: cuda ? 'cuda' : false, build: 'never', logLevel: 'error', maxThreads: threads })
const model = await llama.loadModel({ modelPath: spec.model, gpuLayers: cuda ? 'max' : 0 })
const loadS = (performance.now() - t0) / 1000

async function makeContext(sequences, perSeqTokens) {
  return model.createContext({
    sequences,
    contextSize: perSeqTokens,
    // candela's default max_num_batched_tokens is 2048: the same cap on tokens per step
    batchSize: Math.min(2048, perSeqTokens * sequences),
    threads,
  })
}

/**
 * Generate maxTokens greedy tokens after `ids` on `seq`. With reuse, keep the
 * part of the sequence's KV state that matches the start of `ids` (what
 * node-llama-cpp's LlamaChat does between turns) and evaluate only the rest.
 */
async function gen(seq, ids, maxTokens, { reuse = false, out } = {}) {
  const rec = new Rec()
  let input = ids
  if (reuse) {
    const keep = Math.min(seq.compareContextTokens(ids).firstDifferentIndex, ids.length - 1)
    if (keep < seq.nextTokenIndex) await seq.eraseContextTokenRanges([{ start: keep, end: seq.nextTokenIndex }])
    input = ids.slice(seq.nextTokenIndex)
    rec.reused = ids.length - input.length
  } else if (seq.nextTokenIndex > 0) {
    await seq.clearHistory()
  }
  let n = 0
  for await (const tok of seq.evaluate(input, { temperature: 0 })) {
    rec.add(1)
    out?.push(tok)
    if (++n >= maxTokens) break
  }
  return rec
}

async function warmup(ctx) {
  if (!spec.warmup) return
  const seq = ctx.getSequence()
  await gen(seq, spec.warmup, 4)
  await seq.clearHistory()
  seq.dispose()
}

const tasks = {
  async tokenize() {
    return { ids: Array.from(model.tokenize(spec.text)) }
  },

  // Free-running greedy tokens, and (teacher forcing) the argmax after
  // prompt + forced[0..i): evaluate()'s generator takes the next input token
  // from next(token), so the sequence follows `forced` instead of its own picks.
  async greedy() {
    const ctx = await makeContext(1, spec.prompt.length + spec.maxTokens + 16)
    const seq = ctx.getSequence()
    const out = []
    await gen(seq, spec.prompt, spec.maxTokens, { out })
    const forcedArgmax = []
    if (spec.forced?.length) {
      await seq.clearHistory()
      const it = seq.evaluate(spec.prompt, { temperature: 0 })
      let r = await it.next()
      forcedArgmax.push(r.value)
      for (let i = 0; i + 1 < spec.forced.length; i++) {
        r = await it.next(spec.forced[i])
        forcedArgmax.push(r.value)
      }
      await it.return()
    }
    return { tokenIds: out, forcedArgmax }
  },

  async single() {
    const ctx = await makeContext(1, spec.prompt.length + spec.maxTokens + 16)
    await warmup(ctx)
    const rec = await gen(ctx.getSequence(), spec.prompt, spec.maxTokens)
    return singleStats(rec, spec.prompt.length)
  },

  async offline() {
    const longest = Math.max(...spec.prompts.map((p) => p.length))
    const ctx = await makeContext(spec.prompts.length, longest + spec.maxTokens + 16)
    await warmup(ctx)
    const seqs = spec.prompts.map(() => ctx.getSequence())
    const start = performance.now()
    const recs = await Promise.all(spec.prompts.map((ids, i) => gen(seqs[i], ids, spec.maxTokens)))
    const wallS = (performance.now() - start) / 1000
    const out = recs.reduce((a, r) => a + r.tokens, 0)
    return { ...offlineStats(spec.prompts, out, wallS), batchSize: ctx.batchSize }
  },

  // In-process equivalent of the HTTP serving run: `concurrency` sequences,
  // a closed loop of clients, each request on a cleared sequence.
  async serving() {
    const levels = []
    for (const lv of spec.levels) {
      const longest = Math.max(...lv.prompts.map((p) => p.length))
      const ctx = await makeContext(lv.concurrency, longest + spec.maxTokens + 16)
      await warmup(ctx)
      const seqs = Array.from({ length: lv.concurrency }, () => ctx.getSequence())
      const { recs, t0: a, t1: b } = await closedLoop(lv.prompts, lv.concurrency, (ids, slot) => gen(seqs[slot], ids, spec.maxTokens))
      levels.push({ concurrency: lv.concurrency, ...servingStats(recs, a, b) })
      await ctx.dispose()
    }
    return { levels }
  },

  // Shared system prompt: with caching each of the `concurrency` sequences keeps
  // the KV of its previous prompt and re-evaluates only from the first differing
  // token (per-sequence reuse; node-llama-cpp cannot share KV across sequences).
  async prefix() {
    const longest = Math.max(...spec.prompts.map((p) => p.length))
    const ctx = await makeContext(spec.concurrency, longest + spec.maxTokens + 16)
    await warmup(ctx)
    const seqs = Array.from({ length: spec.concurrency }, () => ctx.getSequence())
    const { recs, t0: a, t1: b } = await closedLoop(spec.prompts, spec.concurrency, (ids, slot) =>
      gen(seqs[slot], ids, spec.maxTokens, { reuse: spec.caching }),
    )
    const cached = recs.reduce((s, r) => s + (r.reused ?? 0), 0)
    const inp = spec.prompts.reduce((s, p) => s + p.length, 0)
    return { ...servingStats(recs, a, b), promptTokens: inp, cachedTokens: cached, prefillTokens: inp - cached }
  },
}

const result = await tasks[spec.task]()
await model.dispose()
await llama.dispose()
write({
  engine: 'node-llama-cpp',
  task: spec.task,
  model: spec.model.split('/').at(-1),
  device: cuda ? 'cuda' : 'cpu',
  threads,
  loadS: round(loadS, 2),
  ...result,
  peakRssMiB: peakRssMiB(),
})
