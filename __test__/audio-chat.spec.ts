/**
 * Audio chat end to end on the qwen2-audio-tiny fixture (a tiny random
 * Qwen2-Audio; transformers' greedy tokens in reference.json): every audio
 * part form, the processor / encoder caches, uuids, limits, and errors.
 * The tiny model's words are meaningless; what is checked is that the
 * pipeline runs and reproduces the reference exactly.
 */

import test from 'ava'
import { readFileSync } from 'node:fs'
import { join } from 'node:path'
import { pathToFileURL } from 'node:url'

import { Engine, MediaError } from '../src/index.js'
import type { ChatMessage } from '../src/index.js'
import { FIXTURES, fixture } from './helpers.js'

const dir = fixture('qwen2-audio-tiny')
const ref = JSON.parse(readFileSync(join(dir, 'reference.json'), 'utf8')) as { greedy_ids: number[] }
const clip1 = readFileSync(join(dir, 'clip1.wav'))
const clip2 = readFileSync(join(dir, 'clip2.wav'))
const greedy = { maxTokens: 8, temperature: 0, ignoreEos: true }

/** The reference conversation with the audio given as `part(i)`. */
function conversation(part: (clip: Buffer, i: number) => Record<string, unknown>): ChatMessage[] {
  return [
    { role: 'user', content: [part(clip1, 0), { type: 'text', text: 'What is this sound?' }] },
    { role: 'assistant', content: 'A chirp.' },
    { role: 'user', content: [part(clip2, 1), { type: 'text', text: 'And this one?' }] },
  ] as ChatMessage[]
}

/** 16-bit PCM WAV bytes -> mono float samples. */
function wavSamples(wav: Buffer): Float32Array {
  const data = wav.subarray(44)
  const out = new Float32Array(data.length / 2)
  for (let i = 0; i < out.length; i++) out[i] = data.readInt16LE(2 * i) / 32768
  return out
}

let engine: Engine
test.before(async () => {
  engine = await Engine.load({ model: dir, dtype: 'f32', limitMmPerPrompt: { audio: 2 }, allowedLocalMediaPath: FIXTURES })
})
test.after.always(async () => {
  await engine?.close()
})

test.serial('every audio part form gives transformers\' greedy tokens', async (t) => {
  t.deepEqual(engine.info.modalities, ['audio'])
  const forms: Array<[string, (clip: Buffer, i: number) => Record<string, unknown>]> = [
    ['input_audio', (c) => ({ type: 'input_audio', input_audio: { data: c.toString('base64'), format: 'wav' } })],
    ['audio_url data:', (c) => ({ type: 'audio_url', audio_url: { url: `data:audio/wav;base64,${c.toString('base64')}` } })],
    ['audio_url file:', (_, i) => ({ type: 'audio_url', audio_url: { url: pathToFileURL(join(dir, `clip${i + 1}.wav`)).href } })],
    ['xinference audio', (_, i) => ({ type: 'audio', audio_url: pathToFileURL(join(dir, `clip${i + 1}.wav`)).href })],
    ['raw samples', (c) => ({ type: 'audio', audio: { samples: wavSamples(c), sampleRate: 16000 } })],
  ]
  for (const [name, part] of forms) {
    const out = await engine.chat(conversation(part), greedy)
    t.deepEqual(out.tokenIds, ref.greedy_ids, name)
  }
})

test.serial('generate with the model\'s own placeholders and multiModalData', async (t) => {
  const prompt = await engine.applyChatTemplate(conversation(() => ({ type: 'audio', audio_url: 'x' })))
  const [out] = await engine.generate({ prompt, multiModalData: { audio: [clip1, clip2] } }, greedy)
  t.deepEqual(out!.tokenIds, ref.greedy_ids)
  const err = await t.throwsAsync(engine.generate({ prompt, multiModalData: { audio: [clip1] } }, greedy))
  t.regex(err!.message, /2 audio placeholder|more audio placeholders/)
})

test.serial('a repeated clip skips preprocessing and the encoder; a uuid alone reuses it', async (t) => {
  const part = (c: Buffer, i: number) => ({ type: 'input_audio', input_audio: { data: c.toString('base64'), format: 'wav' }, uuid: `clip-${i}` })
  const first = await engine.chat(conversation(part), greedy)
  const before = engine.stats()
  // Different text in front: the prefix cache misses, the media caches hit.
  const msgs = conversation(part)
  msgs.unshift({ role: 'system', content: 'Listen carefully.' })
  await engine.chat(msgs, greedy)
  const after = engine.stats()
  t.is(after.encoderRuns, before.encoderRuns, 'no encoder run for known clips')
  t.true(after.encoderCacheHits >= before.encoderCacheHits + 2)
  t.true(after.processorCacheHits >= before.processorCacheHits + 2)
  // uuid-only parts: no data, same tokens.
  const byRef = await engine.chat(conversation((_, i) => ({ type: 'input_audio', input_audio: null, uuid: `clip-${i}` })), greedy)
  t.deepEqual(byRef.tokenIds, first.tokenIds)
  const miss = await t.throwsAsync(
    engine.chat(conversation((_, i) => ({ type: 'audio_url', audio_url: null, uuid: `never-sent-${i}` })), greedy),
  )
  t.true(miss instanceof MediaError)
  t.is((miss as MediaError).status, 400)
  t.regex(miss!.message, /never-sent-0/)
})

test.serial('different audio with the same text gives different logits', async (t) => {
  const a = await engine.chat(conversation((c) => ({ type: 'input_audio', input_audio: { data: c.toString('base64') } })), { ...greedy, logprobs: true })
  const swapped = await engine.chat(conversation((_, i) => ({ type: 'input_audio', input_audio: { data: (i === 0 ? clip2 : clip1).toString('base64') } })), { ...greedy, logprobs: true })
  t.notDeepEqual(a.logprobs?.[0]?.logprob, swapped.logprobs?.[0]?.logprob)
})

test.serial('real speech (espeak-ng) in WAV, MP3, FLAC, OGG and 44.1 kHz stereo runs end to end', async (t) => {
  for (const f of ['speech_16k.wav', 'speech_16k.mp3', 'speech_16k.flac', 'speech_16k.ogg', 'speech_44k_stereo.wav']) {
    const data = readFileSync(join(FIXTURES, 'audio', f)).toString('base64')
    const out = await engine.chat([{ role: 'user', content: [{ type: 'input_audio', input_audio: { data } }, { type: 'text', text: 'Transcribe.' }] }], greedy)
    t.is(out.tokenIds.length, 8, f)
    t.true(out.usage.promptTokens > 100, `${f}: the clip became audio tokens`)
  }
})

test.serial('bad audio is a clear MediaError and never takes the engine down', async (t) => {
  const ask = (part: Record<string, unknown>) => engine.chat([{ role: 'user', content: [part as never] }], greedy)
  const corrupt = await t.throwsAsync(ask({ type: 'input_audio', input_audio: { data: Buffer.from('RIFF....WAVEnot really').toString('base64') } }))
  t.true(corrupt instanceof MediaError)
  t.is((corrupt as MediaError).status, 422)
  const garbage = await t.throwsAsync(ask({ type: 'input_audio', input_audio: { data: Buffer.alloc(3000, 7).toString('base64') } }))
  t.is((garbage as MediaError).status, 422)
  const header = Buffer.from(clip1.subarray(0, 44))
  header.writeUInt32LE(0, 40) // data chunk of 0 bytes
  header.writeUInt32LE(36, 4)
  const empty = await t.throwsAsync(ask({ type: 'input_audio', input_audio: { data: header.toString('base64') } }))
  t.is((empty as MediaError).status, 400, empty!.message)
  const badB64 = await t.throwsAsync(ask({ type: 'input_audio', input_audio: { data: '@@not base64@@' } }))
  t.is((badB64 as MediaError).status, 400)
  const outside = await t.throwsAsync(ask({ type: 'audio_url', audio_url: { url: 'file:///etc/passwd' } }))
  t.regex(outside!.message, /outside the allowed local media path|not found/)
  const three = await t.throwsAsync(engine.chat(conversation((c) => ({ type: 'input_audio', input_audio: { data: c.toString('base64') } })).concat(
    { role: 'user', content: [{ type: 'input_audio', input_audio: { data: clip1.toString('base64') } } as never] }), greedy))
  t.is(three!.message, 'At most 2 audio(s) may be provided in one prompt.')
  // Still serving.
  const ok = await engine.chat(conversation((c) => ({ type: 'input_audio', input_audio: { data: c.toString('base64') } })), greedy)
  t.deepEqual(ok.tokenIds, ref.greedy_ids)
})

test('a text-only model refuses audio with a 400 naming the part', async (t) => {
  const text = await Engine.load({ model: fixture('qwen2-tiny') })
  try {
    const err = await t.throwsAsync(text.chat([{ role: 'user', content: [{ type: 'input_audio', input_audio: { data: clip1.toString('base64') } }] }], greedy))
    t.true(err instanceof MediaError)
    t.is((err as MediaError).status, 400)
    t.regex(err!.message, /messages\[0\]\.content\[0\].*does not accept audio/)
  } finally {
    await text.close()
  }
})
