#!/usr/bin/env bash
# Installs cargo-fuzz (pinned) from crates.io into the cache, once
# (install-cargo-tool.sh), makes sure the pinned nightly toolchain it builds
# with is present (the Makefile's FUZZ_TOOLCHAIN, passed as $1), and prints
# the directory holding the `cargo-fuzz` binary.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
toolchain=${1:?usage: install-cargo-fuzz.sh NIGHTLY-TOOLCHAIN (the Makefile passes FUZZ_TOOLCHAIN)}
# libFuzzer's instrumentation (-Zsanitizer) needs a nightly compiler.
if ! rustup run "$toolchain" rustc --version >/dev/null 2>&1; then
  echo "install-cargo-fuzz: installing the $toolchain toolchain (rustup)" >&2
  rustup toolchain install "$toolchain" --profile minimal >&2 ||
    { echo "install-cargo-fuzz: rustup could not install $toolchain; check that static.rust-lang.org is reachable" >&2; exit 1; }
fi
scripts/install-cargo-tool.sh cargo-fuzz 0.13.2
