#!/usr/bin/env node
// npm run soak [-- --seconds N --concurrency C --model DIR]
//
// A bounded soak: starts `candela serve` on 127.0.0.1 (the Qwen2-VL test
// fixture by default, so media paths run) and drives a mixed load of
// ordinary requests (text, streamed text, image, video, a client that leaves
// mid-stream) and hostile ones (a 6000x6000 16-bit PNG, a FIFO behind a
// file: URL, an empty data: URL, bad JSON, 100 KB of headers, 10 media URLs
// of 19 MB in one request, a truncated WebM, garbage posing as MP4, an image
// part with neither data nor uuid). Every 15 s it prints the server's RSS and
// the statuses so far; at the end, the KV blocks still in use with nothing
// running (leaked), 5xx answers other than 502 / 503 / 504 (upstream or a
// full media budget), and the peak RSS.
// Exits non-zero on a 500, a leaked block or a server that died.
// Needs `npm run build`; uses ffmpeg for nothing (the clips are fixtures).

import { execFileSync, spawn } from 'node:child_process'
import { mkdtempSync, readFileSync } from 'node:fs'
import { createServer } from 'node:http'
import { connect, createServer as netServer } from 'node:net'
import { tmpdir } from 'node:os'
import { dirname, join } from 'node:path'
import { parseArgs } from 'node:util'
import { fileURLToPath } from 'node:url'
import { createDeflate, crc32 } from 'node:zlib'

const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..')
const { values: args } = parseArgs({
  options: {
    seconds: { type: 'string', default: '180' },
    concurrency: { type: 'string', default: '8' },
    model: { type: 'string', default: join(ROOT, 'fixtures', 'qwen2-vl-tiny') },
  },
})
const SECONDS = Number(args.seconds)
const CONCURRENCY = Number(args.concurrency)
const VISION = join(ROOT, 'fixtures', 'vision')

const freePort = () =>
  new Promise((resolve) => {
    const s = netServer().listen(0, '127.0.0.1', () => {
      const { port } = s.address()
      s.close(() => resolve(port))
    })
  })

async function zeroPng(w, h) {
  const chunk = (type, data) => {
    const body = Buffer.concat([Buffer.from(type, 'latin1'), data])
    const len = Buffer.alloc(4)
    len.writeUInt32BE(data.length)
    const crc = Buffer.alloc(4)
    crc.writeUInt32BE(crc32(body))
    return Buffer.concat([len, body, crc])
  }
  const ihdr = Buffer.alloc(13)
  ihdr.writeUInt32BE(w, 0)
  ihdr.writeUInt32BE(h, 4)
  ihdr.writeUInt8(16, 8)
  ihdr.writeUInt8(6, 9)
  const row = Buffer.alloc(1 + w * 8)
  const deflate = createDeflate({ level: 1 })
  const out = []
  deflate.on('data', (d) => out.push(d))
  const done = new Promise((r) => deflate.on('end', r))
  for (let y = 0; y < h; y++) if (!deflate.write(row)) await new Promise((r) => deflate.once('drain', r))
  deflate.end()
  await done
  return Buffer.concat([Buffer.from('89504e470d0a1a0a', 'hex'), chunk('IHDR', ihdr), chunk('IDAT', Buffer.concat(out)), chunk('IEND', Buffer.alloc(0))])
}

const status = (pid) => {
  const s = readFileSync(`/proc/${pid}/status`, 'utf8')
  const kb = (k) => Number(new RegExp(`${k}:\\s+(\\d+) kB`).exec(s)?.[1] ?? 0) * 1024
  return { rss: kb('VmRSS'), hwm: kb('VmHWM') }
}
const mb = (b) => `${(b / 1e6).toFixed(0)} MB`

// ---- setup ----------------------------------------------------------------
const dir = mkdtempSync(join(tmpdir(), 'candela-soak-'))
execFileSync('mkfifo', [join(dir, 'fifo.png')])
const port = await freePort()
const serverEnv = { ...process.env }
delete serverEnv.CANDELA_API_KEY
const server = spawn(
  process.execPath,
  [join(ROOT, 'dist', 'cli.js'), 'serve', args.model, '--port', String(port), '--allowed-local-media-path', dir, '--allow-private-media-urls', '--disable-log-requests'],
  { stdio: ['ignore', 'pipe', 'pipe'], env: serverEnv },
)
let serverLog = ''
server.stdout.on('data', (d) => (serverLog += d))
server.stderr.on('data', (d) => (serverLog += d))
let serverDied = false
server.on('exit', () => (serverDied = true))
const base = `http://127.0.0.1:${port}`
for (let i = 0; i < 600 && !serverLog.includes('serving'); i++) await new Promise((r) => setTimeout(r, 100))
if (!serverLog.includes('serving')) {
  console.error(`the server did not start:\n${serverLog}`)
  process.exit(1)
}

// Media the requests point at.
const big = Buffer.alloc(19e6, 1) // under the 20 MB item cap: fetched, then refused as no image
const media = createServer((_req, res) => res.writeHead(200, { 'content-type': 'image/png', 'content-length': big.length }).end(big))
await new Promise((r) => media.listen(0, '127.0.0.1', r))
const mediaBase = `http://127.0.0.1:${media.address().port}`
const png = readFileSync(join(VISION, '..', 'qwen2-vl-tiny', 'image_a.png'))
const mp4 = readFileSync(join(VISION, 'clip_h264_high.mp4'))
const webm = readFileSync(join(VISION, 'clip_vp9.webm'))
const hugePng = await zeroPng(6000, 6000)
const dataUrl = (mime, b) => `data:${mime};base64,${b.toString('base64')}`

// ---- scenarios --------------------------------------------------------------
const chatBody = (content, extra = {}) => JSON.stringify({ messages: [{ role: 'user', content }], max_tokens: 8, ...extra })
const withText = (part) => [part, { type: 'text', text: 'Describe it.' }]
async function post(body, { stream = false, leave = false, headers = {} } = {}) {
  const ac = new AbortController()
  const timer = setTimeout(() => ac.abort(), 90_000)
  try {
    const res = await fetch(`${base}/v1/chat/completions`, { method: 'POST', body, headers: { 'content-type': 'application/json', ...headers }, signal: ac.signal })
    if (stream && leave && res.status === 200) {
      const reader = res.body.getReader()
      await reader.read()
      ac.abort()
      return 'left'
    }
    await res.arrayBuffer()
    return String(res.status)
  } catch {
    return ac.signal.aborted ? 'client-timeout' : 'reset'
  } finally {
    clearTimeout(timer)
  }
}
function rawHeaders() {
  return new Promise((resolve) => {
    const s = connect(port, '127.0.0.1')
    let got = ''
    s.on('data', (d) => (got += d))
    s.on('error', () => resolve('reset'))
    s.on('close', () => resolve(/^HTTP\/1\.1 (\d{3})/.exec(got)?.[1] ?? 'reset'))
    s.write(`GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ${'a'.repeat(100_000)}\r\n\r\n`)
  })
}

const scenarios = {
  text: () => post(chatBody('Hello, how are you?')),
  'text-stream': () => post(chatBody('Count to ten.', { stream: true }), { stream: true }),
  'stream-leave': () => post(chatBody('Tell a long story.', { stream: true, max_tokens: 200, ignore_eos: true }), { stream: true, leave: true }),
  image: () => post(chatBody(withText({ type: 'image_url', image_url: { url: dataUrl('image/png', png) } }))),
  video: () => post(chatBody(withText({ type: 'video_url', video_url: { url: dataUrl('video/mp4', mp4) } }))),
  'huge-png': () => post(chatBody(withText({ type: 'image_url', image_url: { url: dataUrl('image/png', hugePng) } }))),
  fifo: () => post(chatBody(withText({ type: 'image_url', image_url: { url: `file://${dir}/fifo.png` } }))),
  'empty-data': () => post(chatBody(withText({ type: 'image_url', image_url: { url: 'data:image/png;base64,' } }))),
  'bad-json': () => post('{"messages": [', {}),
  'big-headers': rawHeaders,
  'many-urls': () => post(chatBody([...Array.from({ length: 10 }, (_, i) => ({ type: 'image_url', image_url: { url: `${mediaBase}/${i}.png` } })), { type: 'text', text: 'hi' }])),
  'truncated-webm': () => post(chatBody(withText({ type: 'video_url', video_url: { url: dataUrl('video/webm', webm.subarray(0, webm.length >> 1)) } }))),
  'garbage-mp4': () => post(chatBody(withText({ type: 'video_url', video_url: { url: dataUrl('video/mp4', Buffer.concat([mp4.subarray(0, 32), Buffer.alloc(4000, 0x5a)])) } }))),
  'no-data-no-uuid': () => post(chatBody(withText({ type: 'image_url', image_url: null }))),
}
const names = Object.keys(scenarios)
const counts = new Map() // "scenario status" -> n
let done = 0

// ---- run --------------------------------------------------------------------
const t0 = Date.now()
const deadline = t0 + SECONDS * 1000
const report = () => {
  const { rss, hwm } = serverDied ? { rss: 0, hwm: 0 } : status(server.pid)
  const byStatus = {}
  for (const [k, n] of counts) {
    const s = k.split(' ')[1]
    byStatus[s] = (byStatus[s] ?? 0) + n
  }
  console.log(`[soak] ${((Date.now() - t0) / 1000).toFixed(0)}s requests ${done} rss ${mb(rss)} peak ${mb(hwm)} statuses ${JSON.stringify(byStatus)}`)
}
const ticker = setInterval(report, 15_000)
let k = 0
await Promise.all(
  Array.from({ length: CONCURRENCY }, async () => {
    while (Date.now() < deadline && !serverDied) {
      const name = names[k++ % names.length]
      const s = await scenarios[name]()
      const key = `${name} ${s}`
      counts.set(key, (counts.get(key) ?? 0) + 1)
      done++
    }
  }),
)
clearInterval(ticker)
report()

// ---- verdict ----------------------------------------------------------------
await new Promise((r) => setTimeout(r, 1000)) // aborted requests finish freeing
const metrics = serverDied ? '' : await (await fetch(`${base}/metrics`)).text()
const gauge = (n) => Number(new RegExp(`^${n} (\\S+)$`, 'm').exec(metrics)?.[1] ?? NaN)
const used = gauge('candela_kv_blocks_used')
const running = gauge('candela_requests_running')
const waiting = gauge('candela_requests_waiting')
const { hwm } = serverDied ? { hwm: 0 } : status(server.pid)
console.log('[soak] by scenario:')
for (const [key, n] of [...counts].sort()) console.log(`  ${key.padEnd(28)} ${n}`)
// 502 / 504 are the media host's slowness or failure, 503 a full media budget: answers, not faults.
const fives = [...counts].filter(([key]) => /\s5\d\d$/.test(key) && !/\s50[234]$/.test(key))
console.log(
  `[soak] ${done} requests in ${SECONDS}s at concurrency ${CONCURRENCY}; server peak RSS ${mb(hwm)}; ` +
    `KV blocks used after the load ${used} of ${gauge('candela_kv_blocks_total')} (running ${running}, waiting ${waiting}); ` +
    `5xx other than 502 / 503 / 504: ${fives.reduce((a, [, n]) => a + n, 0)}; server ${serverDied ? 'DIED' : 'alive'}`,
)
server.kill('SIGTERM')
media.close()
media.closeAllConnections()
const bad = serverDied || fives.length > 0 || used !== 0 || running !== 0
process.exit(bad ? 1 : 0)
