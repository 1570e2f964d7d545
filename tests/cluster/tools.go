//go:build tools

// Package tools pins the programs built from these modules: the real etcd
// and kube-apiserver of the e2e control plane (build.sh), and the other
// Kubernetes components of the kind node image (tests/kind/node-image.sh).
// One module graph builds both, so the two clusters run the same versions.
package tools

import (
	_ "go.etcd.io/etcd/server/v3"
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubeadm"
	_ "k8s.io/kubernetes/cmd/kubectl"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
