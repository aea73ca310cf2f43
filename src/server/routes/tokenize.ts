/**
 * POST /tokenize and POST /detokenize, in vLLM's shapes. A chat is rendered
 * with the model's template first; media parts count as the template's
 * placeholder text, not as the feature tokens a request would expand them to.
 * Rendering and tokenizing run on worker threads, never the event loop.
 */

import type { RequestHandler } from 'express'

import { toEngineMessages } from '../content.js'
import { parseBody } from '../context.js'
import type { AppContext } from '../context.js'
import { DetokenizeRequest, TokenizeRequest } from '../schemas.js'

export function tokenize(ctx: AppContext): RequestHandler {
  return async (req, res) => {
    const body = parseBody(TokenizeRequest, req.body)
    const host = ctx.models.select(body.model)
    host.resolveModel(body.model)
    const engine = host.engine()
    let tokens: number[]
    if ('messages' in body) {
      const text = await engine.applyChatTemplate(toEngineMessages(body.messages), {
        addGenerationPrompt: body.add_generation_prompt ?? true,
        ...(body.tools != null ? { tools: body.tools } : {}),
        ...(body.chat_template_kwargs != null ? { chatTemplateKwargs: body.chat_template_kwargs } : {}),
      })
      // The template writes BOS itself where the model wants one.
      tokens = await engine.tokenize(text, { addSpecialTokens: body.add_special_tokens ?? false })
    } else {
      tokens = await engine.tokenize(body.prompt, { addSpecialTokens: body.add_special_tokens ?? true })
    }
    const tokenStrs = body.return_token_strs === true ? await engine.tokenTexts(tokens) : null
    res.json({ count: tokens.length, max_model_len: engine.info.maxModelLen, tokens, token_strs: tokenStrs })
  }
}

export function detokenize(ctx: AppContext): RequestHandler {
  return async (req, res) => {
    const body = parseBody(DetokenizeRequest, req.body)
    // An error about the token ids names this route's field.
    ;(res.locals as { promptParam?: string }).promptParam = 'tokens'
    const host = ctx.models.select(body.model)
    host.resolveModel(body.model)
    res.json({ prompt: await host.engine().detokenize(body.tokens) })
  }
}
