#!/usr/bin/env bash
# cluster.sh up NAME KUBECONFIG | down NAME
#
# up: creates kind cluster NAME (one control plane, two workers) on the node
# image (node-image.sh builds it; TIDEPOOL_KIND_NODE_IMAGE names another,
# such as kindest/node:v1.36.3 for a user with a registry), writes its
# kubeconfig to KUBECONFIG, sets up the pod network when the image asks for
# it, and waits until every node is Ready and CoreDNS is available. A
# cluster of that name that already exists is refused, never reused.
# down: deletes cluster NAME; says so when there is none.
#
# The pod network of this project's node image (label
# dev.tidepool.kind.network=static-routes) is what kindnet sets up, done
# from here: each node gets a ptp + host-local + portmap CNI config for its
# own spec.podCIDR, and a route to every other node's pod range through
# that node's address on kind's Docker network. ptp (a veth per pod, routed
# by the node) rather than a bridge, so a pod reaching a Service or a
# hostPort served on its own node is answered through the node's conntrack.
set -euo pipefail
log_prefix=kind-cluster
. "${BASH_SOURCE[0]%/*}/lib.sh"

cmd=${1:-}
name=${2:-}
[ -n "$name" ] || die "usage: cluster.sh up NAME KUBECONFIG | down NAME"
kind=$("$kind_dir/kind-bin.sh")

exists() { "$kind" get clusters 2>/dev/null | grep -qx "$1"; }

case $cmd in
  down)
    if ! exists "$name"; then
      say "no kind cluster named $name is running; nothing to delete"
      exit 0
    fi
    "$kind" delete cluster --name "$name" >&2
    exit 0
    ;;
  up) ;;
  *) die "usage: cluster.sh up NAME KUBECONFIG | down NAME (got $cmd)" ;;
esac

kubeconfig=${3:-}
[ -n "$kubeconfig" ] || die "usage: cluster.sh up NAME KUBECONFIG"
if exists "$name"; then
  die "a kind cluster named $name already exists; it was not made by this run, so it is left alone: delete it (make kind-down KIND_CLUSTER=$name) or pick another name (KIND_CLUSTER=...)"
fi
image=${TIDEPOOL_KIND_NODE_IMAGE:-$("$kind_dir/node-image.sh")}
tools=$("$repo_dir/scripts/install-tools.sh")
kubectl() { "$tools/kubectl" --kubeconfig "$kubeconfig" "$@"; }

config=$(mktemp)
trap 'rm -f "$config"' EXIT
cat >"$config" <<YAML
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
networking:
  apiServerAddress: 127.0.0.1
  podSubnet: 10.244.0.0/16
  serviceSubnet: 10.96.0.0/16
nodes:
  - role: control-plane
  - role: worker
  - role: worker
YAML
t0=$(date +%s)
say "creating kind cluster $name on $image (1 control plane, 2 workers)"
# No --wait: with this project's image, nodes are Ready only once the pod
# network below is in place.
"$kind" create cluster --name "$name" --image "$image" --config "$config" --kubeconfig "$kubeconfig" >&2 ||
  die "kind create cluster --name $name failed (its messages are above); kind delete cluster --name $name removes what it left"
say "kind create cluster: $(($(date +%s) - t0)) s"

network=$(docker image inspect -f '{{ index .Config.Labels "dev.tidepool.kind.network" }}' "$image" 2>/dev/null || true)
if [ "$network" = static-routes ]; then
  nodes=$("$kind" get nodes --name "$name")
  declare -A cidr ip
  for node in $nodes; do
    for _ in $(seq 1 120); do
      cidr[$node]=$(kubectl get node "$node" -o jsonpath='{.spec.podCIDR}' 2>/dev/null || true)
      [ -n "${cidr[$node]}" ] && break
      sleep 1
    done
    [ -n "${cidr[$node]}" ] || die "node $node got no spec.podCIDR within 120 s (kube-controller-manager allocates them; see kubectl -n kube-system logs)"
    ip[$node]=$(docker inspect -f '{{ range .NetworkSettings.Networks }}{{ .IPAddress }}{{ end }}' "$node")
  done
  for node in $nodes; do
    docker exec -i "$node" sh -c 'cat >/etc/cni/net.d/10-tidepool-ptp.conflist' <<JSON
{
  "cniVersion": "1.0.0",
  "name": "tidepool-kind",
  "plugins": [
    {
      "type": "ptp",
      "ipMasq": false,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "${cidr[$node]}"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
JSON
    for other in $nodes; do
      [ "$other" = "$node" ] && continue
      docker exec "$node" ip route replace "${cidr[$other]}" via "${ip[$other]}"
    done
    say "pod network on $node: ${cidr[$node]} (node address ${ip[$node]})"
  done
fi

kubectl wait --for=condition=Ready nodes --all --timeout=180s >&2 ||
  die "the nodes of $name were not Ready within 180 s (kubectl describe nodes says why)"
kubectl -n kube-system rollout status deployment/coredns --timeout=180s >&2 ||
  die "CoreDNS in $name did not become available within 180 s"
say "cluster $name is up in $(($(date +%s) - t0)) s"
