import { readFileSync } from 'node:fs'
import { join } from 'node:path'

import test from 'ava'

import { Engine, MediaError, Transcriber, ValidationError, isWhisperModel } from '../src/index.js'
import { FIXTURES, fixture } from './helpers.js'

// fixtures/whisper-tiny-random: a tiny random Whisper with the real multilingual
// tokenizer (scripts/make_whisper_fixture.py). Its words are meaningless; what
// is checked is the pipeline: files and samples in, transformers' greedy text out.
const MODEL = fixture('whisper-tiny-random')
const AUDIO = join(FIXTURES, 'audio')
const ref = JSON.parse(readFileSync(join(MODEL, 'reference.json'), 'utf8')) as {
  cases: Record<string, { greedy_ids: number[]; text: string; language?: string }>
}

/** Mono 16-bit PCM WAV -> Float32Array (the fixture clip). */
function readWav(path: string): { samples: Float32Array; sampleRate: number } {
  const b = readFileSync(path)
  let off = 12
  let rate = 0
  while (off + 8 <= b.length) {
    const id = b.toString('ascii', off, off + 4)
    const size = b.readUInt32LE(off + 4)
    if (id === 'fmt ') rate = b.readUInt32LE(off + 12)
    if (id === 'data') {
      const n = size / 2
      const out = new Float32Array(n)
      for (let i = 0; i < n; i++) out[i] = b.readInt16LE(off + 8 + 2 * i) / 32768
      return { samples: out, sampleRate: rate }
    }
    off += 8 + size + (size % 2)
  }
  throw new Error(`no data chunk in ${path}`)
}

let whisper: Transcriber
test.before(async () => {
  whisper = await Transcriber.load({ model: MODEL, dtype: 'f32' })
})
test.after.always(async () => {
  await whisper?.close()
})

test('transcribes the espeak-ng clip end to end like transformers', async (t) => {
  const out = await whisper.transcribe(readFileSync(join(AUDIO, 'speech_16k.wav')), { language: 'en' })
  const want = ref.cases.en_transcribe!
  t.is(out.text, want.text.trim())
  t.is(out.language, 'en')
  t.is(out.languageName, 'english')
  t.is(out.segments.length, 1)
  t.deepEqual(out.segments[0]!.tokens, want.greedy_ids)
  t.is(out.segments[0]!.start, 0)
  t.true(Math.abs(out.duration - 3.24) < 1e-9)
  t.true(out.segments[0]!.avgLogprob < 0)
  t.like(whisper.info, { architecture: 'WhisperForConditionalGeneration', multilingual: true, samplingRate: 16000 })
  t.true(whisper.info.languages.includes('en'))
})

test('samples, a file path and other formats go through the same pipeline', async (t) => {
  const wav = readWav(join(AUDIO, 'speech_16k.wav'))
  const fromFile = await whisper.transcribe(join(AUDIO, 'speech_16k.wav'), { language: 'en' })
  const fromSamples = await whisper.transcribe(wav, { language: 'en' })
  t.deepEqual(fromSamples.segments[0]!.tokens, fromFile.segments[0]!.tokens)
  // The same audio as two identical channels averages to the same mono signal.
  const stereo = await whisper.transcribe({ samples: [wav.samples, wav.samples], sampleRate: 16000 }, { language: 'en' })
  t.deepEqual(stereo.segments[0]!.tokens, fromFile.segments[0]!.tokens)
  // Detection: no language given, transformers' detected language.
  const detected = await whisper.transcribe(wav)
  t.is(detected.language, ref.cases.detect!.language!)
  t.deepEqual(detected.segments[0]!.tokens, ref.cases.detect!.greedy_ids)
  for (const name of ['speech_44k_stereo.wav', 'speech_16k.flac', 'speech_16k.mp3', 'speech_16k.ogg']) {
    const out = await whisper.transcribe(readFileSync(join(AUDIO, name)), { language: 'en' })
    t.true(Math.abs(out.duration - 3.24) < 0.05, `${name}: ${out.duration}`)
    t.true(out.segments[0]!.tokens.length > 0, name)
  }
})

test('long audio is split into 30 s windows, each transcribed', async (t) => {
  const { samples } = readWav(join(AUDIO, 'speech_16k.wav'))
  const long = new Float32Array(samples.length * 11)
  for (let i = 0; i < 11; i++) long.set(samples, i * samples.length)
  const out = await whisper.transcribe({ samples: long, sampleRate: 16000 }, { language: 'en' })
  t.true(out.duration > 30)
  t.is(out.segments.length, 2)
  t.is(out.segments[0]!.start, 0)
  t.is(out.segments[0]!.end, out.segments[1]!.start)
  t.true(out.segments[0]!.end <= 30 && out.segments[0]!.end >= 29)
  t.true(Math.abs(out.segments[1]!.end - out.duration) < 1e-9)
  for (const s of out.segments) t.true(s.tokens.length > 0 && s.text.length > 0)
  t.is(out.text, out.segments.map((s) => s.text).join(' '))
})

test('concurrent requests are decoded in one batch with the same results', async (t) => {
  const bytes = readFileSync(join(AUDIO, 'speech_16k.wav'))
  const opts = [{ language: 'en' }, { language: 'en', prompt: 'Quick brown fox.' }, { language: 'en', task: 'translate' as const }]
  const alone = []
  for (const o of opts) alone.push(await whisper.transcribe(bytes, o))
  const together = await Promise.all(opts.map((o) => whisper.transcribe(bytes, o)))
  t.deepEqual(
    together.map((r) => r.segments[0]!.tokens),
    alone.map((r) => r.segments[0]!.tokens),
  )
  t.deepEqual(together[2]!.segments[0]!.tokens, ref.cases.translate!.greedy_ids)
  t.true(whisper.stats().maxBatch >= 2, JSON.stringify(whisper.stats()))
})

test('corrupt and empty audio reject with MediaErrors; bad options with ValidationErrors', async (t) => {
  const corrupt = await t.throwsAsync(whisper.transcribe(Buffer.from('RIFF\x24\x00\x00\x00WAVEfmt nonsense nonsense')), {
    instanceOf: MediaError,
  })
  t.is(corrupt.status, 422)
  t.is(corrupt.code, 'invalid_media')
  t.regex(corrupt.message, /^[^[]/)
  t.regex(corrupt.message, /WAV|wav|decode|format/i)
  const notAudio = await t.throwsAsync(whisper.transcribe(Buffer.from('hello, this is plainly not audio at all')), {
    instanceOf: MediaError,
  })
  t.is(notAudio.status, 422)
  const empty = await t.throwsAsync(whisper.transcribe(Buffer.alloc(0)), { instanceOf: MediaError })
  t.is(empty.status, 400)
  t.is(empty.code, 'invalid_media')
  const noSamples = await t.throwsAsync(whisper.transcribe({ samples: new Float32Array(0), sampleRate: 16000 }), {
    instanceOf: MediaError,
  })
  t.is(noSamples.status, 400)
  const wav = readFileSync(join(AUDIO, 'speech_16k.wav'))
  await t.throwsAsync(whisper.transcribe(wav, { language: 'klingon' }), { instanceOf: ValidationError, message: /klingon/ })
  await t.throwsAsync(whisper.transcribe(wav, { temperature: -1 }), { instanceOf: ValidationError })
  await t.throwsAsync(whisper.transcribe(wav, { task: 'summarize' as never }), { instanceOf: ValidationError })
  await t.throwsAsync(whisper.transcribe(wav, { speed: 2 } as never), { instanceOf: ValidationError, message: /speed/ })
  await t.throwsAsync(whisper.transcribe(42 as never), { instanceOf: ValidationError })
})

test('an aborted transcription rejects with AbortError and frees the decoder', async (t) => {
  const wav = readWav(join(AUDIO, 'speech_16k.wav'))
  const { samples } = wav
  const long = new Float32Array(samples.length * 30)
  for (let i = 0; i < 30; i++) long.set(samples, i * samples.length)
  const before = await whisper.transcribe(wav, { language: 'en', maxNewTokens: 4 })
  await t.throwsAsync(whisper.transcribe(wav, { signal: AbortSignal.abort() }), { name: 'AbortError' })
  const ac = new AbortController()
  const running = whisper.transcribe({ samples: long, sampleRate: 16000 }, { language: 'en', signal: ac.signal })
  setTimeout(() => ac.abort(), 20)
  await t.throwsAsync(running, { name: 'AbortError' })
  const after = await whisper.transcribe(wav, { language: 'en', maxNewTokens: 4 })
  t.deepEqual(after.segments[0]!.tokens, before.segments[0]!.tokens)
})

test('a Whisper folder is recognised, and Engine.load points to the Transcriber', async (t) => {
  t.true(isWhisperModel(MODEL))
  t.false(isWhisperModel(fixture('llama-tiny')))
  await t.throwsAsync(Engine.load({ model: MODEL }), { message: /Whisper.*Transcriber/ })
  await t.throwsAsync(Transcriber.load({ model: fixture('llama-tiny') }), { message: /not a Whisper model/ })
  await t.throwsAsync(Transcriber.load({ model: join(FIXTURES, 'nope') }), { message: /not found/ })
})

test('a real Whisper (tiny.en) writes the words of the espeak-ng clip', async (t) => {
  const dir = process.env.CANDELA_WHISPER_TINY_EN
  if (!dir) {
    t.log('CANDELA_WHISPER_TINY_EN not set (scripts/fetch_whisper_tiny_en.py); skipped')
    t.pass()
    return
  }
  const real = await Transcriber.load({ model: dir })
  try {
    t.false(real.info.multilingual)
    const out = await real.transcribe(readFileSync(join(AUDIO, 'speech_44k_stereo.wav')))
    t.log(out.text)
    t.regex(out.text.toLowerCase(), /listen.*the quick.*jump/)
    t.is(out.language, 'en')
  } finally {
    await real.close()
  }
})
