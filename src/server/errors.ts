/**
 * Errors of the HTTP API, always in OpenAI's shape
 * `{"error":{"message","type","param","code"}}`, so clients written for
 * OpenAI (or vLLM) surface them as they would there.
 */

import type { ErrorRequestHandler, Request, RequestHandler, Response } from 'express'
import type { ZodError } from 'zod'

import { AbortError, CandelaError, ClosedError, LoadError, MediaError, ValidationError } from '../errors.js'
import { HubError, UnsupportedRepoError } from '../hub/index.js'
import type { HubErrorCode } from '../hub/index.js'

/** The body of every error response. */
export interface OpenAIErrorBody {
  error: { message: string; type: string; param: string | null; code: string | null }
}

/** An error with the HTTP status and OpenAI fields it is answered with. */
export class ApiError extends Error {
  override name = 'ApiError'
  readonly param: string | null
  readonly code: string | null
  readonly type: string
  /** Seconds a client should wait before trying again (sent as `Retry-After`). */
  readonly retryAfter: number | undefined

  constructor(
    readonly status: number,
    message: string,
    fields: { param?: string | null; code?: string | null; type?: string; retryAfter?: number } = {},
  ) {
    super(message)
    this.param = fields.param ?? null
    this.code = fields.code ?? null
    this.type = fields.type ?? (status >= 500 ? 'server_error' : 'invalid_request_error')
    this.retryAfter = fields.retryAfter
  }

  toJSON(): OpenAIErrorBody {
    return { error: { message: this.message, type: this.type, param: this.param, code: this.code } }
  }
}

export const badRequest = (message: string, param: string | null = null, code: string | null = null): ApiError =>
  new ApiError(400, message, { param, code })

/** `["messages", 0, "content"]` -> `messages[0].content`. */
export function paramPath(path: ReadonlyArray<PropertyKey>): string {
  let out = ''
  for (const key of path) {
    if (typeof key === 'number') out += `[${key}]`
    else out += out === '' ? String(key) : `.${String(key)}`
  }
  return out
}

interface IssueLike {
  code?: string
  path: ReadonlyArray<PropertyKey>
  message: string
  errors?: IssueLike[][]
  note?: string
  options?: unknown[]
}

/**
 * The issue that explains a failure best. A union reports one issue list
 * per branch; the branch that got deepest into the value is the one the
 * caller meant (an array of parts with one bad part, not "not a string").
 */
function bestIssue(issue: IssueLike, prefix: ReadonlyArray<PropertyKey>): { path: PropertyKey[]; message: string } {
  const path = [...prefix, ...issue.path]
  if (issue.code === 'invalid_union' && issue.errors && issue.errors.length > 0) {
    let best: { path: PropertyKey[]; message: string } | undefined
    for (const branch of issue.errors) {
      for (const sub of branch) {
        const cand = bestIssue(sub, path)
        if (!best || cand.path.length > best.path.length) best = cand
      }
    }
    if (best && best.path.length > path.length) return best
  }
  if (issue.note === 'No matching discriminator' && Array.isArray(issue.options)) {
    return { path, message: `must be one of ${issue.options.map((o) => JSON.stringify(o)).join(', ')}` }
  }
  return { path, message: issue.message.replace(/^Invalid input: /, '') }
}

/** A failed request schema as a 400 naming the first bad field. */
export function fromZodError(err: ZodError): ApiError {
  const first = err.issues[0] as IssueLike | undefined
  if (!first) return badRequest('invalid request body')
  const { path, message } = bestIssue(first, [])
  const param = paramPath(path)
  if (param === '') return badRequest(`request body: ${message}`)
  return badRequest(`${param}: ${message}`, param)
}

const PROMPT_FIELD = /^(messages|prompt|prompts\[\d+\]|promptTokenIds|tokenIds)$/

/**
 * A library param as the HTTP API spells it: camelCase becomes snake_case
 * (`maxTokens` -> `max_tokens`, `responseFormat.jsonSchema` ->
 * `response_format.json_schema`), and the prompt's field (`messages`,
 * `prompt`, `prompts[2]`) becomes the route's (`promptParam`).
 */
function httpParam(param: string | null, promptParam: string | null): string | null {
  if (param === null) return null
  // The whole prompt (not a part inside it) is the route's prompt field.
  if (promptParam !== null && PROMPT_FIELD.test(param)) return promptParam
  return param.replace(/^prompts\[\d+\]/, 'prompt').replace(/[A-Z]/g, (c) => `_${c.toLowerCase()}`)
}

/** Errors raised by body-parser carry a `type` and an HTTP status. */
interface HttpishError {
  type?: string
  status?: number
  statusCode?: number
  expose?: boolean
  limit?: number
  message?: string
  code?: string
}

/**
 * Any error as an {@link ApiError}. `promptParam` names the route's prompt
 * field (`messages`, `prompt`, `input`): the param of errors about the prompt.
 */
export function toApiError(err: unknown, promptParam: string | null = null): ApiError {
  if (err instanceof ApiError) return err
  if (err instanceof CandelaError) return fromCandelaError(err, promptParam)
  const e = (typeof err === 'object' && err !== null ? err : {}) as HttpishError
  if (e.type === 'entity.parse.failed') {
    return badRequest(`the request body is not valid JSON: ${e.message ?? 'parse error'}`, null, 'invalid_json')
  }
  if (e.type === 'entity.too.large') {
    return new ApiError(413, `the request body is larger than the limit of ${e.limit ?? '?'} bytes`, {
      code: 'request_too_large',
    })
  }
  const status = e.status ?? e.statusCode
  if (typeof status === 'number' && status >= 400 && status < 500 && e.expose !== false) {
    return new ApiError(status, e.message ?? 'bad request')
  }
  const message = err instanceof Error ? err.message : String(err)
  return new ApiError(500, `internal error: ${message}`)
}

/** HTTP statuses of the hub's failures: the model argument names no fetchable model. */
const HUB_STATUS: Record<HubErrorCode, number> = { not_found: 404, gated: 403, offline: 503, network: 502, checksum: 502 }

/** The one place the library's error classes become HTTP statuses. */
function fromCandelaError(err: CandelaError, promptParam: string | null): ApiError {
  const param = httpParam(err.param, promptParam)
  if (err instanceof ValidationError) return new ApiError(400, err.message, { param, code: err.code })
  // Media that cannot be used carries its own status (400, 413, 422, 502, 504).
  if (err instanceof MediaError) return new ApiError(err.status, err.message, { param, code: err.code })
  if (err instanceof AbortError) return new ApiError(503, 'the request was aborted', { code: 'aborted' })
  if (err instanceof ClosedError) return new ApiError(503, err.message, { code: 'shutting_down' })
  if (err instanceof HubError) return new ApiError(HUB_STATUS[err.code], err.message, { param, code: err.code === 'not_found' ? 'model_not_found' : `hub_${err.code}` })
  if (err instanceof UnsupportedRepoError) return new ApiError(400, err.message, { param, code: err.code })
  if (err instanceof LoadError) return new ApiError(err.code === 'model_not_found' ? 404 : 400, err.message, { param, code: err.code })
  return new ApiError(500, `internal error: ${err.message}`)
}

/** Send `err` as an OpenAI error response. */
export function sendError(res: Response, err: ApiError): void {
  if (err.status === 401) res.set('WWW-Authenticate', 'Bearer')
  if (err.retryAfter !== undefined) res.set('Retry-After', String(err.retryAfter))
  // `detail` beside OpenAI's `error`: where Xinference's client reads the message.
  res.status(err.status).json({ ...err.toJSON(), detail: err.message })
}

/** 404 for any path no route answers (JSON, never Express's HTML page). */
export const notFound: RequestHandler = (req, _res, next) => {
  next(new ApiError(404, `no route for ${req.method} ${req.path}`, { code: 'not_found' }))
}

/**
 * The last middleware: every error becomes an OpenAI error response. An
 * error on a response already under way (a stream) can only end it.
 */
export function errorHandler(onServerError: (err: unknown, req: Request) => void): ErrorRequestHandler {
  return (err: unknown, req, res, _next) => {
    const api = toApiError(err, (res.locals as { promptParam?: string }).promptParam ?? null)
    if (api.status >= 500) onServerError(err, req)
    if (res.headersSent) {
      res.end()
      return
    }
    sendError(res, api)
  }
}
