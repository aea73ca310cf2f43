/**
 * Content parts -> media items. Every media part of a chat message (or a
 * prompt's `multiModalData`) passes through here, for the library and the
 * HTTP server alike: its modality is checked against what the model accepts
 * and the per-prompt limits, its URL or payload becomes bytes (or raw
 * samples), and the chat template gets a placeholder part in its place.
 */

import { MediaError } from '../errors.js'
import { RequestBytes } from './fetch.js'
import { decodeBase64, loadUrl } from './source.js'
import type { SourceOptions } from './source.js'
import type { AudioSamples, Modality, ResolvedMedia } from './types.js'
import { MODALITIES } from './types.js'

export type { AudioSamples, Modality, ResolvedMedia } from './types.js'
export { MODALITIES } from './types.js'

/** What the engine allows, from its load options and the model. */
export interface MediaPolicy extends SourceOptions {
  /** Modalities the model takes. */
  accepts: ReadonlySet<Modality>
  /** Most items of each modality in one prompt (0 disables it). */
  limitMmPerPrompt?: Partial<Record<Modality, number>>
  /** Accept `image_embeds` / `audio_embeds` parts. */
  enableMmEmbeds?: boolean
  /**
   * Leave URL items that carry a uuid unfetched (with a `load` to fetch them
   * later), for a caller that first tries the engine's caches by uuid.
   */
  deferUuidFetches?: boolean
}

/** A media part waiting to be resolved, with where it stood. */
export interface PendingPart {
  part: Record<string, unknown>
  /** e.g. `messages[2].content[0]`. */
  path: string
  modality: Modality
}

/** Part type -> modality. */
const PART_MODALITY: Record<string, Modality> = {
  image_url: 'image',
  image: 'image',
  image_embeds: 'image',
  image_pil: 'image',
  audio_embeds: 'audio',
  video_url: 'video',
  video: 'video',
  input_audio: 'audio',
  audio_url: 'audio',
  audio: 'audio',
}

/** The modality of a media part type, or undefined for text and unknown types. */
export function partModality(type: string): Modality | undefined {
  return PART_MODALITY[type]
}

/**
 * What the chat template sees for a media part: `{ type: 'audio', audio: '<audio>' }`.
 * Templates test `content['type']` or `'audio' in content` (Qwen2-Audio,
 * Qwen2-VL); both hold.
 */
export function templatePart(modality: Modality): Record<string, unknown> {
  return { type: modality, [modality]: `<${modality}>` }
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v)
}

function isSamples(v: unknown): v is AudioSamples {
  return isObject(v) && 'samples' in v && 'sampleRate' in v
}

function uuidOf(part: Record<string, unknown>, path: string): string | undefined {
  const u = part.uuid
  if (u === undefined || u === null) return undefined
  if (typeof u !== 'string' || u.length === 0) throw new MediaError(`${path}.uuid must be a non-empty string`, 400, `${path}.uuid`)
  return u
}

/** Audio format hint from a MIME type or OpenAI's input_audio.format. */
function formatHint(mime: string | undefined): string | undefined {
  return mime?.split(';')[0]?.trim() || undefined
}

function samplesItem(v: AudioSamples, path: string): ResolvedMedia {
  const channels = Array.isArray(v.samples) ? v.samples : [v.samples]
  if (channels.length === 0 || !channels.every((c) => c instanceof Float32Array)) {
    throw new MediaError(`${path}.samples must be a Float32Array or one Float32Array per channel`, 400, path)
  }
  if (!Number.isInteger(v.sampleRate) || v.sampleRate <= 0) {
    throw new MediaError(`${path}.sampleRate must be a positive integer (Hz)`, 400, path)
  }
  if (channels.some((c) => c.length !== channels[0]!.length)) {
    throw new MediaError(`${path}: every channel must have the same number of samples`, 400, path)
  }
  return { modality: 'audio', samples: channels, sampleRate: v.sampleRate }
}

/** Processor options a media part may carry itself (qwen-vl-utils style). */
const PART_KWARGS = ['min_pixels', 'max_pixels', 'total_pixels', 'fps', 'max_frames'] as const

function partKwargs(part: Record<string, unknown>): Record<string, unknown> | undefined {
  const out: Record<string, unknown> = {}
  for (const k of PART_KWARGS) if (part[k] !== undefined && part[k] !== null) out[k] = part[k]
  return Object.keys(out).length > 0 ? out : undefined
}

function toBuffer(v: Uint8Array): Buffer {
  return Buffer.from(v.buffer, v.byteOffset, v.byteLength)
}

/** A URL-ish field: `{ url }`, a plain string, or null (uuid-only reference). */
function urlOf(v: unknown, path: string): string | null {
  if (v === null || v === undefined) return null
  if (typeof v === 'string') return v
  if (isObject(v) && typeof v.url === 'string') return v.url
  if (isObject(v) && (v.url === null || v.url === undefined)) return null
  throw new MediaError(`${path} must be { url: string }`, 400, path)
}

/** `image_grid_thw`: [t, h, w] or [[t, h, w]], positive integers. */
function gridOf(v: unknown, path: string): number[] | undefined {
  if (v === undefined || v === null) return undefined
  const flat = Array.isArray(v) && v.length === 1 && Array.isArray(v[0]) ? (v[0] as unknown[]) : v
  if (!Array.isArray(flat) || flat.length !== 3 || !flat.every((x) => Number.isInteger(x) && (x as number) > 0)) {
    throw new MediaError(`${path} must be three positive integers [t, h, w], got ${JSON.stringify(v)}`, 400, path)
  }
  return flat as number[]
}

/** Bytes of a blob field: raw bytes, or base64 of them (as vLLM's clients send them). */
function blobOf(v: unknown, at: string): Buffer | undefined {
  if (typeof v === 'string') return decodeBase64(v, at)
  if (v instanceof Uint8Array) return toBuffer(v)
  return undefined
}

/**
 * An `image_embeds` / `audio_embeds` part: `{ data, shape }`, or a blob
 * (`torch.save` archive, `.npy` file or safetensors; raw or base64), or
 * vLLM's dict form `{ image_embeds: blob, image_grid_thw: blob }`.
 */
function embedsItem(part: Record<string, unknown>, path: string, modality: Modality, uuid: string | undefined): ResolvedMedia {
  const key = `${modality}_embeds`
  const at = `${path}.${key}`
  const gridThw = gridOf(part.image_grid_thw, `${path}.image_grid_thw`)
  const base: ResolvedMedia = { modality, ...(gridThw ? { gridThw } : {}), ...(uuid === undefined ? {} : { uuid }) }
  const v = part[key]
  if (v === null || v === undefined) {
    if (uuid === undefined) throw new MediaError(`${at} is required`, 400, at)
    return { modality, uuid }
  }
  const blob = blobOf(v, at)
  if (blob) return { ...base, embedsBlob: blob }
  if (isObject(v) && v.data instanceof Float32Array) {
    const shape = v.shape
    if (!Array.isArray(shape) || shape.length !== 2 || !shape.every((d) => Number.isInteger(d) && d > 0)) {
      throw new MediaError(`${at}.shape must be [feature_tokens, hidden], got ${JSON.stringify(shape)}`, 400, `${at}.shape`)
    }
    if (shape[0] * shape[1] !== v.data.length) {
      throw new MediaError(`${at}: shape ${JSON.stringify(shape)} needs ${shape[0] * shape[1]} values, got ${v.data.length}`, 400, at)
    }
    return { ...base, embeds: v.data, embedsShape: shape as number[] }
  }
  if (modality === 'image' && isObject(v) && v.image_embeds !== undefined) {
    const inner = blobOf(v.image_embeds, `${at}.image_embeds`)
    if (!inner) throw new MediaError(`${at}.image_embeds must be a base64 string of a tensor file`, 400, `${at}.image_embeds`)
    const extra = Object.keys(v).filter((k) => k !== 'image_embeds' && k !== 'image_grid_thw')
    if (extra.length > 0) {
      throw new MediaError(`${at}: unknown field(s) ${extra.join(', ')} (takes image_embeds and image_grid_thw)`, 400, `${at}.${extra[0]}`)
    }
    const gridField = v.image_grid_thw
    if (gridField === undefined || gridField === null) return { ...base, embedsBlob: inner }
    const gridBlob = blobOf(gridField, `${at}.image_grid_thw`)
    if (gridBlob) return { ...base, embedsBlob: inner, gridBlob }
    const grid = gridOf(gridField, `${at}.image_grid_thw`)
    return { ...base, embedsBlob: inner, gridThw: base.gridThw ?? grid }
  }
  throw new MediaError(
    `${at} must be a base64 string of a torch.save tensor, .npy file or safetensors blob${modality === 'image' ? ', { image_embeds, image_grid_thw }' : ''}, file bytes, or { data: Float32Array, shape: [tokens, hidden] }`,
    400,
    at,
  )
}

/** Resolve one pending part to a media item. */
async function resolvePart(p: PendingPart, opts: MediaPolicy): Promise<ResolvedMedia> {
  const { part, path, modality } = p
  const uuid = uuidOf(part, path)
  const type = part.type as string
  const kwargs = modality === 'audio' ? undefined : partKwargs(part)
  const withUuid = (m: ResolvedMedia): ResolvedMedia => {
    const k = kwargs === undefined ? m : { ...m, kwargs }
    return uuid === undefined ? k : { ...k, uuid }
  }
  const fromUrl = async (field: unknown, fieldPath: string): Promise<ResolvedMedia> => {
    const url = urlOf(field, fieldPath)
    if (url === null) {
      if (uuid === undefined) throw new MediaError(`${fieldPath}: a media part needs data, or a uuid of an item sent before`, 400, fieldPath)
      return withUuid({ modality })
    }
    const load = async (): Promise<ResolvedMedia> => {
      const got = await loadUrl(url, modality, opts, `${fieldPath}.url`)
      return withUuid({ modality, data: got.data, format: formatHint(got.mimeType) })
    }
    // A caller-given uuid names the content, so the URL need not be fetched
    // while the engine's caches hold that uuid; without one, a URL says
    // nothing about what it serves today: fetch it and key it by content.
    if (uuid !== undefined && opts.deferUuidFetches === true && !url.startsWith('data:')) return withUuid({ modality, load })
    return load()
  }
  switch (type) {
    case 'input_audio': {
      const ia = part.input_audio
      if (ia === null || ia === undefined) {
        if (uuid === undefined) throw new MediaError(`${path}.input_audio is required`, 400, `${path}.input_audio`)
        return { modality, uuid }
      }
      if (!isObject(ia) || typeof ia.data !== 'string') {
        throw new MediaError(`${path}.input_audio must be { data: base64, format }`, 400, `${path}.input_audio`)
      }
      const format = typeof ia.format === 'string' ? ia.format : undefined
      return withUuid({ modality, data: decodeBase64(ia.data, `${path}.input_audio.data`), format })
    }
    case 'audio_url':
      return fromUrl(part.audio_url, `${path}.audio_url`)
    case 'image_url':
      return fromUrl(part.image_url, `${path}.image_url`)
    case 'video_url':
      return fromUrl(part.video_url, `${path}.video_url`)
    case 'audio': {
      // Xinference's { type: 'audio', audio_url: '...' } or the library's raw forms.
      if (part.audio_url !== undefined) return fromUrl(part.audio_url, `${path}.audio_url`)
      const a = part.audio
      if (isSamples(a)) return withUuid(samplesItem(a, `${path}.audio`))
      if (a instanceof Uint8Array) return withUuid({ modality, data: Buffer.from(a.buffer, a.byteOffset, a.byteLength) })
      if (a === null || a === undefined) {
        if (uuid === undefined) throw new MediaError(`${path}.audio is required`, 400, `${path}.audio`)
        return { modality, uuid }
      }
      throw new MediaError(`${path}.audio must be file bytes or { samples, sampleRate }`, 400, `${path}.audio`)
    }
    case 'image_embeds':
    case 'audio_embeds':
      return embedsItem(part, path, modality, uuid)
    case 'video': {
      const v = part.video
      if (v instanceof Uint8Array) return withUuid({ modality, data: toBuffer(v) })
      if (Array.isArray(v)) {
        if (v.length === 0 || !v.every((f) => f instanceof Uint8Array)) {
          throw new MediaError(`${path}.video must be file bytes or a non-empty array of encoded frames`, 400, `${path}.video`)
        }
        return withUuid({ modality, frames: v.map(toBuffer) })
      }
      if (v === null || v === undefined) {
        if (uuid === undefined) throw new MediaError(`${path}.video is required`, 400, `${path}.video`)
        return withUuid({ modality })
      }
      throw new MediaError(`${path}.video must be file bytes or an array of encoded frames`, 400, `${path}.video`)
    }
    default: {
      const v = part[type]
      if (v instanceof Uint8Array) return withUuid({ modality, data: toBuffer(v) })
      if (v === null || v === undefined) {
        if (uuid !== undefined) return withUuid({ modality })
        const uuidField = path.startsWith('multiModalData.') ? path.replace('multiModalData.', 'multiModalUuids.') : `${path}.uuid`
        throw new MediaError(`${path} is empty and has no uuid: give its data, or in ${uuidField} the uuid of an item sent before`, 400, path)
      }
      throw new MediaError(`${path}: ${type} parts are not supported by this model`, 400, path)
    }
  }
}

/** Check modalities and limits, then resolve every part (in parallel, order kept). */
export async function resolveParts(parts: PendingPart[], policy: MediaPolicy): Promise<ResolvedMedia[]> {
  const counts: Partial<Record<Modality, number>> = {}
  for (const p of parts) {
    const limit = policy.limitMmPerPrompt?.[p.modality]
    if (limit === 0 || !policy.accepts.has(p.modality)) {
      throw new MediaError(`${p.path}: this model does not accept ${p.modality} input`, 400, p.path)
    }
    if ((p.part.type === 'image_embeds' || p.part.type === 'audio_embeds') && policy.enableMmEmbeds !== true) {
      throw new MediaError(
        `${p.path}: ${p.part.type} parts are disabled; load the engine with enableMmEmbeds: true (candela serve --enable-mm-embeds) to send precomputed embeddings`,
        400,
        p.path,
      )
    }
    counts[p.modality] = (counts[p.modality] ?? 0) + 1
  }
  for (const m of MODALITIES) {
    const limit = policy.limitMmPerPrompt?.[m]
    const n = counts[m] ?? 0
    if (limit !== undefined && n > limit) {
      throw new MediaError(`At most ${limit} ${m}(s) may be provided in one prompt.`, 400, 'messages')
    }
  }
  // One running total of fetched bytes per request (its fetches run in parallel).
  const opts: MediaPolicy = { ...policy, requestBytes: new RequestBytes() }
  return Promise.all(parts.map((p) => resolvePart(p, opts)))
}

/** Items of `generate`'s `multiModalData` as pending parts (prompt order = array order). */
export function pendingFromData(
  data: Partial<Record<Modality, unknown>>,
  uuids: Partial<Record<Modality, Array<string | null>>> | undefined,
): PendingPart[] {
  const out: PendingPart[] = []
  for (const m of MODALITIES) {
    const v = data[m]
    if (v === undefined) continue
    const list = Array.isArray(v) ? v : [v]
    const ids = uuids?.[m] ?? []
    list.forEach((item, i) => {
      const path = `multiModalData.${m}[${i}]`
      const uuid = ids[i] ?? undefined
      out.push({ part: { type: m, [m]: item ?? null, ...(uuid ? { uuid } : {}) }, path, modality: m })
    })
  }
  return out
}

/** Fetch the items {@link resolveParts} deferred (see `deferUuidFetches`), in parallel. */
export async function loadDeferred(media: ResolvedMedia[]): Promise<ResolvedMedia[]> {
  return Promise.all(media.map((m) => (m.load ? m.load() : m)))
}
