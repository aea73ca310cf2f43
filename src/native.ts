/**
 * The native addon, loaded lazily through the loader napi generates
 * (`native/index.cjs`): it finds `native/candela.<platform>.node` in a
 * development checkout, else the per-platform package (`candela-<platform>`).
 *
 * @internal
 */

import { createRequire } from 'node:module'
import type * as Binding from '../native/index.cjs'

export type {
  NativeBatch,
  NativeEngine,
  NativeEvent,
  NativeLoadOptions,
  NativeModelInfo,
  NativeRequest,
  NativeSamplingParams,
  NativeStats,
  NativeTokenLogprob,
} from '../native/index.cjs'

let binding: typeof Binding | undefined

/** The addon's exports; throws a readable error when it is not built. */
export function native(): typeof Binding {
  if (binding) return binding
  const require = createRequire(import.meta.url)
  try {
    binding = require('../native/index.cjs') as typeof Binding
  } catch (err) {
    const detail = err instanceof Error ? err.message.split('\n')[0] : String(err)
    throw new Error(
      `candela: cannot load the native addon (${detail}). In a source checkout run \`npm run build\` ` +
        '(needs Rust); otherwise reinstall so npm fetches the prebuilt package for this platform.',
      { cause: err },
    )
  }
  return binding
}
