// A Python venv for the tests that check candela against real Python clients
// from PyPI (huggingface_hub, xinference-client): made once per machine under
// the temp dir, packages pip-installed when missing. Tests skip without python3.
import { spawn, spawnSync } from 'node:child_process'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

/** The system Python, or undefined. */
export const python = ['python3', 'python'].find((p) => spawnSync(p, ['--version']).status === 0)

const VENV = join(tmpdir(), 'candela-hf-venv')
const PY = join(VENV, 'bin', 'python')

/** The venv's python with `modules` importable (pip-installing `packages` when one is not). */
export function venvPython(modules: string[], packages: string[]): string {
  if (spawnSync(PY, ['-c', modules.map((m) => `import ${m}`).join('; ')]).status === 0) return PY
  if (spawnSync(PY, ['--version']).status !== 0) {
    const mk = spawnSync(python!, ['-m', 'venv', VENV], { encoding: 'utf8' })
    if (mk.status !== 0) throw new Error(`python -m venv failed: ${mk.stderr}`)
  }
  const pip = spawnSync(PY, ['-m', 'pip', 'install', '-q', ...packages], { encoding: 'utf8', timeout: 300_000 })
  if (pip.status !== 0) throw new Error(`pip install ${packages.join(' ')} failed: ${pip.stderr}`)
  return PY
}

/** Run a script (sent on stdin: it may be large) asynchronously, as servers it talks to may live in this very process; its stdout. */
export function runPython(py: string, script: string, env: Record<string, string> = {}): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = spawn(py, ['-'], { env: { PATH: process.env.PATH ?? '', HOME: tmpdir(), ...env }, stdio: ['pipe', 'pipe', 'pipe'] })
    let stdout = ''
    let stderr = ''
    const timer = setTimeout(() => child.kill(), 240_000)
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()))
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()))
    child.on('error', reject)
    child.on('close', (code) => {
      clearTimeout(timer)
      if (code === 0) resolve(stdout)
      else reject(new Error(`python exited with ${code}: ${stderr}`))
    })
    child.stdin.end(script)
  })
}
