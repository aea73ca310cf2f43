/**
 * Models by Hugging Face repo name. {@link pullModel} asks the hub for the
 * newest commit and fetches what is missing; {@link findModel} uses the
 * cache when it already holds a complete set of files for the revision (no
 * request at all), else pulls. Both share the cache with huggingface_hub.
 */

import { readFileSync, statSync } from 'node:fs'

import { HubClient } from './api.js'
import { COMMIT_RE, RepoCache, sizeOf } from './cache.js'
import { fetchBlob } from './download.js'
import type { DownloadProgress } from './download.js'
import { HubError } from './errors.js'
import { formatHubReference, parseHubReference } from './reference.js'
import type { HubReference } from './reference.js'
import { SAFETENSORS_INDEX, UnsupportedRepoError, selectFiles, shardsOf } from './select.js'
import type { Selection } from './select.js'
import { hubSettings } from './settings.js'
import type { HubSettings } from './settings.js'

export { HubError } from './errors.js'
export type { HubErrorCode } from './errors.js'
export type { DownloadProgress } from './download.js'
export { progressLines } from './progress.js'
export { UnsupportedRepoError } from './select.js'
export { parseHubReference } from './reference.js'
export type { HubReference } from './reference.js'
export { hubSettings } from './settings.js'
export type { HubSettings } from './settings.js'

/** A model in the hub cache, ready to load. */
export interface HubModel {
  /** `org/name`. */
  repo: string
  /** The revision asked for (branch, tag or commit). */
  revision: string
  /** The commit the files come from. */
  commit: string
  /** What to load: the snapshot folder (safetensors) or the `.gguf` file in it. */
  path: string
  format: 'safetensors' | 'gguf'
  /** The GGUF's multimodal projector file, when the repo has one. */
  mmproj: string | undefined
  /** Repo paths of the files the model is made of. */
  files: string[]
  /** Bytes of those files. */
  bytes: number
  /** Bytes fetched by this call (0 when everything was cached). */
  downloaded: number
}

export interface HubOptions {
  /** Override the environment's settings (endpoint, token, offline, cache dir). */
  settings?: Partial<HubSettings>
  /** Called as each file downloads. */
  onProgress?: (p: DownloadProgress) => void
  /** Extra attempts per file after a dropped connection, each resuming (default 3). */
  retries?: number
  signal?: AbortSignal
}

/** Whether `model` names a hub repo (`org/name[:revision]` or `hf:org/name[:quant]`). */
export function isHubReference(model: string): boolean {
  return parseHubReference(model) !== undefined
}

function parse(spec: string): HubReference {
  const ref = parseHubReference(spec)
  if (!ref) throw new HubError('not_found', `${JSON.stringify(spec)} is not a Hugging Face repo id (org/name[:revision] or hf:org/name[:quant])`)
  return ref
}

/** Fetch the newest files of `spec` at its revision into the cache (what `candela pull` does). */
export function pullModel(spec: string, options: HubOptions = {}): Promise<HubModel> {
  return obtain(parse(spec), options, true)
}

/** The model `spec` names: from the cache when complete there (no request), else pulled. */
export function findModel(spec: string, options: HubOptions = {}): Promise<HubModel> {
  return obtain(parse(spec), options, false)
}

/**
 * Whether `spec` names a loadable model, without fetching it: the cache
 * answers when it holds the repo's listing (or, offline, its files); else
 * two requests (the commit, the file listing). Throws the {@link HubError}
 * or {@link UnsupportedRepoError} a pull would.
 */
export async function checkModel(spec: string, options: Pick<HubOptions, 'settings' | 'signal'> = {}): Promise<void> {
  await listing(parse(spec), options, false)
}

/** The commit `ref` resolves to, its file listing and the files a load needs; the cached model when it is complete. */
async function listing(ref: HubReference, options: HubOptions, refresh: boolean) {
  const settings = { ...hubSettings(), ...options.settings }
  const cache = new RepoCache(settings.cacheDir, ref.repo)
  if (!refresh || settings.offline) {
    const commit = cache.commitOf(ref.revision)
    const cached = commit === undefined ? undefined : fromCache(ref, cache, commit, settings.offline)
    if (cached) return { cached }
    if (settings.offline) {
      throw new HubError(
        'offline',
        `${formatHubReference(ref)} is not (completely) in the Hugging Face cache at ${settings.cacheDir}, and HF_HUB_OFFLINE is set`,
      )
    }
  }
  const client = new HubClient(settings, options.signal)
  const commit = COMMIT_RE.test(ref.revision) ? ref.revision : await client.commit(ref.repo, ref.revision)
  cache.writeRef(ref.revision, commit)
  let tree = cache.readTree(commit)
  if (!tree) {
    tree = await client.tree(ref.repo, commit)
    cache.writeTree(commit, tree)
  }
  return { client, cache, commit, tree, sel: selectFiles(ref.repo, Object.keys(tree), ref) }
}

async function obtain(ref: HubReference, options: HubOptions, refresh: boolean): Promise<HubModel> {
  const found = await listing(ref, options, refresh)
  if (found.cached) return found.cached
  const { client, cache, commit, tree, sel } = found
  let downloaded = 0
  const get = async (file: string): Promise<void> => {
    if (cache.has(commit, file)) return
    const entry = tree[file]
    if (!entry) throw new UnsupportedRepoError(`${ref.repo}: ${file} is not in the repo at ${commit}`)
    await fetchBlob(client, cache, { repo: ref.repo, commit, file, entry }, options)
    downloaded += sizeOf(entry)
  }
  for (const f of sel.files) await get(f)
  const files = [...sel.files]
  if (sel.kind === 'safetensors' && sel.index) {
    for (const shard of shardsOf(ref.repo, readFileSync(cache.snapshotFile(commit, SAFETENSORS_INDEX), 'utf8'))) {
      await get(shard)
      files.push(shard)
    }
  }
  return describe(ref, cache, commit, sel, files, downloaded)
}

/**
 * The model from the cache alone, or undefined when a file is missing. The
 * cached tree listing says which files the repo has; offline and without
 * one, the snapshot folder's own files stand in for it.
 */
function fromCache(ref: HubReference, cache: RepoCache, commit: string, offline: boolean): HubModel | undefined {
  const tree = cache.readTree(commit)
  const names = tree ? Object.keys(tree) : offline ? cache.snapshotFiles(commit) : undefined
  if (!names || names.length === 0) return undefined
  let sel: Selection
  try {
    sel = selectFiles(ref.repo, names, ref)
  } catch (err) {
    // With the repo's own listing the answer is final; a partial snapshot may just lack files.
    if (tree) throw err
    return undefined
  }
  const files = [...sel.files]
  if (!files.every((f) => cache.has(commit, f))) return undefined
  if (sel.kind === 'safetensors' && sel.index) {
    const shards = shardsOf(ref.repo, readFileSync(cache.snapshotFile(commit, SAFETENSORS_INDEX), 'utf8'))
    if (!shards.every((f) => cache.has(commit, f))) return undefined
    files.push(...shards)
  }
  return describe(ref, cache, commit, sel, files, 0)
}

function describe(ref: HubReference, cache: RepoCache, commit: string, sel: Selection, files: string[], downloaded: number): HubModel {
  const bytes = files.reduce((acc, f) => acc + statSync(cache.snapshotFile(commit, f)).size, 0)
  return {
    repo: ref.repo,
    revision: ref.revision,
    commit,
    path: sel.kind === 'gguf' ? cache.snapshotFile(commit, sel.model) : cache.snapshotDir(commit),
    format: sel.kind,
    mmproj: sel.kind === 'gguf' && sel.mmproj ? cache.snapshotFile(commit, sel.mmproj) : undefined,
    files,
    bytes,
    downloaded,
  }
}
