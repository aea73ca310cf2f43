/**
 * Which files of a repo a load needs: the configs, tokenizer and chat
 * template files the loader reads, and the weights (a safetensors set, or
 * one GGUF file picked by quantization tag plus its mmproj). Nothing else
 * (README, other formats, other quants) is fetched.
 */

import { CandelaError } from '../errors.js'

/** Small files the loader reads when present (crates/candela-models loader, tokenizer, chat_template, processor). */
const METADATA_FILES = [
  'config.json',
  'generation_config.json',
  'tokenizer.json',
  'tokenizer_config.json',
  'special_tokens_map.json',
  'chat_template.jinja',
  'chat_template.json',
  'preprocessor_config.json',
  'video_preprocessor_config.json',
  'processor_config.json',
]

export const SAFETENSORS_INDEX = 'model.safetensors.index.json'

/** Tags tried in order when a GGUF reference names none (llama.cpp's default first). */
const DEFAULT_QUANTS = ['Q4_K_M', 'Q4_0', 'Q8_0', 'F16', 'BF16']
/** Preferred mmproj precisions, best first. */
const MMPROJ_PREFERENCE = ['F16', 'BF16', 'Q8_0', 'F32']

export type Selection =
  | { kind: 'safetensors'; files: string[]; index: boolean }
  | { kind: 'gguf'; model: string; mmproj: string | undefined; files: string[] }

/** The repo holds no checkpoint candela can load, or not the one asked for. */
export class UnsupportedRepoError extends CandelaError {
  override name = 'UnsupportedRepoError'
  constructor(message: string) {
    super(message, { code: 'unsupported_repo', param: 'model' })
  }
}

const isTopLevel = (f: string): boolean => !f.includes('/')
const isGguf = (f: string): boolean => f.toLowerCase().endsWith('.gguf')
const isMmproj = (f: string): boolean => /mmproj/i.test(f)
// llama.cpp split files (model-00001-of-00003.gguf) need a loader that joins them.
const isSplitGguf = (f: string): boolean => /-\d{5}-of-\d{5}\.gguf$/i.test(f)

/** Whether `file`'s name carries `tag` as a whole token (Q4_K_M in `x-Q4_K_M.gguf`, not in `x-Q4_K_M_L.gguf`). */
export function hasQuantTag(file: string, tag: string): boolean {
  const base = file.slice(file.lastIndexOf('/') + 1).replace(/\.gguf$/i, '')
  const esc = tag.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')
  return new RegExp(`(^|[-_.])${esc}($|[-_.])`, 'i').test(base)
}

/**
 * Pick the files of `names` (every path in the repo) to fetch. `gguf` forces
 * a GGUF pick; otherwise safetensors win when the repo has both.
 */
export function selectFiles(repo: string, names: readonly string[], want: { gguf: boolean; quant: string | undefined }): Selection {
  const top = names.filter(isTopLevel)
  const safetensors = top.filter((f) => f.endsWith('.safetensors'))
  if (!want.gguf && safetensors.length > 0) {
    if (!top.includes('config.json')) throw new UnsupportedRepoError(`${repo} has safetensors weights but no config.json`)
    if (!top.includes('tokenizer.json')) throw new UnsupportedRepoError(`${repo} has no tokenizer.json (candela reads the fast-tokenizer file)`)
    const meta = METADATA_FILES.filter((f) => top.includes(f))
    if (top.includes(SAFETENSORS_INDEX)) return { kind: 'safetensors', files: [...meta, SAFETENSORS_INDEX], index: true }
    // As the loader: model.safetensors, else every model*.safetensors.
    const weights = top.includes('model.safetensors') ? ['model.safetensors'] : safetensors.filter((f) => f.startsWith('model')).sort()
    if (weights.length === 0) {
      throw new UnsupportedRepoError(`${repo}: no model.safetensors, model*.safetensors or ${SAFETENSORS_INDEX} (found ${safetensors.join(', ')})`)
    }
    return { kind: 'safetensors', files: [...meta, ...weights], index: false }
  }
  const ggufs = names.filter(isGguf)
  const models = ggufs.filter((f) => !isMmproj(f))
  if (models.length === 0) {
    throw new UnsupportedRepoError(
      want.gguf
        ? `${repo} has no GGUF model file`
        : `${repo} has no checkpoint candela can load (safetensors with config.json, or GGUF); files: ${top.slice(0, 20).join(', ')}${top.length > 20 ? ', ...' : ''}`,
    )
  }
  const model = pickGguf(repo, models, want.quant)
  if (isSplitGguf(model)) throw new UnsupportedRepoError(`${repo}: ${model} is one part of a split GGUF, which candela cannot load yet`)
  const mmprojs = ggufs.filter(isMmproj)
  const mmproj = MMPROJ_PREFERENCE.map((t) => mmprojs.find((f) => hasQuantTag(f, t))).find((f) => f !== undefined) ?? mmprojs.sort()[0]
  return { kind: 'gguf', model, mmproj, files: mmproj ? [model, mmproj] : [model] }
}

function pickGguf(repo: string, models: string[], quant: string | undefined): string {
  if (quant !== undefined) {
    const hits = models.filter((f) => hasQuantTag(f, quant))
    if (hits.length === 0) {
      const tags = models.map((f) => f.slice(f.lastIndexOf('/') + 1))
      throw new UnsupportedRepoError(`${repo} has no GGUF file with quantization ${quant} (files: ${tags.join(', ')})`)
    }
    // The shortest name is the plain file (x-Q4_K_M.gguf before x-Q4_K_M-00001-of-00002.gguf).
    return hits.sort((a, b) => a.length - b.length || a.localeCompare(b))[0]!
  }
  if (models.length === 1) return models[0]!
  for (const tag of DEFAULT_QUANTS) {
    const hit = models.filter((f) => hasQuantTag(f, tag)).sort((a, b) => a.length - b.length)[0]
    if (hit) return hit
  }
  return [...models].sort()[0]!
}

/** The shard file names a safetensors index lists (plain names only). */
export function shardsOf(repo: string, indexText: string): string[] {
  let json: { weight_map?: Record<string, unknown> }
  try {
    json = JSON.parse(indexText) as typeof json
  } catch (err) {
    throw new UnsupportedRepoError(`${repo}: ${SAFETENSORS_INDEX} is not valid JSON (${(err as Error).message})`)
  }
  const map = json.weight_map
  if (!map || typeof map !== 'object') throw new UnsupportedRepoError(`${repo}: ${SAFETENSORS_INDEX} has no weight_map`)
  const shards = [...new Set(Object.values(map).filter((v): v is string => typeof v === 'string'))].sort()
  const bad = shards.find((s) => s.includes('/') || s.includes('\\') || s.startsWith('..'))
  if (bad !== undefined) throw new UnsupportedRepoError(`${repo}: ${SAFETENSORS_INDEX} names shard ${JSON.stringify(bad)}, not a plain file name`)
  if (shards.length === 0) throw new UnsupportedRepoError(`${repo}: ${SAFETENSORS_INDEX} lists no shards`)
  return shards
}
