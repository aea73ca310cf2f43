/**
 * Per-request bookkeeping: a request id (the caller's X-Request-Id or a new
 * one, echoed back), then, when the response ends, one log line and the HTTP
 * metrics. Routes put token counts in `res.locals.usage` for both.
 */

import { randomBytes } from 'node:crypto'

import type { RequestHandler, Response } from 'express'

import type { Logger } from './log.js'
import type { ServerMetrics } from './metrics.js'

/** What a generation route reports about its request. */
export interface RequestUsage {
  promptTokens: number
  completionTokens: number
}

export interface RequestLocals {
  requestId: string
  usage?: RequestUsage
}

export const locals = (res: Response): RequestLocals => res.locals as RequestLocals

const ROUTES = new Set([
  '/v1/chat/completions',
  '/v1/completions',
  '/v1/models',
  '/v1/audio/transcriptions',
  '/v1/audio/translations',
  '/health',
  '/metrics',
  '/version',
])

/** A bounded set of route labels: unknown paths must not grow the metrics without limit. */
export function routeLabel(path: string): string {
  const p = path.length > 1 ? path.replace(/\/+$/, '') : path
  if (ROUTES.has(p)) return p
  if (p.startsWith('/v1/models/')) return '/v1/models/:model'
  return 'other'
}

const GOOD_ID = /^[\w.:@-]{1,128}$/

export function requestLog(log: Logger, metrics: ServerMetrics, enabled: boolean): RequestHandler {
  return (req, res, next) => {
    const started = performance.now()
    const given = req.get('x-request-id')
    const id = given !== undefined && GOOD_ID.test(given) ? given : `req-${randomBytes(8).toString('hex')}`
    locals(res).requestId = id
    res.set('X-Request-Id', id)
    // Captured now: routers rewrite req.url while they run.
    const path = req.path
    const route = routeLabel(path)
    let done = false
    const finish = (): void => {
      if (done) return
      done = true
      const seconds = (performance.now() - started) / 1000
      // A client that left before the response ended: nginx's 499.
      const status = res.writableFinished ? res.statusCode : 499
      metrics.requests.inc({ route, method: req.method, status: String(status) })
      metrics.latency.observe({ route }, seconds)
      if (!enabled || route === '/metrics' || route === '/health') return
      const usage = locals(res).usage
      log.info('request', {
        id,
        method: req.method,
        route: path,
        status,
        prompt_tokens: usage?.promptTokens,
        completion_tokens: usage?.completionTokens,
        latency_ms: Math.round(seconds * 1000),
      })
    }
    res.on('finish', finish)
    res.on('close', finish)
    next()
  }
}
