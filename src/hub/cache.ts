/**
 * The Hugging Face cache layout, as huggingface_hub writes it (file_download.py,
 * _tree_cache.py), so either side finds what the other fetched:
 *
 *   <cache>/models--org--name/
 *     refs/<revision>              the commit a branch or tag pointed to
 *     blobs/<etag>                 file contents, named by LFS sha256 or git blob sha1
 *     snapshots/<commit>/<file>    relative symlinks into blobs/
 *     trees/<commit>.json          the repo's file listing at that commit
 */

import { copyFileSync, existsSync, mkdirSync, readFileSync, readdirSync, renameSync, rmSync, statSync, symlinkSync, writeFileSync } from 'node:fs'
import { dirname, join, relative } from 'node:path'

/** One file of a repo's tree listing (the /tree endpoint's fields, as huggingface_hub caches them). */
export interface TreeEntry {
  size: number
  blob_id: string
  lfs_sha256?: string
  lfs_size?: number
  xet_hash?: string
}

export type Tree = Record<string, TreeEntry>

export const COMMIT_RE = /^[0-9a-f]{40}$/
/** Blob names: git blob sha1 or LFS sha256. */
export const ETAG_RE = /^(?:[0-9a-f]{40}|[0-9a-f]{64})$/

/** The blob name of a file: its LFS sha256, else its git blob id (the hub's ETag). */
export const etagOf = (e: TreeEntry): string => e.lfs_sha256 ?? e.blob_id
/** The file's real size (an LFS file's `size` in some listings is the pointer's). */
export const sizeOf = (e: TreeEntry): number => e.lfs_size ?? e.size

let tmpSeq = 0
/** Write a small file atomically (readers never see half of it). */
function writeAtomic(path: string, text: string): void {
  mkdirSync(dirname(path), { recursive: true })
  const tmp = `${path}.${process.pid}.${tmpSeq++}.tmp`
  writeFileSync(tmp, text)
  renameSync(tmp, path)
}

export class RepoCache {
  /** `<cache>/models--org--name`. */
  readonly root: string

  constructor(
    readonly cacheDir: string,
    readonly repo: string,
  ) {
    this.root = join(cacheDir, ['models', ...repo.split('/')].join('--'))
  }

  /** The commit `revision` names: itself when it is a commit hash, else what refs/ recorded. */
  commitOf(revision: string): string | undefined {
    if (COMMIT_RE.test(revision)) return revision
    try {
      const c = readFileSync(join(this.root, 'refs', revision), 'utf8').trim()
      return COMMIT_RE.test(c) ? c : undefined
    } catch {
      return undefined
    }
  }

  writeRef(revision: string, commit: string): void {
    if (revision === commit) return
    const path = join(this.root, 'refs', revision)
    if (existsSync(path) && readFileSync(path, 'utf8') === commit) return
    writeAtomic(path, commit)
  }

  readTree(commit: string): Tree | undefined {
    try {
      const data = JSON.parse(readFileSync(join(this.root, 'trees', `${commit}.json`), 'utf8')) as { files?: Tree }
      return data.files && typeof data.files === 'object' ? data.files : undefined
    } catch {
      return undefined
    }
  }

  writeTree(commit: string, tree: Tree): void {
    const files: Tree = {}
    for (const k of Object.keys(tree).sort()) files[k] = tree[k]!
    writeAtomic(join(this.root, 'trees', `${commit}.json`), JSON.stringify({ format_version: 1, files }, null, 1))
  }

  snapshotDir(commit: string): string {
    return join(this.root, 'snapshots', commit)
  }

  /** Path of `file` in the snapshot (it may not exist). Names come from the hub: none may leave the folder. */
  snapshotFile(commit: string, file: string): string {
    const parts = file.split('/')
    if (parts.some((p) => p === '' || p === '.' || p === '..' || p.includes('\\')) || file.includes('\0')) {
      throw new Error(`${this.repo}: refusing the repo path ${JSON.stringify(file)}`)
    }
    return join(this.snapshotDir(commit), ...parts)
  }

  /** Whether the snapshot holds `file` with its blob behind it (a dangling link does not count). */
  has(commit: string, file: string): boolean {
    return existsSync(this.snapshotFile(commit, file))
  }

  /** Files under the snapshot folder, `/`-separated (for offline use without a tree listing). */
  snapshotFiles(commit: string): string[] {
    const out: string[] = []
    const walk = (dir: string, prefix: string): void => {
      let names: string[]
      try {
        names = readdirSync(dir)
      } catch {
        return
      }
      for (const n of names) {
        const p = join(dir, n)
        // statSync follows the links; a dangling one is no file.
        const st = statSync(p, { throwIfNoEntry: false })
        if (st?.isDirectory()) walk(p, `${prefix}${n}/`)
        else if (st?.isFile()) out.push(`${prefix}${n}`)
      }
    }
    walk(this.snapshotDir(commit), '')
    return out
  }

  blobPath(etag: string): string {
    if (!ETAG_RE.test(etag)) throw new Error(`${this.repo}: unexpected blob id ${JSON.stringify(etag)} (want a git sha1 or sha256)`)
    return join(this.root, 'blobs', etag)
  }

  /** Where a download of the blob collects until it is complete and checked. */
  incompletePath(etag: string): string {
    return `${this.blobPath(etag)}.incomplete`
  }

  /** Point snapshots/<commit>/<file> at blobs/<etag> (relative link; a copy where links are not allowed). */
  link(commit: string, file: string, etag: string): void {
    const dst = this.snapshotFile(commit, file)
    const src = this.blobPath(etag)
    mkdirSync(dirname(dst), { recursive: true })
    rmSync(dst, { force: true })
    try {
      symlinkSync(relative(dirname(dst), src), dst)
    } catch {
      copyFileSync(src, dst)
    }
  }
}
