// Hostile and ordinary-but-unexpected input (issue 18): files that are not
// files, shutdown under load, small messages for empty or missing media.
import { execFileSync, spawn } from 'node:child_process'
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs'
import { createServer as createHttpServer } from 'node:http'
import { createServer } from 'node:net'
import type { AddressInfo } from 'node:net'
import { join } from 'node:path'
import { pathToFileURL } from 'node:url'

import test from 'ava'

import { MediaError } from '../dist/errors.js'
import { Slots } from '../dist/media/slots.js'
import { loadUrl } from '../dist/media/source.js'
import { fixture, ROOT, tempDir } from './helpers.js'

const CLI = join(ROOT, 'dist', 'cli.js')
const PNG = Buffer.from('89504e470d0a1a0a0000000d4948445200000001000000010806000000', 'hex')

async function refused(t: import('ava').ExecutionContext, p: Promise<unknown>, status: number, pattern: RegExp): Promise<void> {
  const err = await t.throwsAsync(p)
  t.true(err instanceof MediaError, String(err))
  t.is((err as MediaError).status, status, err?.message)
  t.regex(err!.message, pattern)
}

test.serial('file: a FIFO or a directory under the allowed path is refused at once, and fetches still resolve host names after', async (t) => {
  const root = tempDir('candela-fifo-')
  execFileSync('mkfifo', [join(root, 'fifo.jpg')])
  mkdirSync(join(root, 'dir.jpg'))
  const opts = { allowedLocalMediaPath: root }
  const fifo = pathToFileURL(join(root, 'fifo.jpg')).href
  // More than libuv's 4 pool threads: a blocking open of each once hung every later file read and DNS lookup.
  const all = await Promise.allSettled(Array.from({ length: 8 }, () => loadUrl(fifo, 'image', opts, 'p')))
  for (const r of all) {
    t.is(r.status, 'rejected')
    const err = (r as PromiseRejectedResult).reason as MediaError
    t.is(err.status, 400)
    t.is(err.message, 'p: the local media path is not a regular file')
  }
  await refused(t, loadUrl(pathToFileURL(join(root, 'dir.jpg')).href, 'image', opts, 'p'), 400, /not a regular file/)
  // `localhost` goes through dns.lookup, on the same thread pool; it may
  // answer ::1 or 127.0.0.1 first, so the server listens on both.
  const media = createHttpServer((_req, res) => res.writeHead(200, { 'content-type': 'image/png' }).end(PNG))
  await new Promise<void>((r) => media.listen(0, r))
  try {
    const port = (media.address() as AddressInfo).port
    // A hung pool never answers; a busy test machine may just be slow.
    process.env.CANDELA_IMAGE_FETCH_TIMEOUT = '60'
    const got = await loadUrl(`http://localhost:${port}/a.png`, 'image', { allowPrivateMediaUrls: true }, 'p')
    t.deepEqual(got.data, PNG)
  } finally {
    delete process.env.CANDELA_IMAGE_FETCH_TIMEOUT
    media.closeAllConnections()
    await new Promise((r) => media.close(r))
  }
})

test('file: a regular file is read whole; one over the cap is 413', async (t) => {
  const root = tempDir('candela-file-')
  const big = Buffer.alloc(3 << 20, 7) // three read chunks
  writeFileSync(join(root, 'big.mp4'), big)
  t.deepEqual((await loadUrl(pathToFileURL(join(root, 'big.mp4')).href, 'video', { allowedLocalMediaPath: root }, 'p')).data, big)
  writeFileSync(join(root, 'huge.png'), Buffer.alloc(20e6 + 1))
  await refused(t, loadUrl(pathToFileURL(join(root, 'huge.png')).href, 'image', { allowedLocalMediaPath: root }, 'p'), 413, /larger than the 20 MB limit/)
})

test('file: a cancelled request stops waiting for its read', async (t) => {
  const root = tempDir('candela-file-')
  writeFileSync(join(root, 'a.png'), PNG)
  const ac = new AbortController()
  ac.abort(new Error('gone'))
  await refused(t, loadUrl(pathToFileURL(join(root, 'a.png')).href, 'image', { allowedLocalMediaPath: root, signal: ac.signal }, 'p'), 400, /cancelled/)
})

test('Slots: at most `size` holders, waiters served in order, an aborted waiter leaves the queue', async (t) => {
  const slots = new Slots(2)
  const a = await slots.acquire()
  const b = await slots.acquire()
  const order: string[] = []
  const ac = new AbortController()
  const c = slots.acquire(ac.signal).then((r) => (order.push('c'), r))
  const d = slots.acquire().then((r) => (order.push('d'), r))
  ac.abort(new Error('no'))
  await t.throwsAsync(c, { message: 'no' })
  a()
  a() // a second release of the same slot is a no-op
  const rd = await d
  t.deepEqual(order, ['d'])
  let got = false
  const e = slots.acquire().then((r) => ((got = true), r))
  await new Promise((r) => setImmediate(r))
  t.false(got, 'both slots are held (b, d)')
  b()
  ;(await e)()
  rd()
  t.true(got)
})

test('an empty data: URL or base64 payload says "empty"', async (t) => {
  await refused(t, loadUrl('data:image/png;base64,', 'image', {}, 'p'), 400, /^p: the data: URL is empty/)
  const { decodeBase64 } = await import('../dist/media/source.js')
  t.throws(() => decodeBase64('  ', 'input_audio.data'), { message: 'input_audio.data is empty' })
})

async function freePort(): Promise<number> {
  const s = createServer()
  await new Promise<void>((r) => s.listen(0, '127.0.0.1', r))
  const port = (s.address() as AddressInfo).port
  await new Promise((r) => s.close(r))
  return port
}

test('SIGTERM stops the server within a bounded time; a stream in flight ends with a shutting-down error event', async (t) => {
  const port = await freePort()
  const env: NodeJS.ProcessEnv = { ...process.env, CANDELA_CACHE_DIR: join(ROOT, '.cache', 'cli-test-no-download') }
  delete env.CANDELA_API_KEY
  const child = spawn(process.execPath, [CLI, 'serve', fixture('llama-tiny'), '--port', String(port)], { env, stdio: ['ignore', 'pipe', 'pipe'] })
  let out = ''
  child.stdout.on('data', (d: Buffer) => (out += d.toString()))
  child.stderr.on('data', (d: Buffer) => (out += d.toString()))
  const exited = new Promise<number | null>((r) => child.on('close', (code) => r(code)))
  try {
    const end = Date.now() + 30_000
    while (!out.includes('"serving') && Date.now() < end) await new Promise((r) => setTimeout(r, 20))
    // n: 8 keeps the engine busy ~9 s (one sample of 1500 tokens takes ~1.6 s on llama-tiny):
    // on a loaded machine a single sample could finish before the signal lands.
    const res = await fetch(`http://127.0.0.1:${port}/v1/completions`, {
      method: 'POST',
      body: JSON.stringify({ prompt: 'Once', max_tokens: 1500, n: 8, ignore_eos: true, stream: true }),
    })
    t.is(res.status, 200)
    const reader = res.body!.getReader()
    let text = new TextDecoder().decode((await reader.read()).value)
    child.kill('SIGTERM')
    for (;;) {
      const r = await reader.read()
      if (r.done) break
      text += new TextDecoder().decode(r.value)
    }
    t.regex(text, /data: \{"error":\{"message":"the server is shutting down","type":"server_error","param":null,"code":"shutting_down"\}\}/)
    // 0: the graceful path; the 10 s backstop (process.exit(1)) was not needed.
    t.is(await exited, 0, out)
  } finally {
    child.kill('SIGKILL')
  }
})

test('a multiModalData item that is null without a uuid names the missing uuid', async (t) => {
  const { pendingFromData, resolveParts } = await import('../dist/media/index.js')
  const parts = pendingFromData({ image: [null, PNG] }, undefined)
  const err = await t.throwsAsync(resolveParts(parts, { accepts: new Set(['image'] as const) }))
  t.is(
    err?.message,
    'multiModalData.image[0] is empty and has no uuid: give its data, or in multiModalUuids.image[0] the uuid of an item sent before',
  )
  t.is((err as MediaError).status, 400)
})

// Run in a child so its peak RSS (VmHWM) is this load's alone.
const FETCH_MANY = `
import { createServer } from 'node:http'
import { readFileSync } from 'node:fs'
const { pendingFromData, resolveParts } = await import(process.argv[1])
const body = Buffer.alloc(20e6, 1)
let inFlight = 0, maxInFlight = 0
const server = createServer((req, res) => {
  inFlight++; maxInFlight = Math.max(maxInFlight, inFlight)
  res.once('close', () => inFlight--)
  res.writeHead(200, { 'content-type': 'image/png', 'content-length': body.length }).end(body)
})
await new Promise((r) => server.listen(0, '127.0.0.1', r))
const urls = Array.from({ length: 20 }, (_, i) => 'http://127.0.0.1:' + server.address().port + '/' + i + '.png')
let out
try {
  await resolveParts(pendingFromData({ image: urls.map((u) => new URL(u).href) }, undefined).map((p) => ({ ...p, part: { type: 'image_url', image_url: { url: p.part.image } } })), { accepts: new Set(['image']), allowPrivateMediaUrls: true })
  out = { ok: true }
} catch (err) { out = { status: err.status, message: err.message } }
server.closeAllConnections(); server.close()
const hwm = Number(/VmHWM:\\s+(\\d+) kB/.exec(readFileSync('/proc/self/status', 'utf8'))[1]) * 1024
console.log(JSON.stringify({ ...out, hwm, maxInFlight }))
`

test('20 image URLs of 20 MB in one request: 413 past the per-request total, peak RSS under 250 MB', async (t) => {
  const { execFileSync: run } = await import('node:child_process')
  const stdout = run(process.execPath, ['--input-type=module', '-e', FETCH_MANY, join(ROOT, 'dist', 'media', 'index.js')], {
    env: { ...process.env, CANDELA_MAX_REQUEST_MEDIA_BYTES: '64000000' },
    encoding: 'utf8',
  })
  const r = JSON.parse(stdout) as { status: number; message: string; hwm: number; maxInFlight: number }
  t.is(r.status, 413)
  t.regex(r.message, /^multiModalData\.image\[\d+\]\.image_url\.url: the request's media URLs add up to more than 64 MB \(the per-request limit, CANDELA_MAX_REQUEST_MEDIA_BYTES\)/)
  t.log(`peak RSS ${(r.hwm / 1e6).toFixed(0)} MB, ${r.maxInFlight} fetches at once`)
  // Before the limits: all 20 bodies (400 MB) were held at once.
  t.true(r.hwm < 250e6, `peak RSS ${(r.hwm / 1e6).toFixed(0)} MB`)
})

/** Send `head` (and then nothing) on a raw socket; resolves with all the server wrote before closing. */
async function rawExchange(port: number, head: string): Promise<string> {
  const { connect } = await import('node:net')
  return new Promise((resolve, reject) => {
    const socket = connect(port, '127.0.0.1')
    let got = ''
    socket.on('data', (d) => (got += d.toString()))
    socket.on('error', reject)
    socket.on('close', () => resolve(got))
    socket.write(head)
  })
}

test('slow clients get 408 and the connection closes; 100 KB of headers get 431; both in OpenAI shape', async (t) => {
  const { startServer } = await import('../dist/server/index.js')
  const server = await startServer({ load: { model: fixture('llama-tiny') }, port: 0, logger: false, headersTimeoutMs: 500, requestTimeoutMs: 1000 })
  try {
    // A body that never completes (slowloris): the request timeout ends it.
    const slowBody = await rawExchange(server.port, 'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"pro')
    t.regex(slowBody, /^HTTP\/1\.1 408 Request Timeout\r\n/)
    t.regex(slowBody, /\{"error":\{"message":"the request was not received in time","type":"invalid_request_error","param":null,"code":null\}\}$/)
    // Headers that never end.
    t.regex(await rawExchange(server.port, 'GET /health HTTP/1.1\r\nHost: x\r\n'), /^HTTP\/1\.1 408 /)
    const big = await rawExchange(server.port, `GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ${'a'.repeat(100_000)}\r\n\r\n`)
    t.regex(big, /^HTTP\/1\.1 431 Request Header Fields Too Large\r\n/)
    t.regex(big, /"message":"the request headers are larger than the server accepts \(16 KiB\)"/)
  } finally {
    await server.close()
  }
})

/** An all-zero w x h PNG (16-bit RGBA by default) without ever holding its pixels: ~1 MB for 10000 x 10000. */
async function zeroPng(w: number, h: number, bitDepth = 16, colorType = 6, interlaced = false): Promise<Buffer> {
  const zlib = await import('node:zlib')
  const chunk = (type: string, data: Buffer): Buffer => {
    const body = Buffer.concat([Buffer.from(type, 'latin1'), data])
    const len = Buffer.alloc(4)
    len.writeUInt32BE(data.length)
    const crc = Buffer.alloc(4)
    crc.writeUInt32BE(zlib.crc32(body))
    return Buffer.concat([len, body, crc])
  }
  const ihdr = Buffer.alloc(13)
  ihdr.writeUInt32BE(w, 0)
  ihdr.writeUInt32BE(h, 4)
  ihdr.writeUInt8(bitDepth, 8)
  ihdr.writeUInt8(colorType, 9)
  ihdr.writeUInt8(interlaced ? 1 : 0, 12)
  const channels = { 0: 1, 2: 3, 4: 2, 6: 4 }[colorType]!
  const row = (width: number): Buffer => Buffer.alloc(1 + Math.ceil((width * channels * bitDepth) / 8))
  // Adam7's seven passes (first row, first column, row step, column step), or one plain pass.
  const passes = interlaced
    ? [[0, 0, 8, 8], [0, 4, 8, 8], [4, 0, 8, 4], [0, 2, 4, 4], [2, 0, 4, 2], [0, 1, 2, 2], [1, 0, 2, 1]]
    : [[0, 0, 1, 1]]
  const deflate = zlib.createDeflate({ level: 1 })
  const out: Buffer[] = []
  deflate.on('data', (d: Buffer) => out.push(d))
  const done = new Promise((r) => deflate.on('end', r))
  for (const [r0, c0, dr, dc] of passes as Array<[number, number, number, number]>) {
    const pw = Math.ceil((w - c0) / dc)
    const ph = Math.ceil((h - r0) / dr)
    if (pw <= 0 || ph <= 0) continue
    const line = row(pw)
    for (let y = 0; y < ph; y++) if (!deflate.write(line)) await new Promise((r) => deflate.once('drain', r))
  }
  deflate.end()
  await done
  const sig = Buffer.from('89504e470d0a1a0a', 'hex')
  return Buffer.concat([sig, chunk('IHDR', ihdr), chunk('IDAT', Buffer.concat(out)), chunk('IEND', Buffer.alloc(0))])
}

/** `candela serve MODEL ...flags` on a free port; resolves once it serves. */
async function spawnServer(
  model: string,
  flags: string[],
  extraEnv: NodeJS.ProcessEnv = {},
): Promise<{ base: string; pid: number; stop: () => Promise<number | null>; log: () => string }> {
  const port = await freePort()
  const env: NodeJS.ProcessEnv = { ...process.env, CANDELA_CACHE_DIR: join(ROOT, '.cache', 'cli-test-no-download') }
  delete env.CANDELA_API_KEY
  delete env.CANDELA_MEDIA_MEMORY_BUDGET
  Object.assign(env, extraEnv)
  const child = spawn(process.execPath, [CLI, 'serve', model, '--port', String(port), ...flags], { env, stdio: ['ignore', 'pipe', 'pipe'] })
  let out = ''
  child.stdout.on('data', (d: Buffer) => (out += d.toString()))
  child.stderr.on('data', (d: Buffer) => (out += d.toString()))
  const exited = new Promise<number | null>((r) => child.on('close', (code) => r(code)))
  const end = Date.now() + 60_000
  while (!out.includes('"serving') && Date.now() < end && child.exitCode === null) await new Promise((r) => setTimeout(r, 20))
  if (!out.includes('"serving')) {
    child.kill('SIGKILL')
    throw new Error(`the server did not start: ${out}`)
  }
  return {
    base: `http://127.0.0.1:${port}`,
    pid: child.pid!,
    log: () => out,
    stop: async () => {
      child.kill('SIGTERM')
      return exited
    },
  }
}

/** Peak resident memory of a process, bytes (Linux). */
async function peakRss(pid: number): Promise<number> {
  const { readFileSync } = await import('node:fs')
  return Number(/VmHWM:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))![1]) * 1024
}

const imageChat = (png: Buffer): string =>
  JSON.stringify({
    messages: [{ role: 'user', content: [{ type: 'image_url', image_url: { url: `data:image/png;base64,${png.toString('base64')}` } }, { type: 'text', text: 'What is it?' }] }],
    max_tokens: 2,
  })

test.serial('huge interlaced 16-bit PNGs (whose decoder holds the whole frame): within the media memory budget (peak RSS under 1.5 GB for three of 9000x9000), 413 with the numbers above the per-item share', async (t) => {
  const server = await spawnServer(fixture('qwen2-vl-tiny'), ['--media-memory-budget', '700MiB'])
  try {
    // Three distinct files (their own cache keys): a 324 MB 8-bit frame each; 16-bit RGBA once cost 650 MB more.
    const pngs = await Promise.all([9000, 9001, 9002].map((w) => zeroPng(w, 9000, 16, 6, true)))
    const answers = await Promise.all(pngs.map((png) => fetch(`${server.base}/v1/chat/completions`, { method: 'POST', body: imageChat(png) })))
    t.deepEqual(answers.map((r) => r.status), [200, 200, 200])
    const peak = await peakRss(server.pid)
    t.log(`server peak RSS ${(peak / 1e6).toFixed(0)} MB`)
    // Two at once fit the 700 MiB budget, the third waits; before the budget, 3 x 1 GB.
    t.true(peak < 1.5e9, `peak RSS ${(peak / 1e6).toFixed(0)} MB`)
    const big = await fetch(`${server.base}/v1/chat/completions`, { method: 'POST', body: imageChat(await zeroPng(12000, 12000, 16, 6, true)) })
    t.is(big.status, 413)
    const body = (await big.json()) as { error: { message: string; code: string } }
    t.is(
      body.error.message,
      'the 12000x12000 PNG image (resized to 112x112) needs 553.2 MiB to decode, above the per-item media memory limit of 350.0 MiB (half of --media-memory-budget); send it smaller',
    )
  } finally {
    t.is(await server.stop(), 0, server.log())
  }
})

test.serial('a 12000x12000 JPEG and 16-bit PNG cost about their resized size: 200 under a 350 MiB per-item share they once exceeded, peak RSS under 320 MB (432 MB each as decoded RGB)', async (t) => {
  const dir = tempDir('candela-huge-')
  // A baseline JPEG (what cameras and ffmpeg write), made by Debian's ffmpeg.
  execFileSync('ffmpeg', ['-v', 'error', '-y', '-f', 'lavfi', '-i', 'testsrc2=size=12000x12000', '-frames:v', '1', '-q:v', '8', join(dir, 'huge.jpg')])
  const jpg = readFileSync(join(dir, 'huge.jpg'))
  const png = await zeroPng(12000, 12000)
  const jpegChat = imageChat(jpg).replace('data:image/png', 'data:image/jpeg')
  const server = await spawnServer(fixture('qwen2-vl-tiny'), ['--media-memory-budget', '700MiB'])
  try {
    for (const body of [jpegChat, imageChat(png)]) {
      const r = await fetch(`${server.base}/v1/chat/completions`, { method: 'POST', body })
      t.is(r.status, 200, await r.clone().text())
      // The tiny model's processor resizes to 112x112: 64 prompt tokens of image.
      t.true(((await r.json()) as { usage: { prompt_tokens: number } }).usage.prompt_tokens > 16)
    }
    const peak = await peakRss(server.pid)
    t.log(`server peak RSS ${(peak / 1e6).toFixed(0)} MB`)
    t.true(peak < 320e6, `peak RSS ${(peak / 1e6).toFixed(0)} MB`)
  } finally {
    t.is(await server.stop(), 0, server.log())
  }
})

/** A 6 s clip of ffmpeg's test pattern, encoded by Debian's ffmpeg with `codec` args. */
function clip(codec: string[], ext = 'mp4'): Buffer {
  const dir = tempDir('candela-clip-')
  const out = join(dir, `clip.${ext}`)
  execFileSync('ffmpeg', ['-v', 'error', '-y', '-f', 'lavfi', '-i', 'testsrc2=size=128x96:rate=10:duration=6', ...codec, '-pix_fmt', 'yuv420p', out])
  return readFileSync(out)
}

const videoChat = (mp4: Buffer, mime = 'video/mp4'): string =>
  JSON.stringify({
    messages: [{ role: 'user', content: [{ type: 'video_url', video_url: { url: `data:${mime};base64,${mp4.toString('base64')}` } }, { type: 'text', text: 'What happens?' }] }],
    max_tokens: 2,
  })

test.serial('an H.264 High MP4 with B-frames as libx264 writes it keeps every sampled frame; without ffmpeg, HEVC is a 422 naming the codec', async (t) => {
  const high = clip(['-c:v', 'libx264'])
  const baseline = clip(['-c:v', 'libx264', '-profile:v', 'baseline'])
  const hevc = clip(['-c:v', 'libx265', '-x265-params', 'log-level=error', '-tag:v', 'hvc1'])
  const server = await spawnServer(fixture('qwen2-vl-tiny'), [])
  try {
    const tokens: number[] = []
    for (const mp4 of [high, baseline, hevc]) {
      const r = await fetch(`${server.base}/v1/chat/completions`, { method: 'POST', body: videoChat(mp4) })
      const body = (await r.json()) as { usage?: { prompt_tokens: number }; error?: { message: string } }
      t.is(r.status, 200, body.error?.message)
      tokens.push(body.usage!.prompt_tokens)
    }
    // The same 12 sampled frames (6 s at 2 fps) whatever the codec: once a B-frame clip kept one.
    t.is(tokens[0], tokens[1])
    t.is(tokens[2], tokens[1])
  } finally {
    t.is(await server.stop(), 0, server.log())
  }
  const bare = await spawnServer(fixture('qwen2-vl-tiny'), [], { CANDELA_FFMPEG: '/nonexistent/ffmpeg' })
  try {
    const r = await fetch(`${bare.base}/v1/chat/completions`, { method: 'POST', body: videoChat(hevc) })
    t.is(r.status, 422)
    const { error } = (await r.json()) as { error: { message: string } }
    t.regex(error.message, /^HEVC video \(MP4 codec 'hvc1'\) is not supported by the built-in decoders/)
    t.regex(error.message, /this machine has no ffmpeg, which decodes every common video \(install ffmpeg, or set CANDELA_FFMPEG to its path\)$/)
  } finally {
    t.is(await bare.stop(), 0, bare.log())
  }
})

// The default model with default flags (SmolLM2-135M: 30 layers x 3 KV heads
// x 64 dims x 2 x 4 bytes = 45 KiB a token). Runs where CANDELA_SMOLLM2_GGUF
// points at it (`.ci/run` fetches it), like the cargo SmolLM2 check.
const smollm2 = process.env.CANDELA_SMOLLM2_GGUF
;(smollm2 ? test.serial : test.skip)('default flags on the default model: the KV pool holds two full contexts (720 MiB, not 4 GiB) and peak RSS stays under 700 MB after a normal load', async (t) => {
  const server = await spawnServer(smollm2!, [])
  try {
    const ready = /model \S+ ready \(KV cache ([\d.]+ \w+), (\d+) tokens\)/.exec(server.log())
    t.truthy(ready, server.log())
    t.is(ready![1], '720.0 MiB')
    t.is(Number(ready![2]), 2 * 8192)
    // Eight distinct ~450-token chats, four at a time.
    let promptTokens = 0
    const ask = async (i: number): Promise<void> => {
      const text = Array.from({ length: 60 }, (_, j) => `item ${i * 1000 + j}`).join(', ')
      const r = await fetch(`${server.base}/v1/chat/completions`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ messages: [{ role: 'user', content: text }], max_tokens: 16 }),
      })
      const body = (await r.json()) as { usage: { prompt_tokens: number } }
      t.is(r.status, 200)
      promptTokens += body.usage.prompt_tokens
    }
    for (let i = 0; i < 8; i += 4) await Promise.all([i, i + 1, i + 2, i + 3].map(ask))
    const peak = await peakRss(server.pid)
    t.log(`${promptTokens} prompt tokens; server peak RSS ${(peak / 1e6).toFixed(0)} MB`)
    t.true(peak < 700e6, `peak RSS ${(peak / 1e6).toFixed(0)} MB`)
  } finally {
    t.is(await server.stop(), 0, server.log())
  }
})
