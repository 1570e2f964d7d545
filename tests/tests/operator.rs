//! The operator and its agents on the local control plane: Node objects for
//! three nodes, one agent process per node, the operator as a process, real
//! gRPC backends on 127.0.0.x behind a Service whose EndpointSlices the test
//! manages. Each test has its own namespace, nodes (labelled for its
//! operator's node selector), operator and Lease.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use kube::api::Api;
use tidepool_crds::ConnectionPool;
use tidepool_e2e::grpc::{self, Backend};
use tidepool_e2e::objects::{apply_node, apply_service, apply_slice, delete_slice};
use tidepool_e2e::procs::{Agent, Operator, OperatorOptions, eventually, free_port, published};
use tidepool_e2e::{TestNamespace, cluster, ensure_crd, kubectl, kubectl_stdin};

/// A test's world: namespace, nodes, backends, Service, operator, agents.
struct World {
    ns: String,
    client: kube::Client,
    operator: Operator,
    agents: Vec<Agent>,
    backends: Vec<Backend>,
    port: u16,
}

impl World {
    /// Three nodes with agents, `backends` backends on 127.0.0.2.. (one
    /// port), Service `api` (port `grpc` 50051) with one EndpointSlice per
    /// backend.
    async fn new(prefix: &str, backends: usize) -> Result<Self> {
        ensure_crd().await?;
        let ns = TestNamespace::new(prefix).await?.name;
        let client = cluster()?.client().await?;
        let group = ("tidepool.dev/e2e-group", ns.as_str());
        for n in 1..=3 {
            apply_node(&client, &format!("{ns}-n{n}"), &[group]).await?;
        }
        let port = free_port("127.0.0.2")?;
        let mut world_backends = Vec::new();
        for i in 0..backends {
            world_backends.push(
                grpc::start_backend(
                    format!("127.0.0.{}:{port}", i + 2).parse()?,
                    Duration::from_millis(200),
                )
                .await?,
            );
        }
        apply_service(&client, &ns, "api", &[("grpc", 50051)]).await?;
        for i in 0..backends {
            let ip = published(&format!("127.0.0.{}", i + 2));
            apply_slice(
                &client,
                &ns,
                "api",
                &format!("api-{}", i + 2),
                "grpc",
                port,
                &[(&ip, true)],
            )
            .await?;
        }
        let operator = Operator::start(&OperatorOptions {
            namespace: ns.clone(),
            node_selector: format!("tidepool.dev/e2e-group={ns}"),
            status_interval: "1s".into(),
        })
        .await?;
        let mut agents = Vec::new();
        for n in 1..=3 {
            agents.push(Agent::start(&operator.url(), &format!("{ns}-n{n}")).await?);
        }
        Ok(Self {
            ns,
            client,
            operator,
            agents,
            backends: world_backends,
            port,
        })
    }

    fn authority(&self) -> String {
        format!("api.{}", self.ns)
    }

    async fn apply_pool(&self, spec: &str) -> Result<()> {
        let manifest = format!(
            "apiVersion: tidepool.dev/v1alpha1\nkind: ConnectionPool\nmetadata:\n  name: api\n  namespace: {}\nspec:\n  target: {{service: {{name: api, port: grpc}}}}\n{spec}",
            self.ns
        );
        kubectl_stdin(&["apply", "-f", "-"], Some(&manifest))
            .await?
            .ok()?;
        Ok(())
    }

    async fn pool(&self) -> Result<ConnectionPool> {
        Ok(
            Api::<ConnectionPool>::namespaced(self.client.clone(), &self.ns)
                .get("api")
                .await?,
        )
    }

    /// Waits until every agent runs the pool with `check` true of its
    /// `/pools` entry.
    async fn agents_have(
        &self,
        limit: Duration,
        what: &str,
        check: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<()> {
        for agent in &self.agents {
            eventually(limit, &format!("agent {} {what}", agent.node), || async {
                agent
                    .pool(&self.ns, "api")
                    .await
                    .filter(|p| check(p))
                    .map(|_| ())
            })
            .await
            .map_err(|e| self.explain(e))?;
        }
        Ok(())
    }

    /// Waits until the pool's condition `type_` has `status`.
    async fn condition(
        &self,
        type_: &str,
        status: &str,
        limit: Duration,
    ) -> Result<ConnectionPool> {
        eventually(limit, &format!("condition {type_}={status}"), || async {
            let p = self.pool().await.ok()?;
            let c = p
                .status
                .as_ref()?
                .conditions
                .iter()
                .find(|c| c.type_ == type_)?;
            (c.status == status).then_some(p)
        })
        .await
        .map_err(|e| self.explain(e))
    }

    /// An error with the processes' logs and the pool's status attached.
    fn explain(&self, e: anyhow::Error) -> anyhow::Error {
        let mut logs = format!("operator log:\n{}", tail(&self.operator.proc.log()));
        for a in &self.agents {
            logs.push_str(&format!(
                "\n{} log:\n{}",
                a.proc.name(),
                tail(&a.proc.log())
            ));
        }
        e.context(logs)
    }

    fn backend_addrs(&self) -> BTreeSet<String> {
        self.backends.iter().map(|b| b.addr.to_string()).collect()
    }
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Sends `n` calls through `agent`; returns the backends that answered.
async fn traffic(agent: SocketAddr, authority: &str, n: usize) -> Result<BTreeSet<String>> {
    let channel = grpc::channel(agent, authority)?;
    let mut seen = BTreeSet::new();
    for _ in 0..n {
        seen.insert(
            grpc::check(&channel)
                .await
                .with_context(|| format!("a call through the agent at {agent}"))?,
        );
    }
    Ok(seen)
}

#[tokio::test]
async fn apply_reaches_every_agent_carries_traffic_and_status_shows_occupancy() -> Result<()> {
    let w = World::new("op-apply", 2).await?;
    let start = Instant::now();
    w.apply_pool("  size: 2\n  maxStreams: 10\n").await?;
    w.agents_have(Duration::from_secs(10), "has the pool", |p| {
        p["addresses"].as_array().is_some_and(|a| a.len() == 2)
    })
    .await?;
    let took = start.elapsed();
    assert!(
        took <= Duration::from_secs(2),
        "every agent should have the pool within 2s of apply; took {took:?}"
    );

    // Traffic through each agent reaches the backends.
    let mut seen = BTreeSet::new();
    for agent in &w.agents {
        seen.extend(traffic(agent.proxy, &w.authority(), 20).await?);
    }
    assert_eq!(
        seen,
        w.backend_addrs(),
        "calls through the agents should reach every backend"
    );

    // Status: Ready, 3/3, per-address occupancy summed over nodes.
    let p = w
        .condition("Ready", "True", Duration::from_secs(15))
        .await?;
    let s = p.status.unwrap();
    assert_eq!(s.observed_generation, p.metadata.generation);
    let agents = s.agents.unwrap();
    assert_eq!((agents.desired, agents.synced, agents.rejected), (3, 3, 0));
    assert_eq!(s.target.as_deref(), Some("api:grpc"));
    let p = eventually(
        Duration::from_secs(15),
        "status listing both addresses with connections from 3 nodes",
        || async {
            let p = w.pool().await.ok()?;
            let st = p.status.as_ref()?;
            let ok = st.addresses.len() == 2
                && st
                    .addresses
                    .iter()
                    .all(|a| a.nodes == 3 && a.connections >= 1);
            ok.then_some(p)
        },
    )
    .await
    .map_err(|e| w.explain(e))?;
    let s = p.status.unwrap();
    let addrs: BTreeSet<String> = s.addresses.iter().map(|a| a.address.clone()).collect();
    assert_eq!(addrs, w.backend_addrs());
    let totals = s.totals.unwrap();
    assert_eq!(totals.addresses, 2);
    assert_eq!(
        totals.connections,
        s.addresses.iter().map(|a| a.connections).sum::<i64>()
    );

    // kubectl shows it.
    let out = kubectl(&["get", "connectionpools", "-n", &w.ns])
        .await?
        .ok()?;
    assert!(out.contains("api:grpc") && out.contains("True"), "{out}");
    Ok(())
}
