/**
 * A one-line progress indicator for a terminal: a spinner, what is going on
 * and the seconds spent. Other lines printed meanwhile go above it.
 */

const FRAMES = ['⠋', '⠙', '⠹', '⠸', '⠼', '⠴', '⠦', '⠧', '⠇', '⠏']

export class Progress {
  #timer: NodeJS.Timeout | undefined
  #label = ''
  #t0 = 0
  #frame = 0

  constructor(private readonly out: NodeJS.WriteStream) {}

  start(label: string): void {
    this.#label = label
    this.#t0 = performance.now()
    this.#timer ??= setInterval(() => this.#draw(), 100)
    this.#draw()
  }

  #draw(): void {
    const s = ((performance.now() - this.#t0) / 1000).toFixed(1)
    this.out.write(`\r\x1b[2K${FRAMES[this.#frame++ % FRAMES.length]} ${this.#label} ${s}s`)
  }

  /** Print a line above the spinner. */
  log(line: string): void {
    this.out.write(`\r\x1b[2K${line}\n`)
    if (this.#timer) this.#draw()
  }

  stop(): void {
    if (!this.#timer) return
    clearInterval(this.#timer)
    this.#timer = undefined
    this.out.write('\r\x1b[2K')
  }
}
