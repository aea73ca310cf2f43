/**
 * The hub's HTTP calls candela makes, as huggingface_hub makes them:
 * `GET /api/models/{repo}/revision/{rev}` (the commit), `GET
 * /api/models/{repo}/tree/{commit}?recursive=True` (the file listing, paged
 * by `Link: rel="next"`), and `GET /{repo}/resolve/{commit}/{file}`, which
 * answers a small file itself and redirects a large one to a CDN; the
 * redirect carries `X-Linked-Etag` / `X-Linked-Size` and `X-Repo-Commit`.
 * The token never leaves the hub's origin.
 */

import type { Tree } from './cache.js'
import { HubError, fromResponse } from './errors.js'
import type { HubSettings } from './settings.js'

const MAX_REDIRECTS = 10

/** An open download of one file: the body from `start`, and what the hub said the file is. */
export interface OpenedFile {
  response: Response
  /** `X-Linked-Etag` or `ETag`, unquoted. */
  etag: string | undefined
  /** `X-Linked-Size` (an LFS file's size, on the hub's redirect). */
  linkedSize: number | undefined
  /** `X-Repo-Commit`: the commit the hub resolved the file at. */
  repoCommit: string | undefined
  /** Bytes the body starts at (0 when the server ignored the Range). */
  start: number
}

interface TreeItem {
  type?: string
  path?: string
  oid?: string
  size?: number
  lfs?: { oid?: string; size?: number }
  xetHash?: string
}

const unquote = (etag: string | null): string | undefined => (etag ? etag.replace(/^W\//, '').replace(/^"|"$/g, '') : undefined)

const encodePath = (file: string): string => file.split('/').map(encodeURIComponent).join('/')

export class HubClient {
  readonly #origin: string

  constructor(
    private readonly settings: HubSettings,
    private readonly signal?: AbortSignal,
  ) {
    this.#origin = new URL(settings.endpoint).origin
  }

  #headers(url: string, extra: Record<string, string> = {}): Record<string, string> {
    const h: Record<string, string> = { 'user-agent': 'candela', ...extra }
    if (this.settings.token && new URL(url).origin === this.#origin) h.authorization = `Bearer ${this.settings.token}`
    return h
  }

  async #get(url: string, repo: string, what: string, extra?: Record<string, string>, redirect: 'follow' | 'manual' = 'follow'): Promise<Response> {
    let res: Response
    try {
      res = await fetch(url, { headers: this.#headers(url, extra), redirect, signal: this.signal })
    } catch (err) {
      if (this.signal?.aborted) throw err
      const cause = (err as Error & { cause?: Error }).cause?.message ?? (err as Error).message
      throw new HubError('network', `cannot reach the Hugging Face hub at ${this.settings.endpoint} for ${repo}: ${cause}`)
    }
    if (!res.ok && !(redirect === 'manual' && res.status >= 300 && res.status < 400)) {
      await res.body?.cancel()
      throw fromResponse(res, repo, what, this.settings.endpoint, this.settings.token !== undefined)
    }
    return res
  }

  /** The commit `revision` (branch, tag or commit) points to. */
  async commit(repo: string, revision: string): Promise<string> {
    const url = `${this.settings.endpoint}/api/models/${repo}/revision/${encodeURIComponent(revision)}`
    const res = await this.#get(url, repo, revision)
    const info = (await res.json()) as { sha?: unknown }
    if (typeof info.sha !== 'string' || !/^[0-9a-f]{40}$/.test(info.sha)) {
      throw new HubError('network', `${url} answered without a commit sha: is HF_ENDPOINT a Hugging Face hub?`)
    }
    return info.sha
  }

  /** Every file of the repo at `commit`, keyed by path. */
  async tree(repo: string, commit: string): Promise<Tree> {
    const tree: Tree = {}
    let url: string | undefined = `${this.settings.endpoint}/api/models/${repo}/tree/${commit}?recursive=True&expand=False`
    while (url) {
      const res = await this.#get(url, repo, `tree at ${commit}`)
      const items = (await res.json()) as TreeItem[]
      if (!Array.isArray(items)) throw new HubError('network', `${url} did not answer a file list`)
      for (const it of items) {
        if (it.type !== 'file' || typeof it.path !== 'string' || typeof it.oid !== 'string') continue
        tree[it.path] = {
          size: Number(it.size ?? 0),
          blob_id: it.oid,
          ...(it.lfs?.oid ? { lfs_sha256: it.lfs.oid, lfs_size: Number(it.lfs.size ?? it.size ?? 0) } : {}),
          ...(it.xetHash ? { xet_hash: it.xetHash } : {}),
        }
      }
      url = nextLink(res.headers.get('link'), url)
    }
    return tree
  }

  /**
   * Start downloading `file` at byte `start` (a Range request when > 0),
   * following the hub's redirects; the ETag comes from the hub's own answer.
   */
  async open(repo: string, commit: string, file: string, start: number): Promise<OpenedFile> {
    let url = `${this.settings.endpoint}/${repo}/resolve/${commit}/${encodePath(file)}`
    const extra: Record<string, string> = { 'accept-encoding': 'identity' }
    if (start > 0) extra.range = `bytes=${start}-`
    let etag: string | undefined
    let linkedSize: number | undefined
    let repoCommit: string | undefined
    for (let hop = 0; hop <= MAX_REDIRECTS; hop++) {
      const res = await this.#get(url, repo, file, extra, 'manual')
      // The hub's answers describe the file (the last one on its origin wins, as in
      // huggingface_hub, which follows relative redirects); a CDN's headers are its own.
      if (new URL(url).origin === this.#origin) {
        etag = unquote(res.headers.get('x-linked-etag') ?? res.headers.get('etag')) ?? etag
        const size = res.headers.get('x-linked-size')
        if (size !== null) linkedSize = Number(size)
        repoCommit = res.headers.get('x-repo-commit') ?? repoCommit
      }
      const location = res.headers.get('location')
      if (res.status >= 300 && res.status < 400 && location) {
        await res.body?.cancel()
        url = new URL(location, url).toString()
        continue
      }
      if (res.status >= 300) throw new HubError('network', `${url} answered ${res.status} without a Location`)
      return { response: res, etag, linkedSize, repoCommit, start: res.status === 206 ? start : 0 }
    }
    throw new HubError('network', `too many redirects fetching ${file} of ${repo}`)
  }
}

/** The `rel="next"` URL of a Link header, resolved against `base`. */
function nextLink(link: string | null, base: string): string | undefined {
  if (!link) return undefined
  for (const part of link.split(',')) {
    const m = /<([^>]+)>\s*;\s*rel="?next"?/.exec(part)
    if (m) return new URL(m[1]!, base).toString()
  }
  return undefined
}
