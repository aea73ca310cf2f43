/**
 * A small `multipart/form-data` reader for the audio routes: the body arrives
 * whole (express.raw, bounded by the server's body limit), and is split at its
 * boundary into text fields and files. Enough for what OpenAI clients send;
 * no streaming, no nested multipart.
 */

import { badRequest } from './errors.js'

export interface FormFile {
  filename: string
  contentType: string | undefined
  data: Buffer
}

export interface Form {
  fields: Map<string, string[]>
  files: Map<string, FormFile>
}

const CRLF2 = Buffer.from('\r\n\r\n')

/** The boundary of a `multipart/form-data` Content-Type, or undefined. */
export function boundaryOf(contentType: string | undefined): string | undefined {
  if (!contentType || !/^multipart\/form-data\b/i.test(contentType)) return undefined
  const m = /;\s*boundary=(?:"([^"]+)"|([^;\s]+))/i.exec(contentType)
  return m ? (m[1] ?? m[2]) : undefined
}

/** A header parameter (`name="file"`) of a Content-Disposition line. */
function param(header: string, name: string): string | undefined {
  const m = new RegExp(`;\\s*${name}=(?:"((?:[^"\\\\]|\\\\.)*)"|([^;\\s]+))`, 'i').exec(header)
  if (!m) return undefined
  return m[1] !== undefined ? m[1].replace(/\\(.)/g, '$1') : m[2]
}

/** Parse a whole multipart body; a 400 naming what is wrong otherwise. */
export function parseMultipart(body: Buffer, boundary: string): Form {
  const form: Form = { fields: new Map(), files: new Map() }
  const delim = Buffer.from(`--${boundary}`)
  let pos = body.indexOf(delim)
  if (pos < 0) throw badRequest('the multipart body has no part with the boundary of its Content-Type')
  for (;;) {
    pos += delim.length
    // "--" after a delimiter closes the body.
    if (body[pos] === 0x2d && body[pos + 1] === 0x2d) return form
    const headEnd = body.indexOf(CRLF2, pos)
    if (headEnd < 0) throw badRequest('a multipart part has no end of headers')
    const next = body.indexOf(Buffer.from(`\r\n--${boundary}`), headEnd + 4)
    if (next < 0) throw badRequest('the multipart body is truncated (no closing boundary)')
    const headers = body.subarray(pos, headEnd).toString('utf8').split('\r\n').filter((l) => l !== '')
    const data = body.subarray(headEnd + 4, next)
    let disposition = ''
    let contentType: string | undefined
    for (const h of headers) {
      const i = h.indexOf(':')
      if (i < 0) continue
      const key = h.slice(0, i).trim().toLowerCase()
      const value = h.slice(i + 1).trim()
      if (key === 'content-disposition') disposition = value
      else if (key === 'content-type') contentType = value
    }
    const name = param(disposition, 'name')
    if (!/^form-data\b/i.test(disposition) || name === undefined) {
      throw badRequest('every multipart part needs a Content-Disposition: form-data header with a name')
    }
    const filename = param(disposition, 'filename')
    if (filename !== undefined) {
      form.files.set(name, { filename, contentType, data: Buffer.from(data) })
    } else {
      const list = form.fields.get(name) ?? []
      list.push(data.toString('utf8'))
      form.fields.set(name, list)
    }
    pos = next + 2
  }
}
