#!/usr/bin/env bash
# Builds the kind node image for Kubernetes $k8s_version from registry
# packages only (Debian's archive and the Go module proxy), and prints its
# name: tidepool-kind-node:<version>-<key>, the key a hash of every pin and
# of this recipe (lib.sh node_key). An image of that name is complete: it is
# committed under a temporary name and tagged only when every step passed.
#
# Each piece is cached under ~/.cache/tidepool, keyed on its own pins, and
# built into a temporary directory that is renamed when done, so a build
# that was interrupted is never used:
#   kind-k8s-<key>/      kubelet kubeadm kubectl kube-controller-manager
#                        kube-scheduler kube-proxy pause (kube-apiserver and
#                        etcd come from tests/cluster/build.sh)
#   kind-coredns-<key>/  coredns (tests/kind/coredns)
#   kind-crictl-<ver>/   crictl
#   kind-rootfs-<key>.tar  the Debian root filesystem (debootstrap)
set -euo pipefail
log_prefix=node-image
. "${BASH_SOURCE[0]%/*}/lib.sh"

key=$(node_key)
image="tidepool-kind-node:$k8s_version-$key"
if docker image inspect "$image" >/dev/null 2>&1; then
  echo "$image"
  exit 0
fi
need go "the node image's Kubernetes binaries are built from Go modules; install Go 1.26 or later (https://go.dev/dl)"
need gcc "pause is compiled from Kubernetes' C source; install gcc (apt-get install gcc)"
[ "$(id -u)" = 0 ] || die "building the node image runs debootstrap, which needs root; run as root, or use an upstream image: TIDEPOOL_KIND_NODE_IMAGE=kindest/node:$k8s_version"
command -v debootstrap >/dev/null 2>&1 || apt_install debootstrap

# Whatever this run leaves half-built is removed when it exits.
scratch=()
local_images=()
cleanup() {
  rm -rf "${scratch[@]}"
  for img in "${local_images[@]}"; do docker rmi -f "$img" >/dev/null 2>&1 || true; done
}
trap cleanup EXIT
# scratch_dir PREFIX: sets tmp to a new temporary directory next to PREFIX.
scratch_dir() { tmp=$(mktemp -d "$1.tmp.XXXXXX"); scratch+=("$tmp"); }

started=$(date +%s)
say "building $image (the first build takes about half an hour on two cores; later builds reuse ~/.cache/tidepool)"
# timed NAME CMD...: runs CMD, logging how long it took.
timed() {
  local name=$1 t0
  shift
  t0=$(date +%s)
  "$@"
  say "$name: $(($(date +%s) - t0)) s"
}
# keyed NAME FILE...: a short hash of the files' contents.
keyed() { local name=$1; shift; echo "$name-$( (cat "$@"; echo "recipe=1") | sha256sum | cut -c1-16)"; }
# gobuild OUTDIR NAME LOG ARGS...: `go build ARGS -o OUTDIR/NAME`, failing
# with the end of its log.
gobuild() {
  local dir=$1 name=$2 log=$3
  shift 3
  if ! go build -trimpath -o "$dir/$name" "$@" >"$log" 2>&1; then
    tail -n 30 "$log" >&2
    die "building $name failed (the end of its log is above)"
  fi
}

# 1. etcd and kube-apiserver, shared with the process-based e2e.
cluster_bins=$(timed "etcd and kube-apiserver (tests/cluster/build.sh)" "$repo_dir/tests/cluster/build.sh")

# 2. The other Kubernetes binaries, from the same module graph and with the
# same version stamp as build.sh's kube-apiserver.
k8s_bins="$cache_dir/$(keyed kind-k8s "$repo_dir/tests/cluster/go.mod" "$repo_dir/tests/cluster/go.sum")"
if [ ! -d "$k8s_bins" ]; then
  scratch_dir "$k8s_bins"
  minor=${k8s_version#v1.}
  minor=${minor%%.*}
  v=k8s.io/component-base/version
  ldflags="-s -w -X $v.gitVersion=$k8s_version -X $v.gitMajor=1 -X $v.gitMinor=$minor -X $v.gitTreeState=clean -X $v.buildDate=1970-01-01T00:00:00Z"
  for cmd in kubelet kubeadm kubectl kube-controller-manager kube-scheduler kube-proxy; do
    (cd "$repo_dir/tests/cluster" &&
      timed "$cmd" gobuild "$tmp" "$cmd" "$tmp/$cmd.log" -ldflags "$ldflags" "k8s.io/kubernetes/cmd/$cmd")
  done
  src=$(cd "$repo_dir/tests/cluster" && go list -m -f '{{.Dir}}' k8s.io/kubernetes)
  gcc -Os -Wall -Werror -static -DVERSION="v$PAUSE_VERSION" -o "$tmp/pause" "$src/build/pause/linux/pause.c" ||
    die "compiling pause from $src/build/pause/linux/pause.c failed"
  rm -f "$tmp"/*.log
  mv "$tmp" "$k8s_bins"
fi

# 3. CoreDNS with kubeadm's plugins only, and crictl.
coredns_bin="$cache_dir/$(keyed kind-coredns "$kind_dir/coredns/go.mod" "$kind_dir/coredns/go.sum" "$kind_dir/coredns/main.go")"
if [ ! -d "$coredns_bin" ]; then
  scratch_dir "$coredns_bin"
  (cd "$kind_dir/coredns" && CGO_ENABLED=0 timed coredns gobuild "$tmp" coredns "$tmp/build.log" -ldflags "-s -w" .)
  rm -f "$tmp/build.log"
  mv "$tmp" "$coredns_bin"
fi
crictl_bin="$cache_dir/kind-crictl-$CRICTL_VERSION"
if [ ! -d "$crictl_bin" ]; then
  scratch_dir "$crictl_bin"
  GOBIN="$tmp" CGO_ENABLED=0 timed crictl go install -trimpath -ldflags "-s -w" "sigs.k8s.io/cri-tools/cmd/crictl@$CRICTL_VERSION" >&2 ||
    die "go install sigs.k8s.io/cri-tools/cmd/crictl@$CRICTL_VERSION failed"
  mv "$tmp" "$crictl_bin"
fi

# 4. The Debian root filesystem, from the mirror apt already uses.
mirror=${DEBIAN_MIRROR:-$(awk '/^URIs:/ && $2 ~ /\/debian\/?$/ { print $2; exit }' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)}
mirror=${mirror:-http://deb.debian.org/debian}
rootfs_tar="$cache_dir/kind-rootfs-$( (echo "$DEBIAN_SUITE $NODE_PACKAGES recipe=1") | sha256sum | cut -c1-16).tar"
if [ ! -f "$rootfs_tar" ]; then
  scratch_dir "$cache_dir/kind-rootfs"
  debootstrap_quietly() { debootstrap "$@" >"$tmp/debootstrap.log" 2>&1; }
  if ! timed "debootstrap $DEBIAN_SUITE" debootstrap_quietly --variant=minbase --include="$NODE_PACKAGES" \
    "$DEBIAN_SUITE" "$tmp/root" "$mirror"; then
    tail -n 20 "$tmp/debootstrap.log" >&2
    die "debootstrap $DEBIAN_SUITE from $mirror failed (set DEBIAN_MIRROR to another mirror); the end of its log is above"
  fi
  tar -C "$tmp/root" --numeric-owner -cf "$tmp/rootfs.tar" .
  mv "$tmp/rootfs.tar" "$rootfs_tar"
fi

# 5. The images kubeadm runs, built locally under tidepool.local/kind/...
# names (never the upstream names, so a user's pulled images are left alone);
# preload.sh renames them inside the node.
scratch_dir "$cache_dir/kind-node"
work=$tmp
base="tidepool.local/kind/rootfs:$key"
local_images+=("$base")
timed "docker import rootfs" docker import - "$base" <"$rootfs_tar" >/dev/null

# glibc: the libraries the control plane's binaries link (they are built on
# this host, with cgo), copied from this host, plus users and CA roots.
g="$work/glibc"
mkdir -p "$g/etc/ssl/certs" "$g/tmp"
for lib in $(ldd "$cluster_bins/kube-apiserver" "$cluster_bins/etcd" "$k8s_bins/kube-controller-manager" \
  "$k8s_bins/kube-scheduler" | awk '$1 ~ /^\// && $1 !~ /:$/ { print $1 } $3 ~ /^\// { print $3 }' | sort -u); do
  mkdir -p "$g${lib%/*}"
  cp -L "$lib" "$g$lib"
done
[ -e "$g/lib64/ld-linux-x86-64.so.2" ] || die "ldd found no libraries for the control plane binaries"
tar -C "$g/etc/ssl/certs" -xf "$rootfs_tar" --strip-components=4 ./etc/ssl/certs/ca-certificates.crt
printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/nonexistent:/sbin/nologin\n' >"$g/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' >"$g/etc/group"
chmod 1777 "$g/tmp"
glibc="tidepool.local/kind/glibc:$key"
local_images+=("$glibc")
tar -C "$g" --owner=0 --group=0 -c . | docker import - "$glibc" >/dev/null

# component TAG BASE BINARY: an image of BINARY at /usr/local/bin on BASE.
preload=()
component() {
  local upstream=$1 from=$2 bin=$3 name local_name ctx
  name=${upstream#registry.k8s.io/}
  name=${name%%:*}
  local_name="tidepool.local/kind/${name//\//-}:$key"
  ctx="$work/img-${name//\//-}"
  mkdir -p "$ctx"
  cp "$bin" "$ctx/"
  printf 'FROM %s\nCOPY %s /usr/local/bin/%s\nENTRYPOINT ["/usr/local/bin/%s"]\n' \
    "$from" "${bin##*/}" "${bin##*/}" "${bin##*/}" >"$ctx/Dockerfile"
  docker build -q -t "$local_name" "$ctx" >/dev/null 2>&1 || die "building the image $upstream failed"
  local_images+=("$local_name")
  preload+=("$local_name=$upstream")
}
component "registry.k8s.io/kube-apiserver:$k8s_version" "$glibc" "$cluster_bins/kube-apiserver"
component "registry.k8s.io/etcd:$ETCD_IMAGE_TAG" "$glibc" "$cluster_bins/etcd"
component "registry.k8s.io/kube-controller-manager:$k8s_version" "$glibc" "$k8s_bins/kube-controller-manager"
component "registry.k8s.io/kube-scheduler:$k8s_version" "$glibc" "$k8s_bins/kube-scheduler"
# kube-proxy programs iptables/nftables: it runs on the node's own rootfs.
component "registry.k8s.io/kube-proxy:$k8s_version" "$base" "$k8s_bins/kube-proxy"
component "registry.k8s.io/coredns/coredns:$COREDNS_IMAGE_TAG" scratch "$coredns_bin/coredns"
component "registry.k8s.io/pause:$PAUSE_VERSION" scratch "$k8s_bins/pause"

# 6. The node: kind's base-image files from its module, patched for
# Debian's containerd (/usr/bin), this pause version, a host without
# CAP_SYS_RESOURCE (restrict_oom_score_adj, as kind does for rootless
# nodes) and a cgroup v1 host (kubelet v1.36 refuses it by default).
kind_src=$(cd "$repo_dir/tests/cluster" && GOFLAGS=-mod=mod go mod download -json "sigs.k8s.io/kind@$KIND_VERSION" | jq -r .Dir)
[ -d "$kind_src/images/base/files" ] || die "kind $KIND_VERSION's module has no images/base/files (looked in $kind_src)"
ctx="$work/node"
mkdir -p "$ctx/bin"
cp -r "$kind_src/images/base/files" "$ctx/files"
chmod -R u+w "$ctx/files"
rm -rf "$ctx/files/LICENSES"
conf="$ctx/files/etc/containerd/config.toml"
sed -i "s#sandbox_image = \"registry.k8s.io/pause:[^\"]*\"#sandbox_image = \"registry.k8s.io/pause:$PAUSE_VERSION\"#; s#restrict_oom_score_adj = false#restrict_oom_score_adj = true#" "$conf"
grep -q "pause:$PAUSE_VERSION" "$conf" && grep -q 'restrict_oom_score_adj = true' "$conf" ||
  die "kind $KIND_VERSION's containerd config.toml changed shape; update the patch in $0"
sed -i 's#^ExecStart=/usr/local/bin/containerd#ExecStart=/usr/bin/containerd#' "$ctx/files/etc/systemd/system/containerd.service"
echo 'KUBELET_EXTRA_ARGS=--runtime-cgroups=/system.slice/containerd.service --fail-cgroupv1=false' >"$ctx/files/etc/default/kubelet"
mkdir -p "$ctx/files/kind/manifests"
cp "$kind_dir/node/default-cni.yaml" "$ctx/files/kind/manifests/default-cni.yaml"
printf '%s' "$k8s_version" >"$ctx/files/kind/version"
cp "$k8s_bins/kubelet" "$k8s_bins/kubeadm" "$k8s_bins/kubectl" "$crictl_bin/crictl" "$ctx/bin/"
cp "$kind_dir/node/Dockerfile" "$ctx/Dockerfile"
stage="tidepool.local/kind/node-stage:$key"
local_images+=("$stage")
timed "node stage image" docker build -q --build-arg ROOTFS="$base" --label dev.tidepool.kind.network=static-routes \
  -t "$stage" "$ctx" >/dev/null || die "building the node stage image failed (docker build $ctx)"

# 7. Preload the component images and commit, under a temporary name first.
partial="tidepool-kind-node:$k8s_version-$key-partial"
local_images+=("$partial")
timed "preload" "$kind_dir/node/preload.sh" "$stage" "$partial" "${preload[@]}"
docker tag "$partial" "$image"
say "built $image in $(($(date +%s) - started)) s"
echo "$image"
