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
