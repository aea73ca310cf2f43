/**
 * Media URLs -> bytes: `data:` (base64 only), `file:` (only under an
 * allowed local directory, after resolving symlinks and `..`) and http(s)
 * with a timeout and a size cap enforced while the body streams in.
 *
 * Network hardening (allowed domains, private-address blocking, redirect
 * limits) is layered on in this module by the media-fetching work; today
 * http(s) fetches follow the platform's defaults.
 */

import { realpath, readFile, stat } from 'node:fs/promises'
import { isAbsolute, relative, sep } from 'node:path'
import { fileURLToPath } from 'node:url'

import { MediaError } from '../errors.js'
import type { Modality } from './types.js'

/** Per-modality fetch limits (env overrides, as documented in the README). */
export const FETCH_TIMEOUT_MS: Record<Modality, number> = {
  image: envSeconds('CANDELA_IMAGE_FETCH_TIMEOUT', 5),
  video: envSeconds('CANDELA_VIDEO_FETCH_TIMEOUT', 30),
  audio: envSeconds('CANDELA_AUDIO_FETCH_TIMEOUT', 10),
}
export const MAX_BYTES: Record<Modality, number> = { image: 20e6, audio: 25e6, video: 200e6 }

function envSeconds(name: string, fallback: number): number {
  const v = Number(process.env[name])
  return Number.isFinite(v) && v > 0 ? v * 1000 : fallback * 1000
}

export interface SourceOptions {
  /** Directory `file:` URLs may read from; without it `file:` is refused. */
  allowedLocalMediaPath?: string
}

/** A fetched or decoded media payload with what its source says about its format. */
export interface MediaBytes {
  data: Buffer
  /** MIME type from the data: URL or the HTTP response, if any. */
  mimeType?: string
}

/** Bytes of a `data:` URL (base64 payloads only). */
export function decodeDataUrl(url: string, param: string): MediaBytes {
  const comma = url.indexOf(',')
  if (comma < 0) throw new MediaError(`${param}: malformed data: URL (no comma)`, 400, param)
  const meta = url.slice(5, comma)
  const parts = meta.split(';')
  if (!parts.includes('base64')) throw new MediaError(`${param}: only base64 data: URLs are supported`, 400, param)
  const payload = url.slice(comma + 1).trim()
  if (!/^[A-Za-z0-9+/_-]*={0,2}$/.test(payload) || payload.length === 0) {
    throw new MediaError(`${param}: the data: URL is not valid base64`, 400, param)
  }
  return { data: Buffer.from(payload, 'base64'), mimeType: parts[0] || undefined }
}

/** Decode a plain base64 string (OpenAI's input_audio.data). */
export function decodeBase64(text: string, param: string): Buffer {
  const s = text.trim()
  if (s.length === 0 || !/^[A-Za-z0-9+/_-]*={0,2}$/.test(s)) throw new MediaError(`${param} is not valid base64`, 400, param)
  return Buffer.from(s, 'base64')
}

async function readLocal(url: URL, modality: Modality, opts: SourceOptions, param: string): Promise<MediaBytes> {
  const root = opts.allowedLocalMediaPath
  if (!root) {
    throw new MediaError(`${param}: file: URLs are disabled (set allowedLocalMediaPath / --allowed-local-media-path)`, 400, param)
  }
  let real: string
  let base: string
  try {
    base = await realpath(root)
    real = await realpath(fileURLToPath(url))
  } catch {
    throw new MediaError(`${param}: local media file not found`, 400, param)
  }
  const rel = relative(base, real)
  if (rel === '' || rel.startsWith('..' + sep) || rel === '..' || isAbsolute(rel)) {
    throw new MediaError(`${param}: the file lies outside the allowed local media path`, 400, param)
  }
  const st = await stat(real)
  if (st.size > MAX_BYTES[modality]) {
    throw new MediaError(`${param}: the ${modality} file is larger than ${MAX_BYTES[modality]} bytes`, 413, param)
  }
  return { data: await readFile(real) }
}

async function fetchHttp(url: URL, modality: Modality, param: string): Promise<MediaBytes> {
  const timeout = FETCH_TIMEOUT_MS[modality]
  const ac = new AbortController()
  const timer = setTimeout(() => ac.abort(), timeout)
  try {
    let res: Response
    try {
      res = await fetch(url, { signal: ac.signal })
    } catch (err) {
      if (ac.signal.aborted) throw new MediaError(`fetching the ${modality} timed out after ${timeout / 1000} s`, 504, param)
      throw new MediaError(`cannot reach media host ${url.host}: ${(err as Error).message}`, 422, param)
    }
    if (!res.ok) {
      const status = res.status >= 500 || res.status === 408 || res.status === 429 ? 502 : 422
      throw new MediaError(`media host ${url.host} answered HTTP ${res.status}`, status, param)
    }
    const cap = MAX_BYTES[modality]
    const chunks: Buffer[] = []
    let size = 0
    const reader = res.body?.getReader()
    if (reader) {
      for (;;) {
        let r: Awaited<ReturnType<typeof reader.read>>
        try {
          r = await reader.read()
        } catch {
          if (ac.signal.aborted) throw new MediaError(`fetching the ${modality} timed out after ${timeout / 1000} s`, 504, param)
          throw new MediaError(`media host ${url.host} closed the connection early`, 422, param)
        }
        if (r.done) break
        size += r.value.byteLength
        if (size > cap) {
          await reader.cancel().catch(() => {})
          throw new MediaError(`the ${modality} at ${url.host} is larger than ${cap} bytes`, 413, param)
        }
        chunks.push(Buffer.from(r.value))
      }
    }
    return { data: Buffer.concat(chunks), mimeType: res.headers.get('content-type') ?? undefined }
  } finally {
    clearTimeout(timer)
  }
}

/** Bytes behind a media URL. */
export async function loadUrl(raw: string, modality: Modality, opts: SourceOptions, param: string): Promise<MediaBytes> {
  if (raw.startsWith('data:')) return decodeDataUrl(raw, param)
  let url: URL
  try {
    url = new URL(raw)
  } catch {
    throw new MediaError(`${param}: not a valid URL`, 400, param)
  }
  switch (url.protocol) {
    case 'file:':
      return readLocal(url, modality, opts, param)
    case 'http:':
    case 'https:':
      return fetchHttp(url, modality, param)
    default:
      throw new MediaError(`${param}: URL scheme ${url.protocol} is not supported (http, https, data, file)`, 400, param)
  }
}
