/**
 * Media URLs through the HTTP server with the official `openai` client, on
 * the qwen2-vl-tiny fixture: the fetches of one request run together, a slow
 * media server stalls nobody else, uuids spare refetches, decompression bombs
 * and blocked hosts are refused, and upstream failures keep their statuses.
 * The media server runs on 127.0.0.1; the "open" candela server reaches it
 * through a resolver hook (media.test) with private addresses allowed, the
 * default one refuses it.
 */

import test from 'ava'
import { readFileSync } from 'node:fs'
import { join } from 'node:path'
import OpenAI from 'openai'

import { fixture } from './helpers.js'
import { fakeDns, pngHeaderOnly, serve, startMediaServer } from './media-server.js'
import type { MediaServer } from './media-server.js'
import { extra, parsePrometheus, startTestServer } from './server-helpers.js'
import type { TestServer } from './server-helpers.js'

type Part = OpenAI.Chat.Completions.ChatCompletionContentPart
type Message = OpenAI.Chat.Completions.ChatCompletionMessageParam

const dir = fixture('qwen2-vl-tiny')
const imageA = readFileSync(join(dir, 'image_a.png'))
const imageB = readFileSync(join(dir, 'image_b.png'))
const params = extra({ model: 'tiny-vl', max_tokens: 4, temperature: 0, ignore_eos: true, mm_processor_kwargs: { max_pixels: 28 * 28 * 4 } })
const image = (url: string, uuid?: string): Part => ({ type: 'image_url', image_url: { url }, ...(uuid ? { uuid } : {}) }) as Part
const ask = (...parts: Part[]): Message[] => [{ role: 'user', content: [...parts, { type: 'text', text: 'Describe.' }] }]

let media: MediaServer
let open: TestServer
let closed: TestServer
/** Resolves the held /held/* requests once all 16 are in (or after 4 s). */
let releaseHeld: () => void = () => {}
const held = new Promise<void>((r) => (releaseHeld = r))
let releaseHang: () => void = () => {}
const hang = new Promise<void>((r) => (releaseHang = r))

test.before(async () => {
  const routes: Parameters<typeof startMediaServer>[0] = {
    '/a.png': serve(imageA, 'image/png'),
    '/counted.png': serve(imageB, 'image/png'),
    '/bomb.png': serve(pngHeaderOnly(40000, 40000), 'image/png'),
    '/missing.png': (_req, res) => res.writeHead(404).end(),
    '/busy.png': (_req, res) => res.writeHead(500).end(),
    '/slow.png': () => {},
    '/hang.png': async (_req, res) => {
      await hang
      serve(imageA, 'image/png')(_req, res)
    },
  }
  for (let i = 0; i < 16; i++) {
    routes[`/held/${i}.png`] = async (req, res) => {
      if (media.inFlight >= 16) releaseHeld()
      await Promise.race([held, new Promise((r) => setTimeout(r, 4000))])
      serve(i % 2 ? imageA : imageB, 'image/png')(req, res)
    }
  }
  media = await startMediaServer(routes)
  const load = { model: dir, dtype: 'f32' as const, maxModelLen: 2048, limitMmPerPrompt: { image: 16 } }
  const dns = fakeDns({ 'media.test': ['127.0.0.1'], 'other.test': ['127.0.0.1'] })
  open = await startTestServer({
    load: { ...load, allowPrivateMediaUrls: true, allowedMediaDomains: ['media.test'], resolveMediaHost: dns.resolve },
    servedModelName: 'tiny-vl',
  })
  closed = await startTestServer({ load, servedModelName: 'tiny-vl' })
})
test.after.always(async () => {
  releaseHeld()
  releaseHang()
  await open?.server.close()
  await closed?.server.close()
  await media?.close()
})

const at = (path: string, host = 'media.test'): string => `http://${host}:${media.port}${path}`

async function apiError(t: import('ava').ExecutionContext, p: Promise<unknown>, status: number, pattern: RegExp): Promise<void> {
  const err = await t.throwsAsync(p)
  t.true(err instanceof OpenAI.APIError, String(err))
  t.is((err as InstanceType<typeof OpenAI.APIError>).status, status, err?.message)
  t.regex(err!.message, pattern)
}

test.serial('the 16 fetches of one request are in flight together', async (t) => {
  const parts = Array.from({ length: 16 }, (_, i) => image(at(`/held/${i}.png`)))
  const res = await open.client.chat.completions.create({ ...params, messages: ask(...parts) })
  t.is(res.choices[0]!.finish_reason, 'length')
  t.is(media.maxInFlight, 16)
})

test.serial('a slow media server stalls neither the engine nor other requests', async (t) => {
  let slowDone = false
  const slow = open.client.chat.completions.create({ ...params, messages: ask(image(at('/hang.png'))) }).then((r) => {
    slowDone = true
    return r
  })
  // Wait until the hanging fetch has reached the media server.
  for (let i = 0; i < 100 && (media.hits.get('/hang.png') ?? 0) === 0; i++) await new Promise((r) => setTimeout(r, 20))
  const text = await open.client.chat.completions.create({ ...params, messages: [{ role: 'user', content: 'Hello' }] })
  t.is(text.choices[0]!.finish_reason, 'length')
  const withImage = await open.client.chat.completions.create({ ...params, messages: ask(image(at('/a.png'))) })
  t.is(withImage.choices[0]!.finish_reason, 'length')
  t.false(slowDone, 'the slow request was still waiting for its image')
  releaseHang()
  t.is((await slow).choices[0]!.finish_reason, 'length')
})

test.serial('a uuid spares the refetch while the caches hold it; without one every request fetches, and the content hash still hits', async (t) => {
  const metric = async (name: string) =>
    parsePrometheus(await (await fetch(`${open.base}/metrics`)).text()).samples.find((x) => x.name === name)?.value ?? 0
  const hits = () => media.hits.get('/counted.png') ?? 0
  const first = await open.client.chat.completions.create({ ...params, messages: ask(image(at('/counted.png'), 'pic-1')) })
  t.is(hits(), 1)
  const again = await open.client.chat.completions.create({ ...params, messages: ask(image(at('/counted.png'), 'pic-1')) })
  t.is(hits(), 1, 'the uuid was served from the caches')
  t.is(again.choices[0]!.message.content, first.choices[0]!.message.content)
  await open.client.chat.completions.create({ ...params, messages: ask(image(at('/counted.png'))) })
  t.is(hits(), 2)
  const runs = await metric('candela_encoder_runs_total')
  await open.client.chat.completions.create({ ...params, messages: ask(image(at('/counted.png'))) })
  t.is(hits(), 3, 'no uuid: fetched again')
  t.is(await metric('candela_encoder_runs_total'), runs, 'same bytes: the encoder cache hit')
})

test('a PNG declaring 40000×40000 pixels is refused from its header', async (t) => {
  const rss = process.memoryUsage().rss
  await apiError(t, open.client.chat.completions.create({ ...params, messages: ask(image(at('/bomb.png'))) }), 400, /40000x40000 = 1600000000 pixels.*decompression bomb/)
  // 40000² RGB would be 4.8 GB; nothing near that was touched.
  t.true(process.memoryUsage().rss - rss < 512e6)
})

test('blocked hosts and domains are 400s; upstream failures 422 / 502; a timeout 504', async (t) => {
  await apiError(t, closed.client.chat.completions.create({ ...params, messages: ask(image(`${media.base}/a.png`)) }), 400, /127\.0\.0\.1 is a loopback address/)
  await apiError(t, open.client.chat.completions.create({ ...params, messages: ask(image(at('/a.png', 'other.test'))) }), 400, /other\.test is not in the allowed media domains/)
  await apiError(t, open.client.chat.completions.create({ ...params, messages: ask(image(at('/missing.png?sig=abc'))) }), 422, /media host media\.test answered HTTP 404/)
  await apiError(t, open.client.chat.completions.create({ ...params, messages: ask(image(at('/busy.png'))) }), 502, /answered HTTP 500/)
  await apiError(t, open.client.chat.completions.create({ ...params, messages: ask(image('data:image/png;base64,@@@')) }), 400, /not valid base64/)
})

test.serial('a media server slower than the image timeout is a 504 naming the modality and the limit', async (t) => {
  process.env.CANDELA_IMAGE_FETCH_TIMEOUT = '0.5'
  try {
    await apiError(t, open.client.chat.completions.create({ ...params, messages: ask(image(at('/slow.png'))) }), 504, /image from media\.test timed out after 0\.5 s \(CANDELA_IMAGE_FETCH_TIMEOUT\)/)
  } finally {
    delete process.env.CANDELA_IMAGE_FETCH_TIMEOUT
  }
})
