/**
 * What the routes share: the hosted models, metrics, the log and the server's
 * settings; plus the life of one generation request (its abort signal tied
 * to the client's connection, its token tally).
 */

import type { Request, Response } from 'express'
import type { ZodType } from 'zod'

import { ApiError, badRequest, fromZodError, toApiError } from './errors.js'
import type { Logger } from './log.js'
import type { ServerMetrics } from './metrics.js'
import type { ModelPool } from './model-pool.js'
import { locals, routeLabel } from './request-log.js'
import { UsageTally } from './runs.js'
import type { ChoiceEvent } from './runs.js'
import { SseStream } from './sse.js'
import type { ToolCallParserName } from './tools.js'

export interface AppContext {
  /** The hosted models; a request's `model` field picks one. */
  models: ModelPool
  metrics: ServerMetrics
  log: Logger
  /** Require `Authorization: Bearer <apiKey>` on /v1 routes. */
  apiKey: string | undefined
  /** Largest request body, bytes. */
  maxBodyBytes: number
  /** An SSE comment after this many ms without a chunk (0: never). */
  keepAliveMs: number
  /** Log one line per request. */
  logRequests: boolean
  /** The served model's tool-call format, when set by the operator (else read off the chat template). */
  toolCallParser: ToolCallParserName | undefined
  version: string
  /** Serve the web playground at `/`. */
  ui: boolean
  /** Aborted when the server starts closing: every request in flight ends with a 503. */
  stopping: AbortSignal
}

/** What a request in flight is answered when the server closes under it. */
export const shuttingDown = (): ApiError => new ApiError(503, 'the server is shutting down', { code: 'shutting_down' })

/** Validate a body against its schema; a 400 naming the first bad field otherwise. */
export function parseBody<T>(schema: ZodType<T>, body: unknown): T {
  if (body === undefined || body === null || typeof body !== 'object' || Array.isArray(body)) {
    throw badRequest('the request body must be a JSON object')
  }
  const r = schema.safeParse(body)
  if (!r.success) throw fromZodError(r.error)
  return r.data
}

/** One generation request in flight. */
export class Run {
  readonly #ac = new AbortController()
  readonly tally: UsageTally
  readonly created = Math.floor(Date.now() / 1000)
  #clientGone = false

  constructor(
    private readonly ctx: AppContext,
    req: Request,
    private readonly res: Response,
    /** `messages` or `prompt`: the field the engine's prompt errors are about. */
    readonly promptParam: string,
  ) {
    const route = routeLabel(req.baseUrl + req.path)
    this.tally = new UsageTally(
      performance.now(),
      (ms) => ctx.metrics.ttft.observe({ route }, ms / 1000),
      (lost) => this.#reportVideoFrames(lost),
    )
    ;(res.locals as { promptParam?: string }).promptParam = promptParam
    // The client went away before its answer was complete: stop generating at once.
    res.on('close', () => {
      ctx.stopping.removeEventListener('abort', onStop)
      if (!res.writableFinished) {
        this.#clientGone = true
        this.#ac.abort(new Error('the client closed the connection'))
      }
    })
    const onStop = (): void => this.#ac.abort(shuttingDown())
    if (ctx.stopping.aborted) onStop()
    else ctx.stopping.addEventListener('abort', onStop, { once: true })
  }

  /** The error to answer with: the shutdown's own when the server is closing. */
  #reason(err: unknown): unknown {
    return this.ctx.stopping.aborted ? shuttingDown() : err
  }

  get signal(): AbortSignal {
    return this.#ac.signal
  }

  get clientGone(): boolean {
    return this.#clientGone
  }

  /** End every engine stream of the request (early exit or a failure in one of them). */
  cancel(): void {
    this.#ac.abort(new Error('the request ended'))
  }

  /**
   * Say what `frame_recovery` did: in headers while they are unsent (the
   * first chunk of each prompt comes before the answer opens) and in the log.
   */
  #reportVideoFrames(lost: { recovered: number; dropped: number }): void {
    if (!this.res.headersSent) {
      this.res.setHeader('x-candela-video-frames-recovered', String(lost.recovered))
      this.res.setHeader('x-candela-video-frames-dropped', String(lost.dropped))
    }
    this.ctx.log.info('video frame recovery', { id: locals(this.res).requestId, recovered: lost.recovered, dropped: lost.dropped })
  }

  /** Report the token counts to the request log. */
  settle(): void {
    locals(this.res).usage = { promptTokens: this.tally.promptTokens, completionTokens: this.tally.completionTokens }
  }

  /**
   * Run a route's answer: a client that went away is answered by nobody
   * (the abort already freed its request); the engine streams always end
   * and the token counts reach the log.
   */
  async answer(work: () => Promise<void>): Promise<void> {
    try {
      await work()
    } catch (err) {
      if (this.clientGone) return
      throw this.#reason(err)
    } finally {
      this.cancel()
      this.settle()
    }
  }

  /**
   * Stream `events` as SSE: `onEvent` sends each event's chunks, then the
   * usage chunk (`includeUsage`), then `[DONE]`. An error before anything
   * was sent keeps its status and JSON body; later it becomes an error event.
   */
  async streamEvents(
    events: AsyncIterable<ChoiceEvent>,
    head: object,
    includeUsage: boolean,
    onEvent: (ev: ChoiceEvent, send: (data: object) => Promise<void>) => Promise<void>,
  ): Promise<void> {
    const sse = new SseStream(this.res, this.ctx.keepAliveMs)
    sse.startKeepAlive()
    const send = (data: object): Promise<void> => sse.send(data)
    try {
      for await (const ev of events) {
        this.tally.add(ev)
        await onEvent(ev, send)
      }
      if (includeUsage) await sse.send({ ...head, choices: [], usage: this.tally.usage() })
    } catch (err) {
      if (this.clientGone) return
      if (!sse.opened) throw this.#reason(err)
      await sse.send(this.errorEvent(this.#reason(err)))
    }
    sse.end()
  }

  /** An error after the stream opened, as OpenAI's SSE error event body. */
  errorEvent(err: unknown): object {
    const api = toApiError(err, this.promptParam)
    if (api.status >= 500) this.ctx.log.error('request failed', { id: locals(this.res).requestId, error: api.message })
    return api.toJSON()
  }
}
