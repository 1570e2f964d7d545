#!/usr/bin/env bash
# Installs cargo-fuzz (pinned) from crates.io into a cache directory, makes
# sure the nightly toolchain it builds with is present, and prints the
# directory holding the `cargo-fuzz` binary. Installed once; later runs only
# print the path.
set -euo pipefail
version=0.13.2
cache="${TIDEPOOL_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/tidepool}"
root="$cache/cargo-fuzz-$version"
bin="$root/bin"

# libFuzzer's instrumentation (-Zsanitizer) needs a nightly compiler.
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  echo "install-cargo-fuzz: installing the nightly toolchain (rustup)" >&2
  rustup toolchain install nightly --profile minimal >&2
fi
if [ -x "$bin/cargo-fuzz" ]; then
  echo "$bin"
  exit 0
fi
echo "install-cargo-fuzz: building cargo-fuzz $version from crates.io into $root" >&2
# Its own target dir, removed afterwards: only the binary is kept.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if ! CARGO_TARGET_DIR="$work" cargo install --quiet --locked --root "$root" cargo-fuzz --version "=$version" >&2; then
  echo "install-cargo-fuzz: building cargo-fuzz $version failed; check that crates.io is reachable" >&2
  exit 1
fi
"$bin/cargo-fuzz" --version >/dev/null
echo "$bin"
