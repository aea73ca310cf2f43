/** GET /v1/models and GET /v1/models/:model */

import type { RequestHandler } from 'express'

import type { AppContext } from '../context.js'
import { ApiError } from '../errors.js'

function card(ctx: AppContext, id: string): object {
  const whisper = ctx.host.loadedTranscriber
  const info = whisper ? undefined : ctx.host.engine().info
  return {
    id,
    object: 'model',
    created: ctx.host.createdAt,
    owned_by: 'candela',
    root: whisper ? whisper.info.path : info!.path,
    parent: null,
    max_model_len: whisper ? whisper.info.maxTargetPositions : info!.maxModelLen,
  }
}

export function listModels(ctx: AppContext): RequestHandler {
  return (_req, res) => {
    ctx.host.resolveModel(undefined)
    res.json({ object: 'list', data: ctx.host.names.map((name) => card(ctx, name)) })
  }
}

export function retrieveModel(ctx: AppContext): RequestHandler {
  return (req, res) => {
    ctx.host.resolveModel(undefined)
    const id = String(req.params.model)
    if (!ctx.host.names.includes(id)) {
      throw new ApiError(404, `The model \`${id}\` does not exist`, { param: 'model', code: 'model_not_found' })
    }
    res.json(card(ctx, id))
  }
}
