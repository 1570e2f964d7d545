#!/usr/bin/env bash
# Builds the real gRPC peers pinned in go.mod (grpc-go's interop server and
# client, its route_guide and helloworld example servers, and ghz) into a
# cache directory keyed by the pins, and prints that directory. Rebuilt only
# when go.mod, go.sum or the recipe below change. GO names the go command
# (default: go from PATH).
set -euo pipefail
here=$(cd "${BASH_SOURCE[0]%/*}" && pwd)

go=${GO:-go}
if ! command -v "$go" >/dev/null 2>&1; then
  echo "tests/peers: the go command is not installed; the real gRPC peers are built from Go modules. Install Go 1.26 or later and retry." >&2
  exit 1
fi

# Bump when the way the binaries are built changes.
recipe=3
key=$( (cat "$here/go.mod" "$here/go.sum"; echo "recipe=$recipe") | sha256sum | cut -c1-16)
cache="${TIDEPOOL_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/tidepool}"
out="$cache/peers-$key"

cd "$here"
build() { # name package
  local name=$1 pkg=$2
  [ -x "$out/$name" ] && return 0
  echo "tests/peers: building $name ($pkg) into $out" >&2
  if ! CGO_ENABLED=0 "$go" build -trimpath -ldflags "-s -w" -o "$out/$name.tmp" "$pkg" >"$out/$name.build.log" 2>&1; then
    echo "tests/peers: building $name failed; the last lines of $out/$name.build.log:" >&2
    tail -n 30 "$out/$name.build.log" >&2
    exit 1
  fi
  mv "$out/$name.tmp" "$out/$name"
}

mkdir -p "$out"
build ghz github.com/bojand/ghz/cmd/ghz
build interop-server google.golang.org/grpc/interop/server
build interop-client google.golang.org/grpc/interop/client
build route-guide-server google.golang.org/grpc/examples/route_guide/server
build greeter-server google.golang.org/grpc/examples/helloworld/greeter_server
build protoset ./cmd/protoset
[ -s "$out/peers.protoset" ] || { "$out/protoset" "$out/peers.protoset.tmp" && mv "$out/peers.protoset.tmp" "$out/peers.protoset"; }
echo "$out"
