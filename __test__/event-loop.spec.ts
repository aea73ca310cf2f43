// Rendering and tokenizing a long text request run on worker threads: the
// event loop keeps turning (setImmediate ticks run) while a 30k-token chat is
// rendered, tokenized and refused, instead of stalling for the whole call.
import test from 'ava'

import { ContextLengthError, Engine } from '../dist/index.js'
import { fixture } from './helpers.js'
import { post, startTestServer } from './server-helpers.js'

let engine: Engine
// A 32k-context text model: a 30k-token chat fits its context.
test.before(async () => {
  engine = await Engine.load({ model: fixture('qwen2-tiny') })
})
test.after.always(async () => {
  await engine?.close()
})

const WORDS = 'the quick brown fox jumps over the lazy dog while seven wizards quietly judge boxing '
const TOKENS = 30_000

/**
 * How many setImmediate ticks ran while `p` was pending. A call that did its
 * work on the JS thread settles with (almost) none: its work happened before
 * the first tick could run. Work on a worker thread lets the loop turn
 * thousands of times meanwhile; a handful is the structural bound.
 */
async function ticksWhilePending<T>(p: Promise<T>): Promise<{ ticks: number; settled: PromiseSettledResult<T> }> {
  let ticks = 0
  let done = false
  const spin = (): void => {
    if (done) return
    ticks++
    setImmediate(spin)
  }
  setImmediate(spin)
  const [settled] = await Promise.allSettled([p])
  done = true
  return { ticks, settled: settled! }
}
const TURNS = 10

/** Text of at least 30k tokens. */
async function longText(): Promise<{ text: string; count: number }> {
  const per = (await engine.tokenize(WORDS, { addSpecialTokens: false })).length
  let text = WORDS.repeat(Math.ceil(TOKENS / per))
  let count = (await engine.tokenize(text, { addSpecialTokens: false })).length
  while (count < TOKENS) {
    text += WORDS.repeat(Math.ceil((TOKENS - count) / per))
    count = (await engine.tokenize(text, { addSpecialTokens: false })).length
  }
  return { text, count }
}

test('tokenize of a 30k-token text leaves the event loop running', async (t) => {
  const { text, count } = await longText()
  t.true(count >= TOKENS, `${count} tokens`)
  const { ticks, settled } = await ticksWhilePending(engine.tokenize(text, { addSpecialTokens: false }))
  t.is(settled.status, 'fulfilled')
  t.is((settled as PromiseFulfilledResult<number[]>).value.length, count)
  t.log(`${ticks} ticks while tokenizing ${count} tokens`)
  t.true(ticks >= TURNS, `${ticks} ticks while tokenizing`)
})

test('a 30k-token chat is rendered and tokenized off the JS thread before it is refused', async (t) => {
  const { text, count } = await longText()
  // Room for the prompt but not for 5000 more: the engine refuses it only
  // after rendering and tokenizing, and says how many tokens the prompt has.
  const call = engine.chat([{ role: 'user', content: text }], { maxTokens: 5000 })
  const { ticks, settled } = await ticksWhilePending(call)
  t.is(settled.status, 'rejected')
  const err = (settled as PromiseRejectedResult).reason as ContextLengthError
  t.true(err instanceof ContextLengthError, String(err))
  t.is(err.param, 'maxTokens')
  const prompt = Number(/your request has (\d+) input tokens/.exec(err.message)?.[1])
  t.true(prompt >= count, err.message)
  t.log(`${ticks} ticks while rendering and tokenizing ${prompt} tokens`)
  t.true(ticks >= TURNS, `${ticks} ticks while rendering and tokenizing`)
})

test.serial('POST /tokenize of a 30k-token prompt: /health keeps answering while the route tokenizes', async (t) => {
  const { text, count } = await longText()
  const s = await startTestServer({ engine, servedModelName: 'tiny', logRequests: false })
  // Watch the route's own tokenize call (serial: no other test calls it meanwhile).
  let started!: () => void
  const tokenizing = new Promise<void>((resolve) => (started = resolve))
  let tokenized = false
  const tokenize = engine.tokenize.bind(engine)
  engine.tokenize = (...args) => {
    started()
    return tokenize(...args).finally(() => (tokenized = true))
  }
  try {
    const answer = post(`${s.base}/tokenize`, { prompt: text, add_special_tokens: false })
    await tokenizing
    // /health answers that came back while the route's tokenization was still pending.
    let during = 0
    while (!tokenized) {
      const health = await fetch(`${s.base}/health`)
      if (health.ok && !tokenized) during++
    }
    const res = await answer
    t.is(res.status, 200)
    t.is(res.json.count, count)
    t.log(`${during} /health answers while tokenizing ${count} tokens`)
    t.true(during >= 1)
  } finally {
    delete (engine as { tokenize?: unknown }).tokenize
    await s.server.close()
  }
})
