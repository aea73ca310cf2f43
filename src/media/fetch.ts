/**
 * http(s) media fetching, safe to expose to the internet:
 * - an exact-host allow-list (`allowedMediaDomains`), checked on the first
 *   request and again on every redirect hop;
 * - redirects followed by hand, at most {@link MAX_REDIRECTS} hops, or none
 *   with CANDELA_MEDIA_URL_ALLOW_REDIRECTS=0 (or vLLM's VLLM_MEDIA_URL_ALLOW_REDIRECTS=0);
 * - private-network protection (on unless `allowPrivateMediaUrls`): every
 *   address the host resolves to must be public, and the socket connects to
 *   the address that was checked (a pinned lookup), so a DNS answer that
 *   changes between the check and the connect (rebinding) cannot reach
 *   inside;
 * - one deadline per item across all hops and the body, and a size cap
 *   enforced while the body streams in.
 * Errors name the host, never the URL (its query string may hold secrets).
 */

import { lookup as dnsLookup } from 'node:dns/promises'
import type { IncomingMessage } from 'node:http'
import { request as httpRequest } from 'node:http'
import { request as httpsRequest } from 'node:https'
import type { LookupFunction } from 'node:net'

import { MediaError } from '../errors.js'
import { blockedReason, isIpLiteral } from './address.js'
import type { Modality } from './types.js'

/** A resolved address, as `dns.lookup(host, { all: true })` gives them. */
export interface ResolvedAddress {
  address: string
  family: number
}

/** Host name -> addresses. The default is the system resolver (`dns.lookup`). */
export type MediaHostResolver = (hostname: string) => Promise<ResolvedAddress[]>

/** What an http(s) media fetch may do. */
export interface FetchOptions {
  /** Exact host names media may come from (checked on every redirect hop); unset allows any. */
  allowedMediaDomains?: readonly string[]
  /** Allow loopback, private, link-local... addresses (off: refused). */
  allowPrivateMediaUrls?: boolean
  /** Resolve host names with this instead of the system resolver (tests, custom DNS). */
  resolveMediaHost?: MediaHostResolver
  /** Aborts the fetch (the request was cancelled). */
  signal?: AbortSignal
  /** The request's running total of fetched bytes (one per request). */
  requestBytes?: RequestBytes
}

/** Default of the per-request total of fetched media bytes (CANDELA_MAX_REQUEST_MEDIA_BYTES). */
export const DEFAULT_MAX_REQUEST_MEDIA_BYTES = 256e6

/**
 * What one request's media URLs have fetched so far: many small requests'
 * worth of downloads must not arrive in one request (20 image URLs x 20 MB).
 */
export class RequestBytes {
  #used = 0
  readonly limit: number

  constructor(limit?: number) {
    const env = Number(process.env.CANDELA_MAX_REQUEST_MEDIA_BYTES)
    this.limit = limit ?? (Number.isFinite(env) && env > 0 ? env : DEFAULT_MAX_REQUEST_MEDIA_BYTES)
  }

  /** Count `n` more bytes; past the limit, a 413 with both numbers. */
  add(n: number, param: string): void {
    this.#used += n
    if (this.#used > this.limit) {
      throw new MediaError(
        `${param}: the request's media URLs add up to more than ${this.limit / 1e6} MB (the per-request limit, CANDELA_MAX_REQUEST_MEDIA_BYTES); send fewer or smaller items`,
        413,
        param,
      )
    }
  }
}

export const MAX_REDIRECTS = 5

/** Per-modality size caps, in bytes. */
export const MAX_BYTES: Record<Modality, number> = { image: 20e6, audio: 25e6, video: 200e6 }

const TIMEOUT_ENV: Record<Modality, [string, number]> = {
  image: ['CANDELA_IMAGE_FETCH_TIMEOUT', 5],
  video: ['CANDELA_VIDEO_FETCH_TIMEOUT', 30],
  audio: ['CANDELA_AUDIO_FETCH_TIMEOUT', 10],
}

/**
 * An env var by candela's name, or else by vLLM's (`VLLM_IMAGE_FETCH_TIMEOUT`
 * for `CANDELA_IMAGE_FETCH_TIMEOUT`), so a vLLM deployment's settings carry
 * over. Returns the value and the name it was read from.
 */
function envAlias(name: string): { value: string | undefined; env: string } {
  const vllm = name.replace(/^CANDELA_/, 'VLLM_')
  if (process.env[name] !== undefined) return { value: process.env[name], env: name }
  if (process.env[vllm] !== undefined) return { value: process.env[vllm], env: vllm }
  return { value: undefined, env: name }
}

/** The fetch timeout of a modality in seconds, and the env var that sets it (read per fetch). */
export function fetchTimeout(modality: Modality): { seconds: number; env: string } {
  const [name, fallback] = TIMEOUT_ENV[modality]
  const { value, env } = envAlias(name)
  const v = Number(value)
  return { seconds: value !== undefined && Number.isFinite(v) && v > 0 ? v : fallback, env }
}

function redirectsAllowed(): boolean {
  const v = (envAlias('CANDELA_MEDIA_URL_ALLOW_REDIRECTS').value ?? '').trim().toLowerCase()
  return !['0', 'false', 'no', 'off'].includes(v)
}

const REDIRECTS = new Set([301, 302, 303, 307, 308])

/** The host as the allow-list and messages see it: lower case, no brackets, no trailing dot. */
function hostOf(url: URL): string {
  return url.hostname.replace(/^\[|\]$/g, '').replace(/\.$/, '').toLowerCase()
}

/**
 * Where the socket for `url` connects (undefined: to the IP literal in it),
 * or a MediaError saying why nowhere. Names are resolved here, once per hop,
 * even with the protection off, so the hook is the only resolver.
 */
async function checkedAddress(url: URL, opts: FetchOptions, param: string, via: string, signal: AbortSignal): Promise<ResolvedAddress | undefined> {
  const host = hostOf(url)
  const allowed = opts.allowedMediaDomains
  if (allowed !== undefined && !allowed.some((d) => d.replace(/\.$/, '').toLowerCase() === host)) {
    throw new MediaError(`${param}: media host ${host}${via} is not in the allowed media domains (--allowed-media-domains)`, 400, param)
  }
  const guard = opts.allowPrivateMediaUrls !== true
  if (isIpLiteral(host)) {
    const why = guard ? blockedReason(host) : undefined
    if (why) throw blockedError(host, why, via, param)
    return undefined // the socket connects to the literal itself
  }
  let addresses: ResolvedAddress[]
  try {
    addresses = await untilAborted((opts.resolveMediaHost ?? ((h) => dnsLookup(h, { all: true, verbatim: true })))(host), signal)
  } catch (err) {
    if (signal.aborted) throw err
    throw new MediaError(`${param}: cannot resolve media host ${host}${via}`, 422, param)
  }
  if (addresses.length === 0) throw new MediaError(`${param}: cannot resolve media host ${host}${via}`, 422, param)
  // Refuse the host if any of its addresses is private: which one a client
  // picks is not ours to predict, and a mixed answer is a rebinding tell.
  for (const a of guard ? addresses : []) {
    const why = blockedReason(a.address)
    if (why) throw blockedError(host, why, via, param)
  }
  return addresses[0]
}

/** `p`, or a rejection as soon as `signal` aborts (a resolver that hangs must not outlive the deadline). */
export function untilAborted<T>(p: Promise<T>, signal: AbortSignal): Promise<T> {
  return new Promise<T>((resolve, reject) => {
    const abort = (): void => reject(signal.reason)
    if (signal.aborted) return abort()
    signal.addEventListener('abort', abort, { once: true })
    p.then(resolve, reject).finally(() => signal.removeEventListener('abort', abort))
  })
}

function blockedError(host: string, why: string, via: string, param: string): MediaError {
  return new MediaError(
    `${param}: media host ${host}${via} is a ${why} address; media URLs that reach private networks are refused (start with --allow-private-media-urls, or load with allowPrivateMediaUrls: true, to allow them)`,
    400,
    param,
  )
}

/** A lookup that answers the checked address whatever it is asked. */
function pinnedLookup(a: ResolvedAddress): LookupFunction {
  return ((_host: string, options: { all?: boolean }, cb: (...args: unknown[]) => void) => {
    if (options?.all) cb(null, [{ address: a.address, family: a.family }])
    else cb(null, a.address, a.family)
  }) as unknown as LookupFunction
}

/** One GET, resolving when the response head arrives. */
function get(url: URL, pinned: ResolvedAddress | undefined, signal: AbortSignal): Promise<IncomingMessage> {
  return new Promise((resolve, reject) => {
    const request = url.protocol === 'https:' ? httpsRequest : httpRequest
    const req = request(url, {
      method: 'GET',
      agent: false,
      signal,
      headers: { 'accept-encoding': 'identity', 'user-agent': 'candela-media-fetch' },
      ...(pinned ? { lookup: pinnedLookup(pinned) } : {}),
    })
    req.once('response', resolve)
    req.once('error', reject)
    req.end()
  })
}

/** Upstream status -> our status: timeouts 504, overload and server errors 502, the rest 422. */
function upstreamStatus(code: number): number {
  if (code === 408 || code === 504) return 504
  if (code === 429 || code >= 500) return 502
  return 422
}

/** Bytes behind an http(s) URL, within the policy's limits. */
export async function fetchHttp(
  start: URL,
  modality: Modality,
  opts: FetchOptions,
  param: string,
): Promise<{ data: Buffer; mimeType?: string }> {
  const timeout = fetchTimeout(modality)
  const deadline = AbortSignal.timeout(timeout.seconds * 1000)
  const signal = opts.signal ? AbortSignal.any([deadline, opts.signal]) : deadline
  const cap = MAX_BYTES[modality]
  const timedOut = (host: string): MediaError =>
    deadline.aborted
      ? new MediaError(`${param}: fetching the ${modality} from ${host} timed out after ${timeout.seconds} s (${timeout.env})`, 504, param)
      : new MediaError(`${param}: the request was cancelled while fetching its ${modality}`, 400, param)

  let url = start
  let from: string | undefined // the host that redirected here
  for (let hop = 0; ; hop++) {
    const host = hostOf(url)
    if (url.protocol !== 'http:' && url.protocol !== 'https:') {
      throw new MediaError(`${param}: media host ${from} redirected to a ${url.protocol} URL; only http and https are followed`, 400, param)
    }
    const via = from === undefined ? '' : ` (redirected from ${from})`
    let pinned: ResolvedAddress | undefined
    try {
      pinned = await checkedAddress(url, opts, param, via, signal)
    } catch (err) {
      if (signal.aborted) throw timedOut(host)
      throw err
    }
    let res: IncomingMessage
    try {
      res = await get(url, pinned, signal)
    } catch (err) {
      if (signal.aborted) throw timedOut(host)
      const code = (err as NodeJS.ErrnoException).code
      throw new MediaError(`${param}: cannot reach media host ${host}${code ? ` (${code})` : ''}`, 422, param)
    }
    const status = res.statusCode ?? 0
    if (REDIRECTS.has(status)) {
      res.destroy()
      const location = res.headers.location
      if (!redirectsAllowed()) {
        throw new MediaError(`${param}: media host ${host} answered with a redirect, and redirects are off (CANDELA_MEDIA_URL_ALLOW_REDIRECTS=0)`, 422, param)
      }
      if (hop >= MAX_REDIRECTS) {
        throw new MediaError(`${param}: media host ${host} redirected more than ${MAX_REDIRECTS} times`, 422, param)
      }
      let next: URL
      try {
        next = new URL(location ?? '', url)
        if (!location) throw new Error('no Location')
      } catch {
        throw new MediaError(`${param}: media host ${host} sent a redirect without a valid Location`, 422, param)
      }
      from = host
      url = next
      continue
    }
    if (status < 200 || status >= 300) {
      res.destroy()
      throw new MediaError(`${param}: media host ${host} answered HTTP ${status}`, upstreamStatus(status), param)
    }
    const declared = Number(res.headers['content-length'])
    if (Number.isFinite(declared) && declared > cap) {
      res.destroy()
      throw tooLarge(modality, host, cap, param)
    }
    const chunks: Buffer[] = []
    let size = 0
    try {
      for await (const chunk of res as AsyncIterable<Buffer>) {
        size += chunk.byteLength
        if (size > cap) {
          res.destroy()
          throw tooLarge(modality, host, cap, param)
        }
        try {
          opts.requestBytes?.add(chunk.byteLength, param)
        } catch (err) {
          res.destroy()
          throw err
        }
        chunks.push(chunk)
      }
    } catch (err) {
      if (err instanceof MediaError) throw err
      if (signal.aborted) throw timedOut(host)
      throw new MediaError(`${param}: media host ${host} closed the connection before the ${modality} was complete`, 422, param)
    }
    if (!res.complete) {
      throw new MediaError(`${param}: media host ${host} closed the connection before the ${modality} was complete`, 422, param)
    }
    const mimeType = res.headers['content-type']
    return { data: Buffer.concat(chunks), ...(mimeType ? { mimeType } : {}) }
  }
}

function tooLarge(modality: Modality, host: string, cap: number, param: string): MediaError {
  return new MediaError(`${param}: the ${modality} from ${host} is larger than the ${cap / 1e6} MB limit`, 413, param)
}
