// Loading and serving models by Hugging Face repo id, from a mock hub on 127.0.0.1
// (HF_ENDPOINT / HF_HUB_CACHE as a user sets them).
import { spawn } from 'node:child_process'
import { readFileSync } from 'node:fs'
import { join } from 'node:path'

import test from 'ava'

import { Engine } from '../dist/index.js'
import type { DownloadProgress } from '../dist/index.js'
import { startServer } from '../dist/server/index.js'
import { fixture, reference, ROOT, tempDir } from './helpers.js'
import { repoFromDir, startMockHub } from './mock-hub.js'
import type { MockHub } from './mock-hub.js'

const LLAMA = 'candela-test/llama-tiny'
const GGUF = 'candela-test/tiny-gguf'
const ref = reference('llama-tiny')

let hub: MockHub
test.before(async () => {
  hub = await startMockHub({
    [LLAMA]: repoFromDir(fixture('llama-tiny')),
    [GGUF]: { files: { 'tiny-Q4_K_M.gguf': readFileSync(fixture('llama-tiny.gguf')), 'README.md': Buffer.from('#\n') } },
  })
  process.env.HF_ENDPOINT = hub.endpoint
  delete process.env.HF_TOKEN
  delete process.env.HF_HUB_OFFLINE
})
test.after.always(async () => {
  await hub?.close()
})

const freshCache = (): string => (process.env.HF_HUB_CACHE = tempDir('candela-hub-load-'))

test.serial('Engine.load by repo id downloads once, then loads from the cache with no request', async (t) => {
  freshCache()
  const progress: DownloadProgress[] = []
  const engine = await Engine.load({ model: LLAMA, onDownloadProgress: (p) => progress.push(p) })
  try {
    t.is(engine.info.name, LLAMA)
    t.true(engine.info.path.includes(join('models--candela-test--llama-tiny', 'snapshots', hub.commitOf(LLAMA))))
    const p = ref.prompts[0]!
    const [out] = await engine.generate(p.text, { maxTokens: p.greedy_ids.length, temperature: 0, ignoreEos: true })
    t.deepEqual(out!.tokenIds, p.greedy_ids)
  } finally {
    await engine.close()
  }
  t.true(progress.some((e) => e.file === 'model.safetensors' && e.downloaded === e.total))
  const before = hub.log.length
  const again = await Engine.load({ model: LLAMA })
  await again.close()
  t.is(hub.log.length, before, 'the second load made no request')
})

test.serial('Engine.load of hf:org/name picks the GGUF file', async (t) => {
  freshCache()
  const engine = await Engine.load({ model: `hf:${GGUF}:Q4_K_M` })
  try {
    t.is(engine.info.name, GGUF)
    t.true(engine.info.path.endsWith('tiny-Q4_K_M.gguf'))
    t.is(engine.info.architecture, 'LlamaForCausalLM')
  } finally {
    await engine.close()
  }
})

test.serial('a repo that does not exist fails the load with its name; a bad name is not sent anywhere', async (t) => {
  freshCache()
  await t.throwsAsync(Engine.load({ model: 'candela-test/missing' }), { message: /repository candela-test\/missing not found/ })
  const before = hub.log.length
  await t.throwsAsync(Engine.load({ model: 'not a/repo' }), { message: /^model path not found: not a\/repo/ })
  t.is(hub.log.length, before)
})

test.serial('startServer serves a repo under its id', async (t) => {
  freshCache()
  const lines: string[] = []
  const server = await startServer({ load: { model: LLAMA }, port: 0, logger: false, onLoadProgress: (l) => lines.push(l) })
  try {
    await server.ready
    t.deepEqual(server.modelNames, [LLAMA])
    const models = (await (await fetch(`${server.url}/v1/models`)).json()) as { data: Array<{ id: string }> }
    t.deepEqual(
      models.data.map((m) => m.id),
      [LLAMA],
    )
    t.true(lines.includes(`fetched ${LLAMA}/model.safetensors`), lines.join('\n'))
  } finally {
    await server.close()
  }
})

function cli(args: string[], env: NodeJS.ProcessEnv): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [join(ROOT, 'dist', 'cli.js'), ...args], { env, stdio: ['ignore', 'pipe', 'pipe'] })
    let stdout = ''
    let stderr = ''
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()))
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()))
    child.on('error', reject)
    child.on('close', (code) => resolve({ code, stdout, stderr }))
  })
}

test.serial('candela pull prints the path; offline it answers from the cache; a missing repo is one line', async (t) => {
  const cache = freshCache()
  const env = { ...process.env, HF_HUB_CACHE: cache, HF_ENDPOINT: hub.endpoint }
  const r = await cli(['pull', LLAMA], env)
  t.is(r.code, 0, r.stderr)
  const path = join(cache, 'models--candela-test--llama-tiny', 'snapshots', hub.commitOf(LLAMA))
  t.is(r.stdout, `${path}\n`)
  t.regex(r.stderr, /candela: fetched candela-test\/llama-tiny\/model\.safetensors\n/)
  t.regex(r.stderr, /candela: candela-test\/llama-tiny at [0-9a-f]{12} \(safetensors, 4\.8 MB, fetched 4\.8 MB\)\n$/)
  const before = hub.log.length
  const offline = await cli(['pull', LLAMA], { ...env, HF_HUB_OFFLINE: '1' })
  t.is(offline.code, 0, offline.stderr)
  t.is(offline.stdout, `${path}\n`)
  t.regex(offline.stderr, /already cached/)
  t.is(hub.log.length, before)
  const missing = await cli(['pull', 'candela-test/missing'], env)
  t.is(missing.code, 1)
  t.regex(missing.stderr, /^candela: repository candela-test\/missing not found on http:\/\/127\.0\.0\.1:\d+ \(if it is private, set HF_TOKEN to a token that has access\) \(Repository not found\)\n$/)
})
