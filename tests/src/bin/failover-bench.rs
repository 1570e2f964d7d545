//! `failover-bench` (`make bench`): agents rejoining a new leader with
//! authentication on. Two operator processes (release builds) serve TLS
//! from one CA and review every agent's token; 500 simulated agents (the
//! agent's own control client, with an applier that keeps nothing) each
//! hold a real token from the TokenRequest API, bound to a Pod on its own
//! Node. They dial through a TCP forwarder that stands for the control
//! Service: it sends new connections to the replica that leads.
//!
//! The leader is stopped (SIGTERM, as a rolling update does; it releases
//! its Lease). The benchmark reports, as a Markdown table:
//! - how long until the standby led (and the forwarder followed);
//! - from then, when 50%, 99% and all of the agents were connected to it;
//! - how many TokenReviews the new leader made (one per agent at most is
//!   the target: none was cached there before).
//!
//! It measures; it asserts nothing about time.
#![allow(clippy::disallowed_types)] // std::time::Instant: wall-clock timing of whole processes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use clap::Parser;
use futures::StreamExt as _;
use tidepool_agent::config::PoolConfig;
use tidepool_agent::control::{self, Apply, ClientSecurity, ControlOptions, Rejection};
use tidepool_crds::control::pb;
use tidepool_e2e::identity::{AGENT_SA, AUDIENCE, apply_pod, apply_service_account, token};
use tidepool_e2e::objects::apply_node;
use tidepool_e2e::procs::{Proc, eventually, free_port, http_get, loadavg, metric_in};
use tidepool_e2e::{TestNamespace, cluster, ensure_crd};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(
    name = "failover-bench",
    about = "agents rejoining a new leader with TLS and TokenReview"
)]
struct Args {
    /// Simulated agents (one Node and one bound token each).
    #[arg(long, env = "TIDEPOOL_BENCH_AGENTS", default_value_t = 500)]
    agents: usize,
    /// The operators' `--token-review-concurrency`.
    #[arg(long, default_value_t = 16)]
    review_concurrency: usize,
}

/// Applies nothing, reports nothing: the benchmark is the operator's side.
struct Idle;

impl Apply for Idle {
    fn apply(&self, _pools: Vec<Arc<PoolConfig>>) -> Result<(), Rejection> {
        Ok(())
    }
    fn report(&self) -> Vec<pb::PoolReport> {
        Vec::new()
    }
    fn report_version(&self) -> Option<u64> {
        Some(0)
    }
}

/// Forwards each new connection to the port in `target` (0: refuse).
async fn forward(listener: TcpListener, target: Arc<AtomicU16>) {
    loop {
        let Ok((mut inbound, _)) = listener.accept().await else {
            continue;
        };
        let port = target.load(Ordering::SeqCst);
        tokio::spawn(async move {
            if port == 0 {
                return;
            }
            if let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", port)).await {
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            }
        });
    }
}

fn metric(body: &str, name: &str) -> f64 {
    metric_in(body, name).unwrap_or(0.0)
}

async fn metrics(admin: SocketAddr) -> String {
    http_get(admin, "/metrics")
        .await
        .map(|(_, b)| b)
        .unwrap_or_default()
}

struct Replica {
    proc: Proc,
    control: SocketAddr,
    admin: SocketAddr,
}

async fn leads(admin: SocketAddr) -> bool {
    matches!(http_get(admin, "/readyz").await, Ok((200, b)) if b.contains("leader") && !b.contains("standby"))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let exe = std::env::current_exe()?;
    let operator_bin = exe.with_file_name("tidepool-operator");
    if !operator_bin.exists() {
        bail!(
            "{} does not exist; build it first (make bench does)",
            operator_bin.display()
        );
    }
    eprintln!("failover-bench: starting the local control plane");
    ensure_crd().await?;
    let client = cluster()?.client().await?;
    let ns = TestNamespace::new("failover").await?.name;
    apply_service_account(&client, &ns, AGENT_SA).await?;
    let selector = format!("tidepool.dev/bench={ns}");

    eprintln!(
        "failover-bench: {} nodes, pods and bound tokens",
        args.agents
    );
    let files = tempfile::tempdir()?;
    let t = Instant::now();
    let made: Vec<Result<(String, std::path::PathBuf)>> = futures::stream::iter(0..args.agents)
        .map(|i| {
            let (client, ns, dir) = (client.clone(), ns.clone(), files.path().to_path_buf());
            async move {
                let node = format!("{ns}-node-{i:04}");
                apply_node(&client, &node, &[("tidepool.dev/bench", &ns)]).await?;
                let pod = format!("agent-{i:04}");
                let uid = apply_pod(&client, &ns, &pod, AGENT_SA, &node).await?;
                let t = token(&client, &ns, AGENT_SA, AUDIENCE, Some((&pod, &uid)), 3600).await?;
                let path = dir.join(format!("token-{i:04}"));
                std::fs::write(&path, t)?;
                Ok((node, path))
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    let agents: Vec<(String, std::path::PathBuf)> = made.into_iter().collect::<Result<_>>()?;
    eprintln!("failover-bench: objects made in {:?}", t.elapsed());

    let server_name = format!("tidepool-operator.{ns}.svc");
    let spawn = |identity: &str| -> Result<Replica> {
        let control: SocketAddr = format!("127.0.0.1:{}", free_port("127.0.0.1")?).parse()?;
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port("127.0.0.1")?).parse()?;
        let proc = Proc::spawn(
            identity,
            operator_bin.clone(),
            vec![
                format!("--control-listen={control}"),
                format!("--admin-listen={admin}"),
                format!("--watch-namespace={ns}"),
                format!("--node-selector={selector}"),
                format!("--lease-namespace={ns}"),
                format!("--identity={identity}"),
                "--lease-duration=5s".into(),
                format!("--agent-service-account={ns}/{AGENT_SA}"),
                format!("--control-dns-names={server_name}"),
                format!("--token-review-concurrency={}", args.review_concurrency),
            ],
            vec![(
                "KUBECONFIG".into(),
                cluster()?.kubeconfig().display().to_string(),
            )],
        )?;
        Ok(Replica {
            proc,
            control,
            admin,
        })
    };
    let mut a = spawn("replica-a")?;
    eventually(Duration::from_secs(60), "replica-a leading", || async {
        leads(a.admin).await.then_some(())
    })
    .await
    .with_context(|| a.proc.log())?;
    let b = spawn("replica-b")?;
    eventually(
        Duration::from_secs(60),
        "replica-b ready as standby",
        || async { matches!(http_get(b.admin, "/readyz").await, Ok((200, _))).then_some(()) },
    )
    .await
    .with_context(|| b.proc.log())?;

    // The CA bundle, as the kubelet would mount it.
    let cm =
        kube::api::Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(client.clone(), &ns)
            .get("tidepool-control-ca")
            .await?;
    let ca_file = files.path().join("ca.crt");
    std::fs::write(
        &ca_file,
        cm.data
            .and_then(|d| d.get("ca.crt").cloned())
            .context("no CA bundle")?,
    )?;

    // The "Service": a forwarder to the leader.
    let front = TcpListener::bind("127.0.0.1:0").await?;
    let front_addr = front.local_addr()?;
    let target = Arc::new(AtomicU16::new(a.control.port()));
    tokio::spawn(forward(front, target.clone()));

    eprintln!("failover-bench: connecting {} agents", args.agents);
    let stop = CancellationToken::new();
    let t = Instant::now();
    for (node, token_file) in &agents {
        let mut options =
            ControlOptions::new(format!("https://{front_addr}"), node.clone(), node.clone());
        options.security = Some(ClientSecurity {
            token_file: token_file.clone(),
            ca_file: ca_file.clone(),
            server_name: server_name.clone(),
        });
        tokio::spawn(control::run(options, Idle, stop.clone()));
    }
    let n = args.agents as f64;
    eventually(
        Duration::from_secs(120),
        "every agent connected to replica-a",
        || async {
            (metric(
                &metrics(a.admin).await,
                "tidepool_operator_connected_agents",
            ) == n)
                .then_some(())
        },
    )
    .await
    .with_context(|| a.proc.log())?;
    let first_join = t.elapsed();
    let a_metrics = metrics(a.admin).await;
    let a_reviews = metric(&a_metrics, "tidepool_operator_token_reviews_total");
    let b_before = metrics(b.admin).await;
    let b_reviews_before = metric(&b_before, "tidepool_operator_token_reviews_total");
    let load_before = loadavg();

    // The failover.
    eprintln!("failover-bench: stopping the leader");
    let t0 = Instant::now();
    a.proc.terminate().await;
    target.store(0, Ordering::SeqCst);
    while !leads(b.admin).await {
        if t0.elapsed() > Duration::from_secs(60) {
            bail!("replica-b did not lead within 60 s:\n{}", b.proc.log());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let led = t0.elapsed();
    target.store(b.control.port(), Ordering::SeqCst);
    let t1 = Instant::now();
    let (mut p50, mut p99) = (None, None);
    let all = loop {
        let c = metric(
            &metrics(b.admin).await,
            "tidepool_operator_connected_agents",
        );
        let now = t1.elapsed();
        if p50.is_none() && c >= n * 0.5 {
            p50 = Some(now);
        }
        if p99.is_none() && c >= (n * 0.99).ceil() {
            p99 = Some(now);
        }
        if c >= n {
            break now;
        }
        if now > Duration::from_secs(120) {
            bail!(
                "only {c} of {n} agents rejoined within 120 s:\n{}",
                b.proc.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let b_after = metrics(b.admin).await;
    let reviews = metric(&b_after, "tidepool_operator_token_reviews_total") - b_reviews_before;
    let hits = metric(&b_after, "tidepool_operator_token_review_cache_hits_total")
        - metric(&b_before, "tidepool_operator_token_review_cache_hits_total");
    let refusals = metric(&b_after, "tidepool_operator_auth_refusals_total");
    stop.cancel();

    let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1000.0);
    println!();
    println!(
        "| agents | first join (all, to the leader) | leader stopped → standby leads | leads → 50% back | → 99% back | → all back | TokenReviews by the new leader | per agent | cache hits | refusals | review concurrency | load (1 min) |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    println!(
        "| {} | {} ({} reviews) | {} | {} | {} | {} | {} | {:.2} | {} | {} | {} | {} → {} |",
        args.agents,
        ms(first_join),
        a_reviews,
        ms(led),
        ms(p50.unwrap_or(all)),
        ms(p99.unwrap_or(all)),
        ms(all),
        reviews,
        reviews / n,
        hits,
        refusals,
        args.review_concurrency,
        load_before,
        loadavg(),
    );
    Ok(())
}
