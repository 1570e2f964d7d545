//! The e2e harness: the cluster the tests run against (a real kube-apiserver
//! and etcd by default), the real kubectl, a namespace per test, and the
//! setup the scenarios share ([`setup`]).

pub mod cluster;
pub mod grpc;
pub mod helm;
pub mod identity;
pub mod kubectl;
pub mod namespace;
pub mod objects;
pub mod procs;
pub mod setup;

pub use cluster::{Cluster, cluster, repo_root};
pub use kubectl::{Output, kubectl, kubectl_stdin};
pub use namespace::{TestNamespace, ensure_crd};
