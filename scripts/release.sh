#!/usr/bin/env bash
# Builds the statically linked release binaries that the Dockerfiles copy:
# target/x86_64-unknown-linux-gnu/release/tidepool-{operator,agent}
# (under CARGO_TARGET_DIR when set). With --demo, also tidepool-demo, the
# e2e's gRPC backend and load client. Prints each binary's path.
# glibc's static runtime (crt-static) needs an explicit --target, so that
# build scripts and proc-macros stay dynamically linked for the host.
#
# A fresh clone of sources built before gets the same binaries back from a
# content-keyed cache instead of a 3-minute rebuild (scripts/lib/bin-cache.sh;
# TIDEPOOL_BIN_CACHE=0 always builds).
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

. scripts/lib/bin-cache.sh
# shellcheck disable=SC2086 # $sources is a list of paths without spaces
key=$(printf '%s\n' "$target" "$rustflags" "${bins[*]}" "$(rustc -vV)" |
  bin_cache_key $sources tests/Cargo.toml tests/src)
if bin_cache_restore release "$key" "$out" "${bins[@]}"; then
  for bin in "${bins[@]}"; do echo "$out/$bin"; done
  exit 0
fi

RUSTFLAGS="$rustflags" cargo build --release --locked --target "$target" "${packages[@]}" "${bins[@]/#/--bin=}"

bin_cache_store release "$key" "$out" "${bins[@]}"
for bin in "${bins[@]}"; do echo "$out/$bin"; done
