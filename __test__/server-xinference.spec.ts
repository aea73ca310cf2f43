// The real Xinference Python client (`xinference-client` from PyPI) against
// `candela serve`: launch_model, get_model(uid).chat with image and audio
// parts, list_models, terminate_model; behind an API key.
import { readFileSync } from 'node:fs'

import test from 'ava'

import { fixture } from './helpers.js'
import { python, runPython, venvPython } from './python-venv.js'
import { post, startTestServer, until } from './server-helpers.js'

const pyTest = python ? test.serial : test.serial.skip
const KEY = 'sk-xinf'

/** A value as Python reads it (JSON's true / null are not Python). */
const pyJson = (x: unknown): string => `json.loads(${JSON.stringify(JSON.stringify(x))})`

const dataUrl = (path: string, mime: string): string => `data:${mime};base64,${readFileSync(path).toString('base64')}`

pyTest('the Xinference client launches, chats with images and audio, lists and terminates', async (t) => {
  t.timeout(600_000)
  const py = venvPython(['xinference_client'], ['xinference-client'])
  const s = await startTestServer({ models: [], apiKey: KEY, logRequests: false })
  try {
    const image = dataUrl(fixture('qwen2-vl-tiny/image_a.png'), 'image/png')
    const clip1 = dataUrl(fixture('qwen2-audio-tiny/clip1.wav'), 'audio/wav')
    const clip2 = dataUrl(fixture('qwen2-audio-tiny/clip2.wav'), 'audio/wav')
    const visionMessages = [{ role: 'user', content: [{ type: 'text', text: 'What is in the image?' }, { type: 'image_url', image_url: { url: image } }] }]
    // The seed's audio example: audio parts in earlier turns of a multi-turn chat.
    const audioMessages = [
      { role: 'system', content: 'You are a helpful assistant.' },
      { role: 'user', content: [{ type: 'audio', audio_url: clip1 }, { type: 'text', text: 'What is said here?' }] },
      { role: 'assistant', content: 'A short sentence.' },
      { role: 'user', content: [{ type: 'audio', audio_url: clip2 }, { type: 'text', text: 'And here?' }] },
    ]
    const gen = { max_tokens: 6, temperature: 0 }
    const auth = { authorization: `Bearer ${KEY}` }
    const direct = async (model: string, messages: unknown) => {
      const r = await post(`${s.base}/v1/chat/completions`, { model, messages, ...gen }, auth)
      t.is(r.status, 200, r.text)
      return r.json.choices[0].message.content as string
    }
    // The same vision model under another uid answers the OpenAI wire format directly (the client terminates its own).
    t.is((await post(`${s.base}/v1/instances`, { model: fixture('qwen2-vl-tiny'), uid: 'ref-vl' }, auth)).status, 202)
    t.true(await until(async () => (await fetch(`${s.base}/v1/instances/ref-vl`, { headers: auth }).then((r) => r.json()) as { status: string }).status === 'ready', 60_000))
    const visionDirect = await direct('ref-vl', visionMessages)
    const script = `
import json, sys
from xinference_client import RESTfulClient as Client
client = Client(${JSON.stringify(s.base)}, api_key=${JSON.stringify(KEY)})
out = {}
vl = client.launch_model(model_name=${JSON.stringify(fixture('qwen2-vl-tiny'))}, model_engine="candela", model_format="pytorch",
                         quantization="none", model_size_in_billions=2, model_uid="vl", limit_mm_per_prompt='{"image": 4}')
au = client.launch_model(model_name=${JSON.stringify(fixture('qwen2-audio-tiny'))}, model_type="LLM", model_uid="au", n_gpu=None, max_model_len=512)
out["uids"] = [vl, au]
out["listed"] = sorted(client.list_models().keys())
out["vision"] = client.get_model(vl).chat(messages=${pyJson(visionMessages)}, generate_config=${pyJson(gen)})
out["audio"] = client.get_model(au).chat(messages=${pyJson(audioMessages)}, generate_config=${pyJson(gen)})
chunks = client.get_model(vl).chat(messages=${pyJson(visionMessages)}, generate_config=${pyJson({ ...gen, stream: true })})
out["streamed"] = "".join((c["choices"][0]["delta"].get("content") or "") for c in chunks if c["choices"])
try:
    client.launch_model(model_name=${JSON.stringify(fixture('llama-tiny'))}, model_uid="q", quantization="Q4_K_M")
    out["quant_error"] = None
except RuntimeError as e:
    out["quant_error"] = str(e)
try:
    client.launch_model(model_name=${JSON.stringify(fixture('llama-tiny'))}, model_uid="vl")
    out["dup_error"] = None
except RuntimeError as e:
    out["dup_error"] = str(e)
client.terminate_model(vl)
out["after"] = sorted(client.list_models().keys())
try:
    client.get_model(vl)
    out["gone"] = None
except RuntimeError as e:
    out["gone"] = str(e)
print(json.dumps(out))
`
    const got = JSON.parse(await runPython(py, script)) as {
      uids: string[]
      listed: string[]
      vision: { model: string; choices: Array<{ message: { content: string } }> }
      audio: { model: string; choices: Array<{ message: { content: string } }> }
      streamed: string
      quant_error: string | null
      dup_error: string | null
      after: string[]
      gone: string | null
    }
    t.deepEqual(got.uids, ['vl', 'au'])
    t.deepEqual(got.listed, ['au', 'ref-vl', 'vl'])
    // The same requests straight over OpenAI's wire format give the same greedy answers.
    t.is(got.vision.model, 'vl')
    t.is(got.audio.model, 'au')
    t.is(got.audio.choices[0]!.message.content, await direct('au', audioMessages))
    t.is(got.vision.choices[0]!.message.content, visionDirect)
    t.is(got.streamed, got.vision.choices[0]!.message.content)
    t.regex(got.quant_error ?? '', /quantization "Q4_K_M": .* is a safetensors checkpoint, quantized at load to one of q8_0, /)
    t.regex(got.dup_error ?? '', /a model is already launched as "vl"/)
    t.deepEqual(got.after, ['au', 'ref-vl'])
    t.regex(got.gone ?? '', /The model `vl` does not exist/)
  } finally {
    await s.server.close()
  }
})

test('Xinference launch fields: ignored when they only place the model, 400 when they would change results', async (t) => {
  const s = await startTestServer({ models: [], logRequests: false })
  try {
    const launch = (body: object) => post(`${s.base}/v1/models?wait_ready=false`, { model_name: fixture('llama-tiny'), ...body })
    let r = await launch({ model_uid: 'a', model_engine: 'vllm', model_size_in_billions: 1, worker_ip: '10.0.0.1', gpu_idx: null, replica: 1, n_worker: 1, envs: {} })
    t.is(r.status, 200, r.text)
    t.deepEqual(r.json, { model_uid: 'a' })
    for (const [body, param] of [
      [{ model_uid: 'b', model_type: 'embedding' }, 'model_type'],
      [{ model_uid: 'b', model_format: 'awq' }, 'model_format'],
      [{ model_uid: 'b', replica: 2 }, 'replica'],
      [{ model_uid: 'b', n_gpu: 4 }, 'n_gpu'],
      [{ model_uid: 'b', peft_model_config: { lora_list: [] } }, 'peft_model_config'],
      [{ model_uid: 'b', enable_thinking: true }, 'enable_thinking'],
    ] as const) {
      r = await launch(body)
      t.is(r.status, 400, JSON.stringify(body))
      t.is(r.json.error.param, param)
      t.is(r.json.detail, r.json.error.message)
    }
    r = await launch({ model_uid: 'b', trust_remote_code: true })
    t.is(r.status, 400)
    t.regex(r.json.detail, /unknown model option "trust-remote-code"/)
  } finally {
    await s.server.close()
  }
})
