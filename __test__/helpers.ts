import { mkdtempSync, readFileSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
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

const tempDirs: string[] = []

/** A fresh directory under the OS temp dir, removed when this test file's process exits. */
export function tempDir(prefix: string): string {
  if (tempDirs.length === 0) process.once('exit', () => tempDirs.forEach((d) => rmSync(d, { recursive: true, force: true })))
  const dir = mkdtempSync(join(tmpdir(), prefix))
  tempDirs.push(dir)
  return dir
}

/** Poll `check` until it returns true or `ms` pass. */
export async function eventually(check: () => boolean, ms = 2000): Promise<boolean> {
  const end = Date.now() + ms
  while (Date.now() < end) {
    if (check()) return true
    await new Promise((r) => setTimeout(r, 10))
  }
  return check()
}

/** One tensor of a safetensors file: dtype name ("F32", "I64", ...), shape and raw little-endian bytes. */
export interface StTensor {
  dtype: string
  shape: number[]
  data: Uint8Array
}

/** A safetensors blob: u64 LE header length, JSON header, then the tensors' bytes. */
export function writeSafetensors(tensors: Record<string, StTensor>): Buffer {
  const header: Record<string, unknown> = {}
  let offset = 0
  for (const [name, t] of Object.entries(tensors)) {
    header[name] = { dtype: t.dtype, shape: t.shape, data_offsets: [offset, offset + t.data.byteLength] }
    offset += t.data.byteLength
  }
  const json = Buffer.from(JSON.stringify(header))
  const len = Buffer.alloc(8)
  len.writeBigUInt64LE(BigInt(json.length))
  return Buffer.concat([len, json, ...Object.values(tensors).map((t) => Buffer.from(t.data.buffer, t.data.byteOffset, t.data.byteLength))])
}

/** Read one F32 tensor from a safetensors file. */
export function readF32(path: string, name: string): { data: Float32Array; shape: number[] } {
  const buf = readFileSync(path)
  const n = Number(buf.readBigUInt64LE(0))
  const header = JSON.parse(buf.subarray(8, 8 + n).toString('utf8')) as Record<string, { dtype: string; shape: number[]; data_offsets: [number, number] }>
  const t = header[name]
  if (!t || t.dtype !== 'F32') throw new Error(`${path} has no F32 tensor ${name}`)
  const bytes = buf.subarray(8 + n + t.data_offsets[0], 8 + n + t.data_offsets[1])
  return { data: new Float32Array(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength)), shape: t.shape }
}
