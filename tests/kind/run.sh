#!/usr/bin/env bash
# run.sh e2e | up | down — what `make e2e-kind`, `make kind-up` and
# `make kind-down` run.
#
# e2e: a Docker engine (engine.sh), a new kind cluster KIND_CLUSTER
#   (default tidepool-e2e; one of that name already there is refused, unless
#   an earlier e2e run made it and was killed before deleting it), the
#   images (make images), then the scenarios on pods (e2e.sh). The cluster
#   and its node containers are deleted on exit, pass or fail; nothing this
#   run did not create is touched. Prints one summary line last:
#   "e2e-kind: N passed, M failed".
# up: the same cluster (default name tidepool) with tidepool installed by
#   helm, left running for a person; prints `export KUBECONFIG=...` last.
# down: deletes the cluster `up` made; says so when there is none.
set -euo pipefail
log_prefix=e2e-kind
. "${BASH_SOURCE[0]%/*}/lib.sh"
cd "$repo_dir"

mode=${1:-}
tag=${TAG:-e2e}
state="$repo_dir/.kind"
case $mode in
  e2e) name=${KIND_CLUSTER:-tidepool-e2e} ;;
  up | down) name=${KIND_CLUSTER:-tidepool} ;;
  *) die "usage: run.sh e2e | up | down" ;;
esac

if [ "$mode" = down ]; then
  if ! command -v docker >/dev/null 2>&1 || ! docker info >/dev/null 2>&1; then
    say "no Docker engine is running, so no kind cluster is; nothing to delete"
    rm -rf "$state"
    exit 0
  fi
  "$kind_dir/cluster.sh" down "$name"
  rm -rf "$state"
  exit 0
fi

t_start=$(date +%s)
"$kind_dir/engine.sh"
tools=$("$repo_dir/scripts/install-tools.sh")
export PATH="$tools:$PATH"
kind=$("$kind_dir/kind-bin.sh")
# An e2e run records itself as the owner of the cluster it makes: its pid and
# the pid's start time (so a reused pid is not taken for it). A cluster whose
# owner is gone was left by an e2e run that was killed before its cleanup ran
# (SIGKILL, a machine stop); the next e2e run deletes it. Any other cluster of
# the name, or one whose owner still runs, is left alone.
owners="$cache_dir/kind-owners"
owner_file="$owners/$name"
proc_start() { awk '{ print $22 }' "/proc/$1/stat" 2>/dev/null; }
owner_alive() {
  local pid start
  read -r pid start <"$owner_file" 2>/dev/null || return 1
  [ -n "$pid" ] && [ "$(proc_start "$pid")" = "$start" ]
}
if "$kind" get clusters 2>/dev/null | grep -qx "$name"; then
  if [ "$mode" = e2e ] && [ -f "$owner_file" ] && ! owner_alive; then
    say "a kind cluster named $name was left by an e2e run that ended without cleaning up (owner pid $(cut -d' ' -f1 "$owner_file") is gone); deleting it"
    "$kind" delete cluster --name "$name" >&2 || die "kind delete cluster --name $name failed; delete it by hand"
    rm -f "$owner_file"
  else
    die "a kind cluster named $name already exists; it was not made by this run, so it is left alone: delete it (make kind-down KIND_CLUSTER=$name, or kind delete cluster --name $name) or pick another name (KIND_CLUSTER=...)"
  fi
fi

if [ "$mode" = e2e ]; then
  work=$(mktemp -d)
  kubeconfig="$work/kubeconfig"
  results="$work/results"
  : >"$results"
  summary() {
    local passed failed
    passed=$(grep -c '^PASS ' "$results" 2>/dev/null || true)
    failed=$(grep -c '^FAIL ' "$results" 2>/dev/null || true)
    [ -n "${1:-}" ] && [ "$failed" = 0 ] && [ "$passed" = 0 ] && failed=1
    echo "e2e-kind: ${passed:-0} passed, ${failed:-0} failed$([ -n "${1:-}" ] && echo " ($1)") in $(($(date +%s) - t_start)) s"
  }
  # kind bind-mounts /lib/modules; Docker creates it, empty, when the host
  # has none. Remove it again if this run caused it.
  [ -e /lib/modules ] && had_modules=1 || had_modules=0
  cleanup() {
    local rc=$?
    # Only the cluster this run created (the name was free when it started).
    if [ "${created:-0}" = 1 ]; then
      say "deleting kind cluster $name"
      if "$kind" delete cluster --name "$name" >/dev/null 2>&1; then
        rm -f "$owner_file"
      else
        say "kind delete cluster --name $name failed; delete it by hand (or the next make e2e-kind will)"
      fi
    fi
    if [ "$had_modules" = 0 ] && [ -d /lib/modules ]; then rmdir /lib/modules 2>/dev/null || true; fi
    [ -n "${TIDEPOOL_KIND_KEEP_RESULTS:-}" ] && cp "$results" "$TIDEPOOL_KIND_KEEP_RESULTS" 2>/dev/null
    if [ "$rc" != 0 ] && ! grep -q . "$results"; then summary "stopped before the scenarios, exit $rc"; fi
    rm -rf "$work"
  }
  trap cleanup EXIT
else
  mkdir -p "$state"
  kubeconfig="$state/kubeconfig"
fi

t=$(date +%s)
"$kind_dir/node-image.sh" >/dev/null
say "node image ready in $(($(date +%s) - t)) s"
t=$(date +%s)
TAG=$tag "$repo_dir/scripts/images.sh" >&2
say "images built in $(($(date +%s) - t)) s"
created=1
if [ "$mode" = e2e ]; then
  mkdir -p "$owners"
  echo "$$ $(proc_start $$)" >"$owner_file"
fi
"$kind_dir/cluster.sh" up "$name" "$kubeconfig"
t=$(date +%s)
"$kind" load docker-image --name "$name" "tidepool-operator:$tag" "tidepool-agent:$tag" "tidepool-demo:$tag" >&2
say "images loaded into $name in $(($(date +%s) - t)) s"

if [ "$mode" = e2e ]; then
  rc=0
  "$kind_dir/e2e.sh" "$kubeconfig" "$tag" "$results" || rc=$?
  summary
  exit $rc
fi

helm install tidepool charts/tidepool --kubeconfig "$kubeconfig" --namespace tidepool-system --create-namespace \
  --set "operator.image.repository=tidepool-operator,operator.image.tag=$tag,operator.image.pullPolicy=Never" \
  --set "agent.image.repository=tidepool-agent,agent.image.tag=$tag,agent.image.pullPolicy=Never" \
  --wait --timeout 5m >&2
say "kind cluster $name is up with tidepool installed in $(($(date +%s) - t_start)) s; make kind-down deletes it"
say "the demo image tidepool-demo:$tag is loaded (tests/kind/manifests has a backend and clients)"
echo "export KUBECONFIG=$kubeconfig"
