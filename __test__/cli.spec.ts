// The `candela` command line: output, exit codes and one-line errors.
import { spawn } from 'node:child_process'
import { join } from 'node:path'

import test from 'ava'

import { fixture, reference, ROOT } from './helpers.js'

const CLI = join(ROOT, 'dist', 'cli.js')

function run(args: string[], input?: string): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [CLI, ...args], {
      env: { ...process.env, CANDELA_CACHE_DIR: join(ROOT, '.cache', 'cli-test-no-download') },
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
  t.is(r.stderr, 'candela: model path not found: /no/such/model (give a model folder or a .gguf file, or \'default\' for SmolLM2-135M-Instruct)\n')
})

test('an unknown flag is a usage error', async (t) => {
  const r = await run(['generate', fixture('llama-tiny'), '--prompt', 'x', '--bogus'])
  t.is(r.code, 2)
  t.regex(r.stderr, /^candela: Unknown option '--bogus'/)
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
  t.is(r.code, 1)
  t.regex(r.stderr, /^candela: device 'cuda' is not available/)
})

test('--help lists the commands', async (t) => {
  const r = await run(['--help'])
  t.is(r.code, 0)
  t.regex(r.stdout, /generate\s+print the completion/)
  t.regex(r.stdout, /chat\s+chat with a model/)
  const g = await run(['generate', '--help'])
  t.regex(g.stdout, /--prompt TEXT/)
})
