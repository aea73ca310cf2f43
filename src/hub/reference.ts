/**
 * Model references that name a Hugging Face repo: `org/name[:revision]`, and
 * `hf:org/name[:quant]` for GGUF repos (llama.cpp's `-hf` form: the suffix is
 * a quantization tag such as Q4_K_M, not a revision).
 */

export interface HubReference {
  /** `org/name`. */
  repo: string
  /** Branch, tag or commit (default `main`). */
  revision: string
  /** The reference asks for a GGUF file (`hf:` prefix). */
  gguf: boolean
  /** Quantization tag of the GGUF file to pick (`hf:` form only). */
  quant: string | undefined
}

// Hub repo names: letters, digits, '-', '_', '.'; neither part starts with '.' or '-' nor holds '--' / '..'.
const PART = String.raw`[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?`
const REF = new RegExp(String.raw`^(${PART})/(${PART})(?::([A-Za-z0-9_.\-/]{1,200}))?$`)

/** The reference `spec` names, or undefined when it is not of the hub's form. */
export function parseHubReference(spec: string): HubReference | undefined {
  const gguf = spec.startsWith('hf:')
  const m = REF.exec(gguf ? spec.slice(3) : spec)
  if (!m) return undefined
  const [, org, name, suffix] = m
  if (`${org}/${name}`.includes('--') || `${org}/${name}`.includes('..')) return undefined
  if (suffix !== undefined && (suffix.includes('..') || suffix.startsWith('/') || suffix.endsWith('/'))) return undefined
  return {
    repo: `${org}/${name}`,
    revision: gguf ? 'main' : (suffix ?? 'main'),
    gguf,
    quant: gguf ? suffix : undefined,
  }
}

/** How a reference is written back (for names and messages). */
export function formatHubReference(ref: HubReference): string {
  if (ref.gguf) return `hf:${ref.repo}${ref.quant ? `:${ref.quant}` : ''}`
  return ref.revision === 'main' ? ref.repo : `${ref.repo}:${ref.revision}`
}
