/** Errors thrown by candela. */

/**
 * Thrown (or used to reject) when a request is cancelled through its
 * `signal`. `cause` holds the signal's reason.
 */
export class AbortError extends Error {
  override name = 'AbortError'
  /** Same code as DOM abort errors, for code that checks `err.code`. */
  readonly code = 'ABORT_ERR'
  constructor(message = 'The request was aborted', options?: { cause?: unknown }) {
    super(message, options)
  }
}

/** An input the API cannot accept; the message names the field. */
export class ValidationError extends Error {
  override name = 'ValidationError'
}

/** Build the AbortError for an aborted signal. */
export function abortErrorFor(signal: AbortSignal | undefined): AbortError {
  return new AbortError('The request was aborted', { cause: signal?.reason })
}

/**
 * A media item that cannot be used: bad or unsupported data, an unreachable
 * or refused URL. `status` is the HTTP status the server answers with
 * (400 bad input, 413 too large, 422 cannot fetch or decode, 502 / 504
 * upstream failure or timeout); `param` names the request field when known.
 */
export class MediaError extends Error {
  override name = 'MediaError'
  constructor(
    message: string,
    readonly status: number = 422,
    readonly param?: string,
  ) {
    super(message)
  }
}

/** Why the native side refused a request (see `NativeSubmitted`). */
export interface NativeInputErrorLike {
  code: string
  status: number
  message: string
}

/** The typed error for a refused request: media problems are MediaErrors, the rest ValidationErrors. */
export function inputError(e: NativeInputErrorLike): Error {
  return e.code === 'media' || e.code === 'uuid_miss' ? new MediaError(e.message, e.status) : new ValidationError(e.message)
}

/** The transcriber's native media errors arrive as `[media:STATUS] message`; make them MediaErrors. */
export function fromNativeError(err: unknown): unknown {
  if (!(err instanceof Error)) return err
  const m = /^\[media:(\d{3})\] ([\s\S]*)$/.exec(err.message)
  if (m) return new MediaError(m[2]!, Number(m[1]))
  return err
}
