/**
 * A counting semaphore whose waits end when their AbortSignal does: at most
 * `size` holders at once, the rest wait in arrival order.
 */
export class Slots {
  #free: number
  readonly #waiting = new Set<() => void>()

  constructor(readonly size: number) {
    this.#free = size
  }

  /** Wait for a slot; resolves with its release function, rejects with `signal.reason` on abort. */
  acquire(signal?: AbortSignal): Promise<() => void> {
    if (signal?.aborted) return Promise.reject(signal.reason)
    if (this.#free > 0) {
      this.#free--
      return Promise.resolve(this.#releaser())
    }
    return new Promise((resolve, reject) => {
      const grant = (): void => {
        signal?.removeEventListener('abort', onAbort)
        resolve(this.#releaser())
      }
      const onAbort = (): void => {
        this.#waiting.delete(grant)
        reject(signal!.reason)
      }
      this.#waiting.add(grant)
      signal?.addEventListener('abort', onAbort, { once: true })
    })
  }

  #releaser(): () => void {
    let done = false
    return () => {
      if (done) return
      done = true
      const next = this.#waiting.values().next()
      if (next.done === true) {
        this.#free++
        return
      }
      this.#waiting.delete(next.value)
      next.value()
    }
  }
}
