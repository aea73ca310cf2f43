// A media server on 127.0.0.1 for the fetch tests: routes are plain
// handlers; it counts requests per path and how many were in flight at once.
import { createServer } from 'node:http'
import type { IncomingMessage, Server, ServerResponse } from 'node:http'
import type { AddressInfo } from 'node:net'

export type Handler = (req: IncomingMessage, res: ServerResponse) => unknown

export interface MediaServer {
  /** `http://127.0.0.1:PORT` */
  base: string
  port: number
  /** Requests seen, by path. */
  hits: Map<string, number>
  /** Most requests in flight at the same time. */
  maxInFlight: number
  inFlight: number
  close(): Promise<void>
}

export async function startMediaServer(routes: Record<string, Handler>): Promise<MediaServer> {
  const state = { hits: new Map<string, number>(), maxInFlight: 0, inFlight: 0 }
  const server: Server = createServer((req, res) => {
    const path = new URL(req.url ?? '/', 'http://x').pathname
    state.hits.set(path, (state.hits.get(path) ?? 0) + 1)
    state.inFlight++
    state.maxInFlight = Math.max(state.maxInFlight, state.inFlight)
    res.once('close', () => state.inFlight--)
    const handler = routes[path]
    if (!handler) {
      res.writeHead(404).end('not found')
      return
    }
    Promise.resolve(handler(req, res)).catch(() => res.destroy())
  })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  const port = (server.address() as AddressInfo).port
  return {
    base: `http://127.0.0.1:${port}`,
    port,
    get hits() {
      return state.hits
    },
    get maxInFlight() {
      return state.maxInFlight
    },
    get inFlight() {
      return state.inFlight
    },
    close: () =>
      new Promise<void>((resolve) => {
        server.closeAllConnections()
        server.close(() => resolve())
      }),
  }
}

/** Answer `body` with a content type. */
export const serve =
  (body: Buffer, type = 'application/octet-stream'): Handler =>
  (_req, res) => {
    res.writeHead(200, { 'content-type': type, 'content-length': body.length }).end(body)
  }

/** Redirect to `location` with `status`. */
export const redirect =
  (location: string, status = 302): Handler =>
  (_req, res) => {
    res.writeHead(status, { location }).end()
  }

/** A resolver hook that answers from a table (and counts its calls). */
export function fakeDns(table: Record<string, string[]>): {
  resolve: (host: string) => Promise<Array<{ address: string; family: number }>>
  calls: string[]
} {
  const calls: string[] = []
  return {
    calls,
    resolve: async (host) => {
      calls.push(host)
      const addrs = table[host]
      if (!addrs) throw Object.assign(new Error(`getaddrinfo ENOTFOUND ${host}`), { code: 'ENOTFOUND' })
      return addrs.map((address) => ({ address, family: address.includes(':') ? 6 : 4 }))
    },
  }
}

/** A PNG whose header declares `width`×`height` RGB pixels, with a token IDAT. */
export function pngHeaderOnly(width: number, height: number): Buffer {
  const chunk = (type: string, data: Buffer): Buffer => {
    const len = Buffer.alloc(4)
    len.writeUInt32BE(data.length)
    const body = Buffer.concat([Buffer.from(type, 'latin1'), data])
    const crc = Buffer.alloc(4)
    crc.writeUInt32BE(crc32(body))
    return Buffer.concat([len, body, crc])
  }
  const ihdr = Buffer.alloc(13)
  ihdr.writeUInt32BE(width, 0)
  ihdr.writeUInt32BE(height, 4)
  ihdr[8] = 8 // bit depth
  ihdr[9] = 2 // RGB
  return Buffer.concat([
    Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]),
    chunk('IHDR', ihdr),
    chunk('IDAT', Buffer.from([0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01])),
    chunk('IEND', Buffer.alloc(0)),
  ])
}

function crc32(buf: Buffer): number {
  let c = ~0
  for (const b of buf) {
    c ^= b
    for (let k = 0; k < 8; k++) c = c & 1 ? (c >>> 1) ^ 0xedb88320 : c >>> 1
  }
  return ~c >>> 0
}
