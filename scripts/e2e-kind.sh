#!/usr/bin/env bash
# make e2e-kind: the e2e suite on a real kind cluster, then the chart with
# real images and real pods. Needs docker (a running engine), kind, and the
# tools `make tools` installs. Deletes the cluster when done, pass or fail.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
name=${KIND_CLUSTER:-tidepool-e2e}
tag=${TAG:-e2e}
for tool in docker kind; do
  command -v "$tool" >/dev/null 2>&1 || {
    echo "e2e-kind: $tool is not installed; it needs Docker and kind (https://kind.sigs.k8s.io)" >&2; exit 1; }
done
docker info >/dev/null 2>&1 || { echo "e2e-kind: the Docker engine is not running (docker info failed)" >&2; exit 1; }
tools=$(scripts/install-tools.sh)
export PATH="$tools:$PATH"

work=$(mktemp -d)
kubeconfig="$work/kubeconfig"
cleanup() { kind delete cluster --name "$name" >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT

kind create cluster --name "$name" --kubeconfig "$kubeconfig" --wait 120s

# 1. The e2e suite, against this cluster instead of the local control plane.
TIDEPOOL_E2E_KUBECONFIG="$kubeconfig" cargo test -p tidepool-e2e -- --test-threads=2

# 2. The chart with the real images: every pod must become ready.
make images TAG="$tag"
kind load docker-image "tidepool-operator:$tag" "tidepool-agent:$tag" --name "$name"
helm install tidepool charts/tidepool --kubeconfig "$kubeconfig" \
  --namespace tidepool-system --create-namespace \
  --set operator.image.repository=tidepool-operator,operator.image.tag="$tag",operator.image.pullPolicy=Never \
  --set agent.image.repository=tidepool-agent,agent.image.tag="$tag",agent.image.pullPolicy=Never \
  --wait --timeout 5m
kubectl --kubeconfig "$kubeconfig" create namespace shop
kubectl --kubeconfig "$kubeconfig" apply -f examples/connectionpool.yaml
kubectl --kubeconfig "$kubeconfig" get connectionpools -A
echo "e2e-kind: passed"
