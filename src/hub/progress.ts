/** Download progress as log lines: one when a file starts, one when it is complete. */

import type { DownloadProgress } from './download.js'

const mb = (n: number): string => `${(n / 1e6).toFixed(1)} MB`

export function progressLines(write: (line: string) => void): (p: DownloadProgress) => void {
  const started = new Set<string>()
  return (p) => {
    const key = `${p.repo}/${p.file}`
    if (!started.has(key)) {
      started.add(key)
      write(`fetching ${key} (${mb(p.total)}${p.downloaded > 0 ? `, resuming at ${mb(p.downloaded)}` : ''})`)
    }
    if (p.downloaded === p.total) write(`fetched ${key}`)
  }
}
