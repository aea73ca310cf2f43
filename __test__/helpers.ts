import { readFileSync } from 'node:fs'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'

export const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..')
export const FIXTURES = join(ROOT, 'fixtures')

/** A fixture's model path: a folder (`llama-tiny`) or a file (`llama-tiny.gguf`). */
export const fixture = (name: string): string => join(FIXTURES, name)

export interface Reference {
  architecture: string
  prompts: Array<{ text: string; input_ids: number[]; greedy_ids: number[]; greedy_text: string }>
  chat: { messages: Array<{ role: 'system' | 'user' | 'assistant'; content: string }>; rendered: string; input_ids: number[] }
  generation_config: { bos_token_id?: number; eos_token_id?: number | number[] }
}

/** fixtures/<name>/reference.json (outputs of Hugging Face transformers). */
export const reference = (name: string): Reference =>
  JSON.parse(readFileSync(join(FIXTURES, name, 'reference.json'), 'utf8')) as Reference

/** Poll `check` until it returns true or `ms` pass. */
export async function eventually(check: () => boolean, ms = 2000): Promise<boolean> {
  const end = Date.now() + ms
  while (Date.now() < end) {
    if (check()) return true
    await new Promise((r) => setTimeout(r, 10))
  }
  return check()
}
