/**
 * Media URLs -> bytes: `data:` (base64 only), `file:` (only under an
 * allowed local directory, after resolving symlinks and `..`) and http(s)
 * through the hardened fetcher in fetch.ts. Any other scheme is refused.
 * Local files must be regular files; they are read within the modality's
 * fetch deadline.
 */

import { constants } from 'node:fs'
import { open, realpath } from 'node:fs/promises'
import { isAbsolute, relative, sep } from 'node:path'
import { fileURLToPath } from 'node:url'

import { MediaError } from '../errors.js'
import { MAX_BYTES, fetchHttp, fetchTimeout, untilAborted } from './fetch.js'
import type { FetchOptions, RequestBytes } from './fetch.js'
import { Slots } from './slots.js'
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
  if (payload === '') throw new MediaError(`${param}: the data: URL is empty (no bytes after the comma)`, 400, param)
  if (!isBase64(payload)) throw new MediaError(`${param}: the data: URL is not valid base64`, 400, param)
  return { data: Buffer.from(payload, 'base64'), mimeType: parts[0] || undefined }
}

/** Decode a plain base64 string (OpenAI's input_audio.data). */
export function decodeBase64(text: string, param: string): Buffer {
  const s = text.trim()
  if (s === '') throw new MediaError(`${param} is empty`, 400, param)
  if (!isBase64(s)) throw new MediaError(`${param} is not valid base64`, 400, param)
  return Buffer.from(s, 'base64')
}

/**
 * File system calls run on libuv's thread pool (4 threads unless
 * UV_THREADPOOL_SIZE says otherwise), which `dns.lookup` shares: file reads
 * hold at most this many of its threads, so a slow disk cannot stop fetches
 * from resolving their hosts.
 */
const FILE_SLOTS = new Slots(2)
/** Read size: one pool job per MiB, so a deadline is noticed between reads. */
const READ_CHUNK = 1 << 20
/** A FIFO or device opens without waiting for a writer; symlinks were resolved before the open. */
const OPEN_FLAGS = constants.O_RDONLY | (constants.O_NONBLOCK ?? 0) | (constants.O_NOFOLLOW ?? 0)

async function readLocal(url: URL, modality: Modality, opts: SourceOptions, param: string): Promise<MediaBytes> {
  const root = opts.allowedLocalMediaPath
  if (!root) {
    throw new MediaError(`${param}: file: URLs are disabled (set allowedLocalMediaPath / --allowed-local-media-path)`, 400, param)
  }
  const timeout = fetchTimeout(modality)
  const deadline = AbortSignal.timeout(timeout.seconds * 1000)
  const signal = opts.signal ? AbortSignal.any([deadline, opts.signal]) : deadline
  const stopped = (): MediaError =>
    deadline.aborted
      ? new MediaError(`${param}: reading the local ${modality} file timed out after ${timeout.seconds} s (${timeout.env})`, 504, param)
      : new MediaError(`${param}: the request was cancelled while reading its ${modality}`, 400, param)
  let release: () => void
  try {
    release = await FILE_SLOTS.acquire(signal)
  } catch {
    throw stopped()
  }
  // The slot is held until the file calls return, even when the deadline
  // answers the request first: a call stuck on the disk still holds a thread.
  const work = readAllowedFile(root, fileURLToPath(url), MAX_BYTES[modality], modality, param, signal, opts.requestBytes).finally(release)
  try {
    return { data: await untilAborted(work, signal) }
  } catch (err) {
    if (err instanceof MediaError) throw err
    if (signal.aborted) throw stopped()
    throw new MediaError(`${param}: cannot read the local media file (${(err as NodeJS.ErrnoException).code ?? 'error'})`, 422, param)
  }
}

async function readAllowedFile(
  root: string,
  path: string,
  cap: number,
  modality: Modality,
  param: string,
  signal: AbortSignal,
  requestBytes: RequestBytes | undefined,
): Promise<Buffer> {
  let real: string
  let base: string
  try {
    base = await realpath(root)
    real = await realpath(path)
  } catch {
    throw new MediaError(`${param}: local media file not found`, 400, param)
  }
  const rel = relative(base, real)
  if (rel === '' || rel.startsWith('..' + sep) || rel === '..' || isAbsolute(rel)) {
    throw new MediaError(`${param}: the file lies outside the allowed local media path`, 400, param)
  }
  const fh = await open(real, OPEN_FLAGS)
  try {
    const st = await fh.stat()
    if (!st.isFile()) throw new MediaError(`${param}: the local media path is not a regular file`, 400, param)
    if (st.size > cap) throw tooLargeFile(modality, cap, param)
    requestBytes?.add(st.size, param)
    // Read to EOF (the file may have changed since stat), never past the cap.
    const chunks: Buffer[] = []
    let size = 0
    for (;;) {
      if (signal.aborted) throw signal.reason
      const buf = Buffer.allocUnsafe(Math.min(READ_CHUNK, cap + 1 - size))
      const { bytesRead } = await fh.read(buf, 0, buf.length, size)
      if (bytesRead === 0) break
      size += bytesRead
      if (size > cap) throw tooLargeFile(modality, cap, param)
      chunks.push(bytesRead === buf.length ? buf : buf.subarray(0, bytesRead))
    }
    return Buffer.concat(chunks, size)
  } finally {
    await fh.close()
  }
}

function tooLargeFile(modality: Modality, cap: number, param: string): MediaError {
  return new MediaError(`${param}: the ${modality} file is larger than the ${cap / 1e6} MB limit`, 413, param)
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
  const load = {
    'file:': readLocal,
    'http:': fetchHttp,
    'https:': fetchHttp,
  }[url.protocol]
  if (load === undefined) {
    throw new MediaError(`${param}: URL scheme ${url.protocol} is not supported (http, https, data, file)`, 400, param)
  }
  return load(url, modality, opts, param)
}
