// A mock of the Hugging Face hub's HTTP API on 127.0.0.1, answering as the
// hub does (huggingface_hub's file_download.py / hf_api.py read these):
//   GET  /api/models/{repo}/revision/{rev}    {sha, siblings}
//   GET  /api/models/{repo}/tree/{rev}        file list, paged by Link: rel="next"
//   HEAD|GET /{repo}/resolve/{rev}/{file}     small files: 307 to a relative
//        /api/resolve-cache path; LFS files: 302 to a second server (the "CDN")
//        with X-Linked-Etag / X-Linked-Size; X-Repo-Commit everywhere
// plus X-Error-Code on errors (RepoNotFound, RevisionNotFound, EntryNotFound,
// GatedRepo). The CDN honours Range and can drop connections mid-file.
import { createHash } from 'node:crypto'
import { readFileSync, readdirSync, statSync } from 'node:fs'
import { createServer } from 'node:http'
import type { IncomingMessage, Server, ServerResponse } from 'node:http'
import type { AddressInfo } from 'node:net'
import { join } from 'node:path'

export interface MockRepo {
  /** Path in the repo -> contents. */
  files: Record<string, Buffer>
  /** Files need `Authorization: Bearer <token>` (the listing stays public, as on the hub). */
  gatedToken?: string
}

export interface Logged {
  server: 'hub' | 'cdn'
  method: string
  path: string
  auth: string | undefined
  range: string | undefined
}

export interface MockHub {
  endpoint: string
  log: Logged[]
  /** The commit `main` of a repo points to. */
  commitOf(repo: string): string
  /** Drop the next `times` CDN downloads of `file` of `repo` after `bytes` bytes. */
  dropAfter(repo: string, file: string, bytes: number, times?: number): void
  /** Send the next CDN download of `file` up to `bytes` bytes, the rest once the returned function is called. */
  hold(repo: string, file: string, bytes: number): () => void
  /** Make resolve report another etag for `file` than the listing (a repo that changed under a commit). */
  lieAbout(repo: string, file: string): void
  close(): Promise<void>
}

/** A repo made of a fixture folder's files (top level), plus extras. */
export function repoFromDir(dir: string, extra: Record<string, Buffer> = {}): MockRepo {
  const files: Record<string, Buffer> = {}
  for (const n of readdirSync(dir)) if (statSync(join(dir, n)).isFile()) files[n] = readFileSync(join(dir, n))
  return { files: { ...files, 'README.md': Buffer.from('# fixture\n'), ...extra } }
}

const isLfs = (path: string): boolean => /\.(safetensors|gguf|bin)$/.test(path)
const gitOid = (b: Buffer): string => createHash('sha1').update(`blob ${b.length}\0`).update(b).digest('hex')
const sha256 = (b: Buffer): string => createHash('sha256').update(b).digest('hex')

export async function startMockHub(repos: Record<string, MockRepo>, pageSize = 4): Promise<MockHub> {
  const log: Logged[] = []
  const drops = new Map<string, { bytes: number; times: number }>()
  const holds = new Map<string, { bytes: number; released: Promise<void> }>()
  const lies = new Set<string>()
  const commits = new Map(Object.keys(repos).map((r) => [r, createHash('sha1').update(`commit:${r}`).digest('hex')]))
  const blobs = new Map<string, Buffer>()
  for (const repo of Object.values(repos)) for (const b of Object.values(repo.files)) blobs.set(sha256(b), b)
  let cdnBase = ''

  const record = (server: Logged['server'], req: IncomingMessage): string => {
    const path = decodeURIComponent(new URL(req.url ?? '/', 'http://x').pathname)
    log.push({ server, method: req.method ?? '', path, auth: req.headers.authorization, range: req.headers.range })
    return path
  }
  const error = (res: ServerResponse, status: number, code: string, message: string, commit?: string): void => {
    res.writeHead(status, { 'content-type': 'application/json', 'x-error-code': code, 'x-error-message': message, ...(commit ? { 'x-repo-commit': commit } : {}) })
    res.end(JSON.stringify({ error: message }))
  }
  /** The repo and commit `org/name` + `rev` address, or an error answer. */
  const lookup = (res: ServerResponse, repo: string, rev: string): { r: MockRepo; commit: string } | undefined => {
    const r = repos[repo]
    const commit = commits.get(repo)
    if (!r || !commit) {
      error(res, 401, 'RepoNotFound', 'Repository not found')
      return undefined
    }
    if (rev !== 'main' && rev !== commit) {
      error(res, 404, 'RevisionNotFound', `Invalid rev id: ${rev}`)
      return undefined
    }
    return { r, commit }
  }

  const hub: Server = createServer((req, res) => {
    const url = new URL(req.url ?? '/', 'http://x')
    const path = record('hub', req)
    let m = /^\/api\/models\/([^/]+\/[^/]+)\/revision\/(.+)$/.exec(path)
    if (m) {
      const found = lookup(res, m[1]!, m[2]!)
      if (!found) return
      res.writeHead(200, { 'content-type': 'application/json' })
      res.end(
        JSON.stringify({
          _id: m[1],
          id: m[1],
          modelId: m[1],
          sha: found.commit,
          private: false,
          gated: found.r.gatedToken ? 'auto' : false,
          disabled: false,
          tags: [],
          siblings: Object.keys(found.r.files).map((rfilename) => ({ rfilename })),
          lastModified: '2026-01-01T00:00:00.000Z',
        }),
      )
      return
    }
    m = /^\/api\/models\/([^/]+\/[^/]+)\/tree\/([^/]+)$/.exec(path)
    if (m) {
      const found = lookup(res, m[1]!, m[2]!)
      if (!found) return
      const items = Object.entries(found.r.files).map(([p, b]) => ({
        type: 'file',
        oid: gitOid(isLfs(p) ? Buffer.from(`lfs pointer ${sha256(b)}`) : b),
        size: b.length,
        path: p,
        ...(isLfs(p) ? { lfs: { oid: sha256(b), size: b.length, pointerSize: 134 } } : {}),
      }))
      const cursor = Number(url.searchParams.get('cursor') ?? 0)
      const page = items.slice(cursor, cursor + pageSize)
      const headers: Record<string, string> = { 'content-type': 'application/json' }
      if (cursor + pageSize < items.length) {
        const next = new URL(`http://${req.headers.host}${url.pathname}`)
        next.searchParams.set('recursive', 'True')
        next.searchParams.set('expand', 'False')
        next.searchParams.set('cursor', String(cursor + pageSize))
        headers.link = `<${next.toString()}>; rel="next"`
      }
      res.writeHead(200, headers)
      res.end(JSON.stringify(page))
      return
    }
    m = /^\/(?:api\/resolve-cache\/models\/([^/]+\/[^/]+)|([^/]+\/[^/]+)\/resolve)\/([^/]+)\/(.+)$/.exec(path)
    if (m) {
      const repo = (m[1] ?? m[2])!
      const rev = m[3]!
      const file = m[4]!
      const found = lookup(res, repo, rev)
      if (!found) return
      const { r, commit } = found
      if (r.gatedToken && req.headers.authorization !== `Bearer ${r.gatedToken}`) {
        error(res, 401, 'GatedRepo', `Access to model ${repo} is restricted. You must have access to it and be authenticated to access it. Please log in.`)
        return
      }
      const body = r.files[file]
      if (!body) {
        error(res, 404, 'EntryNotFound', `${file} does not exist on "${rev}"`, commit)
        return
      }
      const common = { 'x-repo-commit': commit, 'accept-ranges': 'bytes' }
      if (isLfs(file)) {
        res.writeHead(302, {
          ...common,
          location: `${cdnBase}/blobs/${sha256(body)}?repo=${encodeURIComponent(repo)}&file=${encodeURIComponent(file)}`,
          etag: `"${gitOid(Buffer.from(`lfs pointer ${sha256(body)}`))}"`,
          'x-linked-etag': `"${lies.has(`${repo}/${file}`) ? '0'.repeat(64) : sha256(body)}"`,
          'x-linked-size': String(body.length),
          'content-length': '0',
        })
        res.end()
      } else if (path.startsWith('/api/resolve-cache/')) {
        res.writeHead(200, { ...common, etag: `"${gitOid(body)}"`, 'content-length': String(body.length), 'content-type': 'application/octet-stream' })
        res.end(req.method === 'HEAD' ? undefined : body)
      } else {
        res.writeHead(307, {
          ...common,
          etag: `"${gitOid(body)}"`,
          location: `/api/resolve-cache/models/${repo}/${commit}/${file}`,
          'content-length': '0',
        })
        res.end()
      }
      return
    }
    res.writeHead(404).end('not found')
  })

  const cdn: Server = createServer((req, res) => {
    const url = new URL(req.url ?? '/', 'http://x')
    const path = record('cdn', req)
    const body = blobs.get(path.replace(/^\/blobs\//, ''))
    if (!body) {
      res.writeHead(404).end()
      return
    }
    const range = /^bytes=(\d+)-$/.exec(req.headers.range ?? '')
    const start = range ? Number(range[1]) : 0
    const part = body.subarray(start)
    const headers: Record<string, string> = { 'content-length': String(part.length), 'accept-ranges': 'bytes', etag: `"${sha256(body)}"` }
    if (range) headers['content-range'] = `bytes ${start}-${body.length - 1}/${body.length}`
    res.writeHead(range ? 206 : 200, headers)
    if (req.method === 'HEAD') {
      res.end()
      return
    }
    const key = `${url.searchParams.get('repo')}/${url.searchParams.get('file')}`
    const held = holds.get(key)
    if (held) {
      holds.delete(key)
      res.write(part.subarray(0, held.bytes))
      void held.released.then(() => res.end(part.subarray(held.bytes)))
      return
    }
    const drop = drops.get(key)
    if (drop && drop.times > 0) {
      drop.times--
      // End the socket cleanly mid-body: the client gets exactly these bytes, then a premature close.
      res.write(part.subarray(0, drop.bytes), () => res.socket?.end())
      return
    }
    res.end(part)
  })

  const listen = (s: Server): Promise<number> =>
    new Promise((resolve) => s.listen(0, '127.0.0.1', () => resolve((s.address() as AddressInfo).port)))
  const hubPort = await listen(hub)
  cdnBase = `http://127.0.0.1:${await listen(cdn)}`
  return {
    endpoint: `http://127.0.0.1:${hubPort}`,
    log,
    commitOf: (repo) => commits.get(repo)!,
    dropAfter(repo, file, bytes, times = 1) {
      drops.set(`${repo}/${file}`, { bytes, times })
    },
    lieAbout(repo, file) {
      lies.add(`${repo}/${file}`)
    },
    hold(repo, file, bytes) {
      let release: () => void = () => {}
      holds.set(`${repo}/${file}`, { bytes, released: new Promise<void>((r) => (release = r)) })
      return () => release()
    },
    async close() {
      for (const s of [hub, cdn]) {
        s.closeAllConnections()
        await new Promise<void>((r) => s.close(() => r()))
      }
    },
  }
}
