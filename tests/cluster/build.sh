#!/usr/bin/env bash
# Builds the real etcd and kube-apiserver pinned in go.mod, and tpcluster,
# into a cache directory keyed by the pins, and prints that directory.
# The Kubernetes binaries are rebuilt only when go.mod, go.sum or the build
# recipe below change; the first build takes several minutes on two cores.
# GO names the go command (default: go from PATH).
set -euo pipefail
here=$(cd "${BASH_SOURCE[0]%/*}" && pwd)

go=${GO:-go}
if ! command -v "$go" >/dev/null 2>&1; then
  echo "tests/cluster: the go command is not installed; the e2e control plane is built from Go modules. Install Go 1.26 or later and retry." >&2
  exit 1
fi

# Bump when the way the binaries are built changes (flags, ldflags).
recipe=1
key=$( (cat "$here/go.mod" "$here/go.sum"; echo "recipe=$recipe") | sha256sum | cut -c1-16)
cache="${TIDEPOOL_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/tidepool}"
out="$cache/cluster-$key"
k8s_version=$(awk '$1 == "k8s.io/kubernetes" { print $2; exit }' "$here/go.mod")
[ -n "$k8s_version" ] || { echo "tests/cluster: go.mod does not pin k8s.io/kubernetes" >&2; exit 1; }

cd "$here"
build() { # name package [ldflags]
  local name=$1 pkg=$2 ldflags=${3:-}
  echo "tests/cluster: building $name ($pkg) into $out; the first build takes several minutes" >&2
  if ! "$go" build -trimpath -ldflags "$ldflags" -o "$out/$name.tmp" "$pkg" >"$out/$name.build.log" 2>&1; then
    echo "tests/cluster: building $name failed; the last lines of $out/$name.build.log:" >&2
    tail -n 30 "$out/$name.build.log" >&2
    exit 1
  fi
  mv "$out/$name.tmp" "$out/$name"
}

mkdir -p "$out"
if [ ! -x "$out/etcd" ]; then
  build etcd go.etcd.io/etcd/server/v3
fi
if [ ! -x "$out/kube-apiserver" ]; then
  minor=${k8s_version#v1.}; minor=${minor%%.*}
  v=k8s.io/component-base/version
  build kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver \
    "-s -w -X $v.gitVersion=$k8s_version -X $v.gitMajor=1 -X $v.gitMinor=$minor -X $v.gitTreeState=clean -X $v.buildDate=1970-01-01T00:00:00Z"
fi
# tpcluster is tiny and changes with the harness: go's own cache makes this
# a no-op when its source is unchanged.
"$go" build -trimpath -o "$out/tpcluster.tmp" ./cmd/tpcluster && mv "$out/tpcluster.tmp" "$out/tpcluster"
echo "$out"
