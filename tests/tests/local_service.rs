//! Node-local Services on the local control plane: the operator process
//! creates and keeps a pool's Service and EndpointSlices from agent Pod
//! objects, refuses a name it does not own, and removes what no pool asks
//! for. (Routing through kube-proxy needs real nodes: the kind scenarios
//! `local` and `surge` cover it.)
#![allow(clippy::disallowed_types)] // std::time::Instant: wall-clock deadlines against real processes.

use std::time::Duration;

use anyhow::{Context as _, Result};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use tidepool_crds::ConnectionPool;
use tidepool_e2e::objects::{PodExtras, apply_pod_with, apply_service};
use tidepool_e2e::procs::{Operator, OperatorOptions, eventually};
use tidepool_e2e::setup;
use tidepool_e2e::{kubectl, kubectl_stdin};

const WAIT: Duration = Duration::from_secs(30);

/// Namespace, three nodes, an operator that lists agent pods labelled
/// `app=agent` in the namespace.
struct World {
    ns: String,
    client: kube::Client,
    _operator: Operator,
}

impl World {
    async fn new(prefix: &str) -> Result<Self> {
        let (ns, client) = setup::world(prefix, 3).await?;
        let mut options = OperatorOptions::new(&ns);
        options.extra = vec![
            "--agent-selector".into(),
            "app=agent".into(),
            "--agent-namespace".into(),
            ns.clone(),
        ];
        let operator = Operator::start(&options).await?;
        Ok(Self {
            ns,
            client,
            _operator: operator,
        })
    }

    fn node(&self, n: u8) -> String {
        setup::node(&self.ns, n)
    }

    /// Agent pod `agent-<n>` on node n at 10.9.0.<n>.
    async fn agent(&self, n: u8, ready: bool, finalizers: &[&str]) -> Result<()> {
        apply_pod_with(
            &self.client,
            &self.ns,
            &format!("agent-{n}"),
            &self.node(n),
            &format!("10.9.0.{n}"),
            &PodExtras {
                labels: &[("app", "agent")],
                ready: Some(ready),
                finalizers,
            },
        )
        .await
    }

    async fn apply_pool(&self, name: &str, extra: &str) -> Result<()> {
        let manifest = format!(
            "apiVersion: tidepool.dev/v1alpha1\nkind: ConnectionPool\nmetadata: {{name: {name}}}\nspec:\n  target: {{addresses: ['127.0.0.1:9']}}\n  listenPort: 16001\n{extra}"
        );
        let out = kubectl_stdin(&["apply", "-n", &self.ns, "-f", "-"], Some(&manifest)).await?;
        anyhow::ensure!(out.success, "apply {name}: {}", out.stderr);
        Ok(())
    }

    async fn service(&self, name: &str) -> Option<Service> {
        Api::<Service>::namespaced(self.client.clone(), &self.ns)
            .get_opt(name)
            .await
            .ok()
            .flatten()
    }

    /// The slices of Service `name`: (address, node, ready, serving,
    /// terminating) sorted.
    async fn endpoints(&self, name: &str) -> Result<Vec<(String, String, bool, bool, bool)>> {
        let slices = Api::<EndpointSlice>::namespaced(self.client.clone(), &self.ns)
            .list(&ListParams::default().labels(&format!("kubernetes.io/service-name={name}")))
            .await?;
        let mut out = Vec::new();
        for s in slices {
            for e in s.endpoints {
                let c = e.conditions.unwrap_or_default();
                out.push((
                    e.addresses.join(","),
                    e.node_name.unwrap_or_default(),
                    c.ready.unwrap_or(false),
                    c.serving.unwrap_or(false),
                    c.terminating.unwrap_or(false),
                ));
            }
        }
        out.sort();
        Ok(out)
    }

    /// The pool's LocalService condition: (status, reason, message).
    async fn local_condition(&self, pool: &str) -> Option<(String, String, String)> {
        let p = Api::<ConnectionPool>::namespaced(self.client.clone(), &self.ns)
            .get(pool)
            .await
            .ok()?;
        p.status?
            .conditions
            .into_iter()
            .find(|c| c.type_ == "LocalService")
            .map(|c| (c.status, c.reason, c.message))
    }
}

#[tokio::test]
async fn a_pool_gets_a_node_local_service_that_follows_its_agents() -> Result<()> {
    let w = World::new("local-svc").await?;
    for n in 1..=3 {
        w.agent(n, true, &["tidepool.dev/e2e-hold"]).await?;
    }
    w.apply_pool(
        "payments",
        "  nodeLocalService: {name: payments-pooled, port: 50051}\n",
    )
    .await?;

    // The Service: no selector, local traffic only, port → listenPort,
    // owned by the pool.
    let svc = eventually(WAIT, "the node-local Service exists", || async {
        w.service("payments-pooled").await
    })
    .await?;
    let spec = svc.spec.clone().context("spec")?;
    assert_eq!(spec.internal_traffic_policy.as_deref(), Some("Local"));
    assert!(spec.selector.unwrap_or_default().is_empty());
    let port = &spec.ports.context("ports")?[0];
    assert_eq!(port.port, 50051);
    assert_eq!(
        port.target_port,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(16001))
    );
    let owner = &svc.metadata.owner_references.clone().context("owner")?[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str()),
        ("ConnectionPool", "payments")
    );
    assert_eq!(owner.controller, Some(true));

    // Its slice lists every agent on its node.
    let all_ready: Vec<_> = (1..=3)
        .map(|n| (format!("10.9.0.{n}"), w.node(n), true, true, false))
        .collect();
    eventually(WAIT, "the slice lists the three agents", || async {
        (w.endpoints("payments-pooled").await.ok()? == all_ready).then_some(())
    })
    .await?;
    let (status, reason, message) = eventually(WAIT, "LocalService is True", || async {
        w.local_condition("payments")
            .await
            .filter(|c| c.0 == "True")
    })
    .await?;
    assert_eq!(reason, "Serving");
    assert!(
        message.contains("payments-pooled.")
            && message.contains("3 nodes")
            && message.contains("16001"),
        "{status} {message}"
    );

    // An agent that is not ready: not a ready endpoint, and the status
    // names its node.
    w.agent(2, false, &["tidepool.dev/e2e-hold"]).await?;
    eventually(WAIT, "agent-2 is not ready in the slice", || async {
        let eps = w.endpoints("payments-pooled").await.ok()?;
        eps.contains(&("10.9.0.2".into(), w.node(2), false, false, false))
            .then_some(())
    })
    .await?;
    let (_, reason, message) = eventually(WAIT, "LocalService names the node", || async {
        w.local_condition("payments")
            .await
            .filter(|c| c.0 == "False")
    })
    .await?;
    assert_eq!(reason, "NodesWithoutEndpoint");
    assert!(
        message.contains(&w.node(2)) && !message.contains(&w.node(1)),
        "{message}"
    );

    // A terminating agent (deleted, held by a finalizer, still Ready) is
    // serving and terminating but not ready: kube-proxy sends new
    // connections to a ready successor and lets this one finish.
    w.agent(2, true, &["tidepool.dev/e2e-hold"]).await?;
    Api::<k8s_openapi::api::core::v1::Pod>::namespaced(w.client.clone(), &w.ns)
        .delete("agent-3", &DeleteParams::default())
        .await?;
    eventually(WAIT, "agent-3 is terminating in the slice", || async {
        let eps = w.endpoints("payments-pooled").await.ok()?;
        eps.contains(&("10.9.0.3".into(), w.node(3), false, true, true))
            .then_some(())
    })
    .await?;

    // The pool drops its Service: the Service and its slices go.
    w.apply_pool("payments", "").await?;
    eventually(WAIT, "the Service is deleted", || async {
        w.service("payments-pooled").await.is_none().then_some(())
    })
    .await?;
    eventually(WAIT, "its slices are deleted", || async {
        w.endpoints("payments-pooled")
            .await
            .ok()?
            .is_empty()
            .then_some(())
    })
    .await?;
    release(&w).await
}

#[tokio::test]
async fn a_service_name_the_pool_does_not_own_is_left_as_it_is() -> Result<()> {
    let w = World::new("local-taken").await?;
    for n in 1..=3 {
        w.agent(n, true, &[]).await?;
    }
    apply_service(&w.client, &w.ns, "taken", &[("grpc", 8080)]).await?;
    let before = w.service("taken").await.context("taken")?;
    w.apply_pool("payments", "  nodeLocalService: {name: taken}\n")
        .await?;
    let (_, reason, message) = eventually(WAIT, "LocalService says the name is taken", || async {
        w.local_condition("payments")
            .await
            .filter(|c| c.0 == "False" && c.1 != "Pending")
    })
    .await?;
    assert_eq!(reason, "ServiceNameTaken");
    assert!(message.contains(&format!("{}/taken", w.ns)), "{message}");
    // Warned as an Event on the pool.
    eventually(WAIT, "a ServiceNameTaken event", || async {
        let out = kubectl(&[
            "get",
            "events",
            "-n",
            &w.ns,
            "--field-selector",
            "reason=ServiceNameTaken",
            "-o",
            "name",
        ])
        .await
        .ok()?;
        (!out.stdout.trim().is_empty()).then_some(())
    })
    .await?;
    // Untouched: same resourceVersion, no owner, no slice of ours.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = w.service("taken").await.context("taken")?;
    assert_eq!(
        after.metadata.resource_version,
        before.metadata.resource_version
    );
    assert!(after.metadata.owner_references.is_none());
    assert!(w.endpoints("taken").await?.is_empty());

    // Another name: served.
    w.apply_pool("payments", "  nodeLocalService: {name: payments-pooled}\n")
        .await?;
    eventually(WAIT, "LocalService is True with the new name", || async {
        w.local_condition("payments")
            .await
            .filter(|c| c.0 == "True")
    })
    .await?;
    let svc = w
        .service("payments-pooled")
        .await
        .context("payments-pooled")?;
    assert_eq!(
        svc.spec.context("spec")?.ports.context("ports")?[0].port,
        16001,
        "port defaults to listenPort"
    );

    // Deleting the pool removes what it owned (here by the operator; in a
    // cluster the garbage collector does it too, by owner reference).
    Api::<ConnectionPool>::namespaced(w.client.clone(), &w.ns)
        .delete("payments", &DeleteParams::default())
        .await?;
    eventually(WAIT, "the Service goes with the pool", || async {
        w.service("payments-pooled").await.is_none().then_some(())
    })
    .await?;
    assert!(
        w.service("taken").await.is_some(),
        "the Service it never owned stays"
    );
    Ok(())
}

/// Lets the finalizer-held pods go, so the namespace can be deleted.
async fn release(w: &World) -> Result<()> {
    let pods = Api::<k8s_openapi::api::core::v1::Pod>::namespaced(w.client.clone(), &w.ns);
    for n in 1..=3 {
        let name = format!("agent-{n}");
        let patch = serde_json::json!({"metadata": {"finalizers": null}});
        let _ = pods
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await;
    }
    Ok(())
}

#[tokio::test]
async fn a_listen_port_two_pools_ask_for_belongs_to_the_first_until_it_goes() -> Result<()> {
    let w = World::new("local-port").await?;
    for n in 1..=3 {
        w.agent(n, true, &[]).await?;
    }
    w.apply_pool("first", "  nodeLocalService: {name: first-pooled}\n")
        .await?;
    eventually(WAIT, "first's Service", || async {
        w.service("first-pooled").await
    })
    .await?;
    // Created later, the same listenPort (16001): refused in status, sent
    // to no agent with the port, and no Service made for it.
    w.apply_pool("second", "  nodeLocalService: {name: second-pooled}\n")
        .await?;
    let degraded = |pool: &'static str| {
        let w = &w;
        async move {
            let p = Api::<ConnectionPool>::namespaced(w.client.clone(), &w.ns)
                .get(pool)
                .await
                .ok()?;
            p.status?
                .conditions
                .into_iter()
                .find(|c| c.type_ == "Degraded" && c.status == "True")
                .map(|c| (c.reason, c.message))
        }
    };
    let (reason, message) = eventually(WAIT, "second is Degraded", || degraded("second")).await?;
    assert_eq!(reason, "ListenPortTaken");
    assert!(
        message.contains("spec.listenPort 16001") && message.contains(&format!("{}/first", w.ns)),
        "{message}"
    );
    let (_, reason, _) = eventually(WAIT, "second's LocalService says why", || async {
        w.local_condition("second")
            .await
            .filter(|c| c.0 == "False" && c.1 != "Pending")
    })
    .await?;
    assert_eq!(reason, "ListenPortTaken");
    assert!(w.service("second-pooled").await.is_none());
    assert!(
        degraded("first").await.is_none(),
        "the first pool is untouched"
    );

    // The first goes: the second gets the port and its Service.
    Api::<ConnectionPool>::namespaced(w.client.clone(), &w.ns)
        .delete("first", &DeleteParams::default())
        .await?;
    eventually(WAIT, "second's Service once the port is free", || async {
        w.service("second-pooled").await
    })
    .await?;
    eventually(WAIT, "second is no longer Degraded", || async {
        degraded("second").await.is_none().then_some(())
    })
    .await?;
    Ok(())
}
