/**
 * Audio helpers that need no model.
 *
 * @module
 */

import { ValidationError } from './errors.js'
import { native } from './native.js'

/** Options of {@link splitAudio}; the defaults are vLLM's. */
export interface SplitAudioOptions {
  /** Longest chunk, in seconds (default 30: Whisper's window). */
  maxClipDurationS?: number
  /**
   * How far back from a chunk's maximum end to look for a quiet cut point, in
   * seconds (default 1). Must be shorter than `maxClipDurationS`.
   */
  overlapDurationS?: number
  /** Samples per RMS window when looking for the quietest spot (default 1600 = 0.1 s at 16 kHz). */
  minEnergyWindowSize?: number
}

const OPTION_KEYS = ['maxClipDurationS', 'overlapDurationS', 'minEnergyWindowSize'] as const

const fail = (msg: string): never => {
  throw new ValidationError(msg)
}

/**
 * Split mono audio into chunks of at most `maxClipDurationS` seconds, for models
 * with a fixed window (Whisper). Each cut is placed in the middle of the quietest
 * `minEnergyWindowSize`-sample window within the last `overlapDurationS` seconds
 * of the chunk, so words are not cut in half. Nothing is lost or repeated: the
 * chunks concatenated equal `samples`. Works at any sample rate.
 *
 * @param samples mono samples
 * @param sampleRate samples per second (a positive whole number)
 * @returns the chunks, in order, as copies (none for empty input)
 * @throws {ValidationError} for bad input, naming the option
 *
 * @example
 * ```ts
 * const chunks = splitAudio(samples16k, 16000, { maxClipDurationS: 30 })
 * ```
 */
export function splitAudio(samples: Float32Array, sampleRate: number, options: SplitAudioOptions = {}): Float32Array[] {
  if (!(samples instanceof Float32Array)) fail('samples must be a Float32Array')
  if (typeof sampleRate !== 'number' || !Number.isInteger(sampleRate) || sampleRate < 1 || sampleRate > 0xffffffff) {
    fail(`sampleRate must be a positive whole number of Hz, got ${String(sampleRate)}`)
  }
  if (typeof options !== 'object' || options === null || Array.isArray(options)) {
    fail('splitAudio options must be an object')
  }
  for (const key of Object.keys(options)) {
    if (!(OPTION_KEYS as readonly string[]).includes(key)) fail(`unknown splitAudio option ${JSON.stringify(key)}`)
  }
  for (const key of OPTION_KEYS) {
    const v = options[key]
    if (v !== undefined && (typeof v !== 'number' || !Number.isFinite(v))) {
      fail(`${key} must be a finite number, got ${String(v)}`)
    }
  }
  // The addon checks the ranges (and again the above) and names the option.
  let ends: number[]
  try {
    ends = native().splitAudioBounds(samples, sampleRate, {
      maxClipDurationS: options.maxClipDurationS,
      overlapDurationS: options.overlapDurationS,
      minEnergyWindowSize: options.minEnergyWindowSize,
    })
  } catch (err) {
    if (err instanceof Error && (err as { code?: unknown }).code === 'InvalidArg') {
      throw new ValidationError(err.message)
    }
    throw err
  }
  const chunks: Float32Array[] = []
  let start = 0
  for (const end of ends) {
    chunks.push(samples.slice(start, end))
    start = end
  }
  return chunks
}
