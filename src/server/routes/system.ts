/** GET /health, /version and /metrics: outside /v1, never behind the API key (probes and scrapers). */

import type { RequestHandler } from 'express'

import type { AppContext } from '../context.js'
import { sendError } from '../errors.js'

/** 200 `{"status":"ok"}` once the models launched with the server are ready; 503 with the reason before (loading) and after. */
export function health(ctx: AppContext): RequestHandler {
  return (_req, res) => {
    const err = ctx.models.unavailable()
    if (err) sendError(res, err)
    else res.json({ status: 'ok' })
  }
}

export function version(ctx: AppContext): RequestHandler {
  return (_req, res) => {
    res.json({ version: ctx.version })
  }
}

export function metrics(ctx: AppContext): RequestHandler {
  return async (_req, res) => {
    const text = await ctx.metrics.text()
    res.set('Content-Type', ctx.metrics.contentType).send(text)
  }
}
