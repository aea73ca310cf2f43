// Several models in one server: routed by `model`, launched / listed /
// terminated by uid over REST and the CLI, loading in the background (503 +
// Retry-After meanwhile), refused when they cannot fit, evicted LRU-first.
import { spawn } from 'node:child_process'
import { createHash } from 'node:crypto'
import { existsSync, readFileSync, statSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'

import test from 'ava'

import { parseModelFlag, serveConfig, serverOptionsOf } from '../dist/cli/serve.js'
import { fixture, reference, ROOT, tempDir } from './helpers.js'
import { repoFromDir, startMockHub } from './mock-hub.js'
import type { MockHub } from './mock-hub.js'
import { metricsText, post, sample, startTestServer, until } from './server-helpers.js'
import type { TestServer } from './server-helpers.js'

const llamaRef = reference('llama-tiny').prompts[0]!
const qwenRef = reference('qwen2-tiny').prompts[0]!
const HUB_REPO = 'candela-test/llama-tiny'
const HUB_REPO_2 = 'candela-test/llama-tiny-again'
const GGUF_REPO = 'candela-test/tiny-gguf'
const PT_REPO = 'candela-test/pytorch-only'

let hub: MockHub
test.before(async () => {
  const gguf = readFileSync(fixture('llama-tiny.gguf'))
  hub = await startMockHub({
    [HUB_REPO]: repoFromDir(fixture('llama-tiny')),
    [HUB_REPO_2]: repoFromDir(fixture('llama-tiny')),
    [GGUF_REPO]: { files: { 'tiny-Q4_K_M.gguf': gguf, 'tiny-Q8_0.gguf': gguf } },
    [PT_REPO]: { files: { 'config.json': Buffer.from('{}'), 'pytorch_model.bin': Buffer.from('x') } },
  })
  process.env.HF_ENDPOINT = hub.endpoint
  process.env.HF_HUB_CACHE = tempDir('candela-models-')
})
test.after.always(async () => {
  await hub?.close()
})

const complete = (base: string, model: string | undefined, prompt: string, tokens: number) =>
  post(`${base}/v1/completions`, { ...(model ? { model } : {}), prompt, max_tokens: tokens, temperature: 0, ignore_eos: true })
const get = async (url: string) => {
  const res = await fetch(url)
  return { status: res.status, json: (await res.json()) as any }
}
const del = async (url: string) => {
  const res = await fetch(url, { method: 'DELETE' })
  return { status: res.status, json: (await res.json()) as any }
}

async function twoModels(): Promise<TestServer> {
  return startTestServer({
    models: [
      // f32: the references' arithmetic (the bf16 fixtures' prompt rows take
      // a bf16 engine under 'auto' where the CPU has one).
      { uid: 'llama', model: fixture('llama-tiny'), load: { dtype: 'f32' } },
      { uid: 'qwen', model: fixture('qwen2-tiny'), load: { maxModelLen: 256, dtype: 'f32' } },
    ],
  })
}

test('requests are routed by `model` to each model\'s own engine', async (t) => {
  const s = await twoModels()
  try {
    const a = await complete(s.base, 'llama', llamaRef.text, llamaRef.greedy_ids.length)
    const b = await complete(s.base, 'qwen', qwenRef.text, qwenRef.greedy_ids.length)
    t.is(a.status, 200, a.text)
    t.is(b.status, 200, b.text)
    t.is(a.json.model, 'llama')
    t.is(a.json.choices[0].text, llamaRef.greedy_text)
    t.is(b.json.model, 'qwen')
    t.is(b.json.choices[0].text, qwenRef.greedy_text)
    // No `model`: the first model, as a one-model server answers.
    t.is((await complete(s.base, undefined, llamaRef.text, 2)).json.model, 'llama')
    const models = await get(`${s.base}/v1/models`)
    t.deepEqual(
      models.json.data.map((m: { id: string }) => m.id),
      ['llama', 'qwen'],
    )
    const missing = await complete(s.base, 'nope', 'x', 1)
    t.is(missing.status, 404)
    t.is(missing.json.error.code, 'model_not_found')
    t.regex(missing.json.error.message, /Served: llama, qwen/)
    // vLLM's names, one series per model (the endpoint picker's inputs).
    const m = await metricsText(s.base)
    for (const model_name of ['llama', 'qwen']) {
      const labels = { model_name, engine: '0' }
      t.is(sample(m, 'vllm:num_requests_running', labels), 0, model_name)
      t.is(sample(m, 'vllm:num_requests_waiting', labels), 0, model_name)
      const usage = sample(m, 'vllm:kv_cache_usage_perc', labels)!
      t.true(usage >= 0 && usage <= 1, String(usage))
      t.is(sample(m, 'vllm:cache_config_info', { ...labels, block_size: '16', enable_prefix_caching: 'True' }), 1, model_name)
    }
    const perModel = (text: string, name: string) => ['llama', 'qwen'].reduce((n, model_name) => n + sample(text, name, { model_name })!, 0)
    t.is(perModel(m, 'vllm:generation_tokens_total'), sample(m, 'candela_generation_tokens_total')!)
    // The prefix cache counted in tokens: the same prompt again hits whole blocks.
    const prefix = async () => {
      const text = await metricsText(s.base)
      return ['queries', 'hits'].map((k) => sample(text, `vllm:prefix_cache_${k}_total`, { model_name: 'llama' })!)
    }
    const long = llamaRef.text.repeat(8)
    t.is((await complete(s.base, 'llama', long, 1)).status, 200)
    const [q0, h0] = await prefix()
    t.is((await complete(s.base, 'llama', long, 1)).status, 200)
    const [q1, h1] = await prefix()
    t.true(q1! > q0! && h1! - h0! >= 16 && (h1! - h0!) % 16 === 0, JSON.stringify({ q0, h0, q1, h1 }))
    // /metrics adds up the engines, and a terminated model's counts stay counted.
    const generated = async () => sample(await metricsText(s.base), 'candela_generation_tokens_total')!
    const before = await generated()
    t.true(before >= llamaRef.greedy_ids.length + qwenRef.greedy_ids.length + 2, String(before))
    t.is((await complete(s.base, 'qwen', qwenRef.text, 3)).status, 200)
    t.is(await generated(), before + 3)
    t.is((await del(`${s.base}/v1/instances/qwen`)).status, 200)
    t.is(sample(await metricsText(s.base), 'vllm:num_requests_running', { model_name: 'qwen' }), undefined, 'an unloaded model takes its series along')
    t.is((await complete(s.base, 'llama', llamaRef.text, 2)).status, 200)
    t.is(await generated(), before + 5)
    const list = await get(`${s.base}/v1/instances`)
    t.deepEqual(
      list.json.data.map((i: { uid: string; status: string; max_model_len: number }) => [i.uid, i.status, i.max_model_len]),
      [['llama', 'ready', 2048]],
    )
  } finally {
    await s.server.close()
  }
})

test('a launch returns at once; the model downloads in the background with progress, 503 + Retry-After until ready', async (t) => {
  const s = await startTestServer({ models: [] })
  try {
    const release = hub.hold(HUB_REPO, 'model.safetensors', 100_000)
    const launch = await post(`${s.base}/v1/instances`, { model: HUB_REPO, uid: 'hubbed', max_model_len: 32 })
    t.is(launch.status, 202, launch.text)
    t.is(launch.json.uid, 'hubbed')
    // The weights' download has started and is held part-way.
    t.true(await until(async () => (await get(`${s.base}/v1/instances/hubbed`)).json.download?.total_bytes >= 3185032, 60_000))
    const loading = await get(`${s.base}/v1/instances/hubbed`)
    t.is(loading.json.status, 'downloading')
    t.true(loading.json.download.downloaded_bytes < loading.json.download.total_bytes)
    const early = await complete(s.base, 'hubbed', 'Hi', 1)
    t.is(early.status, 503)
    t.is(early.headers.get('retry-after'), '2')
    t.is(early.json.error.code, 'model_loading')
    release()
    t.true(await until(async () => (await get(`${s.base}/v1/instances/hubbed`)).json.status === 'ready', 60_000))
    const ok = await complete(s.base, 'hubbed', llamaRef.text, llamaRef.greedy_ids.length)
    t.is(ok.status, 200, ok.text)
    t.is(ok.json.choices[0].text, llamaRef.greedy_text)
    t.is((await get(`${s.base}/v1/instances/hubbed`)).json.max_model_len, 32)
  } finally {
    await s.server.close()
  }
})

test('terminating a model mid-download stops the download; launching it again resumes it', async (t) => {
  const s = await startTestServer({ models: [] })
  try {
    const blobs = join(process.env.HF_HUB_CACHE!, 'models--candela-test--llama-tiny-again', 'blobs')
    const part = join(blobs, `${createHash('sha256').update(readFileSync(fixture('llama-tiny/model.safetensors'))).digest('hex')}.incomplete`)
    const release = hub.hold(HUB_REPO_2, 'model.safetensors', 100_000)
    t.is((await post(`${s.base}/v1/instances`, { model: HUB_REPO_2, uid: 'stopme' })).status, 202)
    t.true(await until(async () => (await get(`${s.base}/v1/instances/stopme`)).json.download?.total_bytes >= 3185032, 60_000))
    // Terminate once some bytes are on disk (the response headers arrive
    // before the first body bytes are written).
    t.true(await until(async () => existsSync(part) && statSync(part).size > 0, 60_000))
    t.is((await del(`${s.base}/v1/instances/stopme`)).status, 200)
    // The download stops (its lock goes) and keeps what arrived.
    t.true(await until(async () => existsSync(part) && !existsSync(`${part}.lock`), 60_000))
    const kept = statSync(part).size
    t.true(kept > 0 && kept < 3185032, String(kept))
    release()
    t.is((await post(`${s.base}/v1/instances`, { model: HUB_REPO_2, uid: 'again' })).status, 202)
    t.true(await until(async () => (await get(`${s.base}/v1/instances/again`)).json.status === 'ready', 60_000))
    t.true(hub.log.some((l) => l.server === 'cdn' && l.range === `bytes=${kept}-`))
  } finally {
    await s.server.close()
  }
})

test('bad launches are 4xx naming the problem; terminate frees the uid', async (t) => {
  const s = await startTestServer({ models: [{ uid: 'llama', model: fixture('llama-tiny') }] })
  try {
    const launch = (body: object) => post(`${s.base}/v1/instances`, body)
    let r = await launch({ model: fixture('llama-tiny'), uid: 'llama' })
    t.is(r.status, 400)
    t.is(r.json.error.code, 'model_exists')
    r = await launch({ model: '/no/such/model' })
    t.is(r.status, 400)
    t.regex(r.json.error.message, /^model path not found: \/no\/such\/model/)
    r = await launch({ model: fixture('llama-tiny'), uid: 'x', max_model_len: 'lots' })
    t.is(r.status, 400)
    t.regex(r.json.error.message, /^max_model_len expects an integer, got "lots"/)
    r = await launch({ model: fixture('llama-tiny'), uid: 'x', warp_speed: 9 })
    t.is(r.status, 400)
    t.regex(r.json.error.message, /unknown model option "warp-speed"/)
    r = await launch({ uid: 'x' })
    t.is(r.status, 400)
    t.is(r.json.error.param, 'model')
    r = await launch({ model: fixture('llama-tiny'), uid: 'x', quantization: 'Q4_K_M' })
    t.is(r.status, 400)
    t.is(r.json.error.param, 'quantization')
    t.regex(r.json.error.message, /is a safetensors checkpoint, quantized at load to one of q8_0, q6_k, q5_k, q4_k, q4_0/)
    // A safetensors checkpoint's quantization is applied at load.
    r = await launch({ model: fixture('llama-tiny'), uid: 'at-load', quantization: 'Q8_0' })
    t.is(r.status, 202, r.text)
    t.true(await until(async () => (await get(`${s.base}/v1/instances/at-load`)).json.status === 'ready', 60_000))
    t.is(s.server.models.get('at-load').loaded?.info.quantization, 'q8_0')
    t.is((await complete(s.base, 'at-load', 'Hello', 2)).status, 200)
    r = await launch({ model: fixture('llama-tiny'), uid: 'x', format: 'gguf' })
    t.is(r.status, 400)
    t.regex(r.json.error.message, /is not a GGUF file, not format "gguf"/)
    // A GGUF repo's quantization picks its file.
    r = await launch({ model: GGUF_REPO, uid: 'q8', quantization: 'Q8_0' })
    t.is(r.status, 202, r.text)
    t.true(await until(async () => (await get(`${s.base}/v1/instances/q8`)).json.status === 'ready', 60_000))
    t.true((await get(`${s.base}/v1/instances/q8`)).json.path.endsWith('tiny-Q8_0.gguf'))
    t.is((await get(`${s.base}/v1/instances/q8`)).json.model, `hf:${GGUF_REPO}:Q8_0`)
    // A launch that loads and then fails: described with the reason, chat is 503.
    const broken = tempDir('candela-broken-')
    writeFileSync(join(broken, 'config.json'), '{not json')
    r = await launch({ model: broken, uid: 'broken' })
    t.is(r.status, 202)
    t.true(await until(async () => (await get(`${s.base}/v1/instances/broken`)).json.status === 'failed', 60_000))
    t.regex((await get(`${s.base}/v1/instances/broken`)).json.error, /.+/)
    t.is((await complete(s.base, 'broken', 'x', 1)).json.error.code, 'model_load_failed')

    t.is((await get(`${s.base}/v1/instances/nope`)).status, 404)
    t.is((await del(`${s.base}/v1/instances/nope`)).status, 404)
    t.deepEqual((await del(`${s.base}/v1/instances/llama`)).json, { uid: 'llama', terminated: true })
    t.is((await complete(s.base, 'llama', 'x', 1)).status, 404)
    t.is((await launch({ model: fixture('llama-tiny'), uid: 'llama' })).status, 202)
  } finally {
    await s.server.close()
  }
})

test('a model argument that cannot be loaded is a 400 at launch, before any download', async (t) => {
  const s = await startTestServer({ models: [] })
  try {
    const launch = (model: string) => post(`${s.base}/v1/instances`, { model, uid: 'x' })
    const refused = async (model: string, code: string, message: RegExp) => {
      const r = await launch(model)
      t.is(r.status, 400, r.text)
      t.is(r.json.error.code, code, model)
      t.is(r.json.error.param, 'model')
      t.regex(r.json.error.message, message)
    }
    // Local paths that are not models.
    await refused(fixture('README.md'), 'invalid_model', /README\.md is not a model: give a model folder \(config\.json, tokenizer\.json, safetensors weights\) or a \.gguf file/)
    await refused(fixture('vision'), 'invalid_model', /vision is not a model folder: it has no config\.json/)
    const fake = join(tempDir('candela-fake-'), 'model.gguf')
    writeFileSync(fake, 'not a gguf')
    await refused(fake, 'invalid_model', /model\.gguf is not a GGUF file/)
    // Repos: missing, without a checkpoint candela loads, without the quantization asked for.
    await refused('candela-test/no-such-repo', 'model_not_found', /repository candela-test\/no-such-repo not found/)
    await refused(PT_REPO, 'unsupported_model', /candela-test\/pytorch-only has no checkpoint candela can load/)
    await refused(`hf:${GGUF_REPO}:Q2_K`, 'unsupported_model', /has no GGUF file with quantization Q2_K/)
    t.is((await get(`${s.base}/v1/instances`)).json.data.length, 0)
    t.false(hub.log.some((l) => l.server === 'cdn' && l.path.includes('pytorch')), 'nothing was downloaded')
  } finally {
    await s.server.close()
  }
})

test('a launch that cannot fit is refused with the numbers', async (t) => {
  const s = await startTestServer({ models: [], memoryBudgetBytes: 4 * 2 ** 20 })
  try {
    const r = await post(`${s.base}/v1/instances`, { model: fixture('llama-tiny'), uid: 'big', kv_cache_memory: '2MiB' })
    t.is(r.status, 400)
    t.is(r.json.error.code, 'insufficient_memory')
    t.is(r.json.error.message, 'model big does not fit: its weights (3.0 MiB) and KV cache (2.0 MiB) need 5.0 MiB, but 4.0 MiB is available (terminate a model, or pass a smaller kv_cache_memory)')
    t.is((await get(`${s.base}/v1/instances`)).json.data.length, 0)
  } finally {
    await s.server.close()
  }
})

test('--max-loaded-models: a launch evicts the least recently used idle model', async (t) => {
  const s = await startTestServer({
    maxLoadedModels: 2,
    models: [
      { uid: 'a', model: fixture('llama-tiny') },
      { uid: 'b', model: fixture('llama-tiny') },
    ],
  })
  try {
    // b is used after a: a is the least recently used.
    t.is((await complete(s.base, 'a', 'x', 1)).status, 200)
    t.is((await complete(s.base, 'b', 'x', 1)).status, 200)
    t.is((await post(`${s.base}/v1/instances`, { model: fixture('llama-tiny'), uid: 'c' })).status, 202)
    t.true(await until(async () => (await get(`${s.base}/v1/instances/c`)).json.status === 'ready', 60_000))
    t.deepEqual(
      (await get(`${s.base}/v1/instances`)).json.data.map((i: { uid: string }) => i.uid),
      ['b', 'c'],
    )
    t.is((await complete(s.base, 'a', 'x', 1)).status, 404)
  } finally {
    await s.server.close()
  }
})

function cli(args: string[]): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [join(ROOT, 'dist', 'cli.js'), ...args], { stdio: ['ignore', 'pipe', 'pipe'] })
    let stdout = ''
    let stderr = ''
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()))
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()))
    child.on('error', reject)
    child.on('close', (code) => resolve({ code, stdout, stderr }))
  })
}

test('candela launch / list / terminate talk to a running server', async (t) => {
  const s = await startTestServer({ models: [], apiKey: 'k' })
  try {
    const conn = ['--url', s.base, '--api-key', 'k']
    let r = await cli(['launch', fixture('llama-tiny'), '--uid', 'tiny', '--max-model-len', '48', '--no-enable-prefix-caching', '--wait', ...conn])
    t.is(r.code, 0, r.stderr)
    t.is(r.stdout, 'tiny\n')
    r = await cli(['list', ...conn])
    t.is(r.code, 0, r.stderr)
    t.is(r.stdout, `UID   STATUS  MODEL\ntiny  ready   ${fixture('llama-tiny')}\n`)
    const info = (await fetch(`${s.base}/v1/instances/tiny`, { headers: { authorization: 'Bearer k' } }).then((x) => x.json())) as { max_model_len: number }
    t.is(info.max_model_len, 48)
    r = await cli(['launch', fixture('llama-tiny'), '--uid', 'tiny', ...conn])
    t.is(r.code, 1)
    t.regex(r.stderr, /^candela: a model is already launched as "tiny"/)
    r = await cli(['terminate', 'tiny', ...conn])
    t.is(r.code, 0, r.stderr)
    r = await cli(['terminate', 'tiny', ...conn])
    t.is(r.code, 1)
    t.regex(r.stderr, /^candela: no model with uid "tiny"/)
    r = await cli(['list', '--url', s.base])
    t.is(r.code, 1)
  } finally {
    await s.server.close()
  }
})

test('--model NAME=PATH_OR_REPO,key=value... flags', (t) => {
  t.deepEqual(parseModelFlag('vl=Qwen/Qwen2-VL-2B-Instruct,max-model-len=4096,limit_mm_per_prompt={"image":4,"video":0}'), {
    uid: 'vl',
    model: 'Qwen/Qwen2-VL-2B-Instruct',
    options: [
      ['max-model-len', '4096'],
      ['limit-mm-per-prompt', '{"image":4,"video":0}'],
    ],
  })
  t.deepEqual(parseModelFlag('./m.gguf'), { uid: './m.gguf', model: './m.gguf', options: [] })
  t.throws(() => parseModelFlag('x=./m.gguf,max-model-len=big'), { message: /^--model x: --max-model-len expects an integer/ })
  t.throws(() => parseModelFlag('x=./m.gguf,port=1'), { message: /unknown model option "port"/ })
  // Global model flags are every model's defaults; MODEL is kept unless only --model models are asked for.
  const cfg = serveConfig([], { model: ['a=./a,max-num-seqs=2', 'b=./b'], 'max-num-seqs': '8', 'max-loaded-models': '3' })
  const opts = serverOptionsOf(cfg)
  t.is(opts.load, undefined)
  t.is(opts.maxLoadedModels, 3)
  t.deepEqual(opts.models, [
    { uid: 'a', model: './a', load: { maxNumSeqs: 2 } },
    { uid: 'b', model: './b', load: { maxNumSeqs: 8 } },
  ])
  t.deepEqual(serverOptionsOf(serveConfig(['./m'], {})).load, { model: './m' })
  t.deepEqual(serverOptionsOf(serveConfig([], {})).load, {})
  t.is(serverOptionsOf(serveConfig([], { 'no-model': true })).load, undefined)
})
