/**
 * zod schemas of the request bodies, in OpenAI's snake_case. Objects strip
 * keys they do not know: an OpenAI field candela has no use for (`store`,
 * `metadata`, `parallel_tool_calls`, ...) is ignored, not rejected. Optional
 * fields accept `null` as "not given", as OpenAI does.
 */

import { z } from 'zod'

const int = () => z.number().int()
const opt = <T extends z.ZodType>(schema: T) => schema.nullish()

/** A uuid names a media item for the caches; with no data it must hit a cache. */
const uuid = opt(z.string().min(1))

/**
 * A media part carries its payload under the key named like its type
 * (`image_url: { url }`), or only a `uuid` that refers to an item sent before.
 */
const hasData = (key: string) => (p: Record<string, unknown>) => p[key] != null || p.uuid != null
const needsData = (key: string) => ({ message: `a ${key} part needs ${key} data or a uuid`, path: [key] })

export const TextPart = z.object({ type: z.literal('text'), text: z.string() })
/** An assistant's refusal, sent back in the history; the template sees it as text. */
export const RefusalPart = z.object({ type: z.literal('refusal'), refusal: z.string() })
export const ImageUrlPart = z
  .object({
    type: z.literal('image_url'),
    image_url: opt(z.object({ url: z.string().min(1), detail: opt(z.enum(['auto', 'low', 'high'])) })),
    uuid,
  })
  .refine(hasData('image_url'), needsData('image_url'))
/**
 * Precomputed image embeddings (server started with --enable-mm-embeds):
 * base64 of a `torch.save(tensor)` archive, a `.npy` file or a safetensors
 * blob holding `image_embeds` (floats, (feature_tokens, hidden)) and
 * optionally `image_grid_thw`; or vLLM's dict form (Qwen2-VL) with each as
 * its own base64 file. A grid given here beside it wins over the blob's.
 */
const gridThw = z.union([z.array(int()).length(3), z.array(z.array(int()).length(3)).length(1)])
const b64 = z.string().min(1)
export const ImageEmbedsPart = z
  .object({
    type: z.literal('image_embeds'),
    image_embeds: opt(z.union([b64, z.strictObject({ image_embeds: b64, image_grid_thw: opt(z.union([b64, gridThw])) })])),
    image_grid_thw: opt(gridThw),
    uuid,
  })
  .refine(hasData('image_embeds'), needsData('image_embeds'))
/** Precomputed audio embeddings (Qwen2-Audio), as base64 of a tensor file. */
export const AudioEmbedsPart = z
  .object({ type: z.literal('audio_embeds'), audio_embeds: opt(b64), uuid })
  .refine(hasData('audio_embeds'), needsData('audio_embeds'))
/**
 * vLLM's reference to an image sent before by uuid (a PIL image cannot
 * travel over HTTP, so only the uuid-only form is accepted).
 */
export const ImagePilPart = z.object({
  type: z.literal('image_pil'),
  image_pil: z.null({ error: 'a PIL image cannot be sent over HTTP: give null and the uuid of an image sent before' }).optional(),
  uuid: z.string({ error: 'an image_pil part needs the uuid of an image sent before' }).min(1),
})
export const InputAudioPart = z
  .object({ type: z.literal('input_audio'), input_audio: opt(z.object({ data: z.string().min(1), format: z.string().min(1) })), uuid })
  .refine(hasData('input_audio'), needsData('input_audio'))
export const AudioUrlPart = z
  .object({ type: z.literal('audio_url'), audio_url: opt(z.object({ url: z.string().min(1) })), uuid })
  .refine(hasData('audio_url'), needsData('audio_url'))
/** Xinference's form: `{ type: 'audio', audio_url: 'https://…' }`. */
export const AudioPart = z
  .object({ type: z.literal('audio'), audio_url: opt(z.string().min(1)), uuid })
  .refine(hasData('audio_url'), needsData('audio_url'))
export const VideoUrlPart = z
  .object({ type: z.literal('video_url'), video_url: opt(z.object({ url: z.string().min(1) })), uuid })
  .refine(hasData('video_url'), needsData('video_url'))

/** Every part a user message may hold, told apart by `type`. */
export const UserContentPart = z.discriminatedUnion('type', [
  TextPart,
  ImageUrlPart,
  ImageEmbedsPart,
  AudioEmbedsPart,
  ImagePilPart,
  InputAudioPart,
  AudioUrlPart,
  AudioPart,
  VideoUrlPart,
])
export type UserContentPart = z.infer<typeof UserContentPart>
export type MediaContentPart = Exclude<UserContentPart, { type: 'text' }>

const AssistantContentPart = z.discriminatedUnion('type', [TextPart, RefusalPart])

const textContent = z.union([z.string(), z.array(TextPart)], { error: 'must be a string or an array of text parts' })
const name = opt(z.string())

export const ChatMessage = z.discriminatedUnion('role', [
  z.object({ role: z.literal('system'), content: textContent, name }),
  z.object({ role: z.literal('developer'), content: textContent, name }),
  z.object({
    role: z.literal('user'),
    content: z.union([z.string(), z.array(UserContentPart)], { error: 'must be a string or an array of content parts' }),
    name,
  }),
  z
    .object({
      role: z.literal('assistant'),
      content: opt(z.union([z.string(), z.array(AssistantContentPart)], { error: 'must be a string, an array of parts or null' })),
      name,
      refusal: opt(z.string()),
      tool_calls: opt(z.array(z.looseObject({}))),
    })
    .refine((m) => m.content != null || (m.tool_calls?.length ?? 0) > 0 || m.refusal != null, {
      message: 'an assistant message needs content or tool_calls',
      path: ['content'],
    }),
  z.object({ role: z.literal('tool'), content: textContent, tool_call_id: z.string() }),
])
export type ChatMessage = z.infer<typeof ChatMessage>

const stop = opt(
  z.union([z.string().min(1), z.array(z.string().min(1)).max(64)], { error: 'must be a non-empty string or an array of them' }),
)

const jsonSchema = z.record(z.string(), z.unknown())

/** vLLM's structured outputs: exactly one constraint (checked in ./params). */
export const StructuredOutputs = z.object({
  json: opt(z.union([jsonSchema, z.string()], { error: 'must be a JSON Schema object or its JSON text' })),
  json_object: opt(z.boolean()),
  regex: opt(z.string().min(1)),
  choice: opt(z.array(z.string()).min(1)),
  grammar: opt(z.string().min(1)),
})
export type StructuredOutputs = z.infer<typeof StructuredOutputs>

/** OpenAI's `response_format`. */
export const ResponseFormat = z.discriminatedUnion('type', [
  z.object({ type: z.literal('text') }),
  z.object({ type: z.literal('json_object') }),
  z.object({
    type: z.literal('json_schema'),
    json_schema: z.object({
      name: z.string().min(1),
      description: opt(z.string()),
      schema: jsonSchema,
      strict: opt(z.boolean()),
    }),
  }),
])
export type ResponseFormat = z.infer<typeof ResponseFormat>

/** Fields shared by both completion endpoints (vLLM's extras included). */
const common = {
  model: opt(z.string()),
  max_tokens: opt(int().min(1)),
  temperature: opt(z.number().min(0)),
  top_p: opt(z.number().gt(0).max(1)),
  top_k: opt(int().min(-1)),
  min_p: opt(z.number().min(0).max(1)),
  n: opt(int().min(1).max(128)),
  seed: opt(int().min(0)),
  stop,
  stop_token_ids: opt(z.array(int().min(0))),
  presence_penalty: opt(z.number().min(-2).max(2)),
  frequency_penalty: opt(z.number().min(-2).max(2)),
  repetition_penalty: opt(z.number().gt(0)),
  min_tokens: opt(int().min(0)),
  ignore_eos: opt(z.boolean()),
  skip_special_tokens: opt(z.boolean()),
  stream: opt(z.boolean()),
  stream_options: opt(z.object({ include_usage: opt(z.boolean()) })),
  user: opt(z.string()),
  /** Changes the sampled tokens; rejected rather than silently ignored. */
  logit_bias: opt(z.record(z.string(), z.number())),
  /** vLLM's image / video processor options (min_pixels, max_pixels, fps, ...). */
  mm_processor_kwargs: opt(z.record(z.string(), z.unknown())),
  structured_outputs: opt(StructuredOutputs),
  response_format: opt(ResponseFormat),
}

/** A function the model may call (OpenAI's only tool type). */
export const FunctionTool = z.object({
  type: z.literal('function'),
  function: z.object({
    name: z.string().regex(/^[a-zA-Z0-9_-]{1,64}$/, { error: 'must be 1-64 letters, digits, _ or -' }),
    description: opt(z.string()),
    parameters: opt(z.record(z.string(), z.unknown())),
    strict: opt(z.boolean()),
  }),
})

export const ToolChoice = z.union(
  [z.enum(['none', 'auto', 'required']), z.object({ type: z.literal('function'), function: z.object({ name: z.string() }) })],
  { error: 'must be "none", "auto", "required" or { type: "function", function: { name } }' },
)

export const ChatCompletionRequest = z.object({
  ...common,
  messages: z.array(ChatMessage).min(1),
  max_completion_tokens: opt(int().min(1)),
  logprobs: opt(z.boolean()),
  top_logprobs: opt(int().min(0).max(20)),
  tools: opt(z.array(FunctionTool)),
  tool_choice: opt(ToolChoice),
  parallel_tool_calls: opt(z.boolean()),
  chat_template_kwargs: opt(z.record(z.string(), z.unknown())),
  add_generation_prompt: opt(z.boolean()),
})
export type ChatCompletionRequest = z.infer<typeof ChatCompletionRequest>

const tokenIds = z.array(int().min(0)).min(1)

export const CompletionRequest = z.object({
  ...common,
  prompt: z.union([z.string(), z.array(z.string()).min(1), tokenIds, z.array(tokenIds).min(1)], {
    error: 'must be a string, an array of strings, an array of token ids or an array of those',
  }),
  logprobs: opt(int().min(0).max(20)),
  echo: opt(z.boolean()),
  suffix: opt(z.string()),
  best_of: opt(int().min(1)),
})
export type CompletionRequest = z.infer<typeof CompletionRequest>

/** vLLM's /tokenize: a prompt, or chat messages rendered with the template. */
export const TokenizeRequest = z.union(
  [
    z.object({
      model: opt(z.string()),
      prompt: z.string(),
      add_special_tokens: opt(z.boolean()),
      return_token_strs: opt(z.boolean()),
    }),
    z.object({
      model: opt(z.string()),
      messages: z.array(ChatMessage).min(1),
      add_generation_prompt: opt(z.boolean()),
      add_special_tokens: opt(z.boolean()),
      chat_template_kwargs: opt(z.record(z.string(), z.unknown())),
      tools: opt(z.array(FunctionTool)),
      return_token_strs: opt(z.boolean()),
    }),
  ],
  { error: 'must have prompt (a string) or messages' },
)
export type TokenizeRequest = z.infer<typeof TokenizeRequest>

export const DetokenizeRequest = z.object({ model: opt(z.string()), tokens: z.array(int().min(0)) })

/** OpenAI's Responses API (POST /v1/responses): the parts candela serves. */
const ResponseInputContent = z.discriminatedUnion('type', [
  z.object({ type: z.literal('input_text'), text: z.string() }),
  z.object({ type: z.literal('output_text'), text: z.string() }),
  z.object({ type: z.literal('refusal'), refusal: z.string() }),
  z.object({ type: z.literal('input_image'), image_url: z.string().min(1), detail: opt(z.enum(['auto', 'low', 'high'])) }),
])
export const ResponseInputItem = z.union(
  [
    z.object({
      type: opt(z.literal('message')),
      role: z.enum(['user', 'system', 'developer', 'assistant']),
      content: z.union([z.string(), z.array(ResponseInputContent)]),
    }),
    z.object({ type: z.literal('function_call'), call_id: z.string().min(1), name: z.string().min(1), arguments: z.string() }),
    z.object({ type: z.literal('function_call_output'), call_id: z.string().min(1), output: z.string() }),
  ],
  { error: 'must be a message, a function_call or a function_call_output item' },
)
export type ResponseInputItem = z.infer<typeof ResponseInputItem>

export const ResponsesRequest = z.object({
  model: opt(z.string()),
  input: z.union([z.string(), z.array(ResponseInputItem).min(1)], { error: 'must be a string or a list of input items' }),
  instructions: opt(z.string()),
  previous_response_id: opt(z.string()),
  max_output_tokens: opt(int().min(1)),
  temperature: opt(z.number().min(0)),
  top_p: opt(z.number().gt(0).max(1)),
  stream: opt(z.boolean()),
  store: opt(z.boolean()),
  metadata: opt(z.record(z.string(), z.string())),
  user: opt(z.string()),
  text: opt(
    z.object({
      format: opt(
        z.discriminatedUnion('type', [
          z.object({ type: z.literal('text') }),
          z.object({ type: z.literal('json_object') }),
          z.object({ type: z.literal('json_schema'), name: z.string().min(1), schema: jsonSchema, description: opt(z.string()), strict: opt(z.boolean()) }),
        ]),
      ),
    }),
  ),
  tools: opt(
    z.array(
      z.object({ type: z.literal('function'), name: z.string(), description: opt(z.string()), parameters: opt(z.record(z.string(), z.unknown())), strict: opt(z.boolean()) }),
    ),
  ),
  tool_choice: opt(z.union([z.enum(['none', 'auto', 'required']), z.object({ type: z.literal('function'), name: z.string() })])),
  parallel_tool_calls: opt(z.boolean()),
})
export type ResponsesRequest = z.infer<typeof ResponsesRequest>
