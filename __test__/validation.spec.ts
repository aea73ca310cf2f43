// Bad input is rejected with an Error that says what is wrong, in TS first
// and again in Rust; nothing crashes the process or leaks a rejection.
import test from 'ava'
import { availableParallelism } from 'node:os'

import { Engine, ValidationError } from '../dist/index.js'
import { native } from '../dist/native.js'
import { fixture } from './helpers.js'

let engine: Engine

test.before(async () => {
  engine = await Engine.load({ model: fixture('llama-tiny') })
})

test.after.always(async () => {
  await engine?.close()
})

const user = [{ role: 'user' as const, content: 'Hi' }]

test('bad sampling params reject with a message naming the field', async (t) => {
  const cases: Array<[Record<string, unknown>, RegExp]> = [
    [{ maxTokens: -1 }, /maxTokens must be at least 1, got -1/],
    [{ maxTokens: 0 }, /maxTokens/],
    [{ maxTokens: 1.5 }, /maxTokens must be an integer/],
    [{ topP: 1.5 }, /topP must be in \(0, 1\], got 1.5/],
    [{ topP: 0 }, /topP/],
    [{ temperature: -0.1 }, /temperature/],
    [{ temperature: Number.NaN }, /temperature must be a finite number/],
    [{ topK: -2 }, /topK/],
    [{ minP: 2 }, /minP/],
    [{ n: 0 }, /n must be at least 1/],
    [{ seed: -1 }, /seed/],
    [{ repetitionPenalty: 0 }, /repetitionPenalty/],
    [{ presencePenalty: 3 }, /presencePenalty/],
    [{ stop: '' }, /stop strings must be non-empty/],
    [{ stop: 5 }, /stop must be a string or an array/],
    [{ stopTokenIds: [-1] }, /stopTokenIds/],
    [{ topLogprobs: 21, logprobs: true }, /topLogprobs must be at most 20/],
    [{ minTokens: 5, maxTokens: 2 }, /minTokens \(5\) must not exceed maxTokens \(2\)/],
    [{ max_tokens: 5 }, /unknown parameter "max_tokens" \(did you mean maxTokens\?\)/],
    [{ signal: 'nope' }, /signal must be an AbortSignal/],
  ]
  for (const [params, message] of cases) {
    const err = await t.throwsAsync(engine.generate('Hi', params as never), { message }, JSON.stringify(params))
    t.true(err instanceof ValidationError)
    await t.throwsAsync(engine.chat(user, params as never), { message }, `chat ${JSON.stringify(params)}`)
  }
})

test('streams reject bad params from the first next()', async (t) => {
  await t.throwsAsync(
    async () => {
      for await (const _ of engine.chatStream(user, { maxTokens: -5 })) t.fail()
    },
    { message: /maxTokens/ },
  )
  await t.throwsAsync(
    async () => {
      for await (const _ of engine.generateStream('Hi', { topP: 2 })) t.fail()
    },
    { message: /topP/ },
  )
})

test('malformed messages reject', async (t) => {
  const cases: Array<[unknown, RegExp]> = [
    ['hello', /messages must be an array/],
    [[], /messages must not be empty/],
    [[{ content: 'hi' }], /messages\[0\] has no role/],
    [[{ role: 'wizard', content: 'hi' }], /messages\[0\]\.role must be one of system, developer, user, assistant, tool; got "wizard"/],
    [[{ role: 'user' }], /messages\[0\] has no content/],
    [[{ role: 'user', content: 42 }], /messages\[0\]\.content must be a string or an array of text parts/],
    [[{ role: 'user', content: [{ type: 'image_url', image_url: { url: 'x' } }] }], /messages\[0\]\.content\[0\]: this model does not accept image input/],
    [[user[0], null], /messages\[1\] must be an object/],
  ]
  for (const [messages, message] of cases) {
    await t.throwsAsync(engine.chat(messages as never), { message }, JSON.stringify(messages))
  }
  await t.throwsAsync(engine.applyChatTemplate([{ role: 'nobody' }] as never), { message: /role/ })
})

test('bad prompts reject', async (t) => {
  await t.throwsAsync(engine.generate([]), { message: /prompts must not be empty/ })
  await t.throwsAsync(engine.generate(42 as never), { message: /prompt must be a string/ })
  await t.throwsAsync(engine.generate({ promptTokenIds: [] }), { message: /promptTokenIds must be a non-empty array/ })
  await t.throwsAsync(engine.generate({ promptTokenIds: [1, -2] }), { message: /promptTokenIds/ })
  await t.throwsAsync(engine.generate({ promptTokenIds: [10_000_000] }), { message: /token id 10000000 is out of range/ })
  await t.throwsAsync(engine.generate(''), { message: /empty/ })
})

test('a prompt longer than the maximum model length rejects', async (t) => {
  const max = engine.info.maxModelLen
  const ids = Array.from({ length: max }, (_, i) => 100 + (i % 1000))
  await t.throwsAsync(engine.generate({ promptTokenIds: ids }), { message: new RegExp(`${max} tokens.*maximum length is ${max}`) })
  // Exactly one token of room: more is refused as vLLM refuses it, one runs.
  await t.throwsAsync(engine.generate({ promptTokenIds: ids.slice(1) }, { maxTokens: 50, ignoreEos: true }), {
    message: `'max_tokens' or 'max_completion_tokens' is too large: 50. This model's maximum context length is ${max} tokens and your request has ${max - 1} input tokens (50 > ${max} - ${max - 1}).`,
  })
  const [out] = await engine.generate({ promptTokenIds: ids.slice(1) }, { maxTokens: 1, ignoreEos: true })
  t.is(out!.tokenIds.length, 1)
  t.is(out!.finishReason, 'length')
  // Without maxTokens the default is capped by the room instead.
  const [dflt] = await engine.generate({ promptTokenIds: ids.slice(1) }, { ignoreEos: true })
  t.is(dflt!.tokenIds.length, 1)
})

test('the Rust side validates too, and refusals are typed', async (t) => {
  // Straight to the addon, past the TS checks.
  const ne = await native().NativeEngine.load({ model: fixture('llama-tiny') })
  const refused = async (request: Parameters<typeof ne.addRequest>[0], message: RegExp, code = 'invalid'): Promise<void> => {
    const r = await ne.addRequest(request)
    t.is(r.requestId ?? null, null)
    t.like(r.error, { code, status: 400 })
    t.regex(r.error?.message ?? '', message)
  }
  try {
    await refused({ prompt: 'Hi', params: { maxTokens: -3 } }, /maxTokens must be at least 1, got -3/)
    await refused({ prompt: 'Hi', params: { topP: 1.5 } }, /topP must be in \(0, 1\]/)
    await refused({ prompt: 'Hi', params: { temperature: -1 } }, /temperature/)
    await refused({ prompt: 'Hi', params: { seed: -1 } }, /seed/)
    await refused({}, /exactly one of prompt, promptTokenIds or messages/)
    await refused({ prompt: 'Hi', promptTokenIds: [1] }, /exactly one/)
    await refused({ messages: 'nope' as never }, /messages must be an array/)
    await refused({ messages: [{ role: 'user', content: 'x' }], chatTemplateKwargs: 3 as never }, /chatTemplateKwargs must be an object/)
    await refused({ promptTokenIds: Array(5000).fill(1) }, /the prompt has 5000 tokens, but the model's maximum length is/, 'context_length')
    // Text that cannot fit is refused from its size alone, before the template and tokenizer run.
    await refused({ messages: [{ role: 'user', content: 'x'.repeat(10 << 20) }] }, /bytes of text are at least \d+ tokens/, 'context_length')
    const withImage = await ne.addRequest({ prompt: 'Hi' }, [{ modality: 'image', data: Buffer.from('x') }])
    t.like(withImage.error, { code: 'invalid', status: 400 })
    t.regex(withImage.error?.message ?? '', /does not accept image input/)
    await t.throwsAsync(ne.detokenize([99_999_999]), { message: /out of range/ })
    // Unknown ids are harmless.
    t.notThrows(() => ne.abort(123456))
    t.deepEqual(await ne.next(123456), { events: [], done: true, aborted: false })
  } finally {
    await ne.close()
  }
  await t.throwsAsync(ne.addRequest({ prompt: 'Hi' }), { message: /the engine is closed/ })
})

test('a prompt far over the context is a ValidationError without tokenizing it', async (t) => {
  const engine = await Engine.load({ model: fixture('llama-tiny') })
  try {
    const err = await t.throwsAsync(engine.chat([{ role: 'user', content: 'word '.repeat(4 << 20) }], { maxTokens: 1 }), {
      instanceOf: ValidationError,
    })
    t.regex(err.message, /at least \d+ tokens, but the model's maximum length is \d+/)
    // The engine still answers.
    t.truthy((await engine.generate('Hi', { maxTokens: 2, temperature: 0 }))[0]?.finishReason)
  } finally {
    await engine.close()
  }
})

test('bad load options reject', async (t) => {
  await t.throwsAsync(Engine.load({ model: 'no/such/model' }), { message: /model path not found: no\/such\/model/ })
  // Without the CUDA addon (or a GPU) the error says which is missing; with both it loads.
  const cuda = await Engine.load({ model: fixture('llama-tiny'), device: 'cuda' }).then(
    async (e) => void (await e.close()),
    (err: Error) => err.message,
  )
  if (cuda !== undefined) t.regex(cuda, /^device 'cuda' is not available: /)
  await t.throwsAsync(Engine.load({ model: fixture('llama-tiny'), gpuMemoryUtilization: 0 }), {
    message: /gpuMemoryUtilization must be a number in \(0, 1\], got 0/,
  })
  await t.throwsAsync(Engine.load({ model: fixture('llama-tiny'), device: 'tpu' as never }), { message: /device must be/ })
  await t.throwsAsync(Engine.load({ model: fixture('llama-tiny'), maxNumSeqs: 0 }), { message: /maxNumSeqs must be at least 1/ })
  await t.throwsAsync(Engine.load({ model: fixture('llama-tiny'), threads: 0 }), { message: /threads must be at least 1/ })
  await t.throwsAsync(Engine.load({ model: fixture('llama-tiny'), threads: 1.5 }), { message: /threads must be an integer/ })
  await t.throwsAsync(Engine.load({ model: fixture('llama-tiny'), threads: 4096 }), { message: /threads must be at most 1024/ })
  await t.throwsAsync(Engine.load({ model: fixture('llama-tiny'), dtype: 'int3' as never }), { message: /dtype/ })
  await t.throwsAsync(Engine.load({ model: fixture('llama-tiny'), kvCacheBytes: 10 }), { message: /kv_cache_bytes|KV block/ })
  await t.throwsAsync(Engine.load({ modle: 'x' } as never), { message: /unknown load option "modle"/ })
  await t.throwsAsync(Engine.load({ model: fixture('llama-tiny', ) + '/config.json' }), { message: /neither a model folder nor a .gguf/ })
  await t.throwsAsync(Engine.load({ model: fixture('') }), { message: /config\.json/ })
})

test('threads reach the engine: the option, else the physical cores', async (t) => {
  const one = await Engine.load({ model: fixture('llama-tiny'), threads: 1 })
  t.is(one.info.threads, 1)
  const [out] = await one.generate('Hi', { maxTokens: 2, temperature: 0, ignoreEos: true })
  t.is(out!.tokenIds.length, 2)
  await one.close()
  const auto = await Engine.load({ model: fixture('llama-tiny') })
  t.true(auto.info.threads >= 1 && auto.info.threads <= availableParallelism(), `${auto.info.threads}`)
  await auto.close()
})

test('a closed engine refuses work', async (t) => {
  const e = await Engine.load({ model: fixture('llama-tiny') })
  await e.close()
  await e.close()
  await t.throwsAsync(e.generate('Hi'), { message: /the engine is closed/ })
  t.throws(() => e.stats(), { message: /the engine is closed/ })
})

test('closing an engine ends its running requests with an Error', async (t) => {
  const e = await Engine.load({ model: fixture('llama-tiny') })
  const pending = e.generate('Once upon a time', { maxTokens: 2000, ignoreEos: true })
  await new Promise((r) => setTimeout(r, 50))
  await e.close()
  await t.throwsAsync(pending, { message: /closed/ })
})

test('media fetching load options are checked', async (t) => {
  const model = fixture('llama-tiny')
  await t.throwsAsync(Engine.load({ model, allowedMediaDomains: 'a.com' as never }), { instanceOf: ValidationError, message: /allowedMediaDomains must be an array of host names/ })
  await t.throwsAsync(Engine.load({ model, allowedMediaDomains: ['https://a.com/'] }), { instanceOf: ValidationError, message: /allowedMediaDomains/ })
  await t.throwsAsync(Engine.load({ model, allowPrivateMediaUrls: 'yes' as never }), { instanceOf: ValidationError, message: /allowPrivateMediaUrls/ })
  await t.throwsAsync(Engine.load({ model, resolveMediaHost: {} as never }), { instanceOf: ValidationError, message: /resolveMediaHost must be a function/ })
})
