#!/usr/bin/env bash
# Builds the statically linked release binaries that the Dockerfiles copy:
# target/x86_64-unknown-linux-gnu/release/tidepool-{operator,agent}.
# glibc's static runtime (crt-static) needs an explicit --target, so that
# build scripts and proc-macros stay dynamically linked for the host.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
target=${TARGET:-x86_64-unknown-linux-gnu}
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
  cargo build --release --locked --target "$target" -p tidepool-operator -p tidepool-agent
for bin in tidepool-operator tidepool-agent; do
  echo "target/$target/release/$bin"
done
