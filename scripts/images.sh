#!/usr/bin/env bash
# make images: builds tidepool-operator:$TAG, tidepool-agent:$TAG and
# tidepool-demo:$TAG without pulling any image. The static binaries are built
# on this host (scripts/release.sh --demo) and each is copied alone into a
# FROM-scratch image by its Dockerfile's `prebuilt` stage; the Dockerfiles'
# default stages build the same images from source for users with a
# registry. Prints each image's name and size.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
tag=${TAG:-dev}
command -v docker >/dev/null 2>&1 ||
  { echo "images: the docker command is not installed; install Docker (Debian: apt-get install docker.io), or run tests/kind/engine.sh, which installs and starts it" >&2; exit 1; }
docker info >/dev/null 2>&1 ||
  { echo "images: no Docker engine answers (docker info failed); start it, or run tests/kind/engine.sh" >&2; exit 1; }

mapfile -t bins < <(scripts/release.sh --demo)
scripts/check-static.sh tidepool-operator tidepool-agent tidepool-demo >&2
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
for pair in tidepool-operator:operator/Dockerfile tidepool-agent:agent/Dockerfile tidepool-demo:tests/demo.Dockerfile; do
  name=${pair%%:*} dockerfile=${pair#*:}
  rm -f "$ctx"/*
  for b in "${bins[@]}"; do [ "${b##*/}" = "$name" ] && cp "$b" "$ctx/$name"; done
  [ -f "$ctx/$name" ] || { echo "images: scripts/release.sh did not build $name" >&2; exit 1; }
  docker build -q -f "$dockerfile" --target prebuilt -t "$name:$tag" "$ctx" >/dev/null
  echo "$name:$tag $(docker image inspect -f '{{.Size}}' "$name:$tag" | awk '{ printf "%.1f MB", $1 / 1e6 }')"
done
