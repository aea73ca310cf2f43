#!/usr/bin/env node
// The promise of the npm packages: installed where there is no Rust, they
// work. Takes the tarballs of scripts/pack-platforms.mjs (target/npm/, or the
// folder given) and, in a fresh temporary project with `cargo` and `rustc`
// off the PATH:
//   - checks each tarball holds what it needs and nothing else;
//   - `npm install`s the main package and this platform's addon package;
//   - `npx candela serve` on a fixture answers the `openai` client as
//     transformers does (fixtures/llama-tiny/reference.json);
//   - `import { Engine }` works from an ES module and, through a dynamic
//     import(), from CommonJS;
//   - `device: 'cuda'` names the CUDA package to install, and with that
//     package's tarball installed (when packed) loads it;
//   - without the addon package, loading names the platform and the package.
//
//   node __test__/packed-install.mjs [DIR]
//
// Network: `npm install` fetches the package's JavaScript dependencies
// (express, prom-client, zod) from the npm registry, preferring npm's cache
// (which the checkout's own `npm install` filled), as a user's install does.
// The not yet published addon packages of other platforms are optional and
// answer 404; npm leaves them out. The `openai` client is the checkout's.
// Not run by ava (no .spec.ts): .ci/run runs it after packing.
import assert from 'node:assert/strict'
import { execFileSync, spawn, spawnSync } from 'node:child_process'
import { existsSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { delimiter, dirname, join, resolve } from 'node:path'

import OpenAI from 'openai'

import { platformName } from '../dist/native.js'

const ROOT = resolve(import.meta.dirname, '..')
const DIR = resolve(process.argv[2] ?? join(ROOT, 'target', 'npm'))
const FIXTURE = join(ROOT, 'fixtures', 'llama-tiny')
const REF = JSON.parse(readFileSync(join(FIXTURE, 'reference.json'), 'utf8'))
const MAIN = JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8'))
const WIN = process.platform === 'win32'

const packs = JSON.parse(readFileSync(join(DIR, 'packs.json'), 'utf8'))
const byName = (name) => packs.find((p) => p.name === name)
const platform = platformName()
const main = byName(MAIN.name)
const addon = byName(`${MAIN.name}-${platform}`)
const cudaName = `${MAIN.name}-${platform}-cuda`
const cuda = byName(cudaName)
assert.ok(main && addon, `${DIR}/packs.json lacks ${MAIN.name} or ${MAIN.name}-${platform}: run scripts/pack-platforms.mjs`)

let passed = 0
let failed = 0
async function check(name, fn) {
  try {
    await fn()
    passed++
    console.log(`ok - ${name}`)
  } catch (err) {
    failed++
    console.log(`not ok - ${name}\n${String(err?.stack ?? err).replace(/^/gm, '  ')}`)
  }
}

/** The files in a tarball, as npm unpacks them (without npm's `package/` folder). */
const listing = (pack) =>
  execFileSync('tar', ['-tzf', join(DIR, pack.filename)], { encoding: 'utf8' })
    .split('\n')
    .filter((f) => f !== '' && !f.endsWith('/'))
    .map((f) => f.replace(/^package\//, ''))
    .sort()

await check(`${main.filename} holds the JavaScript, its types, the napi loader and the playground, nothing else`, () => {
  const files = listing(main)
  const allowed = /^(package\.json|README\.md|native\/index\.(cjs|d\.cts)|dist\/.+\.(js|d\.ts)|ui\/(index\.html|playground\.(css|js)))$/
  assert.deepEqual(files.filter((f) => !allowed.test(f)), [])
  for (const f of ['dist/index.js', 'dist/index.d.ts', 'dist/cli.js', 'dist/server/index.js', 'native/index.cjs', 'ui/index.html']) {
    assert.ok(files.includes(f), `${f} is missing`)
  }
})
for (const p of [addon, cuda].filter(Boolean)) {
  await check(`${p.filename} holds its addon and nothing else`, () => {
    const target = p.name.slice(MAIN.name.length + 1)
    assert.deepEqual(listing(p), ['README.md', `candela.${target}.node`, 'package.json'])
  })
}

// No Rust: every PATH entry holding cargo or rustc goes. Where Node's own
// folder goes with them (a distribution's rustc in /usr/bin), links to node,
// npm and npx stand in for it.
const exe = (name) => (WIN ? `${name}.exe` : name)
const keep = process.env.PATH.split(delimiter).filter((d) => d !== '' && !['cargo', 'rustc'].some((t) => existsSync(join(d, exe(t)))))
const nodeDir = dirname(process.execPath)
const stand = mkdtempSync(join(tmpdir(), 'candela-node-bin-'))
if (!keep.includes(nodeDir)) {
  for (const t of ['node', 'npm', 'npx']) if (existsSync(join(nodeDir, t))) symlinkSync(join(nodeDir, t), join(stand, t))
  keep.unshift(stand)
}
const PATH = keep.join(delimiter)
// A user's shell, not an `npm run` one: no npm_* settings leak in.
const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !/^npm_/i.test(k)))
Object.assign(env, { PATH, npm_config_fund: 'false', npm_config_audit: 'false', npm_config_update_notifier: 'false' })
env.CANDELA_CACHE_DIR = join(tmpdir(), 'candela-packed-install-no-download')

const project = mkdtempSync(join(tmpdir(), 'candela-install-'))
const npm = (...args) =>
  execFileSync('npm', args, { cwd: project, env, encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'], shell: WIN, timeout: 600_000 })
/** Run `code` as a file of the temporary project; its stdout, parsed as JSON. */
function script(file, code) {
  writeFileSync(join(project, file), code)
  const r = spawnSync(process.execPath, [file], { cwd: project, env, encoding: 'utf8', timeout: 120_000 })
  assert.equal(r.status, 0, `${file} failed:\n${r.stderr}`)
  return JSON.parse(r.stdout)
}

try {
  await check('cargo and rustc are off the PATH', () => {
    for (const t of ['cargo', 'rustc']) {
      const r = spawnSync(t, ['--version'], { env, shell: WIN })
      assert.ok(r.error?.code === 'ENOENT' || r.status !== 0, `${t} still runs`)
    }
  })

  await check('npm install of the main and the addon tarball', () => {
    writeFileSync(join(project, 'package.json'), JSON.stringify({ name: 'candela-install-check', private: true }))
    npm('install', '--prefer-offline', '--no-progress', join(DIR, main.filename), join(DIR, addon.filename))
    const installed = join(project, 'node_modules', ...addon.name.split('/'), `candela.${platform}.node`)
    assert.ok(existsSync(installed), `${installed} is missing`)
  })

  await check('npx candela serve answers the openai client as transformers does', async () => {
    // Its own process group: npx runs the bin through a shell and does not pass signals on.
    const server = spawn('npx', ['--no', 'candela', 'serve', FIXTURE, '--port', '0', '--served-model-name', 'tiny'], {
      cwd: project,
      env,
      stdio: ['ignore', 'pipe', 'pipe'],
      shell: WIN,
      detached: !WIN,
    })
    let stdout = ''
    let stderr = ''
    server.stdout.on('data', (d) => (stdout += d))
    server.stderr.on('data', (d) => (stderr += d))
    const exited = new Promise((r) => server.on('close', r))
    try {
      const url = await new Promise((ok, fail) => {
        const timer = setTimeout(() => fail(new Error(`no "serving" line in 60 s:\n${stdout}${stderr}`)), 60_000)
        server.on('close', () => fail(new Error(`candela serve exited:\n${stdout}${stderr}`)))
        server.stdout.on('data', () => {
          const m = /"msg":"serving tiny at (http:\/\/[^"]+)"/.exec(stdout)
          if (!m) return
          clearTimeout(timer)
          ok(m[1])
        })
      })
      const client = new OpenAI({ baseURL: url, apiKey: 'none' })
      const chat = await client.chat.completions.create({ model: 'tiny', messages: REF.chat.messages, max_tokens: 4, temperature: 0 })
      assert.equal(chat.usage.prompt_tokens, REF.chat.input_ids.length, 'the chat template and tokenizer of the fixture')
      assert.equal(typeof chat.choices[0].message.content, 'string')
      const [p] = REF.prompts
      const done = await client.completions.create({ model: 'tiny', prompt: p.text, max_tokens: REF.greedy.max_new_tokens, temperature: 0, ignore_eos: true })
      assert.equal(done.choices[0].text, p.greedy_text)
    } finally {
      if (WIN) spawnSync('taskkill', ['/pid', String(server.pid), '/T', '/F'])
      else killGroup(server.pid)
    }
    await exited
    if (!WIN) assert.match(stdout, /"msg":"shutting down"/, `candela serve did not stop on SIGTERM:\n${stdout}${stderr}`)
  })

  const [p] = REF.prompts
  const generate = `
    const engine = await Engine.load({ model: ${JSON.stringify(FIXTURE)} })
    const [out] = await engine.generate(${JSON.stringify(p.text)}, { maxTokens: ${REF.greedy.max_new_tokens}, temperature: 0, ignoreEos: true })
    await engine.close()
    const { startServer } = await import(${JSON.stringify(MAIN.name + '/server')})
    console.log(JSON.stringify({ text: out.text, device: engine.info.device, startServer: typeof startServer }))`
  const expected = { text: p.greedy_text, device: 'cpu', startServer: 'function' }

  await check('import { Engine } from an ES module', () => {
    assert.deepEqual(script('esm.mjs', `import { Engine } from ${JSON.stringify(MAIN.name)}\n${generate}\n`), expected)
  })

  await check('import() of Engine from CommonJS', () => {
    const code = `(async () => {\nconst { Engine } = await import(${JSON.stringify(MAIN.name)})\n${generate}\n})().catch((err) => {\n  console.error(err)\n  process.exitCode = 1\n})\n`
    assert.deepEqual(script('cjs.cjs', code), expected)
  })

  // Engine.load's error message, or the device it got.
  const loadWith = (device) =>
    script(
      `load-${device}.mjs`,
      `import { Engine } from ${JSON.stringify(MAIN.name)}
try {
  const engine = await Engine.load({ model: ${JSON.stringify(FIXTURE)}, device: ${JSON.stringify(device)} })
  console.log(JSON.stringify({ device: engine.info.device }))
  await engine.close()
} catch (err) {
  console.log(JSON.stringify({ error: err.message }))
}
`,
    )

  await check(`device 'cuda' without a CUDA package says what to install`, () => {
    const { error } = loadWith('cuda')
    if (cudaName in (MAIN.peerDependencies ?? {})) {
      assert.ok(error?.includes(`install the package ${cudaName}@${MAIN.version}`), error)
    } else {
      assert.match(error, /^device 'cuda' is not available: candela (has no CUDA support on|publishes no prebuilt CUDA addon for) /)
    }
  })

  if (cuda) {
    await check(`with ${cuda.filename} installed, device 'cuda' loads that package`, () => {
      npm('install', '--prefer-offline', '--no-progress', join(DIR, cuda.filename))
      const got = loadWith('cuda')
      console.log(`  # ${got.error ?? `device ${got.device}`}`)
      // With a GPU it runs; without one the message says why, no longer that the package is missing.
      if (got.device === undefined) {
        assert.doesNotMatch(got.error, /has no CUDA support/)
        if (/cannot be loaded/.test(got.error)) assert.ok(got.error.includes(`the CUDA addon ${cudaName} cannot be loaded`), got.error)
      } else {
        assert.equal(got.device, 'cuda')
      }
    })
  }

  await check(`without ${addon.name}, loading names the platform and the package`, () => {
    rmSync(join(project, 'node_modules', ...addon.name.split('/')), { recursive: true })
    const { error } = loadWith('cpu')
    console.log(`  # ${error}`)
    const want = `candela: cannot load the native addon for ${platform}: install the package ${addon.name}@${MAIN.version}`
    assert.ok(error?.startsWith(want), error)
  })
} finally {
  for (const d of [project, stand]) rmSync(d, { recursive: true, force: true })
}

console.log(`packed-install: ${passed} passed, ${failed} failed`)
process.exitCode = failed === 0 ? 0 : 1

function killGroup(pid) {
  try {
    process.kill(-pid, 'SIGTERM')
  } catch (err) {
    if (err.code !== 'ESRCH') throw err // ESRCH: the group is gone already
  }
}
