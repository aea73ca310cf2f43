/** GET /v1/models and GET /v1/models/:model (OpenAI's view: the ready models by served name). */

import type { RequestHandler } from 'express'

import type { AppContext } from '../context.js'
import type { ModelHost } from '../model-host.js'

function card(host: ModelHost, id: string): object {
  const whisper = host.loadedTranscriber
  const info = whisper ? undefined : host.engine().info
  const path = whisper ? whisper.info.path : info!.path
  return {
    id,
    object: 'model',
    created: host.createdAt,
    owned_by: 'candela',
    root: path,
    parent: null,
    max_model_len: whisper ? whisper.info.maxTargetPositions : info!.maxModelLen,
    // Xinference's description fields: its client picks a chat or generate handle from them.
    model_type: whisper ? 'audio' : 'LLM',
    model_ability: whisper
      ? ['audio2text']
      : [
          'generate',
          ...(info!.hasChatTemplate ? ['chat'] : []),
          ...(info!.modalities.some((m) => m === 'image' || m === 'video') ? ['vision'] : []),
          ...(info!.modalities.includes('audio') ? ['audio'] : []),
        ],
    model_name: host.model,
    model_format: path.endsWith('.gguf') ? 'ggufv2' : 'pytorch',
  }
}

export function listModels(ctx: AppContext): RequestHandler {
  return (_req, res) => {
    const ready = ctx.models.list().filter((h) => h.state === 'ready')
    // Nothing to list yet because the server's own models are loading: say so, as /health does.
    const unavailable = ready.length === 0 ? ctx.models.unavailable() : undefined
    if (unavailable) throw unavailable
    res.json({ object: 'list', data: ready.flatMap((h) => h.names.map((name) => card(h, name))) })
  }
}

export function retrieveModel(ctx: AppContext): RequestHandler {
  return (req, res) => {
    const id = String(req.params.model)
    const host = ctx.models.select(id)
    res.json(card(host, host.resolveModel(id)))
  }
}
