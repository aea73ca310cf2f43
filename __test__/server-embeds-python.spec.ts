/**
 * The seed's own embeddings snippets (vLLM "Multimodal Inputs", online
 * serving), run as a user runs them: tensors serialized by the real
 * `torch.save` and `np.save`, base64-encoded and sent by the Python `openai`
 * client to `candela serve --enable-mm-embeds` on the tiny fixtures. Also the
 * uuid reuse of "Cached Inputs" and hostile payloads (pickled code, a zip
 * bomb, a legacy pickle), which must be 400s.
 *
 * Python: a venv under the temp dir with `openai` and `numpy` from PyPI
 * (python-venv.ts; ~30 MB, well under a minute). The torch.save archives
 * were written once by the real torch (fixtures/torch-save, from
 * scripts/make_torch_save_fixtures.py), so no test downloads torch (PyPI's
 * Linux wheel is the CUDA build: 5.5 GB with its nvidia-* wheels).
 */

import test from 'ava'
import type { ExecutionContext } from 'ava'
import { readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'

import { fixture, readF32, tempDir } from './helpers.js'
import { python, runPython, venvPython } from './python-venv.js'
import { extra, startTestServer } from './server-helpers.js'
import type { TestServer } from './server-helpers.js'

const vl = fixture('qwen2-vl-tiny')
const au = fixture('qwen2-audio-tiny')
const py = python === undefined ? undefined : venvPython(['openai', 'numpy'], ['openai', 'numpy'])
const work = tempDir('candela-embeds-')

/** Write a tensor of the fixture's reference as raw f32 for Python to read. */
function rawF32(dir: string, name: string): { path: string; shape: number[] } {
  const { data, shape } = readF32(join(dir, 'reference.safetensors'), name)
  const path = join(work, `${name}.f32`)
  writeFileSync(path, Buffer.from(data.buffer, data.byteOffset, data.byteLength))
  return { path, shape }
}

/** A torch.save archive of fixtures/torch-save, base64 as the seed's snippets send it. */
const torchSaved = (name: string): string => readFileSync(join(fixture('torch-save'), `${name}.pt`)).toString('base64')

/** Send each message with the `openai` client; each answer's text, or its error. */
const CLIENT = String.raw`
import json, os
import openai

client = openai.OpenAI(base_url=os.environ["BASE"] + "/v1", api_key="unused", max_retries=0)
out = []
for content in json.load(open(os.environ["CONTENTS"])):
    try:
        r = client.chat.completions.create(
            model=os.environ["MODEL"],
            messages=[{"role": "user", "content": content}],
            max_tokens=8, temperature=0, extra_body={"ignore_eos": True},
        )
        out.append({"text": r.choices[0].message.content})
    except openai.APIStatusError as e:
        out.append({"status": e.status_code, "message": e.message})
print(json.dumps(out))
`

type Answer = { text?: string; status?: number; message?: string }

/** The numpy side: `np.save` files of the reference embeddings (and a grid). */
const NPY = String.raw`
import base64, io, json, os
import numpy as np

def b64(a):
    buf = io.BytesIO()
    np.save(buf, a)
    return base64.b64encode(buf.getvalue()).decode()

x = np.fromfile(os.environ["EMBEDS"], dtype=np.float32).reshape(json.loads(os.environ["SHAPE"]))
print(json.dumps({"embeds": b64(x), "fortran": b64(np.asfortranarray(x)), "grid": b64(np.array([1, 6, 8], dtype=np.int64))}))
`

let asked = 0
async function ask(server: TestServer, model: string, contents: unknown[]): Promise<Answer[]> {
  const path = join(work, `contents-${asked++}.json`)
  writeFileSync(path, JSON.stringify(contents))
  return JSON.parse(await runPython(py!, CLIENT, { BASE: server.base, MODEL: model, CONTENTS: path })) as Answer[]
}

const text = (t: string) => ({ type: 'text', text: t })

const DESCRIBE = text('Describe this image.')
const embeds = (v: unknown, more: Record<string, unknown> = {}) => [{ type: 'image_embeds', image_embeds: v, ...more }, DESCRIBE]

let vlServer: TestServer | undefined
let expected: string | null
test.before(async () => {
  if (!py) return
  vlServer = await startTestServer({ load: { model: vl, dtype: 'f32', maxModelLen: 512, enableMmEmbeds: true }, servedModelName: 'tiny-vl' })
  // What the image itself answers: the embeddings below are its vision tower's output.
  const png = readFileSync(join(vl, 'image_a.png')).toString('base64')
  const r = await vlServer.client.chat.completions.create(
    extra({
      model: 'tiny-vl',
      messages: [{ role: 'user', content: [{ type: 'image_url', image_url: { url: `data:image/png;base64,${png}` } }, { type: 'text', text: 'Describe this image.' }] }],
      max_tokens: 8,
      temperature: 0,
      ignore_eos: true,
    }),
  )
  expected = r.choices[0]!.message.content
})
test.after.always(async () => {
  await vlServer?.server.close()
})

const refused = (t: ExecutionContext, a: Answer | undefined, re: RegExp) => {
  t.is(a?.status, 400, JSON.stringify(a))
  t.regex(a?.message ?? '', re)
}

test.serial('image_embeds from np.save in the Qwen2-VL dict form (C and Fortran order), reused by uuid as image_embeds and image_pil (numpy only)', async (t) => {
  if (!py) return t.pass('no python3')
  const e = rawF32(vl, 'one_image.item0.embeds')
  const npyB64 = JSON.parse(await runPython(py, NPY, { EMBEDS: e.path, SHAPE: JSON.stringify(e.shape) })) as Record<string, string>
  const [dict, fortran, byUuid, pil, miss] = await ask(vlServer!, 'tiny-vl', [
    embeds({ image_embeds: npyB64.embeds, image_grid_thw: npyB64.grid }, { uuid: 'npy-1' }),
    embeds({ image_embeds: npyB64.fortran, image_grid_thw: npyB64.grid }),
    // "Cached Inputs": the uuid alone, as image_embeds and as image_pil.
    embeds(null, { uuid: 'npy-1' }),
    [{ type: 'image_pil', image_pil: null, uuid: 'npy-1' }, DESCRIBE],
    embeds(null, { uuid: 'never-sent' }),
  ])
  for (const a of [dict, fortran, byUuid, pil]) t.is(a!.text, expected!, JSON.stringify(a))
  refused(t, miss, /never-sent/)
})

test.serial('image_embeds from torch.save, plain and Qwen2-VL dict forms, reused by uuid; hostile files are 400s', async (t) => {
  if (!py) return t.pass('no python3')
  const torchB64 = Object.fromEntries(
    ['embeds', 'grid', 'strided', 'f16', 'p4', 'ints', 'narrow', 'evil', 'legacy', 'bomb'].map((n) => [n, torchSaved(n)]),
  )
  const answers = await ask(vlServer!, 'tiny-vl', [
    // The Qwen2-VL snippet: both tensors torch.save'd, with a uuid.
    embeds({ image_embeds: torchB64.embeds, image_grid_thw: torchB64.grid }, { uuid: 'emb-1' }),
    embeds(null, { uuid: 'emb-1' }),
    [{ type: 'image_pil', image_pil: null, uuid: 'emb-1' }, DESCRIBE],
    // The plain snippet, with the grid beside it; a strided and an f16 tensor.
    embeds(torchB64.embeds, { image_grid_thw: [1, 6, 8] }),
    embeds(torchB64.strided, { image_grid_thw: [1, 6, 8] }),
    embeds(torchB64.f16, { image_grid_thw: [1, 6, 8] }),
    embeds(torchB64.p4),
    // Wrong files.
    embeds(torchB64.ints, { image_grid_thw: [1, 6, 8] }),
    embeds(torchB64.narrow, { image_grid_thw: [1, 6, 8] }),
    embeds(torchB64.evil, { image_grid_thw: [1, 6, 8] }),
    embeds(torchB64.legacy, { image_grid_thw: [1, 6, 8] }),
    embeds(torchB64.bomb, { image_grid_thw: [1, 6, 8] }),
  ])
  const [dict, byUuid, pil, plain, strided, f16, p4, ints, narrow, evil, legacy, bomb] = answers
  for (const a of [dict, byUuid, pil, plain, strided, p4]) t.is(a!.text, expected!, JSON.stringify(a))
  t.is(typeof f16!.text, 'string', JSON.stringify(f16))
  refused(t, ints, /image_embeds must be a float tensor.*got dtype I32/)
  refused(t, narrow, /hidden size 8 but the model's hidden size is 16/)
  refused(t, evil, /references posix\.system; only tensors/)
  refused(t, legacy, /legacy .*torch\.save/)
  refused(t, bomb, /compress/i)
  // The server still answers.
  const after = await ask(vlServer!, 'tiny-vl', [embeds(null, { uuid: 'emb-1' })])
  t.is(after[0]!.text, expected!)
})

test.serial('audio_embeds (np.save of the audio tower output) answer as the clip itself', async (t) => {
  if (!py) return t.pass('no python3')
  const e = rawF32(au, 'audio_embeds.0')
  const npyB64 = JSON.parse(await runPython(py, NPY, { EMBEDS: e.path, SHAPE: JSON.stringify(e.shape) })) as Record<string, string>
  const s = await startTestServer({ load: { model: au, dtype: 'f32', enableMmEmbeds: true }, servedModelName: 'tiny-audio' })
  try {
    const wav = readFileSync(join(au, 'clip1.wav')).toString('base64')
    const [clip, embeds, short] = await ask(s, 'tiny-audio', [
      [{ type: 'input_audio', input_audio: { data: wav, format: 'wav' } }, text('What is said?')],
      [{ type: 'audio_embeds', audio_embeds: npyB64.embeds }, text('What is said?')],
      [{ type: 'audio_embeds', audio_embeds: npyB64.grid }, text('What is said?')],
    ])
    t.is(typeof clip!.text, 'string', JSON.stringify(clip))
    t.is(embeds!.text, clip!.text, JSON.stringify(embeds))
    t.is(short!.status, 400, JSON.stringify(short))
  } finally {
    await s.server.close()
  }
})
