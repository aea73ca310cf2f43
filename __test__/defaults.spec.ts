// generation_config.json values fill in the sampling params a caller leaves out.
import { cp, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

import test from 'ava'

import { Engine } from '../dist/index.js'
import { fixture, reference } from './helpers.js'

test('the model generation config supplies defaults', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'candela-gencfg-'))
  const model = join(dir, 'llama-tiny')
  await cp(fixture('llama-tiny'), model, { recursive: true })
  const gc = JSON.parse(await readFile(join(model, 'generation_config.json'), 'utf8')) as Record<string, unknown>
  await writeFile(join(model, 'generation_config.json'), JSON.stringify({ ...gc, temperature: 0, max_new_tokens: 5 }))
  const engine = await Engine.load({ model })
  try {
    const p = reference('llama-tiny').prompts[0]!
    // temperature 0 and max_new_tokens 5 from the config.
    const [out] = await engine.generate({ promptTokenIds: p.input_ids }, { ignoreEos: true })
    t.deepEqual(out!.tokenIds, p.greedy_ids.slice(0, 5))
    // Explicit params win.
    const [more] = await engine.generate({ promptTokenIds: p.input_ids }, { ignoreEos: true, maxTokens: 7 })
    t.deepEqual(more!.tokenIds, p.greedy_ids.slice(0, 7))
    const [sampled] = await engine.generate({ promptTokenIds: p.input_ids }, { ignoreEos: true, temperature: 1, seed: 3 })
    t.notDeepEqual(sampled!.tokenIds, p.greedy_ids.slice(0, 5))
    const res = await engine.chat([{ role: 'user', content: 'Hi' }], { ignoreEos: true })
    t.is(res.tokenIds.length, 5)
  } finally {
    await engine.close()
    await rm(dir, { recursive: true, force: true })
  }
})
