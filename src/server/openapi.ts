/**
 * GET /openapi.json: an OpenAPI 3.1 description of the JSON routes, with
 * request bodies generated from the same zod schemas that validate them (so
 * the document cannot drift from what the server accepts).
 */

import { toJSONSchema } from 'zod'
import type { ZodType } from 'zod'

import { ChatCompletionRequest, CompletionRequest, DetokenizeRequest, ResponsesRequest, TokenizeRequest } from './schemas.js'

/** A request body as JSON Schema (draft 2020-12, which OpenAPI 3.1 uses). */
function body(schema: ZodType): object {
  const { $schema: _draft, ...json } = toJSONSchema(schema, { io: 'input', unrepresentable: 'any' }) as Record<string, unknown>
  return { required: true, content: { 'application/json': { schema: json } } }
}

const error = { description: "An error in OpenAI's shape: {\"error\": {\"message\", \"type\", \"param\", \"code\"}}" }
const json = (description: string) => ({ description, content: { 'application/json': {} } })

function post(summary: string, schema: ZodType, ok: string): object {
  return { post: { summary, requestBody: body(schema), responses: { '200': json(ok), '400': error, '404': error, '503': error } } }
}

const get = (summary: string, ok: string): object => ({ get: { summary, responses: { '200': json(ok) } } })

export function openApiDocument(version: string): object {
  return {
    openapi: '3.1.0',
    info: { title: 'candela', version, description: "OpenAI-compatible API (and vLLM's extras) of `candela serve`." },
    paths: {
      '/v1/chat/completions': post('Chat completion (stream: true for server-sent events)', ChatCompletionRequest, 'A chat.completion object, or chat.completion.chunk events'),
      '/v1/completions': post('Text completion (stream: true for server-sent events)', CompletionRequest, 'A text_completion object, or its chunk events'),
      '/v1/responses': post("OpenAI's Responses API (stream: true for typed server-sent events)", ResponsesRequest, 'A response object, or its events'),
      '/v1/responses/{id}': {
        get: { summary: 'A stored response', parameters: [{ name: 'id', in: 'path', required: true, schema: { type: 'string' } }], responses: { '200': json('A response object'), '404': error } },
      },
      '/tokenize': post('Token ids of a prompt or of chat messages rendered with the chat template', TokenizeRequest, '{ count, max_model_len, tokens, token_strs }'),
      '/detokenize': post('Text of token ids', DetokenizeRequest, '{ prompt }'),
      '/v1/audio/transcriptions': { post: { summary: 'Speech to text (Whisper models; multipart/form-data)', responses: { '200': json('The transcription'), '400': error } } },
      '/v1/audio/translations': { post: { summary: 'Speech to English text (Whisper models; multipart/form-data)', responses: { '200': json('The translation'), '400': error } } },
      '/v1/models': get('The served model', 'A list of model objects'),
      '/v1/models/{model}': {
        get: { summary: 'One served model', parameters: [{ name: 'model', in: 'path', required: true, schema: { type: 'string' } }], responses: { '200': json('A model object'), '404': error } },
      },
      '/health': get('200 once the model is loaded, 503 before', '{ status: "ok" }'),
      '/version': get('The server version', '{ version }'),
      '/metrics': { get: { summary: 'Prometheus metrics', responses: { '200': { description: 'Prometheus text format 0.0.4', content: { 'text/plain': {} } } } } },
    },
  }
}
