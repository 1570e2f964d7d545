#!/usr/bin/env bash
# Builds the statically linked release binaries that the Dockerfiles copy:
# target/x86_64-unknown-linux-gnu/release/tidepool-{operator,agent}
# (under CARGO_TARGET_DIR when set). With --demo, also tidepool-demo, the
# e2e's gRPC backend and load client.
# glibc's static runtime (crt-static) needs an explicit --target, so that
# build scripts and proc-macros stay dynamically linked for the host.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
target=${TARGET:-x86_64-unknown-linux-gnu}
bins=(tidepool-operator tidepool-agent)
packages=(-p tidepool-operator -p tidepool-agent)
if [ "${1:-}" = --demo ]; then
  bins+=(tidepool-demo)
  packages+=(-p tidepool-e2e)
fi
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
  cargo build --release --locked --target "$target" "${packages[@]}" "${bins[@]/#/--bin=}"
for bin in "${bins[@]}"; do
  echo "${CARGO_TARGET_DIR:-target}/$target/release/$bin"
done
