// Device selection: which addon a load uses, and what 'auto' and 'cuda' say
// when the CUDA build or a GPU is missing. Passes with and without a GPU:
// on a machine with both, 'cuda' and 'auto' run on CUDA.
import test from 'ava'

import { Engine } from '../dist/index.js'
import { bindingFor, cudaPlatform, native } from '../dist/native.js'
import { fixture } from './helpers.js'

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
