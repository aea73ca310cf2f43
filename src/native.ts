/**
 * The native addons, loaded lazily.
 *
 * - CPU: through the loader napi generates (`native/index.cjs`), which finds
 *   `native/candela.<platform>.node` in a development checkout, else the
 *   per-platform package (`candela-<platform>`).
 * - CUDA: a separate build of the same addon (cargo feature `cuda`),
 *   `native/candela.<platform>-cuda.node` (`npm run build:native:cuda`) or
 *   the package `candela-<platform>-cuda`. Same API, so the same types.
 *
 * @internal
 */

import { existsSync } from 'node:fs'
import { createRequire } from 'node:module'
import { fileURLToPath } from 'node:url'
import type * as Binding from '../native/index.cjs'

import { LoadError } from './errors.js'
import type { Device } from './types.js'

export type {
  NativeBatch,
  NativeEngine,
  NativeEvent,
  NativeLoadOptions,
  NativeMediaItem,
  NativeModelInfo,
  NativeRequest,
  NativeSamplingParams,
  NativeStats,
  NativeStructuredOutputs,
  NativeSubmitted,
  NativeTokenLogprob,
} from '../native/index.cjs'

let binding: typeof Binding | undefined
let cudaBinding: typeof Binding | undefined

/** The addon's exports; throws a readable error when it is not built. */
export function native(): typeof Binding {
  if (binding) return binding
  const require = createRequire(import.meta.url)
  try {
    binding = require('../native/index.cjs') as typeof Binding
  } catch (err) {
    const detail = err instanceof Error ? err.message.split('\n')[0] : String(err)
    throw new LoadError(
      `candela: cannot load the native addon (${detail}). In a source checkout run \`npm run build\` ` +
        '(needs Rust); otherwise reinstall so npm fetches the prebuilt package for this platform.',
      { code: 'load_failed', param: 'device', cause: err },
    )
  }
  return binding
}

/** The platform name of the CUDA addon (`linux-x64-gnu-cuda`), or undefined where there is none. */
export function cudaPlatform(platform: string = process.platform, arch: string = process.arch): string | undefined {
  if (platform === 'linux' && (arch === 'x64' || arch === 'arm64')) return `linux-${arch}-gnu-cuda`
  if (platform === 'win32' && arch === 'x64') return 'win32-x64-msvc-cuda'
  return undefined
}

const unavailable = (why: string): string => `device 'cuda' is not available: ${why}`

function firstLine(err: unknown): string {
  return err instanceof Error ? (err.message.split('\n')[0] ?? err.message) : String(err)
}

const deviceError = (message: string, cause?: unknown): LoadError => new LoadError(message, { code: 'device_unavailable', cause })

/**
 * The CUDA addon's exports; throws a LoadError whose message says what is
 * missing: no CUDA build for this platform, addon not installed / built, or
 * installed but not loadable (no NVIDIA driver or CUDA libraries).
 */
export function nativeCuda(): typeof Binding {
  if (cudaBinding) return cudaBinding
  const platform = cudaPlatform()
  if (!platform) throw deviceError(unavailable(`candela has no CUDA support on ${process.platform}-${process.arch}`))
  const require = createRequire(import.meta.url)
  const local = fileURLToPath(new URL(`../native/candela.${platform}.node`, import.meta.url))
  const pkg = `candela-${platform}`
  const cannotLoad = (what: string, err: unknown): LoadError =>
    deviceError(
      unavailable(
        `the CUDA addon ${what} cannot be loaded (${firstLine(err)}); it needs an NVIDIA driver and the ` +
          'CUDA 12 runtime libraries (libcudart, libcublas, libcublasLt, libcurand, libnvrtc) on the library path',
      ),
      err,
    )
  if (existsSync(local)) {
    try {
      cudaBinding = require(local) as typeof Binding
    } catch (err) {
      throw cannotLoad(local, err)
    }
    return cudaBinding
  }
  try {
    cudaBinding = require(pkg) as typeof Binding
  } catch (err) {
    const code = (err as { code?: unknown } | undefined)?.code
    if (code === 'MODULE_NOT_FOUND' && firstLine(err).includes(pkg)) {
      throw deviceError(
        unavailable(
          `this installation has no CUDA support: install the package ${pkg}, or build ` +
            `native/candela.${platform}.node in a source checkout with \`npm run build:native:cuda\``,
        ),
        err,
      )
    }
    throw cannotLoad(pkg, err)
  }
  return cudaBinding
}

/**
 * The addon and device name for a load. `'cuda'` throws when the CUDA addon
 * or a GPU is missing, saying which; `'auto'` takes CUDA when it can run and
 * otherwise the CPU, logging one line with the reason.
 */
export function bindingFor(
  device: Device,
  log: (line: string) => void = (line) => console.warn(line),
): { binding: typeof Binding; device: 'cpu' | 'cuda' } {
  if (device === 'cpu') return { binding: native(), device: 'cpu' }
  let reason: string
  try {
    const b = nativeCuda()
    const why = b.deviceUnavailable('cuda')
    if (why === null || why === undefined) return { binding: b, device: 'cuda' }
    reason = unavailable(why)
  } catch (err) {
    if (device === 'cuda') throw err
    reason = firstLine(err)
  }
  if (device === 'cuda') throw deviceError(reason)
  log(`candela: CUDA is not available (${reason.replace(/^device 'cuda' is not available: /, '')}); running on the CPU`)
  return { binding: native(), device: 'cpu' }
}
