// Device selection: which addon a load uses, and what 'auto' and 'cuda' say
// when the CUDA build or a GPU is missing. Passes with and without a GPU:
// on a machine with both, 'cuda' and 'auto' run on CUDA.
import { readdirSync, readFileSync } from 'node:fs'
import { join } from 'node:path'

import test from 'ava'

import { Engine } from '../dist/index.js'
import { addonAdvice, addonPackage, bindingFor, cudaPlatform, native, platformName, publishedPlatforms } from '../dist/native.js'
import { fixture, ROOT } from './helpers.js'

const pkg = JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as { name: string; version: string }

test("napi's platform names", (t) => {
  t.is(platformName('linux', 'x64', false), 'linux-x64-gnu')
  t.is(platformName('linux', 'arm64', true), 'linux-arm64-musl')
  t.is(platformName('darwin', 'arm64'), 'darwin-arm64')
  t.is(platformName('win32', 'x64'), 'win32-x64-msvc')
  t.is(platformName('freebsd', 'x64'), 'freebsd-x64')
})

test('every published addon package has its folder in npm/, with the same version', (t) => {
  const cpu = publishedPlatforms('cpu')
  const cuda = publishedPlatforms('cuda')
  t.deepEqual(cpu.sort(), ['darwin-arm64', 'darwin-x64', 'linux-arm64-gnu', 'linux-x64-gnu', 'win32-x64-msvc'])
  t.deepEqual(cuda, ['linux-x64-gnu-cuda'])
  t.deepEqual([...cpu, ...cuda].sort(), readdirSync(join(ROOT, 'npm')).sort())
  for (const platform of [...cpu, ...cuda]) {
    const manifest = JSON.parse(readFileSync(join(ROOT, 'npm', platform, 'package.json'), 'utf8')) as { name: string; version: string }
    t.deepEqual([manifest.name, manifest.version], [addonPackage(platform), pkg.version], platform)
  }
})

test('a missing addon: install its package where one is published, else build from source', (t) => {
  t.is(
    addonAdvice('linux-x64-gnu', 'cpu', 'npm run build'),
    `install the package ${pkg.name}-linux-x64-gnu@${pkg.version} (\`npm install ${pkg.name}-linux-x64-gnu@${pkg.version}\`), ` +
      'or build native/candela.linux-x64-gnu.node in a source checkout with `npm run build`',
  )
  t.is(
    addonAdvice('linux-x64-musl', 'cpu', 'npm run build'),
    'candela publishes no prebuilt addon for linux-x64-musl (only for darwin-arm64, darwin-x64, linux-arm64-gnu, linux-x64-gnu, ' +
      'win32-x64-msvc): build native/candela.linux-x64-musl.node in a clone of the repository with `npm run build` (needs Rust)',
  )
  t.regex(addonAdvice('linux-x64-gnu-cuda', 'cuda', 'npm run build:native:cuda'), new RegExp(`^install the package ${pkg.name}-linux-x64-gnu-cuda@`))
  t.regex(addonAdvice('linux-arm64-gnu-cuda', 'cuda', 'npm run build:native:cuda'), /^candela publishes no prebuilt CUDA addon for linux-arm64-gnu-cuda \(only for linux-x64-gnu-cuda\): /)
})

test('CUDA addon names per platform', (t) => {
  t.is(cudaPlatform('linux', 'x64'), 'linux-x64-gnu-cuda')
  t.is(cudaPlatform('linux', 'arm64'), 'linux-arm64-gnu-cuda')
  t.is(cudaPlatform('win32', 'x64'), 'win32-x64-msvc-cuda')
  t.is(cudaPlatform('darwin', 'arm64'), undefined)
})

test('the CPU addon runs on the CPU and says why it cannot run CUDA', (t) => {
  const b = native()
  t.is(b.deviceUnavailable('cpu'), null)
  t.regex(b.deviceUnavailable('cuda') ?? '', /this build has no CUDA support/)
  t.regex(b.deviceUnavailable() ?? '', /no CUDA support/)
  t.is(bindingFor('cpu').device, 'cpu')
})

test("'auto' falls back to the CPU with one log line, 'cuda' fails saying why", (t) => {
  const lines: string[] = []
  const auto = bindingFor('auto', (l) => lines.push(l))
  if (auto.device === 'cpu') {
    t.is(lines.length, 1)
    t.regex(lines[0]!, /^candela: CUDA is not available \(.+\); running on the CPU$/)
    t.is(auto.binding, native())
    t.throws(() => bindingFor('cuda'), { message: /^device 'cuda' is not available: / })
  } else {
    t.is(auto.device, 'cuda')
    t.deepEqual(lines, [])
    t.is(bindingFor('cuda').device, 'cuda')
  }
})

test("a model loads with device 'auto' on whatever is there", async (t) => {
  const engine = await Engine.load({ model: fixture('llama-tiny'), device: 'auto', gpuMemoryUtilization: 0.5 })
  try {
    t.true(['cpu', 'cuda'].includes(engine.info.device))
    const [out] = await engine.generate('Hello', { maxTokens: 3, temperature: 0 })
    t.is(out!.tokenIds.length, 3)
  } finally {
    await engine.close()
  }
})

test('gpuMemoryUtilization must be in (0, 1]', async (t) => {
  for (const bad of [0, -0.5, 1.5, Number.NaN, '0.9']) {
    await t.throwsAsync(Engine.load({ model: fixture('llama-tiny'), gpuMemoryUtilization: bad as never }), {
      message: /gpuMemoryUtilization must be a number in \(0, 1\]/,
    })
  }
})
