//! The setup the operator scenarios share, so each test file holds only its
//! scenarios: a fresh namespace with Node objects its operator selects,
//! gRPC backends behind Service `api`, pool `api` applied with kubectl,
//! agent processes on their own loopback addresses, and the waits for
//! conditions and connected agents.

use std::ops::RangeInclusive;
use std::time::Duration;

use anyhow::{Context as _, Result};
use kube::api::Api;
use tidepool_crds::ConnectionPool;

use crate::grpc::{self, Backend};
use crate::objects::{apply_node, apply_service, apply_slice};
use crate::procs::{Agent, Operator, eventually, free_port, published};
use crate::{TestNamespace, cluster, ensure_crd, kubectl_stdin};

/// The label on a test's nodes, valued with the test's namespace: what
/// [`OperatorOptions::new`](crate::procs::OperatorOptions::new) selects.
pub const GROUP_LABEL: &str = "tidepool.dev/e2e-group";

/// The Service the backends are behind, and the pool [`apply_pool`] writes.
pub const API: &str = "api";

/// The CRD (installed once per process), a fresh namespace named after
/// `prefix`, and Node objects `<ns>-n1` to `<ns>-n<nodes>` labelled for its
/// operator; the namespace's name and a client.
pub async fn world(prefix: &str, nodes: u8) -> Result<(String, kube::Client)> {
    ensure_crd().await?;
    let ns = TestNamespace::new(prefix).await?.name;
    let client = cluster()?.client().await?;
    add_nodes(&client, &ns, 1..=nodes).await?;
    Ok((ns, client))
}

/// Node `n` of namespace `ns`'s test: `<ns>-n<n>`.
pub fn node(ns: &str, n: u8) -> String {
    format!("{ns}-n{n}")
}

/// Creates or updates the Node objects `nodes` of `ns`'s test, labelled
/// for its operator.
pub async fn add_nodes(client: &kube::Client, ns: &str, nodes: RangeInclusive<u8>) -> Result<()> {
    for n in nodes {
        apply_node(client, &node(ns, n), &[(GROUP_LABEL, ns)]).await?;
    }
    Ok(())
}

/// Backends behind Service [`API`], serving until dropped.
#[derive(Debug)]
pub struct ServiceBackends {
    /// The port every backend listens on (each on its own loopback IP).
    pub port: u16,
    /// The backends, on 127.0.0.2, 127.0.0.3, ...
    pub backends: Vec<Backend>,
}

/// `count` backends on 127.0.0.2 onwards, one port, [`grpc::FLIP_SERVICE`]
/// flipping every 200 ms; Service [`API`] (port `grpc` 50051) in `ns` with
/// one EndpointSlice `api-<last octet>` per backend, published through
/// [`LOOPBACK_MAP`](crate::procs::LOOPBACK_MAP).
pub async fn backends_behind_service(
    client: &kube::Client,
    ns: &str,
    count: u8,
) -> Result<ServiceBackends> {
    let port = free_port("127.0.0.2")?;
    let mut backends = Vec::new();
    for octet in 2..2 + count {
        let addr = format!("127.0.0.{octet}:{port}").parse()?;
        backends.push(grpc::start_backend(addr, Duration::from_millis(200)).await?);
    }
    apply_service(client, ns, API, &[("grpc", 50051)]).await?;
    for octet in 2..2 + count {
        apply_slice(
            client,
            ns,
            API,
            &format!("{API}-{octet}"),
            "grpc",
            port,
            &[(&published(&format!("127.0.0.{octet}")), true)],
        )
        .await?;
    }
    Ok(ServiceBackends { port, backends })
}

/// Creates or updates ConnectionPool [`API`] in `ns` over Service [`API`]
/// port `grpc`, with `spec`: more lines of its spec, each indented two
/// spaces and ending in a newline (`"  size: 2\n"`), or nothing.
pub async fn apply_pool(ns: &str, spec: &str) -> Result<()> {
    let manifest = format!(
        "apiVersion: tidepool.dev/v1alpha1\nkind: ConnectionPool\nmetadata: {{name: {API}, namespace: {ns}}}\nspec:\n  target: {{service: {{name: {API}, port: grpc}}}}\n{spec}"
    );
    kubectl_stdin(&["apply", "-f", "-"], Some(&manifest))
        .await?
        .ok()
        .with_context(|| format!("applying pool {ns}/{API}"))?;
    Ok(())
}

/// Waits at most `limit` until pool `name`'s condition `type_` has
/// `status` for the pool's current generation; returns the pool.
pub async fn condition(
    pools: &Api<ConnectionPool>,
    name: &str,
    type_: &str,
    status: &str,
    limit: Duration,
) -> Result<ConnectionPool> {
    eventually(
        limit,
        &format!("{name}'s condition {type_}={status} for its generation"),
        || async {
            let p = pools.get(name).await.ok()?;
            let c = p
                .status
                .as_ref()?
                .conditions
                .iter()
                .find(|c| c.type_ == type_)?;
            // Only a condition about the current generation counts.
            (c.status == status && c.observed_generation == p.metadata.generation).then_some(p)
        },
    )
    .await
}

/// One agent per node `n` of `nodes` joining `operator`, listening on
/// 127.0.`block`.`n`: each test's agents on their own loopback block, as
/// nodes have their own IPs.
pub async fn start_agents(
    operator: &Operator,
    block: u8,
    nodes: RangeInclusive<u8>,
) -> Result<Vec<Agent>> {
    let ns = &operator.options.namespace;
    let mut agents = Vec::new();
    for n in nodes {
        agents.push(Agent::start(operator, &node(ns, n), &format!("127.0.{block}.{n}")).await?);
    }
    Ok(agents)
}
