/**
 * The media fetcher on its own (src/media/source.ts, fetch.ts, address.ts):
 * allowed domains and redirects, private-network protection with a resolver
 * hook, timeouts, size caps while streaming, upstream error mapping, data:
 * and file: URLs. Every server runs on 127.0.0.1, started here.
 */

import test from 'ava'
import fc from 'fast-check'
import { mkdirSync, symlinkSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { pathToFileURL } from 'node:url'

import { MediaError } from '../dist/errors.js'
import { blockedReason } from '../dist/media/address.js'
import { loadUrl } from '../dist/media/source.js'
import type { SourceOptions } from '../dist/media/source.js'
import { tempDir } from './helpers.js'
import { fakeDns, redirect, serve, startMediaServer } from './media-server.js'
import type { MediaServer } from './media-server.js'

const PNG = Buffer.from('89504e470d0a1a0a', 'hex')
let m: MediaServer
const sent = { bytes: 0, closedEarly: false }

test.before(async () => {
  m = await startMediaServer({
    '/cat.png': serve(PNG, 'image/png'),
    '/to-cat': redirect('/cat.png'),
    '/loop': redirect('/loop', 301),
    '/to-denied': (_req, res) => res.writeHead(307, { location: `http://denied.test:${m.port}/cat.png` }).end(),
    '/to-ftp': redirect('ftp://files.test/cat.png'),
    '/missing': (_req, res) => res.writeHead(404).end(),
    '/busy': (_req, res) => res.writeHead(503).end(),
    '/slow-down': (_req, res) => res.writeHead(429).end(),
    '/upstream-timeout': (_req, res) => res.writeHead(504).end(),
    '/slow': () => {}, // never answers
    '/big-declared': (_req, res) => {
      res.writeHead(200, { 'content-length': String(30e6) })
      res.write(Buffer.alloc(1024))
    },
    '/endless': (req, res) => {
      // No Content-Length: only counting while streaming can stop it.
      res.writeHead(200, { 'content-type': 'audio/wav' })
      const chunk = Buffer.alloc(1 << 20)
      const pump = (): void => {
        while (sent.bytes < 100e6 && !res.destroyed) {
          sent.bytes += chunk.length
          if (!res.write(chunk)) return void res.once('drain', pump)
        }
        res.end()
      }
      req.socket.once('close', () => (sent.closedEarly = sent.bytes < 100e6))
      pump()
    },
  })
})
test.after.always(async () => {
  await m?.close()
})

/** A policy reaching the test server by name: `media.test` -> 127.0.0.1. */
const dns = (): ReturnType<typeof fakeDns> =>
  fakeDns({ 'media.test': ['127.0.0.1'], 'denied.test': ['127.0.0.1'], 'files.test': ['127.0.0.1'] })
const open = (extra: Partial<SourceOptions> = {}): SourceOptions => ({ allowPrivateMediaUrls: true, resolveMediaHost: dns().resolve, ...extra })
const url = (host: string, path: string): string => `http://${host}:${m.port}${path}`

async function refused(t: import('ava').ExecutionContext, p: Promise<unknown>, status: number, pattern: RegExp): Promise<MediaError> {
  const err = await t.throwsAsync(p)
  t.true(err instanceof MediaError, String(err))
  const e = err as MediaError
  t.is(e.status, status, e.message)
  t.regex(e.message, pattern)
  return e
}

test('a host on the allow-list is fetched; the redirect inside it too', async (t) => {
  const opts = open({ allowedMediaDomains: ['media.test'] })
  const got = await loadUrl(url('media.test', '/cat.png'), 'image', opts, 'p')
  t.deepEqual(got.data, PNG)
  t.is(got.mimeType, 'image/png')
  t.deepEqual((await loadUrl(url('media.test', '/to-cat'), 'image', opts, 'p')).data, PNG)
})

test('a host off the allow-list is a 400 naming it, before any request', async (t) => {
  const before = m.hits.get('/cat.png') ?? 0
  await refused(t, loadUrl(url('denied.test', '/cat.png'), 'image', open({ allowedMediaDomains: ['media.test'] }), 'p'), 400, /denied\.test is not in the allowed media domains/)
  t.is(m.hits.get('/cat.png') ?? 0, before)
})

test('a redirect to a denied host is refused at that hop', async (t) => {
  await refused(t, loadUrl(url('media.test', '/to-denied'), 'image', open({ allowedMediaDomains: ['media.test'] }), 'p'), 400, /denied\.test \(redirected from media\.test\) is not in the allowed media domains/)
})

test('a redirect loop stops after 5 hops; a redirect to ftp: is refused', async (t) => {
  const before = m.hits.get('/loop') ?? 0
  await refused(t, loadUrl(url('media.test', '/loop'), 'image', open(), 'p'), 422, /redirected more than 5 times/)
  t.is((m.hits.get('/loop') ?? 0) - before, 6)
  await refused(t, loadUrl(url('media.test', '/to-ftp'), 'image', open(), 'p'), 400, /redirected to a ftp: URL/)
})

test.serial('CANDELA_MEDIA_URL_ALLOW_REDIRECTS=0 turns redirects off', async (t) => {
  process.env.CANDELA_MEDIA_URL_ALLOW_REDIRECTS = '0'
  try {
    await refused(t, loadUrl(url('media.test', '/to-cat'), 'image', open(), 'p'), 422, /redirects are off/)
  } finally {
    delete process.env.CANDELA_MEDIA_URL_ALLOW_REDIRECTS
  }
})

test('private addresses are refused by default, IPv4-mapped IPv6 included; the opt-out reaches them', async (t) => {
  const before = m.hits.get('/cat.png') ?? 0
  await refused(t, loadUrl(`${m.base}/cat.png`, 'image', {}, 'p'), 400, /127\.0\.0\.1 is a loopback address.*--allow-private-media-urls/)
  await refused(t, loadUrl(`http://[::ffff:127.0.0.1]:${m.port}/cat.png`, 'image', {}, 'p'), 400, /loopback \(IPv4-mapped\)/)
  await refused(t, loadUrl(`http://[::1]:${m.port}/cat.png`, 'image', {}, 'p'), 400, /loopback/)
  await refused(t, loadUrl('http://169.254.169.254/latest/meta-data/', 'image', {}, 'p'), 400, /cloud metadata/)
  // The WHATWG parser turns 0x7f.1 and 2130706433 into 127.0.0.1.
  await refused(t, loadUrl(`http://0x7f.1:${m.port}/cat.png`, 'image', {}, 'p'), 400, /loopback/)
  await refused(t, loadUrl(`http://2130706433:${m.port}/cat.png`, 'image', {}, 'p'), 400, /loopback/)
  t.is(m.hits.get('/cat.png') ?? 0, before, 'no blocked fetch reached the server')
  t.deepEqual((await loadUrl(`${m.base}/cat.png`, 'image', { allowPrivateMediaUrls: true }, 'p')).data, PNG)
})

test('a host name resolving to a private address is refused; mixed answers too', async (t) => {
  const d = fakeDns({ 'inside.test': ['10.1.2.3'], 'mixed.test': ['93.184.216.34', '192.168.1.1'], 'v6.test': ['fd00::5'], 'mapped.test': ['::ffff:10.0.0.1'] })
  const opts = { resolveMediaHost: d.resolve }
  await refused(t, loadUrl('http://inside.test/a.png', 'image', opts, 'p'), 400, /inside\.test is a private address/)
  await refused(t, loadUrl('http://mixed.test/a.png', 'image', opts, 'p'), 400, /mixed\.test is a private address/)
  await refused(t, loadUrl('http://v6.test/a.png', 'image', opts, 'p'), 400, /private \(unique local\)/)
  await refused(t, loadUrl('http://mapped.test/a.png', 'image', opts, 'p'), 400, /private \(IPv4-mapped\)/)
  await refused(t, loadUrl('http://nowhere.test/a.png', 'image', opts, 'p'), 422, /cannot resolve media host nowhere\.test/)
})

test('the socket connects to the address that was checked: one lookup per hop, no second resolution', async (t) => {
  // rebind.test exists only in the hook, and its second answer would be an
  // unroutable address: the fetch succeeds only if the HTTP client connected
  // to the first (checked) answer instead of resolving the name again.
  const calls: string[] = []
  const rebinding = async (h: string) => {
    calls.push(h)
    return [{ address: calls.length === 1 ? '127.0.0.1' : '10.255.255.1', family: 4 }]
  }
  const got = await loadUrl(url('rebind.test', '/cat.png'), 'image', { allowPrivateMediaUrls: true, resolveMediaHost: rebinding }, 'p')
  t.deepEqual(got.data, PNG)
  t.deepEqual(calls, ['rebind.test'])
})

test.serial('a slow server hits the per-modality timeout: 504 naming the modality and the limit', async (t) => {
  const prev = process.env.CANDELA_IMAGE_FETCH_TIMEOUT
  process.env.CANDELA_IMAGE_FETCH_TIMEOUT = '0.3'
  try {
    const e = await refused(t, loadUrl(url('media.test', '/slow'), 'image', open(), 'p'), 504, /fetching the image from media\.test timed out after 0\.3 s \(CANDELA_IMAGE_FETCH_TIMEOUT\)/)
    t.notRegex(e.message, /\/slow/)
  } finally {
    if (prev === undefined) delete process.env.CANDELA_IMAGE_FETCH_TIMEOUT
    else process.env.CANDELA_IMAGE_FETCH_TIMEOUT = prev
  }
})

test.serial("vLLM's env names work as aliases; candela's name wins when both are set", async (t) => {
  const names = ['VLLM_MEDIA_URL_ALLOW_REDIRECTS', 'VLLM_IMAGE_FETCH_TIMEOUT', 'CANDELA_IMAGE_FETCH_TIMEOUT']
  const saved = names.map((n) => process.env[n])
  try {
    process.env.VLLM_MEDIA_URL_ALLOW_REDIRECTS = 'false'
    await refused(t, loadUrl(url('media.test', '/to-cat'), 'image', open(), 'p'), 422, /redirects are off/)
    delete process.env.VLLM_MEDIA_URL_ALLOW_REDIRECTS
    process.env.VLLM_IMAGE_FETCH_TIMEOUT = '0.3'
    await refused(t, loadUrl(url('media.test', '/slow'), 'image', open(), 'p'), 504, /timed out after 0\.3 s \(VLLM_IMAGE_FETCH_TIMEOUT\)/)
    process.env.CANDELA_IMAGE_FETCH_TIMEOUT = '0.2'
    await refused(t, loadUrl(url('media.test', '/slow'), 'image', open(), 'p'), 504, /timed out after 0\.2 s \(CANDELA_IMAGE_FETCH_TIMEOUT\)/)
  } finally {
    names.forEach((n, i) => (saved[i] === undefined ? delete process.env[n] : (process.env[n] = saved[i])))
  }
})

test('an oversized body is cut off while it streams in; a declared oversize is refused at once', async (t) => {
  await refused(t, loadUrl(url('media.test', '/endless'), 'audio', open(), 'p'), 413, /audio from media\.test is larger than the 25 MB limit/)
  await new Promise((r) => setTimeout(r, 100))
  t.true(sent.closedEarly, `the server sent ${sent.bytes} bytes`)
  t.true(sent.bytes < 60e6, `the server sent ${sent.bytes} bytes`)
  await refused(t, loadUrl(url('media.test', '/big-declared'), 'image', open(), 'p'), 413, /image from media\.test is larger than the 20 MB limit/)
})

test('upstream answers map to 422 / 502 / 504 and never show the query string', async (t) => {
  const e = await refused(t, loadUrl(url('media.test', '/missing?token=s3cret'), 'image', open(), 'p'), 422, /media host media\.test answered HTTP 404/)
  t.notRegex(e.message, /s3cret|missing/)
  await refused(t, loadUrl(url('media.test', '/busy'), 'image', open(), 'p'), 502, /HTTP 503/)
  await refused(t, loadUrl(url('media.test', '/slow-down'), 'image', open(), 'p'), 502, /HTTP 429/)
  await refused(t, loadUrl(url('media.test', '/upstream-timeout'), 'image', open(), 'p'), 504, /HTTP 504/)
  // A closed port: unreachable host.
  const closed = await startMediaServer({})
  await closed.close()
  await refused(t, loadUrl(`http://media.test:${closed.port}/x.png?k=v`, 'image', open(), 'p'), 422, /cannot reach media host media\.test \(ECONNREFUSED\)/)
})

test('data: URLs: base64 only, and valid base64', async (t) => {
  t.deepEqual((await loadUrl(`data:image/png;base64,${PNG.toString('base64')}`, 'image', {}, 'p')).data, PNG)
  await refused(t, loadUrl('data:image/png;base64,iVBO*w0K', 'image', {}, 'p'), 400, /not valid base64/)
  await refused(t, loadUrl('data:image/png;base64,iVBORw0KG', 'image', {}, 'p'), 400, /not valid base64/)
  await refused(t, loadUrl('data:image/png,rawbytes', 'image', {}, 'p'), 400, /only base64/)
  await refused(t, loadUrl('gopher://media.test/x', 'image', {}, 'p'), 400, /scheme gopher: is not supported/)
})

test('file: URLs stay inside the allowed directory (.., symlinks out)', async (t) => {
  const root = tempDir('candela-media-')
  const inside = join(root, 'allowed')
  mkdirSync(inside)
  writeFileSync(join(inside, 'ok.png'), PNG)
  writeFileSync(join(root, 'secret.png'), PNG)
  symlinkSync(join(root, 'secret.png'), join(inside, 'link.png'))
  const opts = { allowedLocalMediaPath: inside }
  t.deepEqual((await loadUrl(pathToFileURL(join(inside, 'ok.png')).href, 'image', opts, 'p')).data, PNG)
  await refused(t, loadUrl(`file://${inside}/../secret.png`, 'image', opts, 'p'), 400, /outside the allowed local media path/)
  await refused(t, loadUrl(`file://${inside}/%2e%2e/secret.png`, 'image', opts, 'p'), 400, /outside the allowed local media path/)
  await refused(t, loadUrl(pathToFileURL(join(inside, 'link.png')).href, 'image', opts, 'p'), 400, /outside the allowed local media path/)
  await refused(t, loadUrl(pathToFileURL(join(inside, 'ok.png')).href, 'image', {}, 'p'), 400, /file: URLs are disabled/)
})

test('blockedReason: public addresses pass; every private form of IPv4 and IPv6 is caught', (t) => {
  for (const ok of ['93.184.216.34', '8.8.8.8', '2606:4700:4700::1111', '2a00:1450:4001:82a::200e', '::ffff:8.8.8.8', '64:ff9b::808:808']) {
    t.is(blockedReason(ok), undefined, ok)
  }
  const cases: Array<[string, RegExp]> = [
    ['127.0.0.1', /loopback/],
    ['10.0.0.1', /private/],
    ['172.31.255.255', /private/],
    ['192.168.0.1', /private/],
    ['100.64.0.1', /carrier-grade NAT/],
    ['169.254.1.1', /link-local/],
    ['169.254.169.254', /cloud metadata/],
    ['0.0.0.0', /unspecified/],
    ['224.0.0.251', /multicast/],
    ['255.255.255.255', /reserved/],
    ['::', /unspecified/],
    ['::1', /loopback/],
    ['fe80::1%eth0', /link-local/],
    ['fc00::1', /unique local/],
    ['fd00:ec2::254', /cloud metadata/],
    ['ff02::1', /multicast/],
    ['::ffff:169.254.169.254', /cloud metadata \(IPv4-mapped\)/],
    ['::ffff:7f00:1', /loopback \(IPv4-mapped\)/],
    ['::127.0.0.1', /loopback \(IPv4-compatible\)/],
    ['64:ff9b::a00:1', /private \(NAT64\)/],
    ['2002:c0a8:0101::1', /private \(6to4\)/],
    ['[::1]', /loopback/],
  ]
  for (const [addr, why] of cases) t.regex(blockedReason(addr) ?? 'allowed', why, addr)
  t.is(blockedReason('localhost'), 'not an IP address')
})

test('blockedReason: any address in 10/8, 127/8 or 192.168/16 is blocked in every IPv6 disguise', (t) => {
  const octet = fc.integer({ min: 0, max: 255 })
  fc.assert(
    fc.property(fc.constantFrom(10, 127, 192), octet, octet, octet, (a, b, c, d) => {
      const v4 = [a, a === 192 ? 168 : b, c, d]
      const hex = (i: number) => ((v4[i]! << 8) | v4[i + 1]!).toString(16)
      for (const form of [v4.join('.'), `::ffff:${v4.join('.')}`, `::ffff:${hex(0)}:${hex(2)}`, `64:ff9b::${hex(0)}:${hex(2)}`, `2002:${hex(0)}:${hex(2)}::1`]) {
        if (blockedReason(form) === undefined) return false
      }
      return true
    }),
  )
  t.pass()
})

test.serial('a resolver that never answers is cut off by the same deadline', async (t) => {
  process.env.CANDELA_AUDIO_FETCH_TIMEOUT = '0.2'
  try {
    const never = () => new Promise<Array<{ address: string; family: number }>>(() => {})
    await refused(t, loadUrl('http://stuck.test/a.wav', 'audio', { resolveMediaHost: never }, 'p'), 504, /audio from stuck\.test timed out after 0\.2 s \(CANDELA_AUDIO_FETCH_TIMEOUT\)/)
  } finally {
    delete process.env.CANDELA_AUDIO_FETCH_TIMEOUT
  }
})
