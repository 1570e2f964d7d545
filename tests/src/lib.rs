//! The e2e harness: a real kube-apiserver and etcd, kubectl, and helpers.
