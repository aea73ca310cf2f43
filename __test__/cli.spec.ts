// The `candela` command line: output, exit codes and one-line errors.
import { spawn } from 'node:child_process'
import { createServer } from 'node:net'
import type { AddressInfo } from 'node:net'
import { join } from 'node:path'
import { parseArgs } from 'node:util'

import test from 'ava'

import { SERVE_FLAGS, rewriteServeArgs, serveCommand, serveConfig } from '../dist/cli/serve.js'
import { fixture, reference, ROOT } from './helpers.js'

const CLI = join(ROOT, 'dist', 'cli.js')
const ENV: NodeJS.ProcessEnv = { ...process.env, CANDELA_CACHE_DIR: join(ROOT, '.cache', 'cli-test-no-download') }
delete ENV.CANDELA_API_KEY

function run(args: string[], input?: string): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [CLI, ...args], {
      env: ENV,
      stdio: ['pipe', 'pipe', 'pipe'],
    })
    let stdout = ''
    let stderr = ''
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()))
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()))
    child.on('error', reject)
    child.on('close', (code) => resolve({ code, stdout, stderr }))
    child.stdin.end(input ?? '')
  })
}

test('generate prints only the completion', async (t) => {
  const ref = reference('llama-tiny')
  const p = ref.prompts[0]!
  const r = await run(['generate', fixture('llama-tiny'), '--prompt', p.text, '--max-tokens', '16', '--temperature', '0', '--ignore-eos'])
  t.is(r.code, 0, r.stderr)
  t.is(r.stdout, `${p.greedy_text}\n`)
  t.is(r.stderr, '')
})

test('chat --message answers once', async (t) => {
  const r = await run(['chat', fixture('qwen2-tiny'), '--message', 'Hi there', '--max-tokens', '5', '--temperature', '0', '--ignore-eos'])
  t.is(r.code, 0, r.stderr)
  t.true(r.stdout.endsWith('\n'))
  t.true(r.stdout.length > 1)
})

test('chat reads turns from a pipe and quits on /exit', async (t) => {
  const r = await run(['chat', fixture('llama-tiny'), '--max-tokens', '4', '--temperature', '0'], 'Hello\nHow are you?\n/exit\nnever read\n')
  t.is(r.code, 0, r.stderr)
  t.is(r.stdout.trim().split('\n').length >= 1, true)
  t.regex(r.stderr, /llama-tiny \(LlamaForCausalLM, cpu\) loaded/)
})

test('a bad model path is one line on stderr and a non-zero exit', async (t) => {
  const r = await run(['generate', '/no/such/model', '--prompt', 'x'])
  t.is(r.code, 1)
  t.is(r.stdout, '')
  t.is(r.stderr, 'candela: model path not found: /no/such/model (give a model folder, a .gguf file, a Hugging Face repo id like org/name, or \'default\' for SmolLM2-135M-Instruct)\n')
})

test('an unknown flag is a usage error', async (t) => {
  const r = await run(['generate', fixture('llama-tiny'), '--prompt', 'x', '--bogus'])
  t.is(r.code, 2)
  t.regex(r.stderr, /^candela: Unknown option '--bogus'.*\(see 'candela generate --help'\)\n$/)
  t.is(r.stderr.split('\n').length, 2, 'one line')
  t.notRegex(r.stderr, /\n\s+at /, 'no stack trace')
})

test('bad flag values and commands are usage errors', async (t) => {
  let r = await run(['generate', fixture('llama-tiny'), '--prompt', 'x', '--max-tokens', 'many'])
  t.is(r.code, 2)
  t.regex(r.stderr, /--max-tokens expects an integer, got "many"/)
  r = await run(['generate', fixture('llama-tiny')])
  t.is(r.code, 2)
  t.regex(r.stderr, /generate needs --prompt/)
  r = await run(['frobnicate'])
  t.is(r.code, 2)
  t.regex(r.stderr, /unknown command "frobnicate"/)
  r = await run(['generate', fixture('llama-tiny'), '--prompt', 'x', '--max-tokens', '-4'])
  t.is(r.code, 2)
  t.regex(r.stderr, /To specify an option argument starting with a dash use '--max-tokens=-XYZ'/)
  r = await run(['generate', fixture('llama-tiny'), '--prompt', 'x', '--max-tokens=-4'])
  t.is(r.code, 1)
  t.is(r.stderr, 'candela: maxTokens must be at least 1, got -4\n')
  r = await run(['chat', fixture('llama-tiny'), '--device', 'cuda', '--message', 'x'])
  // Where the CUDA addon and a GPU are both there, this simply answers.
  if (r.code !== 0) {
    t.is(r.code, 1)
    t.regex(r.stderr, /^candela: device 'cuda' is not available/)
  }
  r = await run(['chat', fixture('llama-tiny'), '--gpu-memory-utilization', '2', '--message', 'x'])
  t.is(r.code, 1)
  t.regex(r.stderr, /gpuMemoryUtilization must be a number in \(0, 1\]/)
})

test('--help lists the commands', async (t) => {
  const r = await run(['--help'])
  t.is(r.code, 0)
  t.regex(r.stdout, /serve\s+serve a model over an OpenAI-compatible HTTP API/)
  t.regex(r.stdout, /generate\s+print the completion/)
  t.regex(r.stdout, /chat\s+chat with a model/)
  const g = await run(['generate', '--help'])
  t.regex(g.stdout, /--prompt TEXT/)
})

/** A port that was free a moment ago. */
async function freePort(): Promise<number> {
  const srv = createServer()
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r))
  const port = (srv.address() as AddressInfo).port
  await new Promise((r) => srv.close(r))
  return port
}

test('serve: a busy port is one line on stderr and a non-zero exit', async (t) => {
  const blocker = createServer()
  await new Promise<void>((r) => blocker.listen(0, '127.0.0.1', r))
  const port = (blocker.address() as AddressInfo).port
  try {
    const r = await run(['serve', fixture('llama-tiny'), '--port', String(port)])
    t.is(r.code, 1)
    t.is(r.stderr, `candela: cannot listen on 127.0.0.1:${port}: the port is already in use (pick another with --port)\n`)
    t.is(r.stdout, '')
  } finally {
    blocker.close()
  }
})

test('serve: a bad model path or a bad flag is one line and a non-zero exit', async (t) => {
  let r = await run(['serve', '/no/such/model', '--port', '0'])
  t.is(r.code, 1)
  t.is(r.stderr, 'candela: model path not found: /no/such/model (give a model folder, a .gguf file, a Hugging Face repo id like org/name, or \'default\' for SmolLM2-135M-Instruct)\n')
  t.is(r.stdout, '')
  r = await run(['serve', fixture('llama-tiny'), '--port', '0', '--bogus'])
  t.is(r.code, 2)
  t.regex(r.stderr, /^candela: Unknown option '--bogus'[^\n]*\n$/)
  r = await run(['serve', fixture('llama-tiny'), '--kv-cache-memory', 'lots'])
  t.is(r.code, 2)
  t.regex(r.stderr, /^candela: --kv-cache-memory expects a size in bytes like 1073741824, 512MB or 4GiB, got "lots" \(see 'candela serve --help'\)\n$/)
  r = await run(['serve', fixture('llama-tiny'), '--device', 'tpu', '--port', '0'])
  t.is(r.code, 1)
  t.regex(r.stderr, /^candela: device must be[^\n]*\n$/)
})

test('serve --help documents every flag', async (t) => {
  const r = await run(['serve', '--help'])
  t.is(r.code, 0)
  for (const g of SERVE_FLAGS) {
    t.regex(r.stdout, new RegExp(`^${g.title} options:$`, 'm'))
    for (const f of g.flags) t.regex(r.stdout, new RegExp(`^  --${f.name}${f.arg ? ` ${f.arg.replace('|', '\\|')}` : ''} +\\S`, 'm'), f.name)
  }
  for (const name of ['host', 'port', 'served-model-name', 'api-key', 'chat-template', 'max-model-len', 'max-num-seqs', 'max-num-batched-tokens', 'kv-cache-memory', 'enable-prefix-caching', 'no-enable-prefix-caching', 'dtype', 'device']) {
    t.regex(r.stdout, new RegExp(`--${name}\\b`), name)
  }
})

test("--limit-mm-per-prompt takes vLLM's dotted form beside JSON; the dotted one wins for its modality", (t) => {
  const parse = (args: string[]) => {
    const { values, positionals } = parseArgs({ args, options: serveCommand.options, allowPositionals: true, strict: true })
    return serveConfig(positionals, values as Parameters<typeof serveConfig>[1], {})
  }
  t.deepEqual(parse(['--limit-mm-per-prompt.image', '2']).load.limitMmPerPrompt, { image: 2 })
  t.deepEqual(parse(['--limit-mm-per-prompt.image=2', '--limit-mm-per-prompt.audio', '0']).load.limitMmPerPrompt, { image: 2, audio: 0 })
  t.deepEqual(parse(['--limit-mm-per-prompt', '{"image":4,"video":1}', '--limit-mm-per-prompt.image', '1']).load.limitMmPerPrompt, { image: 1, video: 1 })
  t.throws(() => parse(['--limit-mm-per-prompt.image', 'two']), { message: /--limit-mm-per-prompt\.image expects an integer/ })
  t.throws(() => parse(['--limit-mm-per-prompt.smell', '1']), { message: /Unknown option '--limit-mm-per-prompt\.smell'/ })
})

test('serve flags become load and server options', (t) => {
  const parse = (args: string[], env: NodeJS.ProcessEnv = {}) => {
    const { values, positionals } = parseArgs({ args, options: serveCommand.options, allowPositionals: true, strict: true })
    return serveConfig(positionals, values as Parameters<typeof serveConfig>[1], env)
  }
  t.deepEqual(parse([]), { load: {}, server: {} })
  const cfg = parse(
    [
      'some/model',
      '--host', '0.0.0.0',
      '--port', '9000',
      '--served-model-name', 'a',
      '--served-model-name', 'b',
      '--max-model-len', '4096',
      '--max-num-seqs', '8',
      '--max-num-batched-tokens', '512',
      '--kv-cache-memory', '4GiB',
      '--block-size', '32',
      '--threads', '3',
      '--no-enable-prefix-caching',
      '--dtype', 'bfloat16',
      '--device', 'cpu',
      '--chat-template', '{{ messages[0].content }}',
      '--max-request-body', '1MB',
      '--disable-log-requests',
    ],
    { CANDELA_API_KEY: 'from-env' },
  )
  t.deepEqual(cfg, {
    load: {
      model: 'some/model',
      maxModelLen: 4096,
      maxNumSeqs: 8,
      maxNumBatchedTokens: 512,
      kvCacheBytes: 4 * 2 ** 30,
      blockSize: 32,
      threads: 3,
      enablePrefixCaching: false,
      dtype: 'bf16',
      device: 'cpu',
      chatTemplate: '{{ messages[0].content }}',
    },
    server: { host: '0.0.0.0', port: 9000, servedModelName: ['a', 'b'], apiKey: 'from-env', maxBodyBytes: 1e6, logRequests: false },
  })
  t.is(parse(['--api-key', 'flag'], { CANDELA_API_KEY: 'env' }).server.apiKey, 'flag', 'the flag wins over the environment')
  t.is(parse(['--kv-cache-memory', '1073741824']).load.kvCacheBytes, 2 ** 30)
  t.is(parse(['--enable-prefix-caching']).load.enablePrefixCaching, true)
  t.throws(() => parse(['--threads', '0']), { message: /--threads/ })
  t.throws(() => parse(['--port', '70000']), { message: '--port must be between 0 and 65535, got 70000' })
  t.throws(() => parse(['--dtype', 'int3']), { message: /--dtype must be one of auto, f32, f16, bf16/ })
  t.throws(() => parse(['--chat-template', 'no/such/template.jinja']), { message: /no such file "no\/such\/template.jinja"/ })
  t.throws(() => parse(['--enable-prefix-caching', '--no-enable-prefix-caching']), { message: /not both/ })
  t.throws(() => parse(['a', 'b']), { message: 'unexpected argument "b"' })
  t.is(parse(['--tool-call-parser', 'mistral']).server.toolCallParser, 'mistral')
  t.throws(() => parse(['--tool-call-parser', 'pythonic']), { message: /--tool-call-parser must be one of hermes, llama3_json, mistral, got "pythonic"/ })
})

test('serve: listens, logs JSON lines off a TTY, needs the key from CANDELA_API_KEY, stops on SIGTERM', async (t) => {
  const port = await freePort()
  const child = spawn(process.execPath, [CLI, 'serve', fixture('llama-tiny'), '--port', String(port), '--served-model-name', 'tiny'], {
    env: { ...ENV, CANDELA_API_KEY: 'k-123' },
    stdio: ['ignore', 'pipe', 'pipe'],
  })
  let stdout = ''
  let stderr = ''
  child.stdout.on('data', (d: Buffer) => (stdout += d.toString()))
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()))
  const exited = new Promise<number | null>((r) => child.on('close', (code) => r(code)))
  const lines = (): Array<Record<string, unknown>> =>
    stdout
      .split('\n')
      .filter((l) => l !== '')
      .map((l) => JSON.parse(l) as Record<string, unknown>)
  try {
    const end = Date.now() + 20_000
    while (!lines().some((l) => String(l.msg).startsWith('serving')) && Date.now() < end) {
      await new Promise((r) => setTimeout(r, 20))
    }
    const ready = lines().find((l) => String(l.msg).startsWith('serving'))
    t.truthy(ready, stdout + stderr)
    t.is(ready!.msg, `serving tiny at http://127.0.0.1:${port}/v1`)
    t.like(ready, { level: 'info', architecture: 'LlamaForCausalLM', device: 'cpu' })
    t.is(lines()[0]!.msg, 'loading')
    const base = `http://127.0.0.1:${port}`
    t.is((await fetch(`${base}/health`)).status, 200)
    t.is((await fetch(`${base}/v1/models`)).status, 401)
    const res = await fetch(`${base}/v1/chat/completions`, {
      method: 'POST',
      headers: { authorization: 'Bearer k-123', 'content-type': 'application/json' },
      body: JSON.stringify({ model: 'tiny', messages: [{ role: 'user', content: 'Hi' }], max_tokens: 3 }),
    })
    t.is(res.status, 200)
    const body = (await res.json()) as { usage: { prompt_tokens: number; completion_tokens: number } }
    const deadline = Date.now() + 2000
    while (!lines().some((l) => l.msg === 'request' && l.status === 200) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20))
    const logged = lines().filter((l) => l.msg === 'request')
    t.like(logged.at(-1), {
      method: 'POST',
      route: '/v1/chat/completions',
      status: 200,
      prompt_tokens: body.usage.prompt_tokens,
      completion_tokens: body.usage.completion_tokens,
    })
    t.is(logged.filter((l) => l.status === 401).length, 1)
  } finally {
    child.kill('SIGTERM')
  }
  t.is(await exited, 0, stderr)
  t.is(stderr, '')
  t.is(lines().at(-1)!.msg, 'shutting down')
})

test('serve: --media-io-kwargs (vLLM snake_case JSON) and --enable-mm-embeds', async (t) => {
  const parse = (args: string[]) => {
    const { values, positionals } = parseArgs({ args, options: serveCommand.options, allowPositionals: true, strict: true })
    return serveConfig(positionals, values as Parameters<typeof serveConfig>[1], {})
  }
  t.deepEqual(parse(['--media-io-kwargs', '{"image":{"rgba_background_color":[0,0,0]},"video":{"frame_recovery":true}}', '--enable-mm-embeds']).load, {
    mediaIoKwargs: { image: { rgbaBackgroundColor: [0, 0, 0] }, video: { frameRecovery: true } },
    enableMmEmbeds: true,
  })
  t.deepEqual(parse(['--media-io-kwargs', '{"video":{"frame_recovery":false}}']).load, { mediaIoKwargs: { video: { frameRecovery: false } } })
  t.is(parse([]).load.enableMmEmbeds, undefined, 'off by default')
  t.throws(() => parse(['--media-io-kwargs', '{image:']), { message: /^--media-io-kwargs expects JSON like '\{"image":\{"rgba_background_color":\[0,0,0\]\}\}', got "\{image:"$/ })
  t.throws(() => parse(['--media-io-kwargs', '{"image":{"rgba_background_color":[0,0,256]}}']), {
    message: '--media-io-kwargs: image.rgba_background_color must be [r, g, b] with integers 0..255, got [0,0,256]',
  })
  t.throws(() => parse(['--media-io-kwargs', '{"image":{"rgba_background_color":[-1,0,0]}}']), { message: /integers 0\.\.255/ })
  t.throws(() => parse(['--media-io-kwargs', '{"image":{"rgba_background_color":"black"}}']), { message: /integers 0\.\.255/ })
  t.throws(() => parse(['--media-io-kwargs', '{"audio":{}}']), { message: /unknown key "audio" \(image, video\)/ })
  t.throws(() => parse(['--media-io-kwargs', '{"video":{"frame_recovery":1}}']), { message: /frame_recovery must be true or false/ })
  // Through the binary: one usage line, before any model loads.
  const r = await run(['serve', fixture('qwen2-vl-tiny'), '--port', '0', '--media-io-kwargs', '{"image":{"rgba_background_color":[0,0,300]}}'])
  t.is(r.code, 2)
  t.regex(r.stderr, /^candela: --media-io-kwargs: image\.rgba_background_color must be \[r, g, b\] with integers 0\.\.255, got \[0,0,300\] \(see 'candela serve --help'\)\n$/)
  const help = await run(['serve', '--help'])
  t.regex(help.stdout, /--media-io-kwargs JSON +how media files are read/)
  t.regex(help.stdout, /--enable-mm-embeds +accept image_embeds \/ audio_embeds parts/)
})

test('media fetching flags: --allowed-media-domains takes several hosts (vLLM style), --allow-private-media-urls', (t) => {
  const parse = (args: string[], files: string[] = []) => {
    const { values, positionals } = parseArgs({ args: rewriteServeArgs(args, (p) => files.includes(p)), options: serveCommand.options, allowPositionals: true, strict: true })
    return serveConfig(positionals, values as Parameters<typeof serveConfig>[1], {})
  }
  t.deepEqual(parse(['m.gguf', '--allowed-media-domains', 'upload.wikimedia.org', 'cdn.example.com', '--port', '1'], ['m.gguf']).load, {
    model: 'm.gguf',
    allowedMediaDomains: ['upload.wikimedia.org', 'cdn.example.com'],
  })
  // A model file after the hosts stays the model; commas and repeats work too.
  const cfg = parse(['--allowed-media-domains', 'a.com,b.org', 'localhost', 'model.gguf', '--allowed-media-domains', 'c.net', '--allow-private-media-urls'], ['model.gguf'])
  t.deepEqual(cfg.load, { model: 'model.gguf', allowedMediaDomains: ['a.com', 'b.org', 'localhost', 'c.net'], allowPrivateMediaUrls: true })
  t.throws(() => parse(['--allowed-media-domains', 'http://a.com/']), { message: /--allowed-media-domains expects host names/ })
})
