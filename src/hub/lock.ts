/**
 * One downloader per blob across processes: `<blob>.incomplete.lock` holds
 * the pid of the process appending to `<blob>.incomplete`. Another process
 * waits for it to go (or for its owner to die: a stale lock is taken over).
 * huggingface_hub writes to a per-process temporary file, so it never shares
 * our `.incomplete` and needs no part in this.
 */

import { readFileSync } from 'node:fs'
import { open, rm } from 'node:fs/promises'

const POLL_MS = 250

function ownerAlive(lock: string): boolean {
  let pid: number
  try {
    pid = Number(readFileSync(lock, 'utf8').trim())
  } catch {
    return false
  }
  if (!Number.isInteger(pid) || pid <= 0) return false
  if (pid === process.pid) return true
  try {
    process.kill(pid, 0)
    return true
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM'
  }
}

/** Take the lock (waiting while a live process holds it); resolves to its release. */
export async function acquireLock(lock: string, signal?: AbortSignal): Promise<() => Promise<void>> {
  for (;;) {
    try {
      const fh = await open(lock, 'wx')
      await fh.writeFile(String(process.pid))
      await fh.close()
      return () => rm(lock, { force: true })
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err
    }
    if (!ownerAlive(lock)) {
      await rm(lock, { force: true })
      continue
    }
    signal?.throwIfAborted()
    await new Promise((r) => setTimeout(r, POLL_MS))
  }
}
