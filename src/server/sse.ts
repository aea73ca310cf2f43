/**
 * Server-sent events as OpenAI sends them: `data: <json>\n\n` per chunk and
 * `data: [DONE]\n\n` at the end. The response opens lazily (on the first
 * chunk or keep-alive), so an error found before anything was sent can still
 * be answered with its real status and a JSON body.
 */

import type { Response } from 'express'

export class SseStream {
  #opened = false
  #ended = false
  #lastWrite = 0
  #timer: NodeJS.Timeout | undefined

  constructor(
    private readonly res: Response,
    private readonly keepAliveMs: number,
  ) {
    res.once('close', () => this.#stopTimer())
  }

  /** Whether the status and headers went out (errors must then be sent as events). */
  get opened(): boolean {
    return this.#opened
  }

  /**
   * Send a comment line whenever nothing was written for `keepAliveMs`, so
   * proxies and clients do not time out during a long prefill or queue wait.
   */
  startKeepAlive(): void {
    if (this.keepAliveMs <= 0 || this.#timer) return
    this.#lastWrite = performance.now()
    this.#timer = setInterval(() => {
      if (performance.now() - this.#lastWrite >= this.keepAliveMs * 0.9) this.#write(': keep-alive\n\n')
    }, this.keepAliveMs)
  }

  #open(): void {
    if (this.#opened) return
    this.#opened = true
    const res = this.res
    res.status(200)
    res.set({
      'Content-Type': 'text/event-stream; charset=utf-8',
      'Cache-Control': 'no-cache',
      Connection: 'keep-alive',
      // nginx buffers responses unless told not to.
      'X-Accel-Buffering': 'no',
    })
    res.flushHeaders()
    res.socket?.setNoDelay(true)
  }

  #write(text: string): boolean {
    if (this.#ended || this.res.destroyed) return true
    this.#open()
    this.#lastWrite = performance.now()
    return this.res.write(text)
  }

  /** Send one event; waits while the client is slower than the engine. */
  async send(data: unknown): Promise<void> {
    if (this.#write(`data: ${JSON.stringify(data)}\n\n`)) return
    await new Promise<void>((resolve) => {
      const done = (): void => {
        this.res.off('drain', done)
        this.res.off('close', done)
        resolve()
      }
      this.res.on('drain', done)
      this.res.on('close', done)
    })
  }

  /** `data: [DONE]` and the end of the response. */
  end(): void {
    this.#write('data: [DONE]\n\n')
    this.#stopTimer()
    this.#ended = true
    if (!this.res.destroyed) this.res.end()
  }

  #stopTimer(): void {
    if (this.#timer) clearInterval(this.#timer)
    this.#timer = undefined
  }
}
