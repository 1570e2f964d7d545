#!/usr/bin/env bash
# `make demo`: the main job on an embedded default, on this machine alone.
#
# Starts a local control plane (a real kube-apiserver and etcd), installs the
# CRD, runs the operator, one agent (for the Node object "demo-node"), two
# demo gRPC backends (127.0.0.2 and 127.0.0.3, port 50051) behind the Service
# shop/payments-grpc, and a small load client through the agent; applies
# examples/connectionpool.yaml and shows `kubectl get connectionpools` with
# live occupancy every few seconds. Ctrl-C stops everything it started and
# removes its files. TIDEPOOL_DEMO_SECONDS=N stops it after N seconds.
#
# EndpointSlices may not hold loopback addresses, so the backends are
# published as 192.0.2.2 and 192.0.2.3 (a documentation range, RFC 5737) and
# the operator maps them back to 127.0.0.x (--endpoint-address-map).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

CARGO=${CARGO:-cargo}
OPERATOR_CONTROL=127.0.0.1:15010
OPERATOR_ADMIN=127.0.0.1:15020
AGENT_PROXY=127.0.0.1:15000
AGENT_ADMIN=127.0.0.1:15021
BACKENDS=(127.0.0.2:50051 127.0.0.3:50051)

say() { printf '\033[1mdemo:\033[0m %s\n' "$*" >&2; }

for addr in "$OPERATOR_CONTROL" "$OPERATOR_ADMIN" "$AGENT_PROXY" "$AGENT_ADMIN" "${BACKENDS[@]}"; do
  if (exec 3<>"/dev/tcp/${addr%:*}/${addr#*:}") 2>/dev/null; then
    say "port $addr is in use; stop what listens there (make cluster-down, another demo) and retry"
    exit 1
  fi
done

say "building the operator, the agent and the demo client (cargo build)"
$CARGO build -q -p tidepool-operator -p tidepool-agent -p tidepool-e2e --bins
target=$($CARGO metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/debug
tools=$(scripts/install-tools.sh)
bins=$(tests/cluster/build.sh)
export PATH="$tools:$PATH"

dir=$(mktemp -d "${TMPDIR:-/tmp}/tidepool-demo.XXXXXX")
pids=()
cleanup() {
  trap - EXIT INT TERM
  say "stopping"
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do kill "${pids[i]}" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  done
  rm -rf "$dir"
  say "stopped; removed $dir"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

start() { # name, command...
  local name=$1; shift
  "$@" >"$dir/$name.log" 2>&1 &
  pids+=($!)
}

say "starting the local control plane (logs in $dir)"
start cluster "$bins/tpcluster" run --bin-dir "$bins" --state-dir "$dir/cluster"
for _ in $(seq 1 300); do
  grep -q '^ready ' "$dir/cluster.log" 2>/dev/null && break
  kill -0 "${pids[0]}" 2>/dev/null || { cat "$dir/cluster.log" >&2; exit 1; }
  sleep 0.5
done
grep -q '^ready ' "$dir/cluster.log" || { say "the control plane did not start within 150s; see $dir/cluster.log"; exit 1; }
export KUBECONFIG
KUBECONFIG=$(sed -n 's/^ready kubeconfig=\([^ ]*\).*/\1/p' "$dir/cluster.log")

say "installing the CRD and the demo's Node, Service and EndpointSlice"
kubectl apply --server-side -f charts/tidepool/templates/crd-connectionpools.yaml >/dev/null
kubectl wait --for=condition=Established crd/connectionpools.tidepool.dev --timeout=30s >/dev/null
kubectl apply --server-side -f - >/dev/null <<YAML
apiVersion: v1
kind: Node
metadata: {name: demo-node}
---
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Service
metadata: {name: payments-grpc, namespace: shop}
spec:
  ports: [{name: grpc, port: 50051, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: payments-grpc-demo
  namespace: shop
  labels: {kubernetes.io/service-name: payments-grpc}
addressType: IPv4
ports: [{name: grpc, port: 50051, protocol: TCP}]
endpoints:
  - addresses: [192.0.2.2]
    conditions: {ready: true}
  - addresses: [192.0.2.3]
    conditions: {ready: true}
YAML

# The agent's identity, as a cluster gives it: a ServiceAccount, a Pod of
# it on demo-node (no kubelet runs here; the API server binds tokens to the
# Pod all the same), and a token bound to that Pod with the control
# audience. The operator reviews it and serves TLS from its own CA.
kubectl apply --server-side -f - >/dev/null <<YAML
apiVersion: v1
kind: ServiceAccount
metadata: {name: tidepool-agent, namespace: default}
---
apiVersion: v1
kind: Pod
metadata: {name: demo-agent, namespace: default}
spec:
  nodeName: demo-node
  serviceAccountName: tidepool-agent
  automountServiceAccountToken: false
  containers: [{name: agent, image: tidepool-agent:demo}]
YAML
kubectl create token tidepool-agent -n default --audience control.tidepool.dev \
  --bound-object-kind Pod --bound-object-name demo-agent --duration 1h >"$dir/agent-token"

say "starting the operator, the agent and two backends"
start operator "$target/tidepool-operator" --control-listen "$OPERATOR_CONTROL" --admin-listen "$OPERATOR_ADMIN" \
  --lease-namespace default --identity demo-operator --endpoint-address-map 192.0.2.0/24=127.0.0.0/24 \
  --agent-service-account default/tidepool-agent --control-dns-names tidepool-operator.default.svc
for _ in $(seq 1 60); do
  kubectl get configmap tidepool-control-ca -n default -o jsonpath='{.data.ca\.crt}' >"$dir/ca.crt" 2>/dev/null && [ -s "$dir/ca.crt" ] && break
  sleep 0.5
done
[ -s "$dir/ca.crt" ] || { say "the operator did not publish its CA; see $dir/operator.log"; exit 1; }
for b in "${BACKENDS[@]}"; do start "backend-${b%%:*}" "$target/tidepool-demo" backend --listen "$b"; done
start agent "$target/tidepool-agent" --operator "https://$OPERATOR_CONTROL" --node-name demo-node --pod-name demo-agent \
  --operator-server-name tidepool-operator.default.svc --token-file "$dir/agent-token" --ca-file "$dir/ca.crt" \
  --listen "$AGENT_PROXY" --admin-listen "$AGENT_ADMIN"

say "kubectl apply -f examples/connectionpool.yaml"
kubectl apply -f examples/connectionpool.yaml

# Traffic starts once the agent runs the pool: before, the agent rightly
# refuses the authority, and those failures would only confuse the figures.
say "waiting until the pool is Ready, then starting the load client"
kubectl wait --for=condition=Ready connectionpool/payments -n shop --timeout=60s >/dev/null
start load "$target/tidepool-demo" load --agent "$AGENT_PROXY" --authority payments-grpc.shop

deadline=$(( $(date +%s) + ${TIDEPOOL_DEMO_SECONDS:-31536000} ))
while [ "$(date +%s)" -lt "$deadline" ]; do
  sleep 3
  for i in "${!pids[@]}"; do
    kill -0 "${pids[i]}" 2>/dev/null || { say "a demo process exited; its log:"; ls "$dir"; tail -n 20 "$dir"/*.log >&2; exit 1; }
  done
  {
    printf '\n\033[1m$ kubectl get connectionpools -n shop\033[0m   (Ctrl-C stops the demo)\n'
    kubectl get connectionpools -n shop
    printf '\n\033[1mper address\033[0m (status.addresses)\n'
    kubectl get connectionpools -n shop payments -o \
      jsonpath='{range .status.addresses[*]}  {.address}: connections={.connections} streams={.streams} busy={.busy} idle={.idle} nodes={.nodes}{"\n"}{end}'
    kubectl get connectionpools -n shop payments -o \
      jsonpath='{range .status.conditions[*]}  {.type}={.status} ({.reason}) {.message}{"\n"}{end}'
    printf '\n'; tail -n 1 "$dir/load.log"
  } || true
done
