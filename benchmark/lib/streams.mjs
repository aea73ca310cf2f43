// Per-request timing records and the serving metrics computed from them.
// A record: { startMs, chunks: [{ tMs, n }] } with times from performance.now().
import { quantile, round } from './common.mjs'

export class Rec {
  constructor() {
    this.startMs = performance.now()
    this.chunks = []
  }
  /** n tokens arrived now. */
  add(n) {
    if (n > 0) this.chunks.push({ tMs: performance.now(), n })
  }
  get tokens() {
    return this.chunks.reduce((a, c) => a + c.n, 0)
  }
  get ttftMs() {
    return this.chunks.length ? this.chunks[0].tMs - this.startMs : null
  }
  get endMs() {
    return this.chunks.length ? this.chunks.at(-1).tMs : this.startMs
  }
  /** Gaps between tokens; a chunk of k tokens counts as k gaps of (its gap / k). */
  itlMs() {
    const out = []
    for (let i = 1; i < this.chunks.length; i++) {
      const g = (this.chunks[i].tMs - this.chunks[i - 1].tMs) / this.chunks[i].n
      for (let k = 0; k < this.chunks[i].n; k++) out.push(g)
    }
    return out
  }
  /** Decode rate of this stream after its first token. */
  decodeTokS() {
    const n = this.tokens
    if (n < 2) return null
    return (n - this.chunks[0].n) / ((this.endMs - this.chunks[0].tMs) / 1000)
  }
}

/** Serving metrics over a set of requests that ran in [t0, t1]. */
export function servingStats(recs, t0, t1) {
  const ttft = recs.map((r) => r.ttftMs)
  const itl = recs.flatMap((r) => r.itlMs())
  const out = recs.reduce((a, r) => a + r.tokens, 0)
  const wallS = (t1 - t0) / 1000
  return {
    requests: recs.length,
    outputTokens: out,
    wallS: round(wallS, 3),
    outTokS: round(out / wallS, 2),
    ttftP50Ms: round(quantile(ttft, 0.5), 2),
    ttftP99Ms: round(quantile(ttft, 0.99), 2),
    itlP50Ms: round(quantile(itl, 0.5), 3),
    itlP99Ms: round(quantile(itl, 0.99), 3),
  }
}

/**
 * Closed-loop load: `concurrency` clients, each sends its next request as soon
 * as its previous one finished, until `jobs` are done. `send(job)` returns a Rec.
 */
export async function closedLoop(jobs, concurrency, send) {
  const queue = jobs.map((j, i) => [j, i])
  const recs = new Array(jobs.length)
  const t0 = performance.now()
  await Promise.all(
    Array.from({ length: Math.min(concurrency, jobs.length) }, async (_, slot) => {
      for (;;) {
        const next = queue.shift()
        if (!next) return
        recs[next[1]] = await send(next[0], slot)
      }
    }),
  )
  const t1 = performance.now()
  return { recs, t0, t1 }
}

/** The `single` result of one streamed request (the same fields for every engine). */
export function singleStats(rec, promptTokens) {
  return {
    promptTokens,
    outputTokens: rec.tokens,
    ttftMs: round(rec.ttftMs, 2),
    decodeTokS: round(rec.decodeTokS(), 2),
    e2eS: round((rec.endMs - rec.startMs) / 1000, 3),
  }
}

/** The `offline` result of a batch of prompts that took wallS seconds. */
export function offlineStats(prompts, outputTokens, wallS) {
  const inp = prompts.reduce((a, p) => a + p.length, 0)
  return {
    prompts: prompts.length,
    promptTokens: inp,
    outputTokens,
    wallS: round(wallS, 3),
    outTokS: round(outputTokens / wallS, 2),
    totalTokS: round((inp + outputTokens) / wallS, 2),
  }
}
