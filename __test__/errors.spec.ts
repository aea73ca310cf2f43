// One error hierarchy: each class is thrown the same whether the TypeScript
// checks or the native engine caught the mistake, with the same code and
// param; the server answers each with its status in OpenAI's shape.
import test from 'ava'
import type { ExecutionContext } from 'ava'
import { readFileSync } from 'node:fs'
import OpenAI from 'openai'

import {
  AbortError,
  CandelaError,
  ClosedError,
  ContextLengthError,
  Engine,
  LoadError,
  MediaError,
  Transcriber,
  ValidationError,
} from '../dist/index.js'
import { fixture } from './helpers.js'
import { startTestServer } from './server-helpers.js'
import type { TestServer } from './server-helpers.js'

let engine: Engine
const MAX_LEN = 512

test.before(async () => {
  // A vision model (for media errors) with a short context (for context-length errors).
  engine = await Engine.load({ model: fixture('qwen2-vl-tiny'), maxModelLen: MAX_LEN })
})

test.after.always(async () => {
  await engine?.close()
})

const user = [{ role: 'user' as const, content: 'Hi' }]
const png = readFileSync(fixture('qwen2-vl-tiny/image_a.png'))
const imageMessage = (part: Record<string, unknown>) => [{ role: 'user', content: [part, { type: 'text', text: 'What is it?' }] }] as never

/** The rejection of `p`, checked to be `cls` with `code` and `param`. */
async function rejects<T extends CandelaError>(
  t: ExecutionContext,
  p: Promise<unknown>,
  cls: abstract new (...args: never[]) => T,
  fields: { code: string; param: string | null },
  what: string,
): Promise<T> {
  const err = await t.throwsAsync(p, undefined, what)
  t.true(err instanceof cls, `${what}: ${err?.constructor.name} ${err?.message}`)
  t.true(err instanceof CandelaError, what)
  const e = err as unknown as T
  t.is(e.code, fields.code, `${what}: ${e.message}`)
  t.is(e.param, fields.param, `${what}: ${e.message}`)
  return e
}

test('ValidationError: the same class for a mistake TS catches and one the engine catches, param naming the field', async (t) => {
  // TS checks the regex is a non-empty string; the engine's grammar compiler refuses one it cannot compile.
  const ts = await rejects(t, engine.chat(user, { structuredOutputs: { regex: '' } }), ValidationError, { code: 'invalid_request', param: 'structuredOutputs.regex' }, 'TS')
  const rust = await rejects(t, engine.chat(user, { structuredOutputs: { regex: '(' } }), ValidationError, { code: 'invalid_request', param: 'structuredOutputs.regex' }, 'Rust')
  t.notRegex(ts.message, /compile|parse/i)
  t.not(ts.message, rust.message)
  await rejects(t, engine.chat(user, { temperature: -1 }), ValidationError, { code: 'invalid_request', param: 'temperature' }, 'TS temperature')
  // Token ids past the vocabulary: only the engine knows its size.
  await rejects(t, engine.generate({ promptTokenIds: [10 ** 8] }), ValidationError, { code: 'invalid_request', param: 'prompt' }, 'Rust token id')
  await rejects(t, engine.detokenize([10 ** 8]), ValidationError, { code: 'invalid_request', param: 'tokenIds' }, 'Rust detokenize')
  await rejects(t, engine.detokenize([-1]), ValidationError, { code: 'invalid_request', param: 'tokenIds' }, 'TS detokenize')
})

test('ContextLengthError: a prompt too long is the same error caught in TS (token ids) or in Rust (tokenized text)', async (t) => {
  const ts = await rejects(t, engine.generate({ promptTokenIds: Array(MAX_LEN + 10).fill(1) }), ContextLengthError, { code: 'context_length_exceeded', param: 'prompt' }, 'TS')
  // ~600 tokens in 3.6 kB: past the byte pre-check, refused once tokenized.
  const text = 'hello '.repeat(MAX_LEN + 100)
  t.true((await engine.tokenize(text)).length >= MAX_LEN)
  const rust = await rejects(t, engine.generate(text), ContextLengthError, { code: 'context_length_exceeded', param: 'prompt' }, 'Rust')
  t.true(ts instanceof ValidationError && rust instanceof ValidationError)
  const shape = /^the prompt has \d+ tokens, but the model's maximum length is 512 \(prompt \+ output\)$/
  t.regex(ts.message, shape)
  t.regex(rust.message, shape)
  // The engine's byte pre-check of a chat names `messages`; a batch names its prompt.
  await rejects(t, engine.chat([{ role: 'user', content: 'x'.repeat(1 << 20) }]), ContextLengthError, { code: 'context_length_exceeded', param: 'messages' }, 'Rust chat')
  await rejects(t, engine.generate(['ok', { promptTokenIds: Array(MAX_LEN).fill(1) }]), ContextLengthError, { code: 'context_length_exceeded', param: 'prompts[1]' }, 'TS batch')
})

test('ContextLengthError: maxTokens past the room after the prompt names maxTokens', async (t) => {
  const e = await rejects(t, engine.chat(user, { maxTokens: MAX_LEN }), ContextLengthError, { code: 'context_length_exceeded', param: 'maxTokens' }, 'Rust')
  t.regex(e.message, /maximum context length is 512 tokens/)
})

test('MediaError: bad parts caught in TS and undecodable or uncached media caught in Rust', async (t) => {
  const ts = await rejects(
    t,
    engine.chat(imageMessage({ type: 'image_url', image_url: { url: 'data:image/png;base64,' + png.toString('base64') }, uuid: '' })),
    MediaError,
    { code: 'invalid_media', param: 'messages[0].content[0].uuid' },
    'TS',
  )
  t.is(ts.status, 400)
  const garbage = Buffer.from('this is not a picture').toString('base64')
  const rust = await rejects(t, engine.chat(imageMessage({ type: 'image_url', image_url: { url: `data:image/png;base64,${garbage}` } })), MediaError, { code: 'invalid_media', param: null }, 'Rust')
  t.is(rust.status, 422)
  const miss = await rejects(t, engine.chat(imageMessage({ type: 'image_url', image_url: null, uuid: 'never-sent' })), MediaError, { code: 'media_not_cached', param: null }, 'uuid miss')
  t.is(miss.uuid, 'never-sent')
  t.is(miss.status, 400)
})

test('AbortError: before submission (TS) and mid-run (the engine drops the request)', async (t) => {
  const ac = new AbortController()
  ac.abort(new Error('stop'))
  const before = await rejects(t, engine.chat(user, { signal: ac.signal }), AbortError, { code: 'ABORT_ERR', param: null }, 'TS')
  t.is((before.cause as Error).message, 'stop')
  const mid = new AbortController()
  const stream = engine.chatStream(user, { maxTokens: 400, ignoreEos: true, signal: mid.signal })
  const run = (async () => {
    for await (const _ of stream) mid.abort()
  })()
  await rejects(t, run, AbortError, { code: 'ABORT_ERR', param: null }, 'mid-run')
})

test('ClosedError: a call after close, and a request the engine was running when it closed', async (t) => {
  const e = await Engine.load({ model: fixture('llama-tiny') })
  const running = e.chat(user, { maxTokens: 2000, ignoreEos: true })
  const stream = e.chatStream(user, { maxTokens: 2000, ignoreEos: true })
  const first = await stream.next()
  t.false(first.done)
  await e.close()
  await rejects(t, running, ClosedError, { code: 'closed', param: null }, 'running')
  // Chunks already received still come out; then the stream throws.
  const drain = async (): Promise<void> => {
    let r = await stream.next()
    while (!r.done) r = await stream.next()
  }
  await rejects(t, drain(), ClosedError, { code: 'closed', param: null }, 'streaming')
  await rejects(t, e.chat(user), ClosedError, { code: 'closed', param: null }, 'after close')
  await rejects(t, e.tokenize('x'), ClosedError, { code: 'closed', param: null }, 'tokenize after close')
})

test('LoadError: a missing model (TS) and files the native loader refuses', async (t) => {
  await rejects(t, Engine.load({ model: '/nonexistent/model' }), LoadError, { code: 'model_not_found', param: 'model' }, 'TS')
  // A folder of media files: no config.json / weights.
  await rejects(t, Engine.load({ model: fixture('vision') }), LoadError, { code: 'load_failed', param: 'model' }, 'Rust')
  await rejects(t, Transcriber.load({ model: fixture('llama-tiny') }), LoadError, { code: 'load_failed', param: 'model' }, 'Rust transcriber')
})

test('await using closes an Engine and a Transcriber at the end of the block', async (t) => {
  let kept: Engine | undefined
  let whisper: Transcriber | undefined
  {
    await using e = await Engine.load({ model: fixture('llama-tiny') })
    await using w = await Transcriber.load({ model: fixture('whisper-tiny-random') })
    kept = e
    whisper = w
    t.false(e.closed)
    t.false(w.closed)
    t.is((await e.generate('Hi', { maxTokens: 2 }))[0]!.tokenIds.length, 2)
  }
  t.true(kept.closed)
  t.true(whisper.closed)
  await rejects(t, kept.chat(user), ClosedError, { code: 'closed', param: null }, 'engine')
  await rejects(t, whisper.transcribe({ samples: new Float32Array(16000), sampleRate: 16000 }), ClosedError, { code: 'closed', param: null }, 'transcriber')
})

test.serial('the server answers each class with its status, code and snake_case param (openai client)', async (t) => {
  let s: TestServer | undefined
  try {
    s = await startTestServer({ engine, servedModelName: 'tiny-vl', logRequests: false })
    const chat = async (body: Record<string, unknown>) => {
      const err = await t.throwsAsync(s!.client.chat.completions.create({ model: 'tiny-vl', messages: user, ...body } as never))
      t.true(err instanceof OpenAI.APIError, err?.message)
      return err as InstanceType<typeof OpenAI.APIError>
    }
    const tooMany = await chat({ max_tokens: MAX_LEN })
    t.like(tooMany, { status: 400, code: 'context_length_exceeded', param: 'max_tokens' })
    const tooLong = await chat({ messages: [{ role: 'user', content: 'x'.repeat(1 << 20) }] })
    t.like(tooLong, { status: 400, code: 'context_length_exceeded', param: 'messages' })
    // Caught by the engine's grammar compiler.
    t.like(await chat({ structured_outputs: { regex: '(' } }), { status: 400, code: 'invalid_request', param: 'structured_outputs.regex' })
    const garbage = Buffer.from('not a picture').toString('base64')
    const media = await chat({ messages: [{ role: 'user', content: [{ type: 'image_url', image_url: { url: `data:image/png;base64,${garbage}` } }] }] })
    t.like(media, { status: 422, code: 'invalid_media' })
    const miss = await chat({ messages: [{ role: 'user', content: [{ type: 'image_url', image_url: null, uuid: 'nope' }] }] })
    t.like(miss, { status: 400, code: 'media_not_cached' })
    const completion = await t.throwsAsync(s.client.completions.create({ model: 'tiny-vl', prompt: [1, 2, 10 ** 8], max_tokens: 1 }))
    t.like(completion, { status: 400, code: 'invalid_request', param: 'prompt' })
  } finally {
    await s?.server.close()
  }
})
