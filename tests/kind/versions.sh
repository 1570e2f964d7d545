# Pins of everything the kind path builds or installs, sourced by the
# scripts beside it. The Kubernetes, etcd and their dependencies' pins are
# tests/cluster/go.mod and go.sum; CoreDNS's are coredns/go.mod and go.sum.
# Changing any pin here (or those files, or the node image recipe) changes
# the cache key, so the node image is rebuilt.

# kind, installed with `go install`; its node-image files come from the same
# module zip.
KIND_VERSION=v0.33.0
# crictl, on the node's PATH (kind's scripts and kubeadm use it).
CRICTL_VERSION=v1.36.0
# The images kubeadm v1.36.3 asks for, under their upstream names
# (`kubeadm config images list`); each is built here.
ETCD_IMAGE_TAG=3.6.8-0
COREDNS_IMAGE_TAG=v1.14.2
PAUSE_VERSION=3.10.2
# The node's root filesystem: Debian bookworm (systemd 252 still runs on a
# cgroup v1 host) with Debian's containerd, runc and CNI plugins.
DEBIAN_SUITE=bookworm
NODE_PACKAGES=systemd,systemd-sysv,dbus,conntrack,iptables,nftables,iproute2,ethtool,util-linux,mount,kmod,libseccomp2,pigz,e2fsprogs,bash,ca-certificates,curl,jq,procps,containerd,runc,containernetworking-plugins,fuse-overlayfs
