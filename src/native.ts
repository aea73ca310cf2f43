/**
 * The native addons, loaded lazily.
 *
 * - CPU: through the loader napi generates (`native/index.cjs`), which finds
 *   `native/candela.<platform>.node` in a source checkout, else the
 *   per-platform package `<this package>-<platform>` (an optional dependency,
 *   so npm installs only the one whose os / cpu / libc match).
 * - CUDA: a separate build of the same addon (cargo feature `cuda`),
 *   `native/candela.<platform>-cuda.node` (`npm run build:native:cuda`) or
 *   the package `<this package>-<platform>-cuda`, installed by hand (an
 *   optional peer dependency: npm checks its version, never fetches it).
 *   Same API, so the same types.
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

const require = createRequire(import.meta.url)

/** The fields of this package's package.json that name the addon packages. */
interface Manifest {
  name: string
  version: string
  optionalDependencies?: Record<string, string>
  peerDependencies?: Record<string, string>
}

const manifest = require('../package.json') as Manifest

let binding: typeof Binding | undefined
let cudaBinding: typeof Binding | undefined

/** The npm package of the addon for a platform (`linux-x64-gnu`, `linux-x64-gnu-cuda`). */
export function addonPackage(platform: string): string {
  return `${manifest.name}-${platform}`
}

/** The platforms with a published addon package: the CPU ones, or the CUDA ones. */
export function publishedPlatforms(kind: 'cpu' | 'cuda'): string[] {
  const deps = (kind === 'cpu' ? manifest.optionalDependencies : manifest.peerDependencies) ?? {}
  const prefix = `${manifest.name}-`
  return Object.keys(deps)
    .filter((name) => name.startsWith(prefix))
    .map((name) => name.slice(prefix.length))
}

/** napi's name for a platform: `linux-x64-gnu`, `linux-arm64-musl`, `darwin-arm64`, `win32-x64-msvc`. */
export function platformName(
  platform: string = process.platform,
  arch: string = process.arch,
  musl: boolean = platform === 'linux' && isMusl(),
): string {
  if (platform === 'linux') return `linux-${arch}-${musl ? 'musl' : 'gnu'}`
  if (platform === 'win32') return `win32-${arch}-msvc`
  return `${platform}-${arch}`
}

/** Whether this Linux runs on musl: Node's process report names a glibc only on glibc. */
function isMusl(): boolean {
  const report = process.report.getReport() as { header?: { glibcVersionRuntime?: string } }
  return report.header?.glibcVersionRuntime === undefined
}

/**
 * What to do when no addon for `platform` is there: install its package, or,
 * where none is published, build it in a clone with `build` (needs Rust).
 */
export function addonAdvice(platform: string, kind: 'cpu' | 'cuda', build: string): string {
  const file = `native/candela.${platform}.node`
  const published = publishedPlatforms(kind)
  if (!published.includes(platform)) {
    const what = kind === 'cpu' ? 'addon' : 'CUDA addon'
    return (
      `candela publishes no prebuilt ${what} for ${platform} (only for ${published.join(', ')}): ` +
      `build ${file} in a clone of the repository with \`${build}\` (needs Rust)`
    )
  }
  const pkg = `${addonPackage(platform)}@${manifest.version}`
  return `install the package ${pkg} (\`npm install ${pkg}\`), or build ${file} in a source checkout with \`${build}\``
}

/**
 * Where the addon for `platform` is: the source checkout's
 * `native/candela.<platform>.node`, else the installed package; undefined if neither.
 */
function findAddon(platform: string): string | undefined {
  const local = fileURLToPath(new URL(`../native/candela.${platform}.node`, import.meta.url))
  if (existsSync(local)) return local
  const pkg = addonPackage(platform)
  try {
    require.resolve(pkg)
    return pkg
  } catch {
    return undefined
  }
}

/** The addon's exports; throws a LoadError naming the platform and what to install or build. */
export function native(): typeof Binding {
  if (binding) return binding
  try {
    binding = require('../native/index.cjs') as typeof Binding
  } catch (err) {
    const platform = platformName()
    const found = findAddon(platform)
    let why = addonAdvice(platform, 'cpu', 'npm run build')
    if (found) {
      // napi's loader only says "Cannot find native binding"; loading the file again gives the reason.
      try {
        require(found)
      } catch (loadErr) {
        why = `${found} cannot be loaded (${firstLine(loadErr)})`
      }
    }
    throw new LoadError(`candela: cannot load the native addon for ${platform}: ${why}`, {
      code: 'load_failed',
      param: 'device',
      cause: err,
    })
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

const deviceError = (message: string, cause?: unknown): LoadError => new LoadError(message, { code: 'device_unavailable', cause })

function firstLine(err: unknown): string {
  return err instanceof Error ? (err.message.split('\n')[0] ?? err.message) : String(err)
}

/**
 * The CUDA addon's exports; throws a LoadError whose message says what is
 * missing: no CUDA build for this platform, addon not installed / built, or
 * installed but not loadable (no NVIDIA driver or CUDA libraries).
 */
export function nativeCuda(): typeof Binding {
  if (cudaBinding) return cudaBinding
  const platform = cudaPlatform()
  if (!platform) throw deviceError(unavailable(`candela has no CUDA support on ${process.platform}-${process.arch}`))
  const found = findAddon(platform)
  if (!found) {
    const advice = addonAdvice(platform, 'cuda', 'npm run build:native:cuda')
    throw deviceError(unavailable(`this installation has no CUDA support: ${advice}`))
  }
  try {
    cudaBinding = require(found) as typeof Binding
  } catch (err) {
    throw deviceError(
      unavailable(
        `the CUDA addon ${found} cannot be loaded (${firstLine(err)}); it needs an NVIDIA driver and the ` +
          'CUDA 12 runtime libraries (libcudart, libcublas, libcublasLt, libcurand, libnvrtc) on the library path',
      ),
      err,
    )
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
