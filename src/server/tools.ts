/**
 * Tool calling for the chat endpoint: which format a model writes its tool
 * calls in (read off its chat template, or `--tool-call-parser`), the
 * grammar that enforces `tool_choice: "required"` or a named function (as
 * vLLM does: the output is then plain JSON, whatever the family), and
 * parsers that turn the model's text into OpenAI `tool_calls`, whole or as
 * it streams.
 */

import { randomBytes } from 'node:crypto'

/** The tool-call formats candela reads. */
export const TOOL_CALL_PARSERS = ['hermes', 'llama3_json', 'mistral'] as const
export type ToolCallParserName = (typeof TOOL_CALL_PARSERS)[number]

/**
 * The format a chat template teaches its model: Hermes / Qwen
 * `<tool_call>{json}</tool_call>`, Mistral `[TOOL_CALLS][...]`, Llama 3.x
 * bare JSON (`<|python_tag|>` or `"parameters"` in the template). Templates
 * that show none get Hermes, the most common.
 */
export function toolCallParserFor(template: string | null): ToolCallParserName {
  if (template === null) return 'hermes'
  if (template.includes('<tool_call>')) return 'hermes'
  if (template.includes('[TOOL_CALLS]')) return 'mistral'
  if (template.includes('<|python_tag|>') || (template.includes('<|start_header_id|>') && template.includes('"parameters"'))) {
    return 'llama3_json'
  }
  return 'hermes'
}

export interface FunctionTool {
  type: 'function'
  function: { name: string; description?: string | null; parameters?: Record<string, unknown> | null; strict?: boolean | null }
}

export type ToolChoice = 'none' | 'auto' | 'required' | { type: 'function'; function: { name: string } }

/** A parsed call, arguments as JSON text (OpenAI's wire form). */
export interface ParsedToolCall {
  name: string
  arguments: string
}

export const toolCallId = (): string => `call_${randomBytes(12).toString('hex')}`

const parametersOf = (t: FunctionTool): Record<string, unknown> => t.function.parameters ?? { type: 'object', properties: {} }

/**
 * The JSON Schema a forced choice constrains the output to: a named
 * function's parameters, or (`required`) an array of `{ name, parameters }`
 * for any of the tools (one element when parallel calls are off).
 */
export function forcedToolSchema(tools: FunctionTool[], choice: ToolChoice, parallel: boolean): Record<string, unknown> | undefined {
  if (choice === 'none' || choice === 'auto') return undefined
  if (choice !== 'required') {
    const tool = tools.find((t) => t.function.name === choice.function.name)
    return tool ? parametersOf(tool) : undefined
  }
  const items = {
    anyOf: tools.map((t) => ({
      type: 'object',
      properties: { name: { type: 'string', enum: [t.function.name] }, parameters: parametersOf(t) },
      required: ['name', 'parameters'],
      additionalProperties: false,
    })),
  }
  return { type: 'array', items, minItems: 1, ...(parallel ? {} : { maxItems: 1 }) }
}


/** A call object as families write it: `{ name, arguments | parameters }`. */
function callOf(v: unknown): ParsedToolCall | null {
  if (typeof v !== 'object' || v === null || Array.isArray(v)) return null
  const o = v as Record<string, unknown>
  if (typeof o.name !== 'string') return null
  const args = o.arguments ?? o.parameters ?? {}
  return { name: o.name, arguments: typeof args === 'string' ? args : JSON.stringify(args) }
}

const HERMES_OPEN = '<tool_call>'
const HERMES_CLOSE = '</tool_call>'
const MISTRAL_OPEN = '[TOOL_CALLS]'

/** Hermes / Qwen: `<tool_call>{json}</tool_call>` blocks after optional text. */
function parseHermes(text: string): { content: string; calls: ParsedToolCall[] } | null {
  const start = text.indexOf(HERMES_OPEN)
  if (start < 0) return null
  const calls: ParsedToolCall[] = []
  let at = start
  while (at >= 0) {
    const end = text.indexOf(HERMES_CLOSE, at)
    const body = text.slice(at + HERMES_OPEN.length, end < 0 ? undefined : end)
    try {
      const call = callOf(JSON.parse(body))
      if (!call) return null
      calls.push(call)
    } catch {
      return null
    }
    if (end < 0) break
    at = text.indexOf(HERMES_OPEN, end)
  }
  return { content: text.slice(0, start), calls }
}

/** Llama 3.x: the whole answer is one or more JSON calls separated by `;`. */
function parseLlama3(text: string): { content: string; calls: ParsedToolCall[] } | null {
  const body = text.replace(/^\s*(<\|python_tag\|>)?/, '').trim()
  if (!body.startsWith('{')) return null
  const calls: ParsedToolCall[] = []
  for (const piece of splitTopLevel(body, ';')) {
    try {
      const call = callOf(JSON.parse(piece))
      if (!call) return null
      calls.push(call)
    } catch {
      return null
    }
  }
  return calls.length > 0 ? { content: '', calls } : null
}

/** Mistral: `[TOOL_CALLS]` then a JSON array of calls (or `name[ARGS]{json}` pieces). */
function parseMistral(text: string): { content: string; calls: ParsedToolCall[] } | null {
  const start = text.indexOf(MISTRAL_OPEN)
  if (start < 0) return null
  const rest = text.slice(start + MISTRAL_OPEN.length).trim()
  const calls: ParsedToolCall[] = []
  if (rest.startsWith('[')) {
    try {
      const arr: unknown = JSON.parse(rest)
      if (!Array.isArray(arr)) return null
      for (const v of arr) {
        const call = callOf(v)
        if (!call) return null
        calls.push(call)
      }
    } catch {
      return null
    }
  } else {
    for (const piece of rest.split(MISTRAL_OPEN)) {
      const m = /^\s*([\w.-]+)\[ARGS\]([\s\S]*)$/.exec(piece)
      if (!m) return null
      try {
        calls.push({ name: m[1]!, arguments: JSON.stringify(JSON.parse(m[2]!)) })
      } catch {
        return null
      }
    }
  }
  return { content: text.slice(0, start), calls }
}

/** `s` split at `sep` outside JSON strings and brackets. */
function splitTopLevel(s: string, sep: string): string[] {
  const out: string[] = []
  let depth = 0
  let inString = false
  let from = 0
  for (let i = 0; i < s.length; i++) {
    const c = s[i]!
    if (inString) {
      if (c === '\\') i++
      else if (c === '"') inString = false
    } else if (c === '"') inString = true
    else if (c === '{' || c === '[') depth++
    else if (c === '}' || c === ']') depth--
    else if (c === sep && depth === 0) {
      out.push(s.slice(from, i).trim())
      from = i + 1
    }
  }
  const last = s.slice(from).trim()
  if (last !== '') out.push(last)
  return out
}

/**
 * The tool calls in a finished answer and the text around them; no calls
 * (the text as content) when the answer holds none or they do not parse.
 */
export function parseToolCalls(text: string, parser: ToolCallParserName): { content: string; calls: ParsedToolCall[] } {
  const found = parser === 'hermes' ? parseHermes(text) : parser === 'mistral' ? parseMistral(text) : parseLlama3(text)
  return found ?? { content: text, calls: [] }
}

/** The text where a tool call may begin (held back from content while streaming). */
export function toolCallMarker(parser: ToolCallParserName): string {
  return parser === 'hermes' ? HERMES_OPEN : parser === 'mistral' ? MISTRAL_OPEN : '{'
}

/** One piece of a streamed answer: content text, or part of tool call `index`. */
export type StreamDelta =
  | { content: string }
  | { toolCall: { index: number; id?: string; name?: string; arguments: string } }

/** How a choice's tool calls come: parsed from the family format, or forced JSON. */
export type ToolMode = { kind: 'auto'; parser: ToolCallParserName } | { kind: 'named'; name: string } | { kind: 'required' }

/**
 * Turns one choice's streamed text into content and tool-call deltas, as
 * OpenAI streams them: per call, first its index, id and name, then its
 * arguments. Text that may be the start of a tool call is held back until
 * it is known not to be one.
 */
export class ToolCallStreamer {
  #buf = ''
  #inCalls = false
  #calls = 0

  constructor(
    private readonly mode: ToolMode,
    /** Off: calls after the first are dropped (`parallel_tool_calls: false`). */
    private readonly parallel = true,
  ) {}

  /** Whether any tool call was sent. */
  get sawCalls(): boolean {
    return this.#calls > 0
  }

  #call(c: ParsedToolCall): StreamDelta[] {
    if (!this.parallel && this.#calls > 0) return []
    const index = this.#calls++
    return [{ toolCall: { index, id: toolCallId(), name: c.name, arguments: '' } }, { toolCall: { index, arguments: c.arguments } }]
  }

  push(text: string): StreamDelta[] {
    const mode = this.mode
    if (mode.kind === 'named') {
      const out: StreamDelta[] = []
      if (this.#calls === 0) out.push({ toolCall: { index: this.#calls++, id: toolCallId(), name: mode.name, arguments: '' } })
      if (text !== '') out.push({ toolCall: { index: 0, arguments: text } })
      return out
    }
    this.#buf += text
    if (mode.kind === 'required') return this.#required()
    if (this.#inCalls) return mode.parser === 'hermes' ? this.#hermesBlocks() : []
    const marker = toolCallMarker(mode.parser)
    if (mode.parser === 'llama3_json') {
      // The answer is calls when its first character is `{`.
      const lead = this.#buf.trimStart()
      if (lead === '') return []
      if (lead.startsWith('{')) {
        this.#inCalls = true
        return []
      }
      return this.#flushContent(this.#buf.length)
    }
    const at = this.#buf.indexOf(marker)
    if (at >= 0) {
      const out = this.#flushContent(at)
      this.#inCalls = true
      return mode.parser === 'hermes' ? [...out, ...this.#hermesBlocks()] : out
    }
    // Hold back a tail that could be the marker's beginning.
    let keep = 0
    for (let k = Math.min(marker.length - 1, this.#buf.length); k > 0; k--) {
      if (marker.startsWith(this.#buf.slice(-k))) {
        keep = k
        break
      }
    }
    return this.#flushContent(this.#buf.length - keep)
  }

  #flushContent(upto: number): StreamDelta[] {
    const content = this.#buf.slice(0, upto)
    this.#buf = this.#buf.slice(upto)
    return content === '' ? [] : [{ content }]
  }

  /** Complete `<tool_call>...</tool_call>` blocks in the buffer. */
  #hermesBlocks(): StreamDelta[] {
    const out: StreamDelta[] = []
    for (;;) {
      const open = this.#buf.indexOf(HERMES_OPEN)
      const close = this.#buf.indexOf(HERMES_CLOSE)
      if (open < 0 || close < open) return out
      const parsed = parseHermes(this.#buf.slice(open, close + HERMES_CLOSE.length))
      if (!parsed) return out
      for (const c of parsed.calls) out.push(...this.#call(c))
      this.#buf = this.#buf.slice(close + HERMES_CLOSE.length)
    }
  }

  /** Complete elements of the forced `[{ name, parameters }, ...]` array. */
  #required(): StreamDelta[] {
    const out: StreamDelta[] = []
    const s = this.#buf
    let depth = 0
    let inString = false
    let elementStart = -1
    for (let i = 0; i < s.length; i++) {
      const c = s[i]!
      if (inString) {
        if (c === '\\') i++
        else if (c === '"') inString = false
        continue
      }
      if (c === '"') inString = true
      else if (c === '{' || c === '[') {
        depth++
        if (c === '{' && depth === 2) elementStart = i
      } else if (c === '}' || c === ']') {
        depth--
        if (c === '}' && depth === 1 && elementStart >= 0) {
          const call = callOf(JSON.parse(s.slice(elementStart, i + 1)))
          if (call) out.push(...this.#call(call))
          // What follows the element, still inside the array.
          this.#buf = `[${s.slice(i + 1)}`
          return [...out, ...this.#required()]
        }
      }
    }
    return out
  }

  /** The rest, once the choice ends: calls still buffered, or the text as content. */
  end(): StreamDelta[] {
    const mode = this.mode
    if (mode.kind !== 'auto' || this.#buf === '') return []
    const rest = this.#buf
    this.#buf = ''
    if (!this.#inCalls) return [{ content: rest }]
    if (rest.trim() === '') return []
    const parsed = parseToolCalls(rest, mode.parser)
    const out: StreamDelta[] = parsed.content === '' ? [] : [{ content: parsed.content }]
    for (const c of parsed.calls) out.push(...this.#call(c))
    return out
  }
}

/**
 * A finished choice's content and tool calls: forced calls are the JSON the
 * grammar made (none when it was cut short); `auto` ones are parsed from the
 * family format. Only the first call is kept when parallel calls are off.
 */
export function toolCallsOf(text: string, mode: ToolMode, parallel: boolean): { content: string | null; calls: ParsedToolCall[] } {
  let content: string | null = text
  let calls: ParsedToolCall[] = []
  if (mode.kind === 'auto') {
    const parsed = parseToolCalls(text, mode.parser)
    calls = parsed.calls
    content = parsed.calls.length > 0 && parsed.content.trim() === '' ? null : parsed.content
  } else {
    try {
      const value: unknown = JSON.parse(text)
      if (mode.kind === 'named') calls = [{ name: mode.name, arguments: JSON.stringify(value) }]
      else if (Array.isArray(value)) calls = value.map((v) => callOf(v)).filter((c): c is ParsedToolCall => c !== null)
      if (calls.length > 0) content = null
    } catch {
      // Cut short (max_tokens): the text stays the content.
    }
  }
  return { content, calls: parallel ? calls : calls.slice(0, 1) }
}
