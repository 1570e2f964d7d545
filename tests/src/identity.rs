//! Agent identities as a cluster gives them: a ServiceAccount, a Pod of it
//! bound to a node, and a token from the TokenRequest API bound to that
//! Pod, with the control audience. The local control plane has no kubelet,
//! so the Pod never runs; the API server binds tokens to it all the same
//! (and puts its node in them).

use anyhow::{Context as _, Result};
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::api::{Api, Patch, PatchParams, PostParams};

/// The audience agents' tokens are for (the chart's default).
pub const AUDIENCE: &str = "control.tidepool.dev";

/// The ServiceAccount the e2e operators accept.
pub const AGENT_SA: &str = "tidepool-agent";

const MANAGER: &str = "tidepool-e2e";

/// Creates (or updates) ServiceAccount `name` in `ns`.
pub async fn apply_service_account(client: &kube::Client, ns: &str, name: &str) -> Result<()> {
    let sa = serde_json::json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": ns}});
    Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .patch(
            name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&sa),
        )
        .await
        .with_context(|| format!("applying ServiceAccount {ns}/{name} failed"))?;
    Ok(())
}

/// Creates (or updates) Pod `name` of ServiceAccount `sa` on node `node`;
/// returns its UID.
pub async fn apply_pod(
    client: &kube::Client,
    ns: &str,
    name: &str,
    sa: &str,
    node: &str,
) -> Result<String> {
    let pod = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "nodeName": node,
            "serviceAccountName": sa,
            "automountServiceAccountToken": false,
            "containers": [{"name": "agent", "image": "tidepool-agent:e2e"}],
        },
    });
    let pod = Api::<Pod>::namespaced(client.clone(), ns)
        .patch(
            name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&pod),
        )
        .await
        .with_context(|| format!("applying Pod {ns}/{name} failed"))?;
    pod.metadata.uid.context("a Pod without a UID")
}

/// A token of `sa` for `audience` (empty: the API server's own), bound to
/// Pod `pod` (with its UID) when given, else unbound; valid for `seconds`
/// (at least 600, the API server's minimum).
pub async fn token(
    client: &kube::Client,
    ns: &str,
    sa: &str,
    audience: &str,
    pod: Option<(&str, &str)>,
    seconds: i64,
) -> Result<String> {
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: if audience.is_empty() {
                vec![]
            } else {
                vec![audience.into()]
            },
            bound_object_ref: pod.map(|(name, uid)| BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(name.into()),
                uid: Some(uid.into()),
            }),
            expiration_seconds: Some(seconds),
        },
        ..TokenRequest::default()
    };
    let answer = Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .create_token_request(sa, &PostParams::default(), &request)
        .await
        .with_context(|| format!("TokenRequest for {ns}/{sa} failed"))?;
    answer
        .status
        .map(|s| s.token)
        .context("a TokenRequest without a token")
}

/// The token an agent on `node` has: ServiceAccount `sa`'s, bound to a Pod
/// `agent-<node>` on `node`, for the control audience.
pub async fn agent_token(client: &kube::Client, ns: &str, sa: &str, node: &str) -> Result<String> {
    let pod = format!("agent-{node}");
    let uid = apply_pod(client, ns, &pod, sa, node).await?;
    token(client, ns, sa, AUDIENCE, Some((&pod, &uid)), 3600).await
}
