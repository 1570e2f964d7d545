#!/usr/bin/env bash
# Makes sure a Docker engine answers on this machine. An engine that already
# runs is used as it is. Otherwise, on Debian as root, Debian's docker.io is
# installed when absent and dockerd is started in the background (there is
# no systemd here); it keeps running afterwards so its images stay for the
# next run. Its log and pid are in ~/.cache/tidepool/engine/.
set -euo pipefail
log_prefix=engine
. "${BASH_SOURCE[0]%/*}/lib.sh"

if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
  exit 0
fi

if ! command -v dockerd >/dev/null 2>&1; then
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    die "no Docker engine is running and dockerd is not installed, and this is not a Debian machine where I can install it as root; install Docker (Debian: apt-get install docker.io; elsewhere https://docs.docker.com/engine/install/), start it, and retry"
  fi
  apt_install docker.io
fi
need docker "the Docker CLI comes with docker.io (apt-get install docker.io)"

engine="$cache_dir/engine"
mkdir -p "$engine"
pidfile="$engine/dockerd.pid"
if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
  say "dockerd (pid $(cat "$pidfile")) is starting; waiting for it"
else
  args=(--pidfile "$pidfile"
    # Cluster traffic stays on this machine: no default bridge, no NAT
    # rules; kind makes its own network and publishes the API server on
    # 127.0.0.1 through docker-proxy.
    --bridge none --iptables=false --ip-masq=false
    --default-address-pool base=172.29.0.0/16,size=24)
  bounding=$(awk '$1 == "CapBnd:" { print $2 }' /proc/self/status)
  last=$(cat /proc/sys/kernel/cap_last_cap)
  if [ $(( ((1 << (last + 1)) - 1) & ~0x$bounding )) -ne 0 ]; then
    # Privileged containers (kind's nodes) need the wrapper here; see it.
    for cmd in jq capsh; do
      command -v $cmd >/dev/null 2>&1 || apt_install jq libcap2-bin
    done
    install -m 0755 "$kind_dir/runc-wrap" "$engine/runc-wrap"
    args+=(--add-runtime "tidepool-runc=$engine/runc-wrap" --default-runtime tidepool-runc)
    say "the capability bounding set lacks some of the kernel's capabilities: dockerd runs containers through $engine/runc-wrap"
  fi
  say "starting dockerd (log: $engine/dockerd.log)"
  # The daemon outlives this script: it must not inherit its open files (a
  # caller's lock, make's jobserver pipe), or it would hold them for ever.
  (
    for fd in /proc/self/fd/*; do
      n=${fd##*/}
      [ "$n" -gt 2 ] && eval "exec $n>&-" 2>/dev/null
    done
    exec setsid nohup dockerd "${args[@]}" >"$engine/dockerd.log" 2>&1 </dev/null
  ) &
fi
for _ in $(seq 1 60); do
  docker info >/dev/null 2>&1 && exit 0
  sleep 1
done
tail -n 20 "$engine/dockerd.log" >&2 || true
die "dockerd did not answer within 60 s; see $engine/dockerd.log"
