//! A frozen leader writes nothing and pushes nothing when it wakes: two
//! real operator processes on one Lease, the leader stopped with SIGSTOP
//! while an agent is connected to it, the pool changed while it is frozen,
//! then SIGCONT. Asserted on the API server's records (the pool's status,
//! the Lease) and on what the agent runs, not on logs alone.

use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use kube::api::Api;
use tidepool_crds::ConnectionPool;
use tidepool_e2e::procs::{Agent, Operator, OperatorOptions, eventually};
use tidepool_e2e::setup;
use tidepool_e2e::{cluster, kubectl};

fn signal(op: &Operator, sig: &str) -> Result<()> {
    let pid = op.proc.pid().context("the operator is not running")?;
    let status = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()?;
    if !status.success() {
        bail!("kill {sig} {pid} failed");
    }
    Ok(())
}

async fn lease_holder(ns: &str) -> String {
    kubectl(&[
        "get",
        "lease",
        "-n",
        ns,
        "tidepool-operator",
        "-o",
        "jsonpath={.spec.holderIdentity}",
    ])
    .await
    .map(|o| o.stdout.trim().to_string())
    .unwrap_or_default()
}

#[tokio::test]
async fn a_frozen_leader_writes_and_pushes_nothing_when_it_wakes() -> Result<()> {
    let (ns, client) = setup::world("fence", 2).await?;
    let _backend = setup::backends_behind_service(&client, &ns, 1).await?;
    let spec = |max_streams: u32| format!("  maxStreams: {max_streams}\n");
    setup::apply_pool(&ns, &spec(10)).await?;

    // Replica a leads (lease 3 s: renew deadline 2 s), b stands by.
    let a = Operator::start(&OperatorOptions {
        identity: "replica-a".into(),
        ..OperatorOptions::new(&ns)
    })
    .await?;
    let kubeconfig = cluster()?.kubeconfig().to_path_buf();
    let b = Operator::spawn_as(
        &OperatorOptions {
            identity: "replica-b".into(),
            ..OperatorOptions::new(&ns)
        },
        &kubeconfig,
    )
    .await?;
    let agent = Agent::start(&a, &format!("{ns}-n1"), "127.0.239.1").await?;
    let pools: Api<ConnectionPool> = Api::namespaced(client.clone(), &ns);
    let synced = |p: &ConnectionPool| {
        p.status
            .as_ref()
            .and_then(|s| s.agents.as_ref())
            .map_or(0, |a| a.synced)
    };
    eventually(
        Duration::from_secs(30),
        "a's status: the agent synced",
        || async {
            let p = pools.get("api").await.ok()?;
            (synced(&p) == 1).then_some(())
        },
    )
    .await
    .with_context(|| a.proc.log())?;
    let runs = |p: Option<serde_json::Value>, n: u32| {
        p.is_some_and(|p| p.to_string().contains(&format!("\"maxStreams\":{n}")))
    };
    assert!(
        runs(agent.pool(&ns, "api").await, 10),
        "{:?}",
        agent.pool(&ns, "api").await
    );

    // Freeze the leader. The standby takes over once it has seen the Lease
    // unchanged for a lease duration by its own clock.
    signal(&a, "-STOP")?;
    eventually(Duration::from_secs(10), "replica-b leading", || async {
        (lease_holder(&ns).await == "replica-b" && b.wait_leading_once().await).then_some(())
    })
    .await
    .with_context(|| b.proc.log())?;
    // While a is frozen, the pool changes; b writes its view: the agent is
    // connected to a, not b, so b counts it as not synced.
    setup::apply_pool(&ns, &spec(20)).await?;
    eventually(
        Duration::from_secs(15),
        "b's status for generation 2",
        || async {
            let p = pools.get("api").await.ok()?;
            let s = p.status.as_ref()?;
            (s.observed_generation == Some(2) && synced(&p) == 0).then_some(())
        },
    )
    .await
    .with_context(|| b.proc.log())?;

    // Wake a. Its fence has expired: over the next seconds it must write
    // no status (a write of its view would say the agent is synced) and
    // push nothing to its agent (which still has a stream to it), then
    // step down.
    signal(&a, "-CONT")?;
    let watch_until = tokio::time::Instant::now() + Duration::from_secs(6);
    while tokio::time::Instant::now() < watch_until {
        let p = pools.get("api").await?;
        assert_eq!(synced(&p), 0, "a woken leader wrote status: {:?}", p.status);
        assert_eq!(
            p.status.as_ref().and_then(|s| s.observed_generation),
            Some(2)
        );
        assert!(
            runs(agent.pool(&ns, "api").await, 10),
            "a woken leader pushed to its agent: {:?}",
            agent.pool(&ns, "api").await
        );
        assert_eq!(lease_holder(&ns).await, "replica-b");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = a.proc.log();
    assert!(
        log.contains("stepped down"),
        "the woken leader did not step down:\n{log}"
    );
    Ok(())
}

/// A TCP forwarder to the API server that can be paused: while paused it
/// moves no byte either way, so every call through it hangs (a partition
/// between a replica and the API server; kube's client has no read
/// timeout).
struct Pausable {
    addr: std::net::SocketAddr,
    paused: tokio::sync::watch::Sender<bool>,
}

impl Pausable {
    async fn start(upstream: String) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (paused, watch) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let (upstream, watch) = (upstream.clone(), watch.clone());
                tokio::spawn(async move {
                    let Ok(outbound) = tokio::net::TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let (ri, wi) = inbound.into_split();
                    let (ro, wo) = outbound.into_split();
                    tokio::join!(pump(ri, wo, watch.clone()), pump(ro, wi, watch));
                });
            }
        });
        Ok(Self { addr, paused })
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut paused: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let Ok(n) = from.read(&mut buf).await else {
            return;
        };
        if n == 0 {
            return;
        }
        if paused.wait_for(|p| !*p).await.is_err() {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[tokio::test]
async fn a_leader_cut_off_from_the_api_server_stops_acting_and_steps_down() -> Result<()> {
    let (ns, _) = setup::world("partition", 2).await?;
    // Replica a reaches the API server through the forwarder.
    let admin = std::fs::read_to_string(cluster()?.kubeconfig())?;
    let server = admin
        .lines()
        .find_map(|l| l.trim().strip_prefix("server: "))
        .context("no server in the kubeconfig")?
        .trim()
        .trim_matches(|c| c == '"' || c == '\'')
        .to_string();
    let upstream = server
        .trim_start_matches("https://")
        .trim_end_matches('/')
        .to_string();
    let cut = Pausable::start(upstream.clone()).await?;
    let dir = tempfile::tempdir()?;
    let kubeconfig = dir.path().join("a.kubeconfig");
    std::fs::write(
        &kubeconfig,
        admin.replace(&server, &format!("https://{}", cut.addr)),
    )?;
    let a = Operator::spawn_as(
        &OperatorOptions {
            identity: "replica-a".into(),
            ..OperatorOptions::new(&ns)
        },
        &kubeconfig,
    )
    .await?;
    a.wait_ready().await.with_context(|| a.proc.log())?;
    let b = Operator::spawn_as(
        &OperatorOptions {
            identity: "replica-b".into(),
            ..OperatorOptions::new(&ns)
        },
        cluster()?.kubeconfig(),
    )
    .await?;
    let mut first = Agent::start(&a, &format!("{ns}-n1"), "127.0.238.1").await?;
    a.wait_connected(1, Duration::from_secs(20)).await?;
    first.proc.kill().await;

    // Cut a off: its renewals hang. b takes over once it has seen the
    // Lease unchanged for a lease duration.
    cut.paused.send_replace(true);
    eventually(Duration::from_secs(15), "replica-b leading", || async {
        b.wait_leading_once().await.then_some(())
    })
    .await
    .with_context(|| b.proc.log())?;
    // a, still cut off, must no longer accept an agent: its renew deadline
    // has passed even though its renewal call has not returned.
    let late = Agent::start(&a, &format!("{ns}-n2"), "127.0.238.2").await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let late_log = late.proc.log();
    assert!(
        !late_log.contains("control stream open"),
        "a cut-off leader accepted an agent:\n{late_log}"
    );
    // And it steps down (its lease calls time out), while still cut off.
    let mut a = a;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while a.proc.is_running() {
        if tokio::time::Instant::now() > deadline {
            bail!("a cut-off leader kept running:\n{}", a.proc.log());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = a.proc.log();
    assert!(log.contains("stepped down"), "{log}");
    assert!(log.contains("timed out"), "{log}");
    cut.paused.send_replace(false);
    Ok(())
}
