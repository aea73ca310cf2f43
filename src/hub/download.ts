/**
 * One blob into the cache: streamed into `blobs/<etag>.incomplete`, resumed
 * with a Range request after a dropped connection (here or in a later run),
 * checked against its etag (sha256 for LFS files, git blob sha1 otherwise)
 * and only then renamed to `blobs/<etag>` and linked from the snapshot.
 */

import { createHash } from 'node:crypto'
import type { Hash } from 'node:crypto'
import { createReadStream, existsSync, statSync } from 'node:fs'
import { mkdir, open, rename, rm, truncate } from 'node:fs/promises'
import { dirname } from 'node:path'
import { Writable } from 'node:stream'
import { pipeline } from 'node:stream/promises'

import type { HubClient } from './api.js'
import { ETAG_RE, etagOf, sizeOf } from './cache.js'
import type { RepoCache, TreeEntry } from './cache.js'
import { HubError } from './errors.js'
import { acquireLock } from './lock.js'

/** Progress of one file's download. */
export interface DownloadProgress {
  repo: string
  file: string
  /** Bytes of the file on disk so far (resumed bytes count). */
  downloaded: number
  total: number
}

export interface BlobRequest {
  repo: string
  commit: string
  file: string
  entry: TreeEntry
}

export interface BlobOptions {
  onProgress?: (p: DownloadProgress) => void
  /** Extra attempts after a dropped connection, each resuming where the last stopped (default 3). */
  retries?: number
  /** Stops the download (what arrived stays for the next attempt). */
  signal?: AbortSignal
}

/** Hashes the file must match: the etag is an LFS sha256 (64 hex) or a git blob sha1 (40 hex) of the contents. */
function verifier(etag: string, size: number): { hash: Hash; expected: string } | undefined {
  if (/^[0-9a-f]{64}$/.test(etag)) return { hash: createHash('sha256'), expected: etag }
  if (/^[0-9a-f]{40}$/.test(etag)) {
    const hash = createHash('sha1')
    hash.update(`blob ${size}\0`)
    return { hash, expected: etag }
  }
  return undefined
}

const fileSize = (p: string): number => (existsSync(p) ? statSync(p).size : 0)

const inflight = new Map<string, Promise<void>>()

/** Make `snapshots/<commit>/<file>` exist, downloading its blob unless the cache has it. */
export function fetchBlob(client: HubClient, cache: RepoCache, req: BlobRequest, opts: BlobOptions = {}): Promise<void> {
  const etag = etagOf(req.entry)
  const blob = cache.blobPath(etag)
  const link = (): void => cache.link(req.commit, req.file, etag)
  if (existsSync(blob) && fileSize(blob) === sizeOf(req.entry)) {
    link()
    return Promise.resolve()
  }
  let p = inflight.get(blob)
  if (!p) {
    p = download(client, cache, req, opts).finally(() => inflight.delete(blob))
    inflight.set(blob, p)
  }
  return p.then(link)
}

async function download(client: HubClient, cache: RepoCache, req: BlobRequest, opts: BlobOptions): Promise<void> {
  const etag = etagOf(req.entry)
  const part = cache.incompletePath(etag)
  await mkdir(dirname(part), { recursive: true })
  const release = await acquireLock(`${part}.lock`, opts.signal)
  try {
    // Another process may have finished it while this one waited.
    if (fileSize(cache.blobPath(etag)) === sizeOf(req.entry) && existsSync(cache.blobPath(etag))) return
    await downloadLocked(client, cache, req, opts)
  } finally {
    await release()
  }
}

async function downloadLocked(client: HubClient, cache: RepoCache, req: BlobRequest, opts: BlobOptions): Promise<void> {
  const etag = etagOf(req.entry)
  const total = sizeOf(req.entry)
  const part = cache.incompletePath(etag)
  const retries = opts.retries ?? 3
  // The hash runs over the bytes as they arrive; a resumed attempt first reads back what is on disk.
  let check = verifier(etag, total)
  for (let attempt = 0; ; attempt++) {
    let have = fileSize(part)
    if (have > total) {
      await truncate(part, 0)
      have = 0
    }
    check = verifier(etag, total)
    if (check && have > 0) await pipeline(createReadStream(part, { end: have - 1 }), hashSink(check.hash))
    try {
      if (have < total || total === 0) {
        await receive(client, req, part, have, total, etag, opts, (start) => {
          // The server sent the whole file again (it ignored the Range): hash it from the start.
          if (start !== have) check = verifier(etag, total)
          return check?.hash
        })
      }
      break
    } catch (err) {
      // A dropped connection keeps what arrived; the next attempt (or the next pull) resumes there.
      if (err instanceof HubError || attempt >= retries || opts.signal?.aborted) throw err
    }
  }
  if (check) {
    const got = check.hash.digest('hex')
    if (got !== check.expected) {
      await rm(part, { force: true })
      throw new HubError('checksum', `${req.repo}/${req.file}: the download does not match its checksum (got ${got}, want ${check.expected}); try again`)
    }
  } else if (fileSize(part) !== total) {
    throw new HubError('checksum', `${req.repo}/${req.file}: got ${fileSize(part)} bytes, want ${total}`)
  }
  await rename(part, cache.blobPath(etag))
}

async function receive(
  client: HubClient,
  req: BlobRequest,
  part: string,
  have: number,
  total: number,
  etag: string,
  opts: BlobOptions,
  /** The hash to feed, given where the body starts. */
  hashFrom: (start: number) => Hash | undefined,
): Promise<void> {
  const opened = await client.open(req.repo, req.commit, req.file, have)
  // The file the hub resolves must be the one the listing named. Mirrors may
  // answer with ETags of their own; a hash-shaped one must be the file's.
  const mismatch =
    opened.repoCommit !== undefined && opened.repoCommit !== req.commit
      ? `the hub resolved it at commit ${opened.repoCommit}, not ${req.commit}`
      : opened.etag !== undefined && ETAG_RE.test(opened.etag) && opened.etag !== etag
        ? `the hub's ETag ${opened.etag} differs from the listing's ${etag}`
        : opened.linkedSize !== undefined && opened.linkedSize !== total
          ? `the hub's size ${opened.linkedSize} differs from the listing's ${total}`
          : undefined
  if (mismatch) {
    await opened.response.body?.cancel()
    throw new HubError('checksum', `${req.repo}/${req.file}: ${mismatch}`)
  }
  const body = opened.response.body
  if (!body) throw new HubError('network', `${req.repo}/${req.file}: empty response`)
  let done = opened.start
  const hash = hashFrom(opened.start)
  opts.onProgress?.({ repo: req.repo, file: req.file, downloaded: done, total })
  // Each chunk is on disk before the next is read: a dropped connection loses nothing that arrived.
  const fh = await open(part, opened.start > 0 ? 'a' : 'w')
  try {
    for await (const chunk of body as AsyncIterable<Uint8Array>) {
      await fh.write(chunk)
      hash?.update(chunk)
      done += chunk.length
      opts.onProgress?.({ repo: req.repo, file: req.file, downloaded: done, total })
    }
  } finally {
    await fh.close()
  }
  if (done !== total) throw new Error(`${req.file}: the connection ended after ${done} of ${total} bytes`)
}

function hashSink(hash: Hash): Writable {
  return new Writable({
    write(chunk: Buffer, _enc, cb) {
      hash.update(chunk)
      cb()
    },
  })
}
