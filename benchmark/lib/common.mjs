// Shared by the orchestrator (bench.mjs) and the workers: paths, statistics,
// machine facts, child processes, prompt text.
import { execFileSync, spawn } from 'node:child_process'
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { cpus, freemem, release, tmpdir, totalmem, type } from 'node:os'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'

export const BENCH_DIR = join(dirname(fileURLToPath(import.meta.url)), '..')
export const ROOT = join(BENCH_DIR, '..')
export const RESULTS_DIR = join(BENCH_DIR, 'results')
export const MODELS_DIR = join(BENCH_DIR, 'models')
// llama.cpp's tools built from the llama-cpp-python sdist (see RESULTS.md): llama-server, llama-quantize, llama-mtmd-cli
export const LLAMA_BIN = process.env.CANDELA_BENCH_LLAMA_BIN || '/work/build-bench/bin'

/** Peak resident set size of a process in MiB (VmHWM), or null. */
export function peakRssMiB(pid = 'self') {
  try {
    const m = /VmHWM:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))
    return m ? +(Number(m[1]) / 1024).toFixed(1) : null
  } catch {
    return null
  }
}

/** The q-quantile (0..1) of xs, linear interpolation (numpy's default). */
export function quantile(xs, q) {
  if (xs.length === 0) return null
  const s = [...xs].sort((a, b) => a - b)
  const pos = (s.length - 1) * q
  const lo = Math.floor(pos)
  const hi = Math.ceil(pos)
  return s[lo] + (s[hi] - s[lo]) * (pos - lo)
}

export const median = (xs) => quantile(xs, 0.5)

/** min / median / max of the finite numbers in xs. */
export function mmm(xs) {
  const v = xs.filter((x) => typeof x === 'number' && Number.isFinite(x))
  if (v.length === 0) return null
  return { min: Math.min(...v), median: median(v), max: Math.max(...v), n: v.length }
}

export const round = (x, d = 3) => (x === null || x === undefined || !Number.isFinite(x) ? x : +x.toFixed(d))

/** Facts about this machine and the software under test. */
export function machineInfo(extra = {}) {
  const sh = (cmd, args) => {
    try {
      return execFileSync(cmd, args, { cwd: ROOT, encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).trim()
    } catch {
      return null
    }
  }
  let os = `${type()} ${release()}`
  try {
    const m = /PRETTY_NAME="([^"]+)"/.exec(readFileSync('/etc/os-release', 'utf8'))
    if (m) os = `${m[1]} (${type()} ${release()})`
  } catch {}
  let cpuModel = cpus()[0]?.model ?? null
  try {
    const ci = readFileSync('/proc/cpuinfo', 'utf8')
    const flags = /^flags\s*:\s*(.*)$/m.exec(ci)?.[1].split(' ') ?? []
    const simd = ['avx512f', 'avx2', 'fma', 'f16c', 'avx_vnni', 'amx_tile'].filter((f) => flags.includes(f))
    cpuModel = `${cpuModel} [${simd.join(' ')}]`
  } catch {}
  const dirty = sh('git', ['status', '--porcelain', '--untracked-files=no', '--', 'src', 'crates', 'dist', 'native'])
  const pkg = JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8'))
  let nlc = null
  try {
    nlc = JSON.parse(readFileSync(join(BENCH_DIR, 'node_modules', 'node-llama-cpp', 'package.json'), 'utf8')).version
  } catch {}
  return {
    cpuModel,
    cores: cpus().length,
    memGiB: +(totalmem() / 2 ** 30).toFixed(1),
    freeMemGiB: +(freemem() / 2 ** 30).toFixed(1),
    os,
    loadAvgAtStart: sh('cat', ['/proc/loadavg']),
    node: process.version,
    candela: pkg.version,
    nodeLlamaCpp: nlc,
    commit: sh('git', ['rev-parse', 'HEAD']),
    commitSubject: sh('git', ['log', '-1', '--format=%s']),
    treeDirty: dirty ? dirty.split('\n').length > 0 : false,
    date: new Date().toISOString(),
    ...extra,
  }
}

/**
 * Run a worker (node script or python script) on a spec; the worker writes its
 * result JSON to the file named by its 2nd argument. Resolves with the parsed
 * result (plus wallS of the whole process); rejects with the stderr tail.
 */
export function runWorker({ cmd, args, spec, env = {}, label, timeoutS = 1800, verbose = false }) {
  const dir = mkdtempSync(join(tmpdir(), 'candela-bench-'))
  const specFile = join(dir, 'spec.json')
  const outFile = join(dir, 'out.json')
  writeFileSync(specFile, JSON.stringify(spec))
  const t0 = performance.now()
  return new Promise((resolvePromise, reject) => {
    const child = spawn(cmd, [...args, specFile, outFile], {
      cwd: ROOT,
      env: { ...process.env, ...env },
      stdio: ['ignore', 'pipe', 'pipe'],
    })
    let tail = ''
    const keep = (d) => {
      tail = (tail + d.toString()).slice(-6000)
      if (verbose) process.stderr.write(d)
    }
    child.stdout.on('data', keep)
    child.stderr.on('data', keep)
    const timer = setTimeout(() => {
      tail += `\n[bench] ${label}: killed after ${timeoutS}s`
      child.kill('SIGKILL')
    }, timeoutS * 1000)
    child.on('error', reject)
    child.on('close', (code, signal) => {
      clearTimeout(timer)
      const wallS = (performance.now() - t0) / 1000
      let result = null
      if (existsSync(outFile)) {
        try {
          result = JSON.parse(readFileSync(outFile, 'utf8'))
        } catch {}
      }
      rmSync(dir, { recursive: true, force: true })
      if (code !== 0 || !result) {
        reject(new Error(`${label}: exited with ${code ?? signal}\n${tail}`))
        return
      }
      resolvePromise({ ...result, processWallS: round(wallS, 2) })
    })
  })
}

/** Read a worker's spec (argv[2]) and return [spec, write(result)]. */
export function workerIo() {
  const [specFile, outFile] = process.argv.slice(2)
  const spec = JSON.parse(readFileSync(specFile, 'utf8'))
  return [spec, (result) => writeFileSync(outFile, JSON.stringify(result))]
}

/**
 * English text the prompts are cut from (each workload tokenizes it once per
 * model and takes windows of token ids at different offsets).
 */
export const CORPUS = `
The lighthouse keeper wrote in his log every evening, whether or not anything had happened. On most days the entries were short: the wind from the north-west, a fishing boat returning late, the lamp cleaned and the clockwork wound. But on the night of the great storm he filled four pages, and the ink ran where the spray had come in under the door.
A refrigerator does not make cold; it moves heat. A pump called the compressor squeezes a refrigerant gas until it is hot, and the hot gas gives its heat to the kitchen through the coils at the back. The refrigerant, now a liquid, passes through a narrow valve into the coils inside the cabinet, where it boils at a low pressure and takes heat from the food.
In the spring the river rose over its banks and the village moved its market to the hill behind the church. Farmers brought their carts up the muddy track, and children sold eggs from baskets lined with straw. Nobody complained; the flood came every year, and every year the hill became, for a few weeks, the busiest place in the valley.
To bake bread you need flour, water, salt and time. The yeast eats the sugars in the flour and breathes out carbon dioxide, which the gluten traps in a web of tiny bubbles. Knead the dough until it is smooth and springs back when pressed, let it rise until it has doubled, shape it, let it rise again, and bake it in a hot oven until the crust is brown and the loaf sounds hollow when tapped.
The committee met on Tuesday to discuss the budget for the new library. The architect presented three designs: a glass pavilion facing the square, a brick building that matched the old town hall, and a modest extension of the school. After two hours of debate the members agreed to ask the public, and a survey was printed in the weekly paper.
Mountains are made slowly. Plates of the earth's crust press against each other for millions of years, folding rock like cloth and lifting the seabed into ridges. Ice and rain then wear them down, carving valleys and carrying the sand back to the sea, where it settles, hardens and waits to be lifted again.
She learned to sail on a small wooden dinghy with a patched red sail. Her grandfather taught her to read the wind on the water, the dark ripples that arrive a few seconds before the gust, and to ease the sheet before the boat heeled too far. By the end of the summer she could cross the bay alone and come back against the tide.
A good map leaves things out. It shows the roads a traveller needs and hides the thousand details that would bury them; it chooses a scale, a projection and a purpose. The art of the mapmaker is deciding what does not matter, and every map is therefore an argument about the world as much as a picture of it.
`.trim()

/** Format a number for a table cell. */
export function fmt(x, d = 1) {
  if (x === null || x === undefined) return '-'
  if (typeof x !== 'number') return String(x)
  if (!Number.isFinite(x)) return String(x)
  const a = Math.abs(x)
  if (a >= 1000) return x.toFixed(0)
  if (a >= 100) return x.toFixed(Math.min(d, 1))
  if (a >= 10) return x.toFixed(Math.max(d, 1))
  return x.toFixed(Math.max(d, 2))
}

/** A markdown-style table string. */
export function table(headers, rows) {
  const w = headers.map((h, i) => Math.max(h.length, ...rows.map((r) => String(r[i]).length)))
  const line = (cells) => `| ${cells.map((c, i) => String(c).padEnd(w[i])).join(' | ')} |`
  return [line(headers), `| ${w.map((n) => '-'.repeat(n)).join(' | ')} |`, ...rows.map(line)].join('\n')
}
