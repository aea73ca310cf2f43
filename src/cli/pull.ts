/**
 * `candela pull MODEL`: fetch a Hugging Face repo into the shared HF cache
 * (always asking the hub for the revision's newest commit; HF_HUB_OFFLINE
 * uses the cache alone). Prints the path to load on stdout; progress goes to
 * stderr, as a bar on a terminal and as lines otherwise.
 */

import { progressLines, pullModel } from '../hub/index.js'
import type { DownloadProgress } from '../hub/index.js'
import { UsageError } from './usage.js'
import type { Command } from './usage.js'

const mb = (n: number): string => (n / 1e6).toFixed(1)

/** One redrawn line per file: name, bar, percent, MB. */
export function progressBar(out: NodeJS.WriteStream): { update: (p: DownloadProgress) => void; end: () => void } {
  let current = ''
  let lastDraw = 0
  const draw = (p: DownloadProgress): void => {
    const frac = p.total > 0 ? p.downloaded / p.total : 1
    const width = 24
    const fill = Math.round(frac * width)
    const bar = `${'█'.repeat(fill)}${'░'.repeat(width - fill)}`
    out.write(`\r\x1b[2K${p.file} ${bar} ${(frac * 100).toFixed(0).padStart(3)}% ${mb(p.downloaded)}/${mb(p.total)} MB`)
  }
  return {
    update(p) {
      const now = performance.now()
      const done = p.downloaded === p.total
      if (p.file !== current) {
        if (current !== '') out.write('\n')
        current = p.file
      } else if (!done && now - lastDraw < 100) {
        return
      }
      lastDraw = now
      draw(p)
      // A finished file keeps its line; what is written next starts below it.
      if (done) {
        out.write('\n')
        current = ''
      }
    },
    end() {
      if (current !== '') out.write('\n')
      current = ''
    },
  }
}

export const pullCommand: Command = {
  summary: 'download a model from the Hugging Face hub into the shared cache',
  usage: `Usage: candela pull MODEL

MODEL is a Hugging Face repo id: org/name[:revision], or hf:org/name[:quant]
for a GGUF repo (the file with that quantization tag, e.g. Q4_K_M, and the
repo's mmproj file when it has one). Only the files a load needs are fetched,
into the cache huggingface_hub uses (HF_HUB_CACHE, else $HF_HOME/hub, else
~/.cache/huggingface/hub). An interrupted download resumes on the next pull.
Prints the path to load on stdout.

Environment: HF_ENDPOINT (hub URL), HF_TOKEN (gated or private repos),
HF_HUB_OFFLINE=1 (no requests: the cache only).`,
  options: {},
  async run(positionals) {
    if (positionals.length !== 1) throw new UsageError(positionals.length === 0 ? 'pull needs a MODEL (org/name)' : `unexpected argument ${JSON.stringify(positionals[1])}`)
    const spec = positionals[0]!
    const bar = process.stderr.isTTY ? progressBar(process.stderr) : undefined
    const lines = progressLines((l) => process.stderr.write(`candela: ${l}\n`))
    try {
      const m = await pullModel(spec, { onProgress: bar ? bar.update : lines })
      bar?.end()
      const fetched = m.downloaded > 0 ? `fetched ${mb(m.downloaded)} MB` : 'already cached'
      process.stderr.write(`candela: ${m.repo} at ${m.commit.slice(0, 12)} (${m.format}, ${mb(m.bytes)} MB, ${fetched})\n`)
      process.stdout.write(`${m.path}\n`)
      return 0
    } catch (err) {
      bar?.end()
      throw err
    }
  },
}
