//! `tidepool-demo`: the demo's gRPC backend and load client.
//!
//! - `backend --listen ADDR`: the gRPC health service, naming itself in an
//!   `x-backend` response header.
//! - `load --agent ADDR --authority NAME`: unary calls through an agent at a
//!   steady rate plus long-lived watch streams, printing every `--every`
//!   (5s) how many calls succeeded and failed and which backends answered,
//!   stamped with the Unix time in milliseconds (the kind e2e reads these
//!   lines to measure recovery).
//!
//! Both stop on SIGTERM or SIGINT (a pod's PID 1 gets SIGTERM).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};
use tidepool_e2e::grpc;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(
    name = "tidepool-demo",
    about = "the tidepool demo's backend and load client"
)]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Serve the gRPC health service.
    Backend {
        /// Where to listen.
        #[arg(long, env = "TIDEPOOL_DEMO_LISTEN")]
        listen: SocketAddr,
    },
    /// Send calls through an agent.
    Load {
        /// Where the calls go: the agent's listener as an address, or a
        /// `host:port` such as a node-local Service's
        /// (`payments-pooled.shop:50051`), resolved at each connect.
        #[arg(long, env = "TIDEPOOL_DEMO_AGENT", default_value = "127.0.0.1:15000")]
        agent: String,
        /// The authority the calls carry (the pool's Service name).
        #[arg(
            long,
            env = "TIDEPOOL_DEMO_AUTHORITY",
            default_value = "payments-grpc.shop"
        )]
        authority: String,
        /// Concurrent unary callers.
        #[arg(long, env = "TIDEPOOL_DEMO_CALLERS", default_value_t = 4)]
        callers: usize,
        /// Long-lived watch streams kept open.
        #[arg(long, env = "TIDEPOOL_DEMO_WATCHERS", default_value_t = 6)]
        watchers: usize,
        /// How often to print the counts.
        #[arg(long, env = "TIDEPOOL_DEMO_EVERY", default_value = "5s", value_parser = every)]
        every: Duration,
    },
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let stop = CancellationToken::new();
    match args.command {
        Cmd::Backend { listen } => {
            let listener = tokio::net::TcpListener::bind(listen).await?;
            println!("backend serving on {listen}");
            let server = grpc::serve_backend(listener, Duration::from_secs(1), stop.clone());
            shutdown().await;
            // Drain: GOAWAY, and the calls in flight finish (watches do
            // not: the pod's grace period ends them).
            stop.cancel();
            let drained = tokio::time::timeout(Duration::from_secs(4), server)
                .await
                .is_ok();
            println!(
                "backend stopped ({})",
                if drained {
                    "drained"
                } else {
                    "watches still open at 4s"
                }
            );
        }
        Cmd::Load {
            agent,
            authority,
            callers,
            watchers,
            every,
        } => {
            let channel = grpc::channel(&agent, &authority)?;
            let streaming = grpc::streaming_channel(&agent, &authority)?;
            // How each watch ended, by gRPC code (a watch never ends by
            // itself: every end is a GOAWAY drain, a reset or a refusal).
            let (ends_tx, mut ends_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
            for _ in 0..watchers {
                let streaming = streaming.clone();
                let ends = ends_tx.clone();
                tokio::spawn(async move {
                    loop {
                        let code = match grpc::watch_status(&streaming).await {
                            Ok(mut s) => loop {
                                match s.message().await {
                                    Ok(Some(_)) => {}
                                    Ok(None) => break "Ok".to_string(),
                                    Err(status) => break format!("{:?}", status.code()),
                                }
                            },
                            Err(status) => format!("{:?}", status.code()),
                        };
                        let _ = ends.send(code);
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                });
            }
            let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<String, String>>(1024);
            // Calls sent again because they never left this client (see
            // grpc::never_sent), counted apart from failures.
            let resent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
            for _ in 0..callers {
                let channel = channel.clone();
                let tx = tx.clone();
                let resent = resent.clone();
                tokio::spawn(async move {
                    loop {
                        let mut r = grpc::try_check(&channel).await;
                        if let Err(status) = &r
                            && grpc::never_sent(status)
                        {
                            resent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            r = grpc::try_check(&channel).await;
                        }
                        let r =
                            r.map_err(|s| format!("check failed: {}: {}", s.code(), s.message()));
                        if tx.send(r).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                });
            }
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            let (mut ok, mut failed, mut by_backend, mut last_error) =
                (0u64, 0u64, BTreeMap::new(), None);
            let mut ends: BTreeMap<String, u64> = BTreeMap::new();
            loop {
                tokio::select! {
                    _ = shutdown() => return Ok(()),
                    r = rx.recv() => match r {
                        Some(Ok(b)) => { ok += 1; *by_backend.entry(b).or_insert(0u64) += 1; }
                        Some(Err(e)) => { failed += 1; last_error = Some(e); }
                        None => return Ok(()),
                    },
                    Some(code) = ends_rx.recv() => *ends.entry(code).or_insert(0) += 1,
                    _ = tick.tick() => {
                        let spread: Vec<String> = by_backend.iter().map(|(b, n)| format!("{b}={n}")).collect();
                        let at = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .unwrap_or_default()
                            .as_millis();
                        let ended: Vec<String> = ends.iter().map(|(c, n)| format!("{c}={n}")).collect();
                        let resent = resent.swap(0, std::sync::atomic::Ordering::Relaxed);
                        println!("load: {ok} ok, {failed} failed in {every:?} via {agent} at {at} ({}) watches_ended[{}] resent={resent}{}", spread.join(" "), ended.join(","),
                            last_error.take().map(|e| format!("; last error: {e}")).unwrap_or_default());
                        (ok, failed) = (0, 0);
                        by_backend.clear();
                        ends.clear();
                    }
                }
            }
        }
    }
    Ok(())
}

/// Waits for SIGTERM or SIGINT.
async fn shutdown() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Parses `--every` (`1s`, `500ms`).
fn every(s: &str) -> Result<Duration, String> {
    tidepool_crds::validate::parse_duration(s)
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("{s:?} is not a positive duration such as 1s or 500ms"))
}
