#!/usr/bin/env bash
# Installs kind $KIND_VERSION (versions.sh) into the cache with `go install`
# and prints its path. A kind already on PATH at that version is used as is.
set -euo pipefail
log_prefix=kind-bin
. "${BASH_SOURCE[0]%/*}/lib.sh"

if command -v kind >/dev/null 2>&1 && [ "$(kind version -q 2>/dev/null)" = "$KIND_VERSION" ]; then
  command -v kind
  exit 0
fi
bin="$cache_dir/kind-$KIND_VERSION/kind"
if [ ! -x "$bin" ]; then
  need go "kind is installed from its Go module; install Go 1.26 or later (https://go.dev/dl), or put kind $KIND_VERSION on PATH"
  say "installing kind $KIND_VERSION (go install sigs.k8s.io/kind@$KIND_VERSION)"
  tmp=$(mktemp -d "$cache_dir/kind-$KIND_VERSION.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  GOBIN="$tmp" CGO_ENABLED=0 go install "sigs.k8s.io/kind@$KIND_VERSION" >&2 ||
    die "go install sigs.k8s.io/kind@$KIND_VERSION failed; check that the Go module proxy ($(go env GOPROXY)) is reachable"
  mkdir -p "${bin%/*}"
  mv "$tmp/kind" "$bin"
fi
echo "$bin"
