#!/usr/bin/env bash
# install-cargo-tool.sh CRATE VERSION: builds a cargo subcommand (pinned)
# from crates.io into ~/.cache/tidepool/CRATE-VERSION (TIDEPOOL_CACHE_DIR)
# once, and prints the directory holding its binary. Later runs only print
# the path. Its build directory is removed afterwards: only the binary stays.
set -euo pipefail
crate=${1:?usage: install-cargo-tool.sh CRATE VERSION}
version=${2:?usage: install-cargo-tool.sh CRATE VERSION}
cache="${TIDEPOOL_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/tidepool}"
root="$cache/$crate-$version"
bin="$root/bin"
if [ -x "$bin/$crate" ]; then
  echo "$bin"
  exit 0
fi
echo "install-cargo-tool: building $crate $version from crates.io into $root (once)" >&2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if ! CARGO_TARGET_DIR="$work" cargo install --quiet --locked --root "$work/root" "$crate" --version "=$version" >&2; then
  echo "install-cargo-tool: building $crate $version failed; check that crates.io is reachable" >&2
  exit 1
fi
# Moved into place whole: a killed build leaves no half install.
mkdir -p "$cache"
rm -rf "$root"
mv "$work/root" "$root"
"$bin/$crate" --version >/dev/null
echo "$bin"
