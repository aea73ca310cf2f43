/**
 * Errors thrown by candela: one hierarchy under {@link CandelaError}, each
 * with a `code` and the `param` (request field) at fault. A mistake is the
 * same class with the same code and param whether the TypeScript checks or
 * the native engine caught it.
 *
 * ```
 * CandelaError
 * ├─ ValidationError       code 'invalid_request'
 * │  └─ ContextLengthError code 'context_length_exceeded'
 * ├─ MediaError            code 'invalid_media' | 'media_not_cached' (+ `status`)
 * ├─ AbortError            code 'ABORT_ERR'
 * ├─ ClosedError           code 'closed'
 * ├─ LoadError             code 'model_not_found' | 'device_unavailable' | 'load_failed'
 * ├─ HubError              code 'gated' | 'not_found' | 'offline' | 'network' | 'checksum'
 * ├─ UnsupportedRepoError  code 'unsupported_repo'
 * └─ InternalError         code 'internal' (a bug in candela)
 * ```
 */

export interface CandelaErrorOptions {
  code?: string
  /** The request field at fault, as the library names it (`maxTokens`, `messages[0].content`). */
  param?: string | null
  cause?: unknown
}

/** Every error candela throws. */
export class CandelaError extends Error {
  override name = 'CandelaError'
  /** What kind of mistake this is (stable; switch on it). */
  readonly code: string
  /** The request field at fault, when one is (`maxTokens`, `messages[1].content[0]`); else null. */
  readonly param: string | null

  constructor(message: string, options: CandelaErrorOptions = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause })
    this.code = options.code ?? 'error'
    this.param = options.param ?? null
  }
}

/**
 * An input the API cannot accept; the message names the field, and `param`
 * holds it when the message starts with it.
 */
export class ValidationError extends CandelaError {
  override name = 'ValidationError'
  constructor(message: string, options: CandelaErrorOptions = {}) {
    super(message, { ...options, code: options.code ?? 'invalid_request', param: 'param' in options ? options.param : paramOf(message) })
  }
}

/**
 * The request does not fit the model's context: the prompt is too long
 * (`param` is the prompt's field) or `maxTokens` asks for more than is left
 * (`param` is `maxTokens`).
 */
export class ContextLengthError extends ValidationError {
  override name = 'ContextLengthError'
  constructor(message: string, options: Omit<CandelaErrorOptions, 'code'> = {}) {
    super(message, { ...options, code: 'context_length_exceeded' })
  }
}

/**
 * A media item that cannot be used: bad or unsupported data, an unreachable
 * or refused URL, a uuid no cache holds (`code` 'media_not_cached': send the
 * data again). `status` is the HTTP status the server answers with (400 bad
 * input, 413 too large, 422 cannot fetch or decode, 502 / 504 upstream
 * failure or timeout); `param` is the part's path when TS knows it.
 */
export class MediaError extends CandelaError {
  override name = 'MediaError'
  /** The uuid of a `media_not_cached` item. */
  readonly uuid: string | undefined

  constructor(
    message: string,
    readonly status: number = 422,
    param?: string,
    options: { code?: 'invalid_media' | 'media_not_cached'; uuid?: string } = {},
  ) {
    super(message, { code: options.code ?? 'invalid_media', param: param ?? null })
    this.uuid = options.uuid
  }
}

/**
 * Thrown (or used to reject) when a request is cancelled through its
 * `signal`. `cause` holds the signal's reason.
 */
export class AbortError extends CandelaError {
  override name = 'AbortError'
  constructor(message = 'The request was aborted', options?: { cause?: unknown }) {
    // Same code as DOM abort errors, for code that checks `err.code`.
    super(message, { code: 'ABORT_ERR', cause: options?.cause })
  }
}

/** A call on an engine or transcriber that is closed, or a request it was running when it closed. */
export class ClosedError extends CandelaError {
  override name = 'ClosedError'
  constructor(message: string) {
    super(message, { code: 'closed' })
  }
}

/** A model that cannot be loaded: no such model, no such device, or files the loader refuses. */
export class LoadError extends CandelaError {
  override name = 'LoadError'
  constructor(
    message: string,
    options: { code: 'model_not_found' | 'device_unavailable' | 'load_failed'; param?: string; cause?: unknown },
  ) {
    super(message, { code: options.code, param: options.param ?? (options.code === 'device_unavailable' ? 'device' : 'model'), cause: options.cause })
  }
}

/** A failure that is not the caller's: a bug in candela (the message says so) or the machine. */
export class InternalError extends CandelaError {
  override name = 'InternalError'
  constructor(message: string, options: { cause?: unknown } = {}) {
    super(message, { code: 'internal', cause: options.cause })
  }
}

/** Build the AbortError for an aborted signal. */
export function abortErrorFor(signal: AbortSignal | undefined): AbortError {
  return new AbortError('The request was aborted', { cause: signal?.reason })
}

/**
 * The field a message starts with: the library's messages lead with it
 * (`messages[0].content[1]: ...`, `maxTokens must be ...`). Only a leading
 * path followed by `:` or a verb counts, so prose never becomes a param.
 */
export function paramOf(message: string): string | null {
  if (message.startsWith("'max_tokens' or 'max_completion_tokens'")) return 'maxTokens'
  const m = /^([A-Za-z_]\w*(?:\[\d+\]|\.[A-Za-z_]\w*)*)(?::| (?:must|is|has|needs|cannot)\b| \()/.exec(message)
  return m ? m[1]! : null
}

/** A prompt-level refusal ("the prompt is empty", a template error, a bad token id): it is about the prompt field. */
const PROMPT_MESSAGE = /^(the prompt\b|chat template|token id)/

/** Why the native side refused a request (`NativeSubmitted.error`). */
export interface NativeInputErrorLike {
  code: string
  status: number
  message: string
  uuid?: string | null
  param?: string | null
}

/**
 * The typed error of a refused request. `promptParam` names the request's
 * prompt field (`messages`, `prompt`, `prompts[2]`), the param of errors
 * about the prompt.
 */
export function inputError(e: NativeInputErrorLike, promptParam: string | null = null): CandelaError {
  switch (e.code) {
    case 'media':
      return new MediaError(e.message, e.status, e.param ?? undefined)
    case 'uuid_miss':
      return new MediaError(e.message, e.status, e.param ?? undefined, { code: 'media_not_cached', uuid: e.uuid ?? undefined })
    case 'context_length':
      return new ContextLengthError(e.message, { param: e.param ?? promptParam })
    default:
      return new ValidationError(e.message, { param: e.param ?? paramOf(e.message) ?? (PROMPT_MESSAGE.test(e.message) ? promptParam : null) })
  }
}

/**
 * An error a native call threw, as its CandelaError (refused inputs arrive
 * as values, see {@link inputError}): a closed engine as code `Closing`,
 * cancelled work as `Cancelled`, the caller's
 * mistakes as `InvalidArg` (a ValidationError, or `invalid` when the call
 * gives another class for them); anything else is an InternalError.
 */
export function fromNative(
  err: unknown,
  options: { promptParam?: string; invalid?: (message: string, cause: Error) => CandelaError } = {},
): CandelaError {
  if (err instanceof CandelaError) return err
  if (!(err instanceof Error)) return new InternalError(String(err), { cause: err })
  const code = (err as { code?: unknown }).code
  if (code === 'Closing') return new ClosedError(err.message)
  if (code === 'Cancelled') return new AbortError(err.message, { cause: err })
  if (code === 'InvalidArg') {
    if (options.invalid) return options.invalid(err.message, err)
    const param = paramOf(err.message) ?? (PROMPT_MESSAGE.test(err.message) ? (options.promptParam ?? null) : null)
    return new ValidationError(err.message, { param, cause: err })
  }
  return new InternalError(err.message, { cause: err })
}
