//! The replica's role on its own pod: label `tidepool.dev/role` is `leader`
//! on the replica that holds the Lease and `standby` on the others.
//!
//! Why: every replica that has read the pools is ready (`/readyz` is 200 on
//! a warm standby, so a Deployment of two replicas is Available 2/2 and a
//! rollout can wait for it), so readiness cannot be what keeps agents off
//! a standby. The chart's control Service selects `tidepool.dev/role:
//! leader` as well, so it routes agents to the leader only; on a failover
//! the new leader labels itself and the Service follows within the
//! endpoint controller's delay. A standby that is reached anyway (a stale
//! label, a connection made before a change) still refuses the control
//! stream with UNAVAILABLE, and the agent redials.
//!
//! Each replica writes only its own pod's label: at start (so a restarted
//! container drops a label from its previous reign) and whenever its role
//! changes, retrying until the write lands.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The label the chart's control Service selects on.
pub const ROLE_LABEL: &str = "tidepool.dev/role";

/// The label's value for a role.
pub fn role(leading: bool) -> &'static str {
    if leading { "leader" } else { "standby" }
}

/// The merge patch that sets this replica's role label.
pub fn patch(leading: bool) -> serde_json::Value {
    serde_json::json!({ "metadata": { "labels": { ROLE_LABEL: role(leading) } } })
}

/// Keeps pod `namespace/name`'s role label equal to `leading` until `stop`.
pub async fn run(
    client: kube::Client,
    namespace: String,
    name: String,
    mut leading: watch::Receiver<bool>,
    stop: CancellationToken,
) {
    let pods: Api<Pod> = Api::namespaced(client, &namespace);
    loop {
        let now = *leading.borrow_and_update();
        match pods
            .patch(&name, &PatchParams::default(), &Patch::Merge(patch(now)))
            .await
        {
            Ok(_) => {
                tracing::info!(pod = %name, role = role(now), "labelled this replica's pod with its role");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    changed = leading.changed() => if changed.is_err() { return },
                }
            }
            Err(error) => {
                tracing::warn!(pod = %name, role = role(now), %error, "labelling this replica's pod failed; retrying");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    // A change while waiting is written at once.
                    changed = leading.changed() => if changed.is_err() { return },
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_patch_labels_the_role() {
        assert_eq!(
            patch(true),
            serde_json::json!({"metadata": {"labels": {"tidepool.dev/role": "leader"}}})
        );
        assert_eq!(patch(false)["metadata"]["labels"][ROLE_LABEL], "standby");
    }
}
