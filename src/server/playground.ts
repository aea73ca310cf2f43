/**
 * The web playground (the `ui/` folder of the package: HTML, CSS and one
 * script, no build step, nothing fetched from elsewhere) served at `/`. The
 * page itself is public; every API call it makes carries the API key the
 * user types in, so a server with --api-key answers nothing without it.
 */

import { fileURLToPath } from 'node:url'

import express from 'express'
import type { RequestHandler } from 'express'

/** `ui/` at the package root, next to `dist/`. */
export const PLAYGROUND_DIR = fileURLToPath(new URL('../../ui/', import.meta.url))

/** The page may load only its own files and show media the user picked (data: and blob: URLs). */
const CSP = "default-src 'self'; img-src 'self' data: blob:; media-src 'self' data: blob:; style-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"

export function playground(): RequestHandler {
  return express.static(PLAYGROUND_DIR, {
    index: 'index.html',
    fallthrough: true,
    setHeaders: (res) => {
      res.setHeader('Content-Security-Policy', CSP)
      res.setHeader('X-Content-Type-Options', 'nosniff')
      res.setHeader('Cache-Control', 'no-cache')
    },
  })
}
