/**
 * The Express app of the OpenAI-compatible API. Middleware order matters:
 * the request log sees every request; the API key is checked before a body
 * is read; the body parser only runs on routes that take one; the error
 * handler turns everything (bad JSON, a body over the limit, unknown paths)
 * into OpenAI's error shape.
 */

import express from 'express'
import type { Express } from 'express'

import type { AppContext } from './context.js'
import { bearerAuth } from './auth.js'
import { errorHandler, notFound } from './errors.js'
import { openApiDocument } from './openapi.js'
import { playground } from './playground.js'
import { locals, requestLog } from './request-log.js'
import { chatCompletions } from './routes/chat.js'
import { completions } from './routes/completions.js'
import { describeInstance, launchInstance, listInstances, terminateInstance } from './routes/instances.js'
import { ResponseStore, createResponse, retrieveResponse } from './routes/responses.js'
import { listModels, retrieveModel } from './routes/models.js'
import { clusterAuth, xinferenceLaunch, xinferenceTerminate } from './routes/xinference.js'
import { audioTranscriptions, multipartBody } from './routes/transcriptions.js'
import { health, metrics, version } from './routes/system.js'
import { detokenize, tokenize } from './routes/tokenize.js'

/** The routes over a context; `createApp` and `startServer` (serve.ts) build the context. */
export function buildApp(ctx: AppContext): Express {
  const app = express()
  app.disable('x-powered-by')
  app.set('etag', false)
  app.use(requestLog(ctx.log, ctx.metrics, ctx.logRequests))

  app.get('/health', health(ctx))
  app.get('/version', version(ctx))
  app.get('/metrics', metrics(ctx))
  let openapi: object | undefined
  app.get('/openapi.json', (_req, res) => {
    res.json((openapi ??= openApiDocument(ctx.version)))
  })
  // vLLM's utility routes live outside /v1 (and outside its API key).
  const json = express.json({ limit: ctx.maxBodyBytes, type: () => true })
  app.post('/tokenize', json, tokenize(ctx))
  app.post('/detokenize', json, detokenize(ctx))

  // Xinference's client asks whether to send its key before it has one.
  app.get('/v1/cluster/auth', clusterAuth(ctx))

  const v1 = express.Router()
  if (ctx.apiKey !== undefined) v1.use(bearerAuth(ctx.apiKey))
  // Any content type is read as JSON: `curl -d '{...}'` sends form encoding by default.
  v1.get('/models', listModels(ctx))
  v1.get('/models/:model', retrieveModel(ctx))
  v1.post('/models', json, xinferenceLaunch(ctx))
  v1.delete('/models/:uid', xinferenceTerminate(ctx))
  v1.post('/instances', json, launchInstance(ctx))
  v1.get('/instances', listInstances(ctx))
  v1.get('/instances/:uid', describeInstance(ctx))
  v1.delete('/instances/:uid', terminateInstance(ctx))
  v1.post('/chat/completions', json, chatCompletions(ctx))
  v1.post('/completions', json, completions(ctx))
  const responses = new ResponseStore()
  v1.post('/responses', json, createResponse(ctx, responses))
  v1.get('/responses/:id', retrieveResponse(ctx, responses))
  v1.post('/audio/transcriptions', multipartBody(ctx), audioTranscriptions(ctx))
  v1.post('/audio/translations', multipartBody(ctx), audioTranscriptions(ctx, 'translate'))
  app.use('/v1', v1)
  // Last before the 404s: the playground's files never shadow an API route.
  if (ctx.ui) app.use(playground())

  app.use(notFound)
  app.use(
    errorHandler((err, req) => {
      const res = req.res
      ctx.log.error('internal error', {
        id: res ? locals(res).requestId : undefined,
        route: req.originalUrl,
        error: err instanceof Error ? (err.stack ?? err.message) : String(err),
      })
    }),
  )
  return app
}
