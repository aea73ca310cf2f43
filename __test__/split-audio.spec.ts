// splitAudio: chunks of long audio that lose no sample, stay within the limit,
// and cut where it is quiet, at any sample rate. Property-based (fast-check).
import test from 'ava'
import fc from 'fast-check'

import { splitAudio, ValidationError } from '../dist/index.js'

const concat = (chunks: Float32Array[]): Float32Array => {
  const out = new Float32Array(chunks.reduce((n, c) => n + c.length, 0))
  let at = 0
  for (const c of chunks) {
    out.set(c, at)
    at += c.length
  }
  return out
}

/** Deterministic noise in [-0.5, 0.5) from an integer seed. */
const noise = (n: number, seed: number): Float32Array => {
  const a = new Float32Array(n)
  let s = seed >>> 0 || 1
  for (let i = 0; i < n; i++) {
    s ^= s << 13
    s ^= s >>> 17
    s ^= s << 5
    a[i] = (s >>> 0) / 2 ** 32 - 0.5
  }
  return a
}

test('chunks concatenate to the input and stay within the limits, at any sample rate', (t) => {
  fc.assert(
    fc.property(
      fc.integer({ min: 0, max: 20_000 }),
      fc.integer({ min: 1, max: 192_000 }),
      fc.double({ min: 0.0005, max: 3, noNaN: true }),
      fc.double({ min: 0, max: 0.999, noNaN: true }),
      fc.integer({ min: 1, max: 4000 }),
      fc.integer(),
      (len, sampleRate, maxClipDurationS, overlapFrac, minEnergyWindowSize, seed) => {
        const opts = { maxClipDurationS, overlapDurationS: maxClipDurationS * overlapFrac, minEnergyWindowSize }
        const maxClip = Math.floor(maxClipDurationS * sampleRate)
        const overlap = Math.floor(opts.overlapDurationS * sampleRate)
        fc.pre(maxClip >= 1)
        const samples = noise(len, seed)
        const chunks = splitAudio(samples, sampleRate, opts)
        t.deepEqual(concat(chunks), samples)
        chunks.forEach((c, i) => {
          t.true(c.length >= 1 && c.length <= maxClip, `chunk ${i}: ${c.length} > ${maxClip}`)
          // Every chunk but the last ends inside its search region.
          if (i < chunks.length - 1) t.true(c.length + Math.min(overlap, maxClip - 1) >= maxClip)
        })
        t.is(chunks.length === 0, len === 0)
      },
    ),
    { numRuns: 300 },
  )
})

test('cuts land in the quiet part of the overlap region', (t) => {
  fc.assert(
    fc.property(fc.integer({ min: 8000, max: 48_000 }), fc.double({ min: 0.1, max: 0.8, noNaN: true }), (sampleRate, quietAt) => {
      // 5 s of noise with 0.1 s of silence placed inside the last second of the first 3 s clip.
      const samples = noise(sampleRate * 5, sampleRate)
      const window = Math.round(sampleRate / 100)
      const silenceStart = Math.floor((2 + quietAt) * sampleRate)
      const silenceLen = Math.floor(sampleRate / 10)
      samples.fill(0, silenceStart, silenceStart + silenceLen)
      const chunks = splitAudio(samples, sampleRate, { maxClipDurationS: 3, overlapDurationS: 1, minEnergyWindowSize: window })
      const cut = chunks[0]!.length
      t.true(cut >= silenceStart && cut <= silenceStart + silenceLen, `cut ${cut} outside ${silenceStart}+${silenceLen}`)
      t.deepEqual(concat(chunks), samples)
    }),
    { numRuns: 25 },
  )
})

test('defaults are 30 s clips; short audio is one chunk; chunks are copies', (t) => {
  const sr = 16_000
  const short = noise(sr * 10, 7)
  const one = splitAudio(short, sr)
  t.is(one.length, 1)
  t.deepEqual(one[0], short)
  one[0]![0] = 42
  t.not(short[0], 42)
  const long = noise(sr * 65, 9)
  const chunks = splitAudio(long, sr)
  t.is(chunks.length, 3)
  chunks.forEach((c, i) => t.true(c.length <= 30 * sr && (i === chunks.length - 1 || c.length >= 29 * sr)))
  t.deepEqual(splitAudio(new Float32Array(0), sr), [])
})

test('bad options throw a ValidationError naming the option', (t) => {
  const x = new Float32Array(100)
  const cases: Array<[() => unknown, RegExp]> = [
    [() => splitAudio(x, 0), /sampleRate/],
    [() => splitAudio(x, 16000.5), /sampleRate/],
    [() => splitAudio(x, Number.NaN), /sampleRate/],
    [() => splitAudio([0, 1] as unknown as Float32Array, 16000), /samples must be a Float32Array/],
    [() => splitAudio(x, 16000, { maxClipDurationS: 0 }), /maxClipDurationS/],
    [() => splitAudio(x, 16000, { maxClipDurationS: -3 }), /maxClipDurationS/],
    [() => splitAudio(x, 16000, { maxClipDurationS: Number.POSITIVE_INFINITY }), /maxClipDurationS/],
    [() => splitAudio(x, 16000, { maxClipDurationS: 1e-9, overlapDurationS: 0 }), /maxClipDurationS/],
    [() => splitAudio(x, 16000, { overlapDurationS: -1 }), /overlapDurationS/],
    [() => splitAudio(x, 16000, { overlapDurationS: 30 }), /overlapDurationS/],
    [() => splitAudio(x, 16000, { maxClipDurationS: 2, overlapDurationS: 5 }), /overlapDurationS/],
    [() => splitAudio(x, 16000, { minEnergyWindowSize: 0 }), /minEnergyWindowSize/],
    [() => splitAudio(x, 16000, { minEnergyWindowSize: 1.5 }), /minEnergyWindowSize/],
    [() => splitAudio(x, 16000, { minEnergyWindowSize: '10' as unknown as number }), /minEnergyWindowSize/],
    [() => splitAudio(x, 16000, { max_clip_duration_s: 3 } as never), /unknown splitAudio option "max_clip_duration_s"/],
  ]
  for (const [fn, msg] of cases) {
    const err = t.throws(fn, { instanceOf: ValidationError })
    t.regex(err!.message, msg)
  }
})
