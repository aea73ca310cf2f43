// The Engine API on the llama-tiny fixture: batching, chat, streaming,
// abort, sampling options. Generation is greedy (temperature 0) unless a
// test is about sampling.
import test from 'ava'

import { AbortError, Engine } from '../dist/index.js'
import type { StreamChunk } from '../dist/index.js'
import { eventually, fixture, reference } from './helpers.js'

const ref = reference('llama-tiny')
let engine: Engine

test.before(async () => {
  engine = await Engine.load({ model: fixture('llama-tiny'), maxNumSeqs: 16 })
})

test.after.always(async () => {
  await engine?.close()
})

// Tests that look at the engine's counters (idle, interleaving) are serial:
// ava runs them first, one at a time, before the concurrent ones.
const idle = (): boolean => {
  const s = engine.stats()
  return s.running === 0 && s.waiting === 0 && s.kvBlocksUsed === 0
}

test('info describes the model', (t) => {
  const info = engine.info
  t.is(info.name, 'llama-tiny')
  t.is(info.architecture, 'LlamaForCausalLM')
  t.is(info.maxModelLen, 2048)
  t.is(info.vocabSize, 49152)
  t.true(info.hasChatTemplate)
  t.true(info.eosTokenIds.includes(2))
  t.is(info.device, 'cpu')
})

test('generate accepts a string, { prompt }, { promptTokenIds } and arrays of them', async (t) => {
  const p = ref.prompts[0]!
  const params = { maxTokens: 4, temperature: 0, ignoreEos: true }
  const [a] = await engine.generate(p.text, params)
  const [b] = await engine.generate({ prompt: p.text }, params)
  const [c] = await engine.generate({ promptTokenIds: p.input_ids }, params)
  t.deepEqual(a!.tokenIds, p.greedy_ids.slice(0, 4))
  t.deepEqual(b!.tokenIds, a!.tokenIds)
  t.deepEqual(c!.tokenIds, a!.tokenIds)
  t.is(a!.text, await engine.detokenize(a!.tokenIds))
  t.is(a!.outputs.length, 1)
  t.deepEqual(a!.outputs[0]!.tokenIds, a!.tokenIds)
})

test('generate defaults maxTokens to 16', async (t) => {
  const [out] = await engine.generate(ref.prompts[0]!.text, { temperature: 0, ignoreEos: true })
  t.is(out!.tokenIds.length, 16)
})

test('a batch of prompts returns one output per prompt, in order', async (t) => {
  const prompts = ['Hello', 'The capital of France is', 'Once upon a time', 'Hi', '1 2 3 4']
  const batch = await engine.generate(prompts, { maxTokens: 6, temperature: 0, ignoreEos: true })
  t.is(batch.length, prompts.length)
  for (const [i, prompt] of prompts.entries()) {
    const [alone] = await engine.generate(prompt, { maxTokens: 6, temperature: 0, ignoreEos: true })
    t.deepEqual(batch[i]!.tokenIds, alone!.tokenIds, `prompt ${i}`)
    t.is(batch[i]!.usage.promptTokens, (await engine.tokenize(prompt)).length)
  }
})

test('chat renders the model chat template', async (t) => {
  t.is(await engine.applyChatTemplate(ref.chat.messages), ref.chat.rendered)
  const res = await engine.chat(ref.chat.messages, { maxTokens: 5, temperature: 0, ignoreEos: true })
  t.is(res.usage.promptTokens, ref.chat.input_ids.length)
  t.is(res.tokenIds.length, 5)
  // Same as generating from the rendered prompt's ids.
  const [raw] = await engine.generate({ promptTokenIds: ref.chat.input_ids }, { maxTokens: 5, temperature: 0, ignoreEos: true })
  t.deepEqual(res.tokenIds, raw!.tokenIds)
  t.is(res.text, raw!.text)
  // Text parts are joined like a string content.
  const parts = await engine.chat(
    [ref.chat.messages[0]!, { role: 'user', content: [{ type: 'text', text: 'Hi there' }] }],
    { maxTokens: 5, temperature: 0, ignoreEos: true },
  )
  t.deepEqual(parts.tokenIds, res.tokenIds)
})

test('chat stops at EOS unless ignoreEos', async (t) => {
  // With EOS as a stop token the answer ends with 'stop' or reaches maxTokens; the EOS id never shows up.
  const res = await engine.chat([{ role: 'user', content: 'Hello' }], { maxTokens: 64, temperature: 0 })
  t.false(res.tokenIds.includes(2))
  t.true(res.finishReason === 'stop' || res.tokenIds.length === 64)
})

test.serial('8 concurrent chatStream calls interleave', async (t) => {
  const order: Array<{ stream: number; final: boolean }> = []
  const texts: string[] = Array(8).fill('')
  await Promise.all(
    Array.from({ length: 8 }, async (_, i) => {
      const messages = [{ role: 'user' as const, content: `Count to ${i + 3}, please.` }]
      for await (const chunk of engine.chatStream(messages, { maxTokens: 24, temperature: 0, ignoreEos: true })) {
        order.push({ stream: i, final: chunk.finishReason !== undefined })
        texts[i] += chunk.text
      }
    }),
  )
  const firstFinish = order.findIndex((e) => e.final)
  t.true(firstFinish > 0)
  const startedBeforeAnyFinished = new Set(order.slice(0, firstFinish).map((e) => e.stream))
  t.true(startedBeforeAnyFinished.size >= 4, `only ${startedBeforeAnyFinished.size} streams had tokens before the first finished`)
  // Tokens of different streams alternate (not eight runs one after the other).
  let switches = 0
  for (let k = 1; k < order.length; k++) if (order[k]!.stream !== order[k - 1]!.stream) switches++
  t.true(switches > 8, `arrival order switched streams only ${switches} times`)
  t.is(order.filter((e) => e.final).length, 8)
  t.true(await eventually(idle))
})

test('streamed text equals the non-streamed result', async (t) => {
  const params = { maxTokens: 12, temperature: 0, ignoreEos: true }
  let text = ''
  const ids: number[] = []
  let last: StreamChunk | undefined
  for await (const chunk of engine.generateStream(ref.prompts[1]!.text, params)) {
    text += chunk.text
    ids.push(...chunk.tokenIds)
    last = chunk
  }
  const [out] = await engine.generate(ref.prompts[1]!.text, params)
  t.is(text, out!.text)
  t.deepEqual(ids, out!.tokenIds)
  t.is(last?.finishReason, 'length')
  t.is(last?.usage?.completionTokens, 12)
})

test.serial('aborting through an AbortSignal rejects with AbortError and frees the KV blocks', async (t) => {
  const ac = new AbortController()
  const pending = engine.generate('Once upon a time', { maxTokens: 2000, ignoreEos: true, temperature: 0, signal: ac.signal })
  t.true(await eventually(() => engine.stats().kvBlocksUsed > 0))
  ac.abort()
  const err = await t.throwsAsync(pending)
  t.true(err instanceof AbortError)
  t.is(err?.name, 'AbortError')
  t.true(await eventually(idle, 1000), JSON.stringify(engine.stats()))
})

test.serial('aborting a stream throws AbortError from the loop', async (t) => {
  const ac = new AbortController()
  let chunks = 0
  const err = await t.throwsAsync(async () => {
    for await (const _ of engine.chatStream([{ role: 'user', content: 'Tell me a long story' }], {
      maxTokens: 2000,
      ignoreEos: true,
      signal: ac.signal,
    })) {
      if (++chunks === 3) ac.abort()
    }
  })
  t.true(err instanceof AbortError)
  t.true(chunks >= 3)
  t.true(await eventually(idle, 1000), JSON.stringify(engine.stats()))
})

test('an already aborted signal rejects at once', async (t) => {
  const ac = new AbortController()
  ac.abort()
  await t.throwsAsync(engine.generate('Hi', { signal: ac.signal }), { instanceOf: AbortError })
  await t.throwsAsync(engine.chat([{ role: 'user', content: 'Hi' }], { signal: ac.signal }), { instanceOf: AbortError })
})

test.serial('breaking out of for-await aborts the request', async (t) => {
  const before = engine.stats().requestsFinished
  let n = 0
  for await (const chunk of engine.generateStream('Once upon a time', { maxTokens: 2000, ignoreEos: true })) {
    t.truthy(chunk)
    if (++n === 2) break
  }
  t.is(n, 2)
  t.true(await eventually(idle, 1000), JSON.stringify(engine.stats()))
  t.true(engine.stats().requestsFinished > before)
})

test('seeded sampling is reproducible', async (t) => {
  const params = { maxTokens: 12, temperature: 1, ignoreEos: true }
  const [a] = await engine.generate('Hello', { ...params, seed: 1234 })
  const [b] = await engine.generate('Hello', { ...params, seed: 1234 })
  const [c] = await engine.generate('Hello', { ...params, seed: 99 })
  t.deepEqual(a!.tokenIds, b!.tokenIds)
  t.notDeepEqual(a!.tokenIds, c!.tokenIds)
  // The same seed inside a batch gives the same sample too.
  const batch = await engine.generate(['Hello', 'Hello'], { ...params, seed: 1234 })
  t.deepEqual(batch[0]!.tokenIds, a!.tokenIds)
  t.deepEqual(batch[1]!.tokenIds, a!.tokenIds)
})

test('n > 1 returns n samples', async (t) => {
  const [out] = await engine.generate('Hello', { n: 3, maxTokens: 8, temperature: 1, seed: 7, ignoreEos: true })
  t.is(out!.outputs.length, 3)
  t.deepEqual(
    out!.outputs.map((o) => o.index),
    [0, 1, 2],
  )
  for (const o of out!.outputs) {
    t.is(o.tokenIds.length, 8)
    t.is(o.finishReason, 'length')
  }
  t.is(out!.usage.completionTokens, 24)
  t.deepEqual(out!.tokenIds, out!.outputs[0]!.tokenIds)
  t.true(new Set(out!.outputs.map((o) => o.tokenIds.join(','))).size > 1, 'the samples differ')
  // Greedy samples are all the same.
  const [greedy] = await engine.generate('Hello', { n: 2, maxTokens: 8, temperature: 0, ignoreEos: true })
  t.deepEqual(greedy!.outputs[0]!.tokenIds, greedy!.outputs[1]!.tokenIds)
})

test('stop strings end the text and are not part of it', async (t) => {
  const p = ref.prompts[0]!
  const [full] = await engine.generate(p.text, { maxTokens: 16, temperature: 0, ignoreEos: true })
  t.is(full!.text, p.greedy_text)
  // A stop string from the middle of the greedy text.
  const mid = Math.floor(full!.text.length / 2)
  const stop = full!.text.slice(mid, mid + 4)
  const cut = full!.text.indexOf(stop)
  t.true(cut > 0 && stop.length === 4)
  const [out] = await engine.generate(p.text, { maxTokens: 16, temperature: 0, ignoreEos: true, stop })
  t.is(out!.text, full!.text.slice(0, cut))
  t.false(out!.text.includes(stop))
  t.is(out!.finishReason, 'stop')
  t.is(out!.stopReason, stop)
  // Several stop strings: the earliest wins; streaming never leaks it either.
  let streamed = ''
  const early = full!.text.slice(3, 6)
  const stops = ['\u0000never there', stop, early]
  for await (const c of engine.generateStream(p.text, { maxTokens: 16, temperature: 0, ignoreEos: true, stop: stops })) {
    streamed += c.text
  }
  t.is(streamed, full!.text.slice(0, full!.text.indexOf(early)))
})

test('stop token ids end generation', async (t) => {
  const p = ref.prompts[0]!
  const stopId = p.greedy_ids[3]!
  const [out] = await engine.generate({ promptTokenIds: p.input_ids }, { maxTokens: 16, temperature: 0, stopTokenIds: [stopId] })
  t.is(out!.finishReason, 'stop')
  t.deepEqual(out!.tokenIds.slice(0, 3), p.greedy_ids.slice(0, 3))
  t.true(out!.tokenIds.length <= 4)
})

test('logprobs have one entry per token with topLogprobs alternatives', async (t) => {
  const [out] = await engine.generate(ref.prompts[0]!.text, {
    maxTokens: 5,
    temperature: 0,
    ignoreEos: true,
    logprobs: true,
    topLogprobs: 3,
  })
  const lps = out!.logprobs!
  t.is(lps.length, 5)
  lps.forEach((lp, i) => {
    t.is(lp.tokenId, out!.tokenIds[i]!)
    t.true(lp.logprob <= 0)
    t.is(typeof lp.token, 'string')
    t.is(lp.topLogprobs.length, 3)
    t.is(lp.topLogprobs[0]!.tokenId, lp.tokenId, 'greedy picks the most likely token')
    t.true(Math.abs(lp.topLogprobs[0]!.logprob - lp.logprob) < 1e-4)
    for (let k = 1; k < 3; k++) t.true(lp.topLogprobs[k]!.logprob <= lp.topLogprobs[k - 1]!.logprob)
  })
  const [plain] = await engine.generate('Hi', { maxTokens: 2 })
  t.is(plain!.logprobs, undefined)
  const [only] = await engine.generate('Hi', { maxTokens: 2, logprobs: true })
  t.is(only!.logprobs!.length, 2)
  t.is(only!.logprobs![0]!.topLogprobs.length, 0)
})

test('minTokens holds off stop tokens', async (t) => {
  const [greedy] = await engine.generate('Hi', { maxTokens: 1, temperature: 0 })
  const first = greedy!.tokenIds[0]!
  const [stopped] = await engine.generate('Hi', { maxTokens: 10, temperature: 0, stopTokenIds: [first] })
  t.deepEqual(stopped!.tokenIds, [first])
  t.is(stopped!.finishReason, 'stop')
  const [held] = await engine.generate('Hi', { maxTokens: 10, minTokens: 5, temperature: 0, stopTokenIds: [first] })
  t.true(held!.tokenIds.length >= 5)
  t.false(held!.tokenIds.slice(0, 5).includes(first))
})

test('tokenize / detokenize round trip', async (t) => {
  const ids = await engine.tokenize('Hello world')
  t.true(ids.length > 0)
  t.is(await engine.detokenize(ids), 'Hello world')
})

test('stats count requests and tokens', async (t) => {
  const before = engine.stats()
  await engine.generate('Hello there', { maxTokens: 3, ignoreEos: true })
  const after = engine.stats()
  t.true(after.requestsFinished >= before.requestsFinished + 1)
  t.true(after.generationTokens >= before.generationTokens + 3)
  t.true(after.kvBlocksTotal > 0)
  t.is(after.kvBlocksUsed + after.kvBlocksFree, after.kvBlocksTotal)
})
