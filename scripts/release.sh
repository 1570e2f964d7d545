#!/usr/bin/env bash
# Builds the statically linked release binaries that the Dockerfiles copy:
# target/x86_64-unknown-linux-gnu/release/tidepool-{operator,agent}
# (under CARGO_TARGET_DIR when set). With --demo, also tidepool-demo, the
# e2e's gRPC backend and load client. Prints each binary's path.
# glibc's static runtime (crt-static) needs an explicit --target, so that
# build scripts and proc-macros stay dynamically linked for the host.
#
# A content-keyed copy of the binaries is kept under
# ~/.cache/tidepool/release-bins (TIDEPOOL_CACHE_DIR). Its key hashes every
# file of the workspace's crates (tracked or not, ignored ones aside), the
# lock file, the toolchain (rustc -vV), RUSTFLAGS, the target and the binary
# list. A fresh clone of sources that were built before gets the same bytes
# back instead of a 3-minute rebuild: cargo's own fingerprints go by mtime
# and path, so they cannot tell. TIDEPOOL_RELEASE_CACHE=0 always builds.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
target=${TARGET:-x86_64-unknown-linux-gnu}
bins=(tidepool-operator tidepool-agent)
packages=(-p tidepool-operator -p tidepool-agent)
if [ "${1:-}" = --demo ]; then
  bins+=(tidepool-demo)
  packages+=(-p tidepool-e2e)
fi
rustflags="${RUSTFLAGS:-} -C target-feature=+crt-static"
out="${CARGO_TARGET_DIR:-target}/$target/release"

cache_root="${TIDEPOOL_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/tidepool}/release-bins"
key=""
if [ "${TIDEPOOL_RELEASE_CACHE:-1}" != 0 ] && git rev-parse --git-dir >/dev/null 2>&1; then
  key=$(
    {
      printf '%s\n' "$target" "$rustflags" "${bins[*]}"
      rustc -vV
      git ls-files -z --cached --others --exclude-standard -- \
        Cargo.toml Cargo.lock rust-toolchain rust-toolchain.toml .cargo \
        crds operator agent tests/Cargo.toml tests/src tests/build.rs |
        LC_ALL=C sort -z | xargs -0 -r sha256sum
    } | sha256sum | cut -c1-16
  )
fi

if [ -n "$key" ] && [ -d "$cache_root/$key" ]; then
  hit=1
  for bin in "${bins[@]}"; do [ -x "$cache_root/$key/$bin" ] || hit=0; done
  if [ "$hit" = 1 ]; then
    mkdir -p "$out"
    for bin in "${bins[@]}"; do cp -p "$cache_root/$key/$bin" "$out/$bin"; done
    echo "release: sources unchanged since a build kept under $cache_root/$key; reusing its binaries (TIDEPOOL_RELEASE_CACHE=0 rebuilds)" >&2
    for bin in "${bins[@]}"; do echo "$out/$bin"; done
    exit 0
  fi
fi

RUSTFLAGS="$rustflags" cargo build --release --locked --target "$target" "${packages[@]}" "${bins[@]/#/--bin=}"

if [ -n "$key" ]; then
  # Written beside, then renamed: a killed run leaves no half entry. The
  # three newest entries are kept.
  mkdir -p "$cache_root"
  tmp=$(mktemp -d "$cache_root/.new.XXXXXX")
  for bin in "${bins[@]}"; do cp -p "$out/$bin" "$tmp/$bin"; done
  rm -rf "${cache_root:?}/$key"
  mv "$tmp" "$cache_root/$key"
  find "$cache_root" -mindepth 1 -maxdepth 1 -name '.new.*' -mmin +60 -exec rm -rf {} +
  ls -1t "$cache_root" | tail -n +4 | while read -r old; do rm -rf "${cache_root:?}/$old"; done
fi
for bin in "${bins[@]}"; do echo "$out/$bin"; done
