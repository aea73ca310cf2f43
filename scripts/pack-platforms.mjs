#!/usr/bin/env node
// Pack what `npm publish` uploads: the main package and one package per
// addon (npm/<platform>/ plus its candela.<platform>.node), as tarballs in
// target/npm/ (or --out DIR), listed with their sizes and files in
// packs.json there. `npm run pack:platforms` builds the addon first.
//
//   node scripts/pack-platforms.mjs [--out DIR] [--require linux-x64-gnu,linux-x64-gnu-cuda | --require all]
//
// An addon is taken from npm/<platform>/ (where the release workflow puts the
// built artifacts) or else native/ (where `npm run build` and
// `npm run build:native:cuda` write them). A platform without one is left
// out, unless --require names it. The TypeScript is rebuilt from scratch
// (dist/ may hold files of sources that are gone). No Rust is needed.
import { execFileSync } from 'node:child_process'
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join, resolve } from 'node:path'
import { parseArgs } from 'node:util'

const ROOT = resolve(import.meta.dirname, '..')
const { values: args } = parseArgs({ options: { out: { type: 'string' }, require: { type: 'string' } } })
const out = resolve(args.out ?? join(ROOT, 'target', 'npm'))

const main = readJson(join(ROOT, 'package.json'))
const platforms = readdirSync(join(ROOT, 'npm')).sort()
checkVersions(platforms)
const wanted = args.require === 'all' ? platforms : (args.require?.split(',').filter(Boolean) ?? [])
for (const p of wanted) if (!platforms.includes(p)) fail(`--require ${p}: there is no npm/${p}/`)

rmSync(out, { recursive: true, force: true })
mkdirSync(out, { recursive: true })
// npm on Windows is a .cmd script, which only a shell runs.
const npm = (cwd, ...argv) => execFileSync('npm', argv, { cwd, encoding: 'utf8', shell: process.platform === 'win32' })

rmSync(join(ROOT, 'dist'), { recursive: true, force: true })
execFileSync(process.execPath, [join(ROOT, 'node_modules', 'typescript', 'bin', 'tsc'), '-p', join(ROOT, 'tsconfig.json')], { stdio: 'inherit' })

const packs = []
for (const platform of platforms) {
  const addon = `candela.${platform}.node`
  const from = [join(ROOT, 'npm', platform, addon), join(ROOT, 'native', addon)].find((f) => existsSync(f))
  if (!from) {
    if (wanted.includes(platform)) fail(`${platform}: no ${addon} in npm/${platform}/ or native/`)
    console.log(`pack-platforms: ${platform}: no ${addon}, left out`)
    continue
  }
  // A copy of the package folder, so an addon from native/ never lands in npm/.
  const stage = mkdtempSync(join(tmpdir(), `candela-pack-${platform}-`))
  try {
    for (const f of ['package.json', 'README.md']) copyFileSync(join(ROOT, 'npm', platform, f), join(stage, f))
    copyFileSync(from, join(stage, addon))
    packs.push(pack(stage))
  } finally {
    rmSync(stage, { recursive: true, force: true })
  }
}
// --ignore-scripts: `prepare` would build the addon (Rust) and the TypeScript again.
packs.push(pack(ROOT, '--ignore-scripts'))

writeFileSync(join(out, 'packs.json'), `${JSON.stringify(packs, null, 2)}\n`)
const mb = (n) => `${(n / 1e6).toFixed(1)} MB`
for (const p of packs) {
  console.log(`${p.filename}  ${mb(p.size)} (unpacked ${mb(p.unpackedSize)}, ${p.entryCount} files)`)
}
console.log(`pack-platforms: ${packs.length} tarballs in ${out}`)

function pack(dir, ...flags) {
  const [info] = JSON.parse(npm(dir, 'pack', '--json', '--pack-destination', out, ...flags))
  const { name, version, filename, size, unpackedSize, entryCount, files } = info
  return { name, version, filename, size, unpackedSize, entryCount, files: files.map((f) => f.path).sort() }
}

// Every addon package must carry the main package's version under the name
// its optionalDependencies (CPU addons) or optional peerDependencies (CUDA)
// give, or an install pairs the wrong binary with the JavaScript.
function checkVersions(dirs) {
  const declared = { ...main.optionalDependencies, ...main.peerDependencies }
  const names = new Set()
  for (const platform of dirs) {
    const pkg = readJson(join(ROOT, 'npm', platform, 'package.json'))
    const name = `${main.name}-${platform}`
    if (pkg.name !== name) fail(`npm/${platform}/package.json: name ${pkg.name}, expected ${name}`)
    if (pkg.version !== main.version) fail(`${name}: version ${pkg.version}, the main package is ${main.version}`)
    if (declared[name] !== main.version) fail(`package.json: ${name} must be an optional or peer dependency at ${main.version}`)
    if (!pkg.files?.includes(`candela.${platform}.node`)) fail(`npm/${platform}/package.json: files must list candela.${platform}.node`)
    names.add(name)
  }
  for (const name of Object.keys(declared)) {
    if (name.startsWith(`${main.name}-`) && !names.has(name)) fail(`package.json depends on ${name}, which has no folder in npm/`)
  }
}

function readJson(file) {
  return JSON.parse(readFileSync(file, 'utf8'))
}

function fail(message) {
  console.error(`pack-platforms: ${message}`)
  process.exit(1)
}
