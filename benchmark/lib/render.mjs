// Markdown tables of one workload's results (printed by bench.mjs, embedded
// in RESULTS.md by report.mjs). Serving metrics (`c16.ttftP50Ms`, ...) are
// pivoted: one row per (case, concurrency).
import { fmt, table } from './common.mjs'

export function cell(s, d = 1) {
  if (!s) return '-'
  if (s.n === 1 || s.min === s.max) return fmt(s.median, d)
  return `${fmt(s.median, d)} (${fmt(s.min, d)}–${fmt(s.max, d)})`
}

const LEVEL = /^c(\d+)\.(.+)$/

/** Split metrics into per-level ones (grouped by level) and the rest. */
function split(metrics) {
  const levels = new Map()
  const flat = []
  for (const m of metrics) {
    const x = LEVEL.exec(m.key)
    if (!x) {
      flat.push(m)
      continue
    }
    if (!levels.has(x[1])) levels.set(x[1], [])
    levels.get(x[1]).push({ ...m, sub: x[2], subLabel: m.label.replace(/^c=\d+ /, '') })
  }
  return { levels, flat }
}

/**
 * One row per (item, concurrency level): the item's name and its flat
 * metrics only on its first row, the per-level metrics on every row.
 */
function pivotRows(items, levels, flat, name, value) {
  const rows = []
  for (const it of items) {
    let first = true
    for (const [lv, ms] of levels) {
      rows.push([first ? name(it) : '', lv, ...ms.map((m) => value(it, m)), ...flat.map((m) => (first ? value(it, m) : ''))])
      first = false
    }
  }
  return rows
}

export function casesTable(r) {
  const { levels, flat } = split(r.metrics)
  if (levels.size === 0) {
    // load as its own column, unless the workload lists it among its metrics
    const load = !r.metrics.some((m) => m.key === 'loadS')
    return table(
      ['case', ...r.metrics.map((m) => `${m.label} (${m.unit})`), ...(load ? ['load (s)'] : [])],
      r.cases.map((c) => [c.id, ...r.metrics.map((m) => cell(r.summary[c.id][m.key])), ...(load ? [cell(r.summary[c.id].loadS, 2)] : [])]),
    )
  }
  const rows = pivotRows(r.cases, levels, flat, (c) => c.id, (c, m) => cell(r.summary[c.id][m.key]))
  const subs = [...levels.values()][0]
  return table(['case', 'concurrency', ...subs.map((m) => `${m.subLabel} (${m.unit})`), ...flat.map((m) => `${m.label} (${m.unit})`)], rows)
}

export function ratiosTable(r) {
  if (!r.ratios.length) return ''
  const { levels, flat } = split(r.metrics)
  const arrow = (m) => (m.better === 'higher' ? '↑' : '↓')
  if (levels.size === 0) {
    return table(
      ['candela', 'peer', ...r.metrics.map((m) => `${m.label} ${arrow(m)}`)],
      r.ratios.map((x) => [x.candela, x.peer, ...r.metrics.map((m) => cell(x.metrics[m.key], 2))]),
    )
  }
  const rows = pivotRows(r.ratios, levels, flat, (x) => `${x.candela} ÷ ${x.peer}`, (x, m) => cell(x.metrics[m.key], 2))
  const subs = [...levels.values()][0]
  return table(['candela ÷ peer', 'concurrency', ...subs.map((m) => `${m.subLabel} ${arrow(m)}`), ...flat.map((m) => `${m.label} ${arrow(m)}`)], rows)
}

export function sanityTable(s) {
  const out = []
  for (const [, v] of Object.entries(s.models)) {
    out.push(
      table(
        ['case', 'weights', `free run = reference (of ${s.maxTokens})`, `teacher-forced top-1 = reference (of ${s.maxTokens})`, 'free run = candela on the same file'],
        v.rows.map((r) => [
          r.id,
          r.format,
          r.freeRunMatchingPrefix,
          r.forcedTop1Agreement,
          r.pairFreeRunMatchingPrefix ? `${r.pairFreeRunMatchingPrefix.tokens} (vs ${r.pairFreeRunMatchingPrefix.with})` : '',
        ]),
      ),
    )
  }
  return out
}
