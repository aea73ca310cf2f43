/**
 * Qwen2-VL, Qwen2.5-VL and Qwen2-Audio from llama.cpp's pair of files (a
 * text GGUF + an mmproj, made from the fixtures by llama.cpp's own converter:
 * scripts/make_gguf_fixtures.py; the F16 pairs are committed): the library
 * and `candela serve --mmproj` with the openai client give transformers' greedy tokens, as the
 * safetensors folders do. The mmproj carries no pixel bounds, so requests
 * pass the fixture's (mm_processor_kwargs).
 */

import test from 'ava'
import { spawn } from 'node:child_process'
import { readFileSync } from 'node:fs'
import { createServer } from 'node:net'
import type { AddressInfo } from 'node:net'
import { join } from 'node:path'
import OpenAI from 'openai'

import { Engine } from '../src/index.js'
import type { ChatMessage } from '../src/index.js'
import { fixture, ROOT } from './helpers.js'

interface Case {
  messages: Array<{ role: string; content: Array<{ type: string; text?: string }> }>
  greedy_ids: number[]
}
type VlRef = { cases: Record<'one_image' | 'two_images' | 'video', Case> }
type AudioRef = { messages: Array<{ role: string; content: string | Array<{ type: string; text?: string }> }>; clips: string[]; greedy_ids: number[] }

// The F16 pairs are committed in fixtures/gguf; the F32 ones are checked
// when CANDELA_GGUF_FIXTURES names the folder the script wrote them to.
const dirFor = (ty: string): string | undefined => (ty === 'f16' ? fixture('gguf') : process.env.CANDELA_GGUF_FIXTURES)
const pair = (name: string, ty: string): { model: string; mmproj: string } => ({
  model: join(dirFor(ty) ?? '', `${name}-${ty}.gguf`),
  mmproj: join(dirFor(ty) ?? '', `mmproj-${name}-${ty}.gguf`),
})
// F32 pairs only when the folder that holds them is named.
const TYPES = process.env.CANDELA_GGUF_FIXTURES ? ['f32', 'f16'] : ['f16']
const json = <T>(name: string, file: string): T => JSON.parse(readFileSync(join(fixture(name), file), 'utf8')) as T
const greedy = { maxTokens: 8, temperature: 0, ignoreEos: true }

/** The fixture's pixel bounds as processor kwargs. */
function bounds(name: string): { min_pixels: number; max_pixels: number } {
  const pp = json<{ min_pixels: number; max_pixels: number }>(name, 'preprocessor_config.json')
  return { min_pixels: pp.min_pixels, max_pixels: pp.max_pixels }
}

function vlMessages(name: string, c: Case): ChatMessage[] {
  const file = (f: string): Buffer => readFileSync(join(fixture(name), f))
  const images = [file('image_a.png'), file('image_b.png')]
  const frames = [0, 1, 2, 3].map((i) => file(`frame_${i}.png`))
  let k = 0
  return c.messages.map((m) => ({
    role: m.role,
    content: m.content.map((p) => {
      if (p.type === 'text') return p
      if (p.type === 'video') return { type: 'video', video: frames }
      return { type: 'image', image: images[k++] }
    }),
  })) as ChatMessage[]
}

for (const name of ['qwen2-vl-tiny', 'qwen2_5-vl-tiny']) {
  for (const ty of TYPES) {
    test(`${name} ${ty} GGUF + mmproj: images and video give transformers' greedy tokens`, async (t) => {
      const ref = json<VlRef>(name, 'reference.json')
      const engine = await Engine.load({ ...pair(name, ty), dtype: 'f32', maxModelLen: 512, maxNumBatchedTokens: 16, limitMmPerPrompt: { image: 2, video: 1 } })
      try {
        t.is(engine.info.architecture, name === 'qwen2-vl-tiny' ? 'Qwen2VLForConditionalGeneration' : 'Qwen2_5_VLForConditionalGeneration')
        for (const c of ['one_image', 'two_images', 'video'] as const) {
          const out = await engine.chat(vlMessages(name, ref.cases[c]), { ...greedy, mmProcessorKwargs: bounds(name) })
          t.deepEqual(out.tokenIds, ref.cases[c].greedy_ids, c)
        }
      } finally {
        await engine.close()
      }
    })
  }
}

for (const ty of TYPES) {
  test(`qwen2-audio-tiny ${ty} GGUF + mmproj: audio gives transformers' greedy tokens`, async (t) => {
    const ref = json<AudioRef>('qwen2-audio-tiny', 'reference.json')
    const clips = ref.clips.map((f) => readFileSync(join(fixture('qwen2-audio-tiny'), f)).toString('base64'))
    let k = 0
    const messages = ref.messages.map((m) => ({
      role: m.role,
      content: typeof m.content === 'string' ? m.content : m.content.map((p) => (p.type === 'text' ? p : { type: 'input_audio', input_audio: { data: clips[k++], format: 'wav' } })),
    })) as ChatMessage[]
    const engine = await Engine.load({ ...pair('qwen2-audio-tiny', ty), dtype: 'f32', limitMmPerPrompt: { audio: 2 } })
    try {
      t.is(engine.info.architecture, 'Qwen2AudioForConditionalGeneration')
      t.deepEqual((await engine.chat(messages, greedy)).tokenIds, ref.greedy_ids)
    } finally {
      await engine.close()
    }
  })
}

test('a pair of different families is refused, naming both files', async (t) => {
  const vl = pair('qwen2-vl-tiny', 'f16')
  const audio = pair('qwen2-audio-tiny', 'f16')
  for (const [model, mmproj] of [
    [vl.model, audio.mmproj],
    [audio.model, vl.mmproj],
  ] as const) {
    const err = await t.throwsAsync(Engine.load({ model, mmproj }))
    t.true(err!.message.includes(model) && err!.message.includes(mmproj), err!.message)
  }
})

async function freePort(): Promise<number> {
  const srv = createServer()
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r))
  const port = (srv.address() as AddressInfo).port
  await new Promise((r) => srv.close(r))
  return port
}

test('candela serve model.gguf --mmproj mmproj.gguf answers the openai client with an image', async (t) => {
  const name = 'qwen2_5-vl-tiny'
  const { model, mmproj } = pair(name, 'f16')
  const port = await freePort()
  const env: NodeJS.ProcessEnv = { ...process.env }
  delete env.CANDELA_API_KEY
  const child = spawn(process.execPath, [join(ROOT, 'dist', 'cli.js'), 'serve', model, '--mmproj', mmproj, '--port', String(port), '--served-model-name', 'vl', '--dtype', 'f32'], {
    env,
    stdio: ['ignore', 'pipe', 'pipe'],
  })
  let out = ''
  child.stdout.on('data', (d: Buffer) => (out += d.toString()))
  child.stderr.on('data', (d: Buffer) => (out += d.toString()))
  const exited = new Promise<number | null>((r) => child.on('close', (code) => r(code)))
  try {
    const end = Date.now() + 30_000
    while (!out.includes('serving vl') && Date.now() < end) await new Promise((r) => setTimeout(r, 50))
    t.true(out.includes('serving vl'), out)
    const ref = json<VlRef>(name, 'reference.json')
    const png = readFileSync(join(fixture(name), 'image_a.png')).toString('base64')
    const client = new OpenAI({ baseURL: `http://127.0.0.1:${port}/v1`, apiKey: 'none' })
    const c = ref.cases.one_image
    const res = await client.chat.completions.create({
      model: 'vl',
      messages: [{ role: 'user', content: [{ type: 'image_url', image_url: { url: `data:image/png;base64,${png}` } }, { type: 'text', text: c.messages[0]!.content[1]!.text! }] }],
      max_tokens: 8,
      temperature: 0,
      ...({ ignore_eos: true, mm_processor_kwargs: bounds(name) } as Record<string, unknown>),
    })
    const engine = await Engine.load({ model, mmproj, dtype: 'f32' })
    try {
      t.is(res.choices[0]!.message.content, await engine.detokenize(c.greedy_ids))
    } finally {
      await engine.close()
    }
  } finally {
    child.kill('SIGTERM')
  }
  t.is(await exited, 0, out)
})
