/**
 * `Authorization: Bearer <key>` on the /v1 routes when the server has an API
 * key (as vLLM's --api-key). Keys are compared by digest in constant time.
 */

import { createHash, timingSafeEqual } from 'node:crypto'

import type { RequestHandler } from 'express'

import { ApiError } from './errors.js'

const digest = (s: string): Buffer => createHash('sha256').update(s).digest()

export function bearerAuth(apiKey: string): RequestHandler {
  const want = digest(apiKey)
  return (req, _res, next) => {
    const header = req.get('authorization')
    const m = header === undefined ? null : /^Bearer\s+(.+)$/i.exec(header.trim())
    if (!m) {
      next(new ApiError(401, 'missing API key: send the header "Authorization: Bearer <key>"', { code: 'invalid_api_key' }))
      return
    }
    if (!timingSafeEqual(digest(m[1]!), want)) {
      next(new ApiError(401, 'incorrect API key provided', { code: 'invalid_api_key' }))
      return
    }
    next()
  }
}
