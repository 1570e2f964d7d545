#!/usr/bin/env bash
# Checks that the release binaries are statically linked, so they run in a
# distroless/static image that has no libc: `file` must say so and `ldd`
# must find no shared libraries. Arguments name the binaries (default: the
# operator and the agent); CARGO_TARGET_DIR is honoured.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
target=${TARGET:-x86_64-unknown-linux-gnu}
status=0
bins=("$@")
[ ${#bins[@]} -gt 0 ] || bins=(tidepool-operator tidepool-agent)
for bin in "${bins[@]}"; do
  path="${CARGO_TARGET_DIR:-target}/$target/release/$bin"
  if [ ! -x "$path" ]; then
    echo "check-static: $path is missing; run make release first" >&2
    exit 1
  fi
  desc=$(file -b "$path")
  ldd_out=$(ldd "$path" 2>&1 || true)
  if [[ "$desc" == *"statically linked"* || "$desc" == *"static-pie linked"* ]] && [[ "$ldd_out" == *"not a dynamic executable"* || "$ldd_out" == *"statically linked"* ]]; then
    echo "check-static: ok  $path ($desc)"
  else
    echo "check-static: FAIL $path is dynamically linked: file says '$desc'; ldd says '$ldd_out'" >&2
    status=1
  fi
  "$path" --help >/dev/null || { echo "check-static: FAIL $path --help did not run" >&2; status=1; }
done
exit $status
