/**
 * Media URLs -> bytes: `data:` (base64 only), `file:` (only under an
 * allowed local directory, after resolving symlinks and `..`) and http(s)
 * through the hardened fetcher in fetch.ts. Any other scheme is refused.
 */

import { realpath, readFile, stat } from 'node:fs/promises'
import { isAbsolute, relative, sep } from 'node:path'
import { fileURLToPath } from 'node:url'

import { MediaError } from '../errors.js'
import { MAX_BYTES, fetchHttp } from './fetch.js'
import type { FetchOptions } from './fetch.js'
import type { Modality } from './types.js'

export interface SourceOptions extends FetchOptions {
  /** Directory `file:` URLs may read from; without it `file:` is refused. */
  allowedLocalMediaPath?: string
}

/** A fetched or decoded media payload with what its source says about its format. */
export interface MediaBytes {
  data: Buffer
  /** MIME type from the data: URL or the HTTP response, if any. */
  mimeType?: string
}

/** Standard or URL-safe base64, padded or not (a lone trailing character can encode nothing). */
function isBase64(s: string): boolean {
  return s.length > 0 && /^[A-Za-z0-9+/_-]*={0,2}$/.test(s) && s.replace(/=+$/, '').length % 4 !== 1
}

/** Bytes of a `data:` URL (base64 payloads only). */
export function decodeDataUrl(url: string, param: string): MediaBytes {
  const comma = url.indexOf(',')
  if (comma < 0) throw new MediaError(`${param}: malformed data: URL (no comma)`, 400, param)
  const meta = url.slice(5, comma)
  const parts = meta.split(';')
  if (!parts.includes('base64')) throw new MediaError(`${param}: only base64 data: URLs are supported`, 400, param)
  const payload = url.slice(comma + 1).trim()
  if (!isBase64(payload)) throw new MediaError(`${param}: the data: URL is not valid base64`, 400, param)
  return { data: Buffer.from(payload, 'base64'), mimeType: parts[0] || undefined }
}

/** Decode a plain base64 string (OpenAI's input_audio.data). */
export function decodeBase64(text: string, param: string): Buffer {
  const s = text.trim()
  if (!isBase64(s)) throw new MediaError(`${param} is not valid base64`, 400, param)
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
    throw new MediaError(`${param}: the ${modality} file is larger than the ${MAX_BYTES[modality] / 1e6} MB limit`, 413, param)
  }
  return { data: await readFile(real) }
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
      return fetchHttp(url, modality, opts, param)
    default:
      throw new MediaError(`${param}: URL scheme ${url.protocol} is not supported (http, https, data, file)`, 400, param)
  }
}
