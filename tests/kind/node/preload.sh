#!/usr/bin/env bash
# preload.sh STAGE OUT LOCAL=NAME...: runs the node stage image, imports
# each local Docker image LOCAL (named with a registry host, so containerd
# keeps the name as it is) into its containerd (namespace k8s.io) under
# the upstream NAME kubeadm asks for, and commits the result as OUT. This is
# the step `kind build node-image` does with `ctr content fetch`, which
# cannot run without a registry.
set -euo pipefail
stage=$1 out=$2
shift 2
c=tidepool-kind-preload-$$
cleanup() { docker rm -f "$c" >/dev/null 2>&1 || true; }
trap cleanup EXIT
docker run -d --name "$c" --privileged --entrypoint sleep "$stage" infinity >/dev/null
docker exec "$c" sh -c 'nohup containerd >/tmp/containerd.log 2>&1 & echo $! >/tmp/containerd.pid'
for _ in $(seq 1 30); do
  docker exec "$c" ctr version >/dev/null 2>&1 && break
  sleep 1
done
docker exec "$c" ctr version >/dev/null || { docker exec "$c" cat /tmp/containerd.log >&2; echo "preload: containerd did not start in the node image" >&2; exit 1; }
for pair in "$@"; do
  local_name=${pair%%=*} name=${pair#*=}
  docker save "$local_name" | docker exec -i "$c" ctr -n k8s.io images import --no-unpack --digests - >/dev/null
  docker exec "$c" ctr -n k8s.io images tag --force "$local_name" "$name" >/dev/null
  docker exec "$c" ctr -n k8s.io images rm "$local_name" >/dev/null
  echo "preload: $name" >&2
done
# Stop containerd cleanly (its metadata database must be closed), then
# commit with the node's entrypoint back in place. Its parent is `sleep`,
# which reaps nobody: a stopped containerd stays a zombie (state Z).
docker exec "$c" sh -c 'p=$(cat /tmp/containerd.pid); kill "$p"
  for _ in $(seq 1 60); do
    state=$(awk "{ print \$3 }" "/proc/$p/stat" 2>/dev/null || true)
    [ -z "$state" ] || [ "$state" = Z ] && exit 0
    sleep 0.5
  done
  exit 1' || { echo "preload: containerd in the node image did not stop within 30 s" >&2; exit 1; }
docker exec "$c" rm -f /tmp/containerd.log /tmp/containerd.pid
docker commit --change 'ENTRYPOINT ["/usr/local/bin/entrypoint", "/sbin/init"]' --change 'CMD []' "$c" "$out" >/dev/null
