//! The operator and its agents on the local control plane: Node objects for
//! three nodes, one agent process per node, the operator as a process, real
//! gRPC backends on 127.0.0.x behind a Service whose EndpointSlices the test
//! manages. Each test has its own namespace, nodes (labelled for its
//! operator's node selector), operator and Lease.
#![allow(clippy::disallowed_types)] // std::time::Instant: wall-clock deadlines against real processes.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use kube::api::Api;
use tidepool_crds::ConnectionPool;
use tidepool_e2e::grpc::{self, Backend};
use tidepool_e2e::objects::{apply_pod, apply_service, apply_slice, delete_pod, delete_slice};
use tidepool_e2e::procs::{Agent, Operator, OperatorOptions, eventually, free_port, published};
use tidepool_e2e::setup::{self, ServiceBackends};
use tidepool_e2e::{TestNamespace, kubectl, kubectl_stdin};

/// A test's world: namespace, nodes, backends, Service, operator, agents.
struct World {
    ns: String,
    /// Agent n listens on 127.0.<block>.n.
    block: u8,
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
    async fn new(prefix: &str, backends: u8) -> Result<Self> {
        let (ns, client) = setup::world(prefix, 3).await?;
        let ServiceBackends { port, backends } =
            setup::backends_behind_service(&client, &ns, backends).await?;
        let operator = Operator::start(&OperatorOptions::new(&ns)).await?;
        // Each test's agents get their own loopback block, as nodes have
        // their own IPs.
        let block = 10
            + (ns
                .bytes()
                .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)))
                % 200) as u8;
        let agents = setup::start_agents(&operator, block, 1..=3).await?;
        // Every agent's control stream is open before a test starts its
        // clock: an agent that dialed while the operator was still settling
        // redials after a backoff, which is not what "apply reaches every
        // agent within 2 s" measures.
        operator.wait_connected(3, Duration::from_secs(30)).await?;
        Ok(Self {
            ns,
            block,
            client,
            operator,
            agents,
            backends,
            port,
        })
    }

    fn authority(&self) -> String {
        format!("api.{}", self.ns)
    }

    async fn apply_pool(&self, spec: &str) -> Result<()> {
        setup::apply_pool(&self.ns, spec).await
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

    /// Waits until the pool's condition `type_` has `status` for the
    /// pool's current generation.
    async fn condition(
        &self,
        type_: &str,
        status: &str,
        limit: Duration,
    ) -> Result<ConnectionPool> {
        let pools = Api::<ConnectionPool>::namespaced(self.client.clone(), &self.ns);
        setup::condition(&pools, "api", type_, status, limit)
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

/// The backends a pool entry in an agent's `/pools` lists.
fn addresses_of(p: &serde_json::Value) -> BTreeSet<String> {
    p["addresses"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a["address"].as_str().map(String::from))
        .collect()
}

#[tokio::test]
async fn live_changes_keep_in_flight_streams_and_agents_follow_endpoints() -> Result<()> {
    let mut w = World::new("op-change", 2).await?;
    w.apply_pool("  size: 2\n  maxStreams: 10\n").await?;
    w.agents_have(Duration::from_secs(10), "has the pool", |p| {
        addresses_of(p).len() == 2
    })
    .await?;

    // A long-lived stream through agent 1, getting a message every flip.
    let channel = grpc::streaming_channel(w.agents[0].proxy, &w.authority())?;
    let mut stream = grpc::watch(&channel).await?;
    tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await??
        .context("the watch ended")?;

    // New settings reach every agent...
    w.apply_pool("  size: 5\n  maxStreams: 3\n").await?;
    w.agents_have(Duration::from_secs(10), "runs size 5, maxStreams 3", |p| {
        p["settings"]["size"] == 5 && p["settings"]["maxStreams"] == 3
    })
    .await?;
    // ...and the stream opened before them still flows.
    for _ in 0..3 {
        let m = tokio::time::timeout(Duration::from_secs(5), stream.message()).await??;
        assert!(
            m.is_some(),
            "the in-flight stream ended when the settings changed"
        );
    }
    let p = w
        .condition("Ready", "True", Duration::from_secs(15))
        .await?;
    assert_eq!(p.status.unwrap().observed_generation, Some(2));

    // An endpoint added: every agent dials it.
    let third = grpc::start_backend(
        format!("127.0.0.4:{}", w.port).parse()?,
        Duration::from_millis(200),
    )
    .await?;
    apply_slice(
        &w.client,
        &w.ns,
        "api",
        "api-4",
        "grpc",
        w.port,
        &[(&published("127.0.0.4"), true)],
    )
    .await?;
    let with_third: BTreeSet<String> = w
        .backend_addrs()
        .into_iter()
        .chain([third.addr.to_string()])
        .collect();
    w.agents_have(Duration::from_secs(10), "follows the added endpoint", |p| {
        addresses_of(p) == with_third
    })
    .await?;
    let reached = eventually(
        Duration::from_secs(10),
        "a call reaching the new backend",
        || async {
            traffic(w.agents[1].proxy, &w.authority(), 10)
                .await
                .ok()
                .filter(|s| s.contains(&third.addr.to_string()))
        },
    )
    .await?;
    assert!(reached.contains(&third.addr.to_string()));
    w.backends.push(third);

    // An endpoint removed: agents drop it and calls no longer reach it.
    let gone = w.backends[0].addr.to_string();
    delete_slice(&w.client, &w.ns, "api-2").await?;
    w.agents_have(Duration::from_secs(10), "drops the removed endpoint", |p| {
        let a = addresses_of(p);
        a.len() == 2 && !a.contains(&gone)
    })
    .await?;
    for agent in &w.agents {
        let seen = traffic(agent.proxy, &w.authority(), 20).await?;
        assert!(
            !seen.contains(&gone),
            "agent {} still sends to the removed endpoint {gone}",
            agent.node
        );
    }
    Ok(())
}

#[tokio::test]
async fn restarted_agents_and_operator_resync_and_agents_serve_meanwhile() -> Result<()> {
    let mut w = World::new("op-restart", 1).await?;
    w.apply_pool("  size: 2\n").await?;
    w.agents_have(Duration::from_secs(10), "has the pool", |p| {
        addresses_of(p).len() == 1
    })
    .await?;

    // An agent killed and restarted gets its pools back.
    w.agents[0].proc.kill().await;
    w.agents[0].proc.restart()?;
    w.agents_have(
        Duration::from_secs(10),
        "has the pool again after a restart",
        |p| p["settings"]["size"] == 2,
    )
    .await?;
    traffic(w.agents[0].proxy, &w.authority(), 5).await?;

    // The operator killed: agents keep serving with what they have.
    w.operator.proc.kill().await;
    for agent in &w.agents {
        traffic(agent.proxy, &w.authority(), 5)
            .await
            .with_context(|| format!("agent {} while the operator is down", agent.node))?;
    }
    // A change made meanwhile reaches them once the operator is back.
    w.apply_pool("  size: 4\n").await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        w.agents[0].pool(&w.ns, "api").await.context("the pool")?["settings"]["size"],
        2
    );
    w.operator.proc.restart()?;
    w.operator.wait_ready().await?;
    w.agents_have(Duration::from_secs(15), "resyncs to size 4", |p| {
        p["settings"]["size"] == 4
    })
    .await?;
    for agent in &w.agents {
        traffic(agent.proxy, &w.authority(), 5).await?;
    }
    let p = w
        .condition("Ready", "True", Duration::from_secs(15))
        .await?;
    let s = p.status.unwrap();
    assert_eq!(s.observed_generation, Some(2));
    assert_eq!(s.agents.map(|a| (a.desired, a.synced)), Some((3, 3)));
    Ok(())
}

#[tokio::test]
async fn a_rejected_snapshot_degrades_the_pool_naming_the_node_and_delete_closes_listeners()
-> Result<()> {
    let w = World::new("op-reject", 1).await?;
    // Something on node 2 holds the port the pool asks for.
    let ip2 = format!("127.0.{}.2", w.block);
    let port = free_port(&ip2)?;
    let _squatter = std::net::TcpListener::bind(format!("{ip2}:{port}"))?;
    w.apply_pool(&format!("  size: 2\n  listenPort: {port}\n"))
        .await?;

    let node2 = format!("{}-n2", w.ns);
    let p = w
        .condition("Degraded", "True", Duration::from_secs(15))
        .await?;
    let s = p.status.unwrap();
    let degraded = s.conditions.iter().find(|c| c.type_ == "Degraded").unwrap();
    assert_eq!(degraded.reason, "AgentRejected");
    assert!(degraded.message.contains(&node2), "{}", degraded.message);
    assert!(
        degraded.message.contains(&format!("{port}")),
        "{}",
        degraded.message
    );
    let agents = s.agents.unwrap();
    assert_eq!((agents.desired, agents.synced, agents.rejected), (3, 2, 1));
    assert!(
        w.agents[1].pool(&w.ns, "api").await.is_none(),
        "node 2 keeps its last good configuration"
    );

    // The other nodes serve it, on the dedicated port too.
    let dedicated: SocketAddr = format!("127.0.{}.1:{port}", w.block).parse()?;
    let direct = grpc::channel(dedicated, "anything")?;
    grpc::check(&direct)
        .await
        .context("a call on the pool's dedicated port")?;

    // A person sees it in `kubectl describe` (an Event).
    let events = eventually(
        Duration::from_secs(10),
        "an AgentRejected event",
        || async {
            let out = kubectl(&[
                "get",
                "events",
                "-n",
                &w.ns,
                "--field-selector",
                "reason=AgentRejected",
                "-o",
                "name",
            ])
            .await
            .ok()?;
            let out = out.ok().ok()?;
            (!out.trim().is_empty()).then_some(out)
        },
    )
    .await?;
    assert!(events.contains("event"), "{events}");

    // Deleted: agents drop it and its listener closes.
    kubectl(&["delete", "connectionpool", "api", "-n", &w.ns])
        .await?
        .ok()?;
    for agent in [&w.agents[0], &w.agents[2]] {
        eventually(
            Duration::from_secs(10),
            &format!("agent {} dropping the pool", agent.node),
            || async { agent.pool(&w.ns, "api").await.is_none().then_some(()) },
        )
        .await
        .map_err(|e| w.explain(e))?;
    }
    eventually(
        Duration::from_secs(10),
        "the dedicated listener closing",
        || async {
            tokio::net::TcpStream::connect(dedicated)
                .await
                .is_err()
                .then_some(())
        },
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn bad_targets_say_why_in_conditions_and_unknown_nodes_are_refused() -> Result<()> {
    let w = World::new("op-bad", 1).await?;
    let manifest = format!(
        "apiVersion: tidepool.dev/v1alpha1\nkind: ConnectionPool\nmetadata:\n  name: lost\n  namespace: {}\nspec:\n  target: {{service: {{name: lost, port: grpc}}}}\n",
        w.ns
    );
    kubectl_stdin(&["apply", "-f", "-"], Some(&manifest))
        .await?
        .ok()?;
    let api = Api::<ConnectionPool>::namespaced(w.client.clone(), &w.ns);
    let reason = |want: &'static str| {
        let api = api.clone();
        async move {
            eventually(
                Duration::from_secs(15),
                &format!("reason {want}"),
                || async {
                    let p = api.get("lost").await.ok()?;
                    let st = p.status?;
                    let ready = st.conditions.iter().find(|c| c.type_ == "Ready")?.clone();
                    let degraded = st
                        .conditions
                        .iter()
                        .find(|c| c.type_ == "Degraded")?
                        .clone();
                    (ready.status == "False"
                        && ready.reason == want
                        && degraded.status == "True"
                        && degraded.reason == want)
                        .then_some(ready.message)
                },
            )
            .await
        }
    };
    let m = reason("ServiceNotFound").await.map_err(|e| w.explain(e))?;
    assert!(m.contains("lost") && m.contains("does not exist"), "{m}");

    apply_service(&w.client, &w.ns, "lost", &[("http", 80)]).await?;
    let m = reason("PortNotFound").await?;
    assert!(m.contains("http (80)"), "{m}");

    apply_service(&w.client, &w.ns, "lost", &[("grpc", 50051)]).await?;
    apply_slice(
        &w.client,
        &w.ns,
        "lost",
        "lost-1",
        "grpc",
        w.port,
        &[(&published("127.0.0.2"), false)],
    )
    .await?;
    reason("NoReadyEndpoints").await?;

    apply_slice(
        &w.client,
        &w.ns,
        "lost",
        "lost-1",
        "grpc",
        w.port,
        &[(&published("127.0.0.2"), true)],
    )
    .await?;
    eventually(
        Duration::from_secs(15),
        "the pool becoming Ready once it resolves",
        || async {
            let p = api.get("lost").await.ok()?;
            p.status?
                .conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
                .then_some(())
        },
    )
    .await
    .map_err(|e| w.explain(e))?;

    // An agent on a node the operator does not serve is refused, clearly,
    // and the others stay connected.
    let stranger =
        Agent::start(&w.operator, "no-such-node", &format!("127.0.{}.9", w.block)).await?;
    eventually(
        Duration::from_secs(10),
        "the stranger's refusal in its log",
        || async {
            stranger
                .proc
                .log()
                .contains("node \\\"no-such-node\\\" is not a node this operator serves")
                .then_some(())
                .or_else(|| {
                    stranger
                        .proc
                        .log()
                        .contains("is not a node this operator serves")
                        .then_some(())
                })
        },
    )
    .await
    .with_context(|| stranger.proc.log())?;
    assert!(
        w.operator
            .metric("tidepool_operator_refused_streams_total")
            .await?
            >= 1.0
    );
    assert_eq!(
        w.operator
            .metric("tidepool_operator_connected_agents")
            .await?,
        3.0
    );
    Ok(())
}

#[tokio::test]
async fn spec_clients_admits_only_listed_namespaces_by_the_nodes_pod_map() -> Result<()> {
    let w = World::new("op-clients", 1).await?;
    let other = TestNamespace::new("op-clients-dev").await?.name;
    let (n1, n2) = (format!("{}-n1", w.ns), format!("{}-n2", w.ns));
    // Pod IPs on agent 1's loopback block: .50 a pod of the pool's
    // namespace on node 1, .51 one of another namespace on node 1, .53 one
    // of the pool's namespace on node 2 (so unknown to agent 1), .52 no pod
    // (yet).
    let ip = |host: u8| format!("127.0.{}.{host}", w.block);
    apply_pod(&w.client, &w.ns, "allowed", &n1, &ip(50)).await?;
    apply_pod(&w.client, &other, "refused", &n1, &ip(51)).await?;
    apply_pod(&w.client, &w.ns, "elsewhere", &n2, &ip(53)).await?;
    w.apply_pool(&format!(
        "  clients: {{namespaces: [{}, not-{}]}}\n",
        w.ns, other
    ))
    .await?;

    // The map reached agent 1 with node 1's pods only, and the pool its list.
    let agent = &w.agents[0];
    let pods_of = |map: &serde_json::Value| -> BTreeSet<(String, String)> {
        map["pods"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                (
                    p["ip"].as_str().unwrap_or_default().to_owned(),
                    p["namespace"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    };
    let want: BTreeSet<(String, String)> = [(ip(50), w.ns.clone()), (ip(51), other.clone())].into();
    eventually(
        Duration::from_secs(10),
        "agent 1's pod map holding node 1's two pods",
        || async { (pods_of(&agent.clients().await) == want).then_some(()) },
    )
    .await
    .map_err(|e| w.explain(e))?;
    w.agents_have(
        Duration::from_secs(10),
        "runs the pool's client list",
        |p| p["clients"][0] == w.ns.as_str(),
    )
    .await?;
    assert!(
        pods_of(&w.agents[1].clients().await).contains(&(ip(53), w.ns.clone())),
        "agent 2 has its own node's pod"
    );

    let call_from = |host: u8| {
        let channel = grpc::channel_from(agent.proxy, &w.authority(), ip(host).parse().unwrap());
        async move {
            grpc::try_check(&channel?)
                .await
                .map_err(anyhow::Error::from)
        }
    };
    // A pod of the listed namespace is served.
    let backend = call_from(50).await.map_err(|e| w.explain(e))?;
    assert_eq!(backend, w.backends[0].addr.to_string());
    // Another namespace's pod, a pod of another node and an unknown IP are
    // refused with PERMISSION_DENIED naming the pool and why.
    let pool = format!("pool {}/api", w.ns);
    for (host, why) in [
        (51, format!("namespace {other}")),
        (53, "no pod this node's agent knows".to_owned()),
        (52, "no pod this node's agent knows".to_owned()),
    ] {
        let status = call_from(host)
            .await
            .err()
            .and_then(|e| e.downcast::<tonic::Status>().ok())
            .with_context(|| format!("a call from {} was not refused", ip(host)))?;
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
        assert!(
            status.message().contains(&pool)
                && status.message().contains(&why)
                && status.message().contains(&ip(host)),
            "{}",
            status.message()
        );
    }
    let refused = |reason: &str| {
        format!(
            "tidepool_proxy_refused_total{{pool=\"{}/api\",reason=\"{reason}\"",
            w.ns
        )
    };
    assert_eq!(agent.metric(&refused("namespace")).await?, 1.0);
    assert_eq!(agent.metric(&refused("unknown_ip")).await?, 2.0);

    // Pods come and go: a new pod of the listed namespace at .52 is served
    // once its IP reaches the agent; the refused pod's IP, gone, stays
    // refused (now as unknown).
    apply_pod(&w.client, &w.ns, "newcomer", &n1, &ip(52)).await?;
    delete_pod(&w.client, &other, "refused").await?;
    eventually(
        Duration::from_secs(10),
        "a call from the new pod's IP served",
        || async { call_from(52).await.ok() },
    )
    .await
    .map_err(|e| w.explain(e))?;
    let status = call_from(51)
        .await
        .err()
        .and_then(|e| e.downcast::<tonic::Status>().ok())
        .context("the deleted pod's IP was served")?;
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert!(status.message().contains("no pod"), "{}", status.message());

    // A pool without a list serves everyone again.
    w.apply_pool("").await?;
    eventually(
        Duration::from_secs(10),
        "a call from a pod of another node served once the list is gone",
        || async { call_from(53).await.ok() },
    )
    .await
    .map_err(|e| w.explain(e))?;
    Ok(())
}
