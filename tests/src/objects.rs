//! The Kubernetes objects a local control plane lacks controllers for, made
//! by the tests themselves: Nodes, Services, EndpointSlices, and Pods with
//! the node and IP a scheduler and kubelet would have given them.

use anyhow::{Context as _, Result};
use k8s_openapi::api::core::v1::{Node, Pod, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, Patch, PatchParams};

/// The field manager of objects the tests apply.
const MANAGER: &str = "tidepool-e2e";

/// Creates or updates a Node named `name` with `labels`.
pub async fn apply_node(client: &kube::Client, name: &str, labels: &[(&str, &str)]) -> Result<()> {
    let labels: serde_json::Map<String, serde_json::Value> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
        .collect();
    let node = serde_json::json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}});
    Api::<Node>::all(client.clone())
        .patch(
            name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&node),
        )
        .await
        .with_context(|| format!("applying node {name} failed"))?;
    Ok(())
}

/// Deletes a Node.
pub async fn delete_node(client: &kube::Client, name: &str) -> Result<()> {
    Api::<Node>::all(client.clone())
        .delete(name, &DeleteParams::default())
        .await?;
    Ok(())
}

/// Creates or updates a selector-less Service with `ports` (name, port).
pub async fn apply_service(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    ports: &[(&str, i32)],
) -> Result<()> {
    let ports: Vec<serde_json::Value> = ports
        .iter()
        .map(|(n, p)| serde_json::json!({"name": n, "port": p, "protocol": "TCP"}))
        .collect();
    let svc = serde_json::json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"ports": ports}
    });
    Api::<Service>::namespaced(client.clone(), namespace)
        .patch(
            name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&svc),
        )
        .await
        .with_context(|| format!("applying service {namespace}/{name} failed"))?;
    Ok(())
}

/// Creates or updates EndpointSlice `slice` of Service `service`: one port
/// named `port_name` with number `port`, and `endpoints` (IPv4, ready or not).
pub async fn apply_slice(
    client: &kube::Client,
    namespace: &str,
    service: &str,
    slice: &str,
    port_name: &str,
    port: u16,
    endpoints: &[(&str, bool)],
) -> Result<()> {
    let endpoints: Vec<serde_json::Value> = endpoints
        .iter()
        .map(|(ip, ready)| serde_json::json!({"addresses": [ip], "conditions": {"ready": ready}}))
        .collect();
    let obj = serde_json::json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": slice, "namespace": namespace, "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": port_name, "port": port, "protocol": "TCP"}],
        "endpoints": endpoints
    });
    Api::<EndpointSlice>::namespaced(client.clone(), namespace)
        .patch(
            slice,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&obj),
        )
        .await
        .with_context(|| format!("applying endpointslice {namespace}/{slice} failed"))?;
    Ok(())
}

/// Creates or updates Pod `name` on `node` and writes its status as a
/// kubelet would: `Running` with `ip` as its pod IP. No container runs. The
/// namespace's `default` ServiceAccount, which pods need, is made if
/// missing (no controller makes it here).
pub async fn apply_pod(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    node: &str,
    ip: &str,
) -> Result<()> {
    apply_pod_with(client, namespace, name, node, ip, &PodExtras::default()).await
}

/// What [`apply_pod_with`] adds to a plain pod.
#[derive(Debug, Clone, Default)]
pub struct PodExtras<'a> {
    /// Labels.
    pub labels: &'a [(&'a str, &'a str)],
    /// The `Ready` condition the kubelet would write, if any.
    pub ready: Option<bool>,
    /// Finalizers (a deleted pod with one stays, terminating).
    pub finalizers: &'a [&'a str],
}

/// [`apply_pod`] with labels, a Ready condition and finalizers.
pub async fn apply_pod_with(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    node: &str,
    ip: &str,
    extras: &PodExtras<'_>,
) -> Result<()> {
    let sa = serde_json::json!({
        "apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": "default", "namespace": namespace}
    });
    Api::<ServiceAccount>::namespaced(client.clone(), namespace)
        .patch(
            "default",
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&sa),
        )
        .await
        .with_context(|| format!("applying serviceaccount {namespace}/default failed"))?;
    let pod = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": extras.labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<std::collections::BTreeMap<_, _>>(),
            "finalizers": extras.finalizers,
        },
        "spec": {
            "nodeName": node,
            "automountServiceAccountToken": false,
            "containers": [{"name": "app", "image": "example.invalid/app:1"}]
        }
    });
    let pods = Api::<Pod>::namespaced(client.clone(), namespace);
    pods.patch(
        name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&pod),
    )
    .await
    .with_context(|| format!("applying pod {namespace}/{name} failed"))?;
    let status = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "status": {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "conditions": extras.ready.map(|r| vec![serde_json::json!({
                "type": "Ready",
                "status": if r { "True" } else { "False" },
            })]).unwrap_or_default(),
        }
    });
    pods.patch_status(
        name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&status),
    )
    .await
    .with_context(|| format!("writing the status of pod {namespace}/{name} failed"))?;
    Ok(())
}

/// Deletes a Pod at once (no kubelet would finish a graceful deletion).
pub async fn delete_pod(client: &kube::Client, namespace: &str, name: &str) -> Result<()> {
    Api::<Pod>::namespaced(client.clone(), namespace)
        .delete(name, &DeleteParams::default().grace_period(0))
        .await?;
    Ok(())
}

/// Deletes an EndpointSlice.
pub async fn delete_slice(client: &kube::Client, namespace: &str, slice: &str) -> Result<()> {
    Api::<EndpointSlice>::namespaced(client.clone(), namespace)
        .delete(slice, &DeleteParams::default())
        .await?;
    Ok(())
}
