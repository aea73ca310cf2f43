#!/usr/bin/env bash
# Check the GitHub Actions workflows (.github/workflows/) with actionlint,
# pinned, built from the Go module proxy into .cache/bin on first use (needs
# `go`). actionlint also lints the `run:` scripts when the ShellCheck
# binary is on PATH; .ci/run installs Debian's.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=v1.7.12
bin="$PWD/.cache/bin/actionlint-$VERSION"
if [ ! -x "$bin" ]; then
  command -v go >/dev/null || { echo "actionlint.sh: needs go to build actionlint $VERSION (go install from the Go module proxy)" >&2; exit 1; }
  tmp=$(mktemp -d)
  GOBIN="$tmp" go install "github.com/rhysd/actionlint/cmd/actionlint@$VERSION"
  mkdir -p "$(dirname "$bin")"
  mv "$tmp/actionlint" "$bin"
  rmdir "$tmp"
fi
command -v shellcheck >/dev/null || echo "actionlint.sh: no shellcheck on PATH, so the run: scripts go unchecked" >&2
"$bin" -version | head -1
"$bin" "$@"
