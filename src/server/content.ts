/**
 * OpenAI chat messages -> engine messages. This is the one place content
 * parts are converted: text parts pass as text, and media parts (image_url,
 * video_url, input_audio, audio_url, image_embeds, audio_embeds, and the
 * uuid-only image_pil reference, each with an optional
 * uuid) are handed to the engine typed as they came, so the engine decides
 * whether the model takes that modality and answers a ValidationError
 * naming `messages[i].content[j]` when it does not. Media resolution
 * (fetching URLs, decoding data: URLs) plugs in at {@link toEnginePart}.
 */

import type { ChatMessage as EngineMessage, ContentPart } from '../types.js'
import type { ChatMessage as WireMessage, UserContentPart } from './schemas.js'

type NoNulls<T> = { [K in keyof T]: Exclude<T[K], null> }

/** Drop `null`s (OpenAI's "not given"): the engine treats a present key as set. */
function compact<T extends object>(obj: T): NoNulls<T> {
  return Object.fromEntries(Object.entries(obj).filter(([, v]) => v !== null && v !== undefined)) as NoNulls<T>
}

/** One user content part for the engine. */
export function toEnginePart(part: UserContentPart): ContentPart {
  if (part.type === 'text') return { type: 'text', text: part.text }
  return compact(part)
}

type WireContent = WireMessage['content']

function toEngineContent(content: WireContent | undefined): ContentPart[] | string | null {
  if (content === null || content === undefined) return null
  if (typeof content === 'string') return content
  return content.map((part) => (part.type === 'refusal' ? { type: 'text' as const, text: part.refusal } : toEnginePart(part)))
}

/** The conversation as {@link Engine.chat} takes it. */
export function toEngineMessages(messages: WireMessage[]): EngineMessage[] {
  return messages.map((m) => {
    const out: EngineMessage = { role: m.role, content: toEngineContent(m.content) }
    if ('name' in m && m.name != null) out.name = m.name
    if (m.role === 'assistant') {
      if (m.tool_calls != null && m.tool_calls.length > 0) out.tool_calls = m.tool_calls
      // A refusal with no content is what the assistant said.
      if (out.content === null && m.refusal != null) out.content = m.refusal
    }
    if (m.role === 'tool') out.tool_call_id = m.tool_call_id
    return out
  })
}
