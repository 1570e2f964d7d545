#!/usr/bin/env bash
# fuzz-build.sh TOOLCHAIN TARGET_DIR: builds the cargo-fuzz targets (fuzz/)
# with the pinned nightly TOOLCHAIN into TARGET_DIR and prints the directory
# holding their binaries, one per target, each runnable by itself (libFuzzer
# is linked in). A fresh clone of sources built before gets them back from
# the content-keyed cache (scripts/lib/bin-cache.sh) instead of a
# 3-minute rebuild.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
toolchain=${1:?usage: fuzz-build.sh TOOLCHAIN TARGET_DIR}
target_dir=${2:?usage: fuzz-build.sh TOOLCHAIN TARGET_DIR}
fuzz_bin=$(scripts/install-cargo-fuzz.sh "$toolchain")
mapfile -t targets < <(PATH="$fuzz_bin:$PATH" cargo "+$toolchain" fuzz list --fuzz-dir fuzz)
[ ${#targets[@]} -gt 0 ] || { echo "fuzz-build: cargo fuzz list found no target in fuzz/" >&2; exit 1; }
out="$target_dir/x86_64-unknown-linux-gnu/release"

. scripts/lib/bin-cache.sh
# shellcheck disable=SC2086 # $sources is a list of paths without spaces
key=$(printf '%s\n' "${targets[*]}" "$(rustup run "$toolchain" rustc -vV)" "$("$fuzz_bin/cargo-fuzz" --version)" |
  bin_cache_key $sources fuzz/Cargo.toml fuzz/Cargo.lock fuzz/src fuzz/fuzz_targets)
if ! bin_cache_restore fuzz "$key" "$out" "${targets[@]}"; then
  PATH="$fuzz_bin:$PATH" cargo "+$toolchain" fuzz build --fuzz-dir fuzz --target-dir "$target_dir" >&2
  bin_cache_store fuzz "$key" "$out" "${targets[@]}"
fi
echo "$out"
