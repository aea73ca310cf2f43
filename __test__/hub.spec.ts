// Models from the Hugging Face hub, against a mock of its HTTP API on 127.0.0.1.
import { spawn } from 'node:child_process'
import { createHash } from 'node:crypto'
import { existsSync, lstatSync, mkdirSync, readFileSync, readlinkSync, rmSync, statSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'

import test from 'ava'

import { HubError, UnsupportedRepoError, findModel, hubSettings, parseHubReference, pullModel } from '../src/hub/index.js'
import type { DownloadProgress, HubOptions } from '../src/hub/index.js'
import { eventually, fixture, tempDir } from './helpers.js'
import { repoFromDir, startMockHub } from './mock-hub.js'
import { python, runPython, venvPython } from './python-venv.js'
import type { MockHub } from './mock-hub.js'

const LLAMA = 'candela-test/llama-tiny'
const GGUF = 'candela-test/tiny-gguf'
const GATED = 'candela-test/gated-llama'
const PT_ONLY = 'candela-test/pytorch-only'
const SHARDED = 'candela-test/sharded'
const shardIndex = {
  metadata: { total_size: 8 },
  weight_map: { 'a.weight': 'model-00001-of-00002.safetensors', 'b.weight': 'model-00002-of-00002.safetensors', 'c.weight': 'model-00002-of-00002.safetensors' },
}
const gguf = readFileSync(fixture('llama-tiny.gguf'))
const mmproj = Buffer.from('GGUF mmproj stand-in: only its bytes matter here')

let hub: MockHub
test.before(async () => {
  hub = await startMockHub({
    [LLAMA]: repoFromDir(fixture('llama-tiny')),
    [GGUF]: {
      files: {
        'tiny-Q4_K_M.gguf': gguf,
        'tiny-Q8_0.gguf': Buffer.concat([gguf, Buffer.from([0])]),
        'mmproj-tiny-Q8_0.gguf': Buffer.from('a worse mmproj'),
        'mmproj-tiny-f16.gguf': mmproj,
        'README.md': Buffer.from('# gguf\n'),
      },
    },
    [GATED]: { ...repoFromDir(fixture('llama-tiny')), gatedToken: 'hf_right' },
    [PT_ONLY]: { files: { 'config.json': Buffer.from('{}'), 'pytorch_model.bin': Buffer.from('x') } },
    [SHARDED]: {
      files: {
        'config.json': Buffer.from('{}'),
        'tokenizer.json': Buffer.from('{"model": {}}'),
        'model.safetensors.index.json': Buffer.from(JSON.stringify(shardIndex)),
        'model-00001-of-00002.safetensors': Buffer.from('shard one'),
        'model-00002-of-00002.safetensors': Buffer.from('shard two'),
        'consolidated.safetensors': Buffer.from('another layout of the same weights'),
        'pytorch_model.bin': Buffer.from('and another'),
      },
    },
  })
})
test.after.always(async () => {
  await hub?.close()
})

const sha256 = (p: string): string => createHash('sha256').update(readFileSync(p)).digest('hex')

function setup(extra: Partial<HubOptions['settings']> = {}): { cacheDir: string; opts: (o?: HubOptions) => HubOptions } {
  const cacheDir = tempDir('candela-hub-')
  const settings = { endpoint: hub.endpoint, cacheDir, token: undefined, offline: false, ...extra }
  return { cacheDir, opts: (o = {}) => ({ ...o, settings: { ...settings, ...o.settings } }) }
}

/** Requests made while `fn` runs. */
async function requests<T>(fn: () => Promise<T>): Promise<{ value: T; log: MockHub['log'] }> {
  const before = hub.log.length
  const value = await fn()
  return { value, log: hub.log.slice(before) }
}

test.serial('references: org/name[:revision] and hf:org/name[:quant]', (t) => {
  t.deepEqual(parseHubReference('Qwen/Qwen2-VL-2B-Instruct'), { repo: 'Qwen/Qwen2-VL-2B-Instruct', revision: 'main', gguf: false, quant: undefined })
  t.deepEqual(parseHubReference('org/name:v1.0'), { repo: 'org/name', revision: 'v1.0', gguf: false, quant: undefined })
  t.deepEqual(parseHubReference('hf:bartowski/x-GGUF:Q4_K_M'), { repo: 'bartowski/x-GGUF', revision: 'main', gguf: true, quant: 'Q4_K_M' })
  for (const bad of ['./models/x', '/abs/path', 'a/b/c', 'model.gguf', 'org/..', 'org/na--me', '-x/y', 'org/name:']) {
    t.is(parseHubReference(bad), undefined, bad)
  }
})

test.serial('pull fetches only the files a load needs, in the layout huggingface_hub writes', async (t) => {
  const { cacheDir, opts } = setup({ token: 'hf_secret' })
  const progress: DownloadProgress[] = []
  const { value: m, log } = await requests(() => pullModel(LLAMA, opts({ onProgress: (p) => progress.push(p) })))
  const commit = hub.commitOf(LLAMA)
  const root = join(cacheDir, 'models--candela-test--llama-tiny')
  t.is(m.commit, commit)
  t.is(m.format, 'safetensors')
  t.is(m.path, join(root, 'snapshots', commit))
  t.deepEqual([...m.files].sort(), ['config.json', 'generation_config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json'])
  t.is(readFileSync(join(root, 'refs', 'main'), 'utf8'), commit)
  // Snapshot entries are relative links to blobs named by their etag; the bytes are the fixture's.
  const link = join(m.path, 'model.safetensors')
  t.true(lstatSync(link).isSymbolicLink())
  t.is(readlinkSync(link), join('..', '..', 'blobs', sha256(fixture('llama-tiny/model.safetensors'))))
  t.is(sha256(link), sha256(fixture('llama-tiny/model.safetensors')))
  t.true(readlinkSync(join(m.path, 'config.json')).startsWith(join('..', '..', 'blobs')))
  t.false(existsSync(join(m.path, 'reference.json')))
  t.false(existsSync(join(m.path, 'README.md')))
  const tree = JSON.parse(readFileSync(join(root, 'trees', `${commit}.json`), 'utf8')) as { files: Record<string, unknown> }
  t.true('reference.json' in tree.files, 'the cached listing is the whole repo (paged)')
  // Requests: the revision, the listing (paged), one resolve per file; the token stays on the hub.
  const downloads = log.filter((l) => l.path.includes('/resolve/'))
  t.deepEqual(downloads.map((l) => l.path.split('/').pop()).sort(), [...m.files].sort())
  t.true(log.filter((l) => l.path.includes('/tree/')).length >= 2)
  t.true(log.filter((l) => l.server === 'hub').every((l) => l.auth === 'Bearer hf_secret'))
  const cdn = log.filter((l) => l.server === 'cdn')
  t.is(cdn.length, 1)
  t.is(cdn[0]!.auth, undefined)
  const last = progress.filter((p) => p.file === 'model.safetensors').pop()!
  t.deepEqual(last, { repo: LLAMA, file: 'model.safetensors', downloaded: 3185032, total: 3185032 })
  t.is(m.downloaded, m.bytes)
})

test.serial('a complete cached model is found with no request; pull asks only for the commit', async (t) => {
  const { opts } = setup()
  await pullModel(LLAMA, opts())
  const again = await requests(() => findModel(LLAMA, opts()))
  t.is(again.log.length, 0)
  t.is(again.value.downloaded, 0)
  const byCommit = await requests(() => findModel(`${LLAMA}:${hub.commitOf(LLAMA)}`, opts()))
  t.is(byCommit.log.length, 0)
  const pulled = await requests(() => pullModel(LLAMA, opts()))
  t.deepEqual(
    pulled.log.map((l) => l.path),
    [`/api/models/${LLAMA}/revision/main`],
  )
})

test.serial('HF_HUB_OFFLINE: the cache answers, a missing model is a clear error, nothing is sent', async (t) => {
  const { cacheDir, opts } = setup()
  await pullModel(LLAMA, opts())
  const offline = await requests(() => findModel(LLAMA, opts({ settings: { offline: true } })))
  t.is(offline.log.length, 0)
  t.is(offline.value.commit, hub.commitOf(LLAMA))
  const pulled = await requests(() => pullModel(LLAMA, opts({ settings: { offline: true } })))
  t.is(pulled.log.length, 0)
  // A cache written without tree listings (older huggingface_hub): offline, the snapshot's files stand in.
  rmSync(join(cacheDir, 'models--candela-test--llama-tiny', 'trees'), { recursive: true })
  const untreed = await requests(() => findModel(LLAMA, opts({ settings: { offline: true } })))
  t.is(untreed.log.length, 0)
  t.deepEqual([...untreed.value.files].sort(), [...offline.value.files].sort())
  // Online, it asks for the commit and the listing, and downloads nothing.
  const relisted = await requests(() => findModel(LLAMA, opts()))
  t.deepEqual(
    relisted.log.map((l) => l.path.replace(/\/tree\/.*/, '/tree')),
    [`/api/models/${LLAMA}/revision/main`, `/api/models/${LLAMA}/tree`, `/api/models/${LLAMA}/tree`],
  )
  const before = hub.log.length
  const err = await t.throwsAsync(findModel(GGUF, opts({ settings: { offline: true } })), { instanceOf: HubError })
  t.is(err.code, 'offline')
  t.regex(err.message, /candela-test\/tiny-gguf.*HF_HUB_OFFLINE/)
  t.is(hub.log.length, before)
})

test.serial('a gated repo is a clear error naming it; the right token opens it', async (t) => {
  const { opts } = setup()
  const err = await t.throwsAsync(pullModel(GATED, opts()), { instanceOf: HubError })
  t.is(err.code, 'gated')
  t.is(err.status, 401)
  t.regex(err.message, /candela-test\/gated-llama is a gated repo.*HF_TOKEN/)
  const wrong = await t.throwsAsync(pullModel(GATED, opts({ settings: { token: 'hf_wrong' } })), { instanceOf: HubError })
  t.regex(wrong.message, /token in HF_TOKEN has no access/)
  const m = await pullModel(GATED, opts({ settings: { token: 'hf_right' } }))
  t.is(sha256(join(m.path, 'model.safetensors')), sha256(fixture('llama-tiny/model.safetensors')))
})

test.serial('a missing repo, revision or checkpoint is a clear error naming it', async (t) => {
  const { opts } = setup()
  const repo = await t.throwsAsync(pullModel('candela-test/nope', opts()), { instanceOf: HubError })
  t.is(repo.code, 'not_found')
  t.regex(repo.message, /repository candela-test\/nope not found on http:\/\/127\.0\.0\.1/)
  const rev = await t.throwsAsync(pullModel(`${LLAMA}:v9`, opts()), { instanceOf: HubError })
  t.is(rev.code, 'not_found')
  t.regex(rev.message, /candela-test\/llama-tiny has no revision v9/)
  const unsupported = await t.throwsAsync(pullModel(PT_ONLY, opts()), { instanceOf: UnsupportedRepoError })
  t.regex(unsupported.message, /candela-test\/pytorch-only has no checkpoint candela can load/)
  const noGguf = await t.throwsAsync(pullModel(`hf:${LLAMA}`, opts()), { instanceOf: UnsupportedRepoError })
  t.regex(noGguf.message, /has no GGUF model file/)
})

test.serial('GGUF repos: the file is picked by quant tag, with the best mmproj', async (t) => {
  const { opts } = setup()
  const byDefault = await pullModel(`hf:${GGUF}`, opts())
  t.is(byDefault.format, 'gguf')
  t.true(byDefault.path.endsWith('tiny-Q4_K_M.gguf'))
  t.true(byDefault.mmproj!.endsWith('mmproj-tiny-f16.gguf'))
  t.deepEqual(readFileSync(byDefault.mmproj!), mmproj)
  t.deepEqual([...byDefault.files].sort(), ['mmproj-tiny-f16.gguf', 'tiny-Q4_K_M.gguf'])
  const q8 = await pullModel(`hf:${GGUF}:q8_0`, opts())
  t.true(q8.path.endsWith('tiny-Q8_0.gguf'))
  t.is(statSync(q8.path).size, gguf.length + 1)
  const missing = await t.throwsAsync(pullModel(`hf:${GGUF}:Q2_K`, opts()), { instanceOf: UnsupportedRepoError })
  t.regex(missing.message, /no GGUF file with quantization Q2_K \(files: .*tiny-Q4_K_M\.gguf/)
})

test.serial('a dropped connection keeps the partial file and the next pull resumes it with a Range request', async (t) => {
  const { cacheDir, opts } = setup()
  const etag = sha256(fixture('llama-tiny/model.safetensors'))
  const partial = join(cacheDir, 'models--candela-test--llama-tiny', 'blobs', `${etag}.incomplete`)
  hub.dropAfter(LLAMA, 'model.safetensors', 1_000_000)
  await t.throwsAsync(pullModel(LLAMA, opts({ retries: 0 })))
  // What reached the disk before the drop (the fetch may lose its last queued chunks, never more).
  const kept = statSync(partial).size
  t.true(kept > 0 && kept <= 1_000_000, String(kept))
  const resumed = await requests(() => pullModel(LLAMA, opts()))
  const cdn = resumed.log.filter((l) => l.server === 'cdn')
  t.deepEqual(
    cdn.map((l) => l.range),
    [`bytes=${kept}-`],
  )
  t.false(existsSync(partial))
  t.is(sha256(join(resumed.value.path, 'model.safetensors')), etag)
})

test.serial('within one pull, a dropped connection is retried from where it stopped', async (t) => {
  const { opts } = setup()
  hub.dropAfter(LLAMA, 'model.safetensors', 65536, 2)
  const { value: m, log } = await requests(() => pullModel(LLAMA, opts()))
  const ranges = log.filter((l) => l.server === 'cdn').map((l) => l.range)
  t.is(ranges.length, 3)
  t.is(ranges[0], undefined)
  const starts = ranges.slice(1).map((r) => Number(/^bytes=(\d+)-$/.exec(r ?? '')?.[1]))
  t.true(starts[0]! > 0 && starts[0]! <= 65536 && starts[1]! > starts[0]! && starts[1]! <= starts[0]! + 65536, ranges.join())
  t.is(sha256(join(m.path, 'model.safetensors')), sha256(fixture('llama-tiny/model.safetensors')))
})

test.serial('a download that does not match its sha256 is thrown away, not cached', async (t) => {
  const { cacheDir, opts } = setup()
  const body = readFileSync(fixture('llama-tiny/model.safetensors'))
  const etag = sha256(fixture('llama-tiny/model.safetensors'))
  const blobs = join(cacheDir, 'models--candela-test--llama-tiny', 'blobs')
  // A partial file whose bytes are wrong: the resumed download completes it, the hash catches it.
  await pullModel(LLAMA, opts()).then(() => rmSync(join(cacheDir, 'models--candela-test--llama-tiny'), { recursive: true }))
  mkdirSync(blobs, { recursive: true })
  const bad = Buffer.from(body.subarray(0, 4096))
  bad[100] = bad[100]! ^ 0xff
  writeFileSync(join(blobs, `${etag}.incomplete`), bad)
  const err = await t.throwsAsync(pullModel(LLAMA, opts()), { instanceOf: HubError })
  t.is(err.code, 'checksum')
  t.regex(err.message, /candela-test\/llama-tiny\/model\.safetensors: the download does not match its checksum/)
  t.false(existsSync(join(blobs, etag)))
  t.false(existsSync(join(blobs, `${etag}.incomplete`)))
  const m = await pullModel(LLAMA, opts())
  t.is(sha256(join(m.path, 'model.safetensors')), etag)
})

// Cross-check with the real huggingface_hub from PyPI.
const pyTest = python ? test.serial : test.serial.skip

const hfPython = (script: string, env: Record<string, string>): Promise<string> =>
  runPython(venvPython(['huggingface_hub'], ['huggingface_hub']), script, { HF_HUB_DISABLE_TELEMETRY: '1', HF_HUB_DISABLE_XET: '1', ...env })

pyTest('a model huggingface_hub downloaded is used by candela with no request', async (t) => {
  t.timeout(360_000)
  const { cacheDir, opts } = setup()
  const before = hub.log.length
  const out = await hfPython(`from huggingface_hub import snapshot_download; print(snapshot_download(${JSON.stringify(LLAMA)}))`, {
    HF_ENDPOINT: hub.endpoint,
    HF_HUB_CACHE: cacheDir,
  })
  t.true(hub.log.length > before, 'python fetched from the mock')
  const { value: m, log } = await requests(() => findModel(LLAMA, opts()))
  t.is(log.length, 0)
  t.is(m.path, out.trim())
  t.is(sha256(join(m.path, 'model.safetensors')), sha256(fixture('llama-tiny/model.safetensors')))
})

pyTest('huggingface_hub reads the cache candela wrote', async (t) => {
  t.timeout(360_000)
  const { cacheDir, opts } = setup()
  const m = await pullModel(LLAMA, opts())
  const script = `
import json
from huggingface_hub import scan_cache_dir, hf_hub_download
info = scan_cache_dir()
repos = [{"repo_id": r.repo_id, "size": r.size_on_disk, "revisions": [{"commit": v.commit_hash, "refs": sorted(v.refs), "files": sorted(f.file_name for f in v.files)} for v in r.revisions]} for r in info.repos]
paths = {f: hf_hub_download(${JSON.stringify(LLAMA)}, f) for f in ${JSON.stringify(m.files)}}
print(json.dumps({"repos": repos, "warnings": [str(w) for w in info.warnings], "paths": paths}))
`
  const before = hub.log.length
  const got = JSON.parse(await hfPython(script, { HF_HUB_CACHE: cacheDir, HF_HUB_OFFLINE: '1', HF_ENDPOINT: hub.endpoint })) as {
    repos: Array<{ repo_id: string; size: number; revisions: Array<{ commit: string; refs: string[]; files: string[] }> }>
    warnings: string[]
    paths: Record<string, string>
  }
  t.is(hub.log.length, before)
  t.deepEqual(got.warnings, [])
  t.deepEqual(got.repos, [{ repo_id: LLAMA, size: m.bytes, revisions: [{ commit: m.commit, refs: ['main'], files: [...m.files].sort() }] }])
  for (const f of m.files) t.is(got.paths[f], join(m.path, f))
})

test.serial('repo paths that would leave the cache are refused', async (t) => {
  const evil = await startMockHub({ 'candela-test/evil': { files: { 'x/../../../escape-Q4_K_M.gguf': Buffer.from('GGUF') } } })
  try {
    const cacheDir = tempDir('candela-hub-')
    const err = await t.throwsAsync(pullModel('hf:candela-test/evil', { settings: { endpoint: evil.endpoint, cacheDir, token: undefined, offline: false } }))
    t.regex(err.message, /refusing the repo path "x\/\.\.\/\.\.\/\.\.\/escape-Q4_K_M\.gguf"/)
    t.false(existsSync(join(cacheDir, 'escape-Q4_K_M.gguf')))
    t.false(existsSync(join(cacheDir, '..', 'escape-Q4_K_M.gguf')))
  } finally {
    await evil.close()
  }
})

test.serial('a file the hub resolves differently from the listing is refused', async (t) => {
  const { opts } = setup()
  hub.lieAbout(GGUF, 'tiny-Q8_0.gguf')
  const err = await t.throwsAsync(pullModel(`hf:${GGUF}:Q8_0`, opts()), { instanceOf: HubError })
  t.is(err.code, 'checksum')
  t.regex(err.message, /tiny-Q8_0\.gguf: the hub's ETag 0{64} differs from the listing's [0-9a-f]{64}/)
})

test('settings come from the environment as huggingface_hub reads it', (t) => {
  const home = tempDir('candela-hf-home-')
  writeFileSync(join(home, 'token'), 'hf_from_file\n')
  t.deepEqual(hubSettings({ HF_HOME: home }), { endpoint: 'https://huggingface.co', token: 'hf_from_file', offline: false, cacheDir: join(home, 'hub') })
  t.deepEqual(hubSettings({ HF_HOME: home, HF_HUB_CACHE: '/c', HF_TOKEN: 'hf_env', HF_ENDPOINT: 'http://127.0.0.1:1/', HF_HUB_OFFLINE: 'yes' }), {
    endpoint: 'http://127.0.0.1:1',
    token: 'hf_env',
    offline: true,
    cacheDir: '/c',
  })
  t.is(hubSettings({ XDG_CACHE_HOME: '/x', HF_TOKEN_PATH: '/nonexistent' }).cacheDir, '/x/huggingface/hub')
  t.false(hubSettings({ HF_HUB_OFFLINE: '0', HF_TOKEN_PATH: '/nonexistent' }).offline)
  t.is(hubSettings({ HF_TOKEN_PATH: '/nonexistent' }).token, undefined)
})

test.serial('one downloader per blob across processes: a live lock is waited for, a stale one taken over', async (t) => {
  const { cacheDir, opts } = setup()
  const etag = sha256(fixture('llama-tiny/model.safetensors'))
  const blobs = join(cacheDir, 'models--candela-test--llama-tiny', 'blobs')
  const lock = join(blobs, `${etag}.incomplete.lock`)
  mkdirSync(blobs, { recursive: true })
  // Another live process holds the blob's lock.
  const other = spawn(process.execPath, ['-e', 'setInterval(() => {}, 1000)'], { stdio: 'ignore' })
  writeFileSync(lock, String(other.pid))
  const before = hub.log.length
  const pulled = pullModel(LLAMA, opts())
  t.true(await eventually(() => hub.log.slice(before).some((l) => l.path.endsWith('/tokenizer_config.json')), 30_000))
  await new Promise((r) => setTimeout(r, 300))
  t.false(hub.log.slice(before).some((l) => l.path.endsWith('/model.safetensors')), 'no download while another process holds the lock')
  other.kill()
  const m = await pulled
  t.is(sha256(join(m.path, 'model.safetensors')), etag)
  t.false(existsSync(lock))
  // A lock whose owner is gone does not block.
  const again = setup()
  const blobs2 = join(again.cacheDir, 'models--candela-test--llama-tiny', 'blobs')
  mkdirSync(blobs2, { recursive: true })
  writeFileSync(join(blobs2, `${etag}.incomplete.lock`), '2147483646')
  t.is(sha256(join((await pullModel(LLAMA, again.opts())).path, 'model.safetensors')), etag)
})

test('the terminal progress bar: one line per file, redrawn in place, ended when the file is', async (t) => {
  const { progressBar } = await import('../src/cli/pull.js')
  let out = ''
  const bar = progressBar({ write: (s: string) => ((out += s), true) } as unknown as NodeJS.WriteStream)
  bar.update({ repo: LLAMA, file: 'config.json', downloaded: 0, total: 2_000_000 })
  bar.update({ repo: LLAMA, file: 'config.json', downloaded: 2_000_000, total: 2_000_000 })
  bar.update({ repo: LLAMA, file: 'model.safetensors', downloaded: 0, total: 4_000_000 })
  bar.end()
  const lines = out.split('\n')
  t.is(lines.length, 3)
  // eslint-disable-next-line no-control-regex -- the bar redraws with ANSI escapes
  t.regex(lines[0]!, /\r\x1b\[2Kconfig\.json ░{24} {3}0% 0\.0\/2\.0 MB\r\x1b\[2Kconfig\.json █{24} 100% 2\.0\/2\.0 MB$/)
  // eslint-disable-next-line no-control-regex -- as above
  t.regex(lines[1]!, /^\r\x1b\[2Kmodel\.safetensors ░{24} {3}0% 0\.0\/4\.0 MB$/)
  t.is(lines[2], '')
})

test.serial('a sharded checkpoint: the index, then the shards it names, nothing else', async (t) => {
  const { opts } = setup()
  const { value: m, log } = await requests(() => pullModel(SHARDED, opts()))
  t.deepEqual([...m.files].sort(), ['config.json', 'model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors', 'model.safetensors.index.json', 'tokenizer.json'])
  t.deepEqual(
    log.filter((l) => l.path.includes('/resolve/')).map((l) => l.path.split('/').pop()).sort(),
    [...m.files].sort(),
  )
  t.is(readFileSync(join(m.path, 'model-00002-of-00002.safetensors'), 'utf8'), 'shard two')
  const again = await requests(() => findModel(SHARDED, opts()))
  t.is(again.log.length, 0)
  t.deepEqual([...again.value.files].sort(), [...m.files].sort())
})
