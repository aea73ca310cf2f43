// The web playground at `/`, in a real browser (headless Chromium driven by
// puppeteer-core) against a server on the qwen2-vl-tiny fixture: an uploaded
// image streams transformers' greedy answer; a pasted image and a video go in
// one message; an audio model launched from the form answers an uploaded clip
// and is terminated from the list; an --api-key server answers the page
// nothing without the key. Screenshots of each state go to
// test-output/playground/.
import { execFileSync } from 'node:child_process'
import { existsSync, mkdirSync, readFileSync } from 'node:fs'
import { join } from 'node:path'
import { parseArgs } from 'node:util'

import test from 'ava'
import puppeteer from 'puppeteer-core'
import type { Browser, Page } from 'puppeteer-core'

import { serveCommand, serveConfig } from '../dist/cli/serve.js'
import { FIXTURES, fixture, ROOT } from './helpers.js'
import { metricsText, sample, startTestServer } from './server-helpers.js'
import type { TestServer } from './server-helpers.js'

const ARTEFACTS = join(ROOT, 'test-output', 'playground')

/** $CHROME_PATH, else Debian's chromium (or another Chromium-family browser) on the PATH. */
function findChromium(): string | undefined {
  if (process.env.CHROME_PATH) return existsSync(process.env.CHROME_PATH) ? process.env.CHROME_PATH : undefined
  for (const name of ['chromium', 'chromium-browser', 'google-chrome-stable', 'google-chrome']) {
    try {
      return execFileSync('sh', ['-c', `command -v ${name}`], { encoding: 'utf8' }).trim()
    } catch {
      // not installed under this name
    }
  }
  return undefined
}

test('the playground is served at / with its own files only; --no-ui turns it off', async (t) => {
  const flags = (args: string[]) => {
    const { values, positionals } = parseArgs({ args, options: serveCommand.options, allowPositionals: true, strict: true })
    return serveConfig(positionals, values as Parameters<typeof serveConfig>[1]).server
  }
  t.is(flags(['--no-ui']).ui, false)
  t.is(flags([]).ui, undefined)
  const on = await startTestServer({ models: [], apiKey: 'k' })
  const off = await startTestServer({ models: [], ui: false })
  try {
    // The page is public (it asks for the key); the API behind it is not.
    const page = await fetch(`${on.base}/`)
    t.is(page.status, 200)
    t.regex(page.headers.get('content-type')!, /^text\/html/)
    t.regex(page.headers.get('content-security-policy')!, /default-src 'self'/)
    t.regex(await page.text(), /<script type="module" src="playground.js">/)
    t.is((await fetch(`${on.base}/playground.js`)).status, 200)
    t.is((await fetch(`${on.base}/v1/instances`)).status, 401)
    t.is((await fetch(`${on.base}/no-such-file.js`)).status, 404)
    const none = await fetch(`${off.base}/`)
    t.is(none.status, 404)
    t.regex(((await none.json()) as { error: { message: string } }).error.message, /GET \//)
  } finally {
    await Promise.all([on.server.close(), off.server.close()])
  }
})

const chromium = findChromium()
if (chromium === undefined) {
  test.skip('the playground in a real browser: SKIPPED, no Chromium found (apt-get install chromium, or point CHROME_PATH at one)', () => {})
} else {
  browserTests(chromium)
}

function browserTests(executablePath: string): void {
  const vl = fixture('qwen2-vl-tiny')
  const ref = JSON.parse(readFileSync(join(vl, 'reference.json'), 'utf8')) as { cases: { one_image: { input_ids: number[]; greedy_ids: number[] } } }
  let s: TestServer
  let browser: Browser
  let page: Page
  const shot = (name: string) => page.screenshot({ path: join(ARTEFACTS, `${name}.png`) })
  /** Set a form field as a user would: select the old value, type the new one. */
  const fill = async (selector: string, value: string) => {
    await page.click(selector, { count: 3 })
    await page.keyboard.press('Backspace')
    await page.type(selector, value)
  }
  const reply = () =>
    page.$eval('.message.assistant:last-child', (el) => ({
      text: el.querySelector('.text')!.textContent,
      meta: el.querySelector('.meta')!.textContent,
      chunks: Number(el.getAttribute('data-chunks') ?? 0),
      model: el.getAttribute('data-model'),
      error: el.querySelector('.error')?.textContent,
    }))
  // Page-side expressions are strings: the tests compile without the DOM's types.
  const lastReplyDone = () =>
    page.waitForFunction(`['done', 'error'].includes(document.querySelector('.message.assistant:last-child')?.dataset.state)`, { timeout: 60_000 })
  const pickerShows = (model: string, timeout = 5_000) =>
    page.waitForFunction(`document.querySelector('#model-picker').value === ${JSON.stringify(model)}`, { timeout })

  test.before(async () => {
    mkdirSync(ARTEFACTS, { recursive: true })
    s = await startTestServer({ models: [{ uid: 'tiny-vl', model: vl, load: { dtype: 'f32', maxModelLen: 512, limitMmPerPrompt: { image: 2 } } }] })
    browser = await puppeteer.launch({
      executablePath,
      headless: true,
      // As root in a container: no sandbox, no /dev/shm of any size.
      args: ['--no-sandbox', '--disable-dev-shm-usage', '--disable-gpu'],
    })
    page = await browser.newPage()
    await page.setViewport({ width: 1280, height: 800 })
  })
  test.after.always(async () => {
    await browser?.close()
    await s?.server.close()
  })

  test.serial('an uploaded image, sent, streams transformers\' greedy answer token by token', async (t) => {
    // Everything the page loads comes from the server itself (or is media the user picked).
    const elsewhere: string[] = []
    page.on('request', (req) => {
      const url = req.url()
      if (!url.startsWith(`${s.base}/`) && !url.startsWith('data:') && !url.startsWith('blob:')) elsewhere.push(url)
    })
    await page.goto(s.base)
    await pickerShows('tiny-vl')
    await shot('1-start')
    await fill('#sampling [name=temperature]', '0')
    await fill('#sampling [name=max_tokens]', String(ref.cases.one_image.greedy_ids.length))
    const input = await page.$('#file-input')
    await (input as unknown as { uploadFile(path: string): Promise<void> }).uploadFile(join(vl, 'image_a.png'))
    await page.waitForSelector('#attachments .attachment img')
    await page.type('#prompt', 'Describe this image.')
    await shot('2-image-attached')
    await page.click('#send')
    await lastReplyDone()
    const r = await reply()
    t.is(r.error, undefined)
    t.is(r.model, 'tiny-vl')
    t.is(r.text, await s.server.engine!.detokenize(ref.cases.one_image.greedy_ids))
    // One SSE chunk per token or so: the answer arrived in pieces, not at the end.
    t.true(r.chunks >= 2, String(r.chunks))
    t.regex(r.meta!, new RegExp(`^tiny-vl · ${ref.cases.one_image.input_ids.length} prompt \\+ ${ref.cases.one_image.greedy_ids.length} tokens`))
    t.is(await page.$$eval('.message.user .media img', (imgs) => imgs.length), 1)
    // The charts read /metrics: the prefix cache hit rate shown is the server's.
    const rate = sample(await metricsText(s.base), 'candela_prefix_cache_hit_rate')!
    await page.waitForFunction(`document.querySelector('[data-chart="prefix"] output')?.textContent === '${(100 * rate).toFixed(0)}%'`, { timeout: 10_000 })
    t.true((await page.$$eval('#charts polyline', (ls) => ls.length)) >= 5)
    await shot('3-streamed-answer')
    t.deepEqual(elsewhere, [])
  })

  test.serial('a pasted image and an uploaded video go in one message', async (t) => {
    await page.click('#clear-chat')
    const png = readFileSync(join(vl, 'image_b.png')).toString('base64')
    const mp4 = readFileSync(join(FIXTURES, 'vision', 'clip_h264.mp4')).toString('base64')
    // What a paste of a copied image delivers: a ClipboardEvent whose clipboardData holds the file.
    await page.evaluate(`(() => {
      const bytes = Uint8Array.from(atob('${png}'), (c) => c.charCodeAt(0))
      const data = new DataTransfer()
      data.items.add(new File([bytes], 'image.png', { type: 'image/png' }))
      document.querySelector('#prompt').dispatchEvent(new ClipboardEvent('paste', { clipboardData: data, bubbles: true, cancelable: true }))
    })()`)
    await page.waitForSelector('#attachments .attachment img')
    const input = await page.$('#file-input')
    await (input as unknown as { uploadFile(path: string): Promise<void> }).uploadFile(join(FIXTURES, 'vision', 'clip_h264.mp4'))
    await page.waitForSelector('#attachments .attachment video')
    await page.type('#prompt', 'What happens?')
    await page.click('#send')
    await lastReplyDone()
    const r = await reply()
    t.is(r.error, undefined)
    const want = await s.client.chat.completions.create({
      model: 'tiny-vl',
      messages: [
        {
          role: 'user',
          content: [
            { type: 'image_url', image_url: { url: `data:image/png;base64,${png}` } },
            { type: 'video_url', video_url: { url: `data:video/mp4;base64,${mp4}` } } as never,
            { type: 'text', text: 'What happens?' },
          ],
        },
      ],
      temperature: 0,
      top_p: 1,
      max_tokens: ref.cases.one_image.greedy_ids.length,
    })
    t.is(r.text, want.choices[0]!.message.content)
    t.regex(r.meta!, new RegExp(`^tiny-vl · ${want.usage!.prompt_tokens} prompt \\+ ${want.usage!.completion_tokens} tokens`))
    t.is(await page.$$eval('.message.user .media > *', (els) => els.map((e) => e.tagName).join(',')), 'IMG,VIDEO')
  })

  test.serial('a model launched from the form answers in the chat; terminate removes it', async (t) => {
    await fill('#launch [name=model]', fixture('qwen2-audio-tiny'))
    await fill('#launch [name=uid]', 'second')
    await fill('#launch [name=max_model_len]', '512')
    await fill('#launch [name=limit_mm_per_prompt]', '{"audio": 1}')
    await page.select('#launch [name=dtype]', 'f32')
    await fill('#launch [name=extra]', '{"max_num_seqs": 4}')
    await shot('4-launch-form')
    await page.click('#launch button[type=submit]')
    // The picker moves to the new model once it is ready.
    await pickerShows('second', 60_000)
    t.is(await page.$eval('#launch-error', (e) => e.textContent), '')
    const info = (await (await fetch(`${s.base}/v1/instances/second`)).json()) as { max_model_len: number; status: string }
    t.is(info.status, 'ready')
    t.is(info.max_model_len, 512)

    await page.click('#clear-chat')
    const clip = join(fixture('qwen2-audio-tiny'), 'clip1.wav')
    const input = await page.$('#file-input')
    await (input as unknown as { uploadFile(path: string): Promise<void> }).uploadFile(clip)
    await page.waitForSelector('#attachments .attachment audio')
    const prompt = 'What is this sound?'
    await page.type('#prompt', prompt)
    await page.keyboard.press('Enter')
    await lastReplyDone()
    const r = await reply()
    t.is(r.error, undefined)
    t.is(r.model, 'second')
    const wav = readFileSync(clip).toString('base64')
    const want = await s.client.chat.completions.create({
      model: 'second',
      messages: [{ role: 'user', content: [{ type: 'audio_url', audio_url: { url: `data:audio/wav;base64,${wav}` } } as never, { type: 'text', text: prompt }] }],
      temperature: 0,
      top_p: 1,
      max_tokens: 8,
    })
    t.is(r.text, want.choices[0]!.message.content)
    t.true(r.chunks >= 2, String(r.chunks))
    t.regex(r.meta!, new RegExp(`^second · ${want.usage!.prompt_tokens} prompt`))
    // The form's limit_mm_per_prompt reached the model: two clips in one message are refused.
    await (input as unknown as { uploadFile(...paths: string[]): Promise<void> }).uploadFile(clip, join(fixture('qwen2-audio-tiny'), 'clip2.wav'))
    await page.waitForFunction(`document.querySelectorAll('#attachments .attachment').length === 2`)
    await page.type('#prompt', 'And these?')
    await page.click('#send')
    await lastReplyDone()
    t.regex((await reply()).error ?? '', /audio/)
    t.is(await page.$$eval('.message.user.unsent', (els) => els.length), 1)
    t.deepEqual(await page.$$eval('#instances tbody tr', (rows) => rows.map((row) => row.getAttribute('data-uid'))), ['tiny-vl', 'second'])
    await shot('5-second-model')

    await page.click('#instances tr[data-uid="second"] button.terminate')
    await page.waitForFunction(`document.querySelector('#instances tr[data-uid="second"]') === null`, { timeout: 30_000 })
    t.is((await fetch(`${s.base}/v1/instances/second`)).status, 404)
    t.deepEqual(await page.$$eval('#model-picker option', (opts) => opts.map((o) => o.getAttribute('value'))), ['tiny-vl'])
    await shot('6-terminated')
  })

  test.serial('a launch the server refuses shows its message', async (t) => {
    await fill('#launch [name=model]', '/no/such/model')
    await page.click('#launch button[type=submit]')
    await page.waitForFunction(`document.querySelector('#launch-error').textContent !== ''`)
    t.regex((await page.$eval('#launch-error', (e) => e.textContent))!, /^model path not found: \/no\/such\/model/)
  })

  test.serial('with --api-key the page loads, but answers nothing until the key is given', async (t) => {
    const locked = await startTestServer({ models: [], apiKey: 'sekret' })
    try {
      const keyed = await browser.newPage()
      await keyed.setViewport({ width: 1280, height: 800 })
      t.is((await keyed.goto(locked.base))!.status(), 200)
      await keyed.waitForSelector('#key-form:not([hidden])')
      t.is(await keyed.evaluate(`fetch('/v1/instances').then((r) => r.status)`), 401)
      await keyed.type('#api-key', 'wrong')
      await keyed.click('#key-form button')
      await keyed.waitForFunction(`document.querySelector('#key-error').textContent === 'the server refused this key'`)
      await keyed.screenshot({ path: join(ARTEFACTS, '7-api-key-refused.png') })
      await keyed.click('#api-key', { count: 3 })
      await keyed.type('#api-key', 'sekret')
      await keyed.click('#key-form button')
      await keyed.waitForSelector('#key-form[hidden]')
      t.is(await keyed.$eval('#server-status', (e) => e.textContent), '0 models')
      await keyed.close()
    } finally {
      await locked.server.close()
    }
  })
}
