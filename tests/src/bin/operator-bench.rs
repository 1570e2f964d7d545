//! `operator-bench` (`make bench`): one operator (a release build, as a
//! process) on the local control plane against simulated agents (in-process
//! control clients, the agent's own protocol code with an applier that
//! records instead of proxying): 500 agents × 200 pools by default.
//!
//! Measures, and prints as a Markdown table for docs/benchmarks.md:
//! - convergence: time from a spec change (the PATCH sent) to each agent
//!   applying it (its ACK follows at once), p50/p99 over agents and rounds,
//!   and the time until every agent had it;
//! - the operator's memory (VmRSS, and the peak VmHWM);
//! - status writes per minute while every agent reports changing occupancy.
//!
//! It measures; it asserts nothing about time.
#![allow(clippy::disallowed_types)] // std::time::Instant: wall-clock timing of whole processes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use clap::Parser;
use futures::StreamExt as _;
use kube::api::{Api, Patch, PatchParams};
use tidepool_agent::config::PoolConfig;
use tidepool_agent::control::{self, Apply, ControlOptions, Rejection};
use tidepool_crds::ConnectionPool;
use tidepool_crds::control::pb;
use tidepool_e2e::objects::apply_node;
use tidepool_e2e::procs::{Proc, eventually, free_port, http_get};
use tidepool_e2e::{TestNamespace, cluster, ensure_crd};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(
    name = "operator-bench",
    about = "the operator at scale on the local control plane"
)]
struct Args {
    /// Simulated agents (one Node each).
    #[arg(long, env = "TIDEPOOL_BENCH_AGENTS", default_value_t = 500)]
    agents: usize,
    /// ConnectionPools.
    #[arg(long, env = "TIDEPOOL_BENCH_POOLS", default_value_t = 200)]
    pools: usize,
    /// Spec changes measured.
    #[arg(long, env = "TIDEPOOL_BENCH_ROUNDS", default_value_t = 10)]
    rounds: usize,
    /// How long status writes are counted.
    #[arg(long, env = "TIDEPOOL_BENCH_STATUS_WINDOW", default_value = "60s", value_parser = humantime_secs)]
    status_window: Duration,
}

fn humantime_secs(s: &str) -> Result<Duration, String> {
    tidepool_crds::validate::parse_duration(s)
        .ok_or_else(|| format!("{s:?} is not a duration such as 60s"))
}

/// An applied change: agent, pool key, generation, when.
type Applied = (usize, String, i64, Instant);

/// A simulated agent: records what it applies, reports occupancy that
/// changes every 5 s.
///
/// It does as little as it can beyond what the operator sees, so the
/// benchmark measures the operator rather than 500 agents sharing its
/// cores (each real agent has a node of its own): it validates only pools
/// whose generation changed, and tells the control client when its report
/// changes (`report_version`) so an unchanged one is not rebuilt every
/// second.
struct SimAgent {
    index: usize,
    started: Instant,
    pools: Mutex<HashMap<String, Arc<PoolConfig>>>,
    /// Bumped when the set of pools it runs changes.
    changes: std::sync::atomic::AtomicU64,
    applied: mpsc::UnboundedSender<Applied>,
}

impl SimAgent {
    /// Which 5-second period of the run it is: its occupancy changes with it.
    fn period(&self) -> u64 {
        self.started.elapsed().as_secs() / 5
    }
}

impl Apply for SimAgent {
    fn apply(&self, pools: Vec<Arc<PoolConfig>>) -> Result<(), Rejection> {
        let now = Instant::now();
        let mut mine = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        let mut next = HashMap::with_capacity(pools.len());
        for p in pools {
            let key = p.key();
            let old = mine.get(&key);
            let known = old.is_some_and(|old| old.uid == p.uid && old.generation == p.generation);
            if !known && p.spec.settings().is_err() {
                return Err(Rejection {
                    error: format!("pool {key} is invalid"),
                    pools: vec![key],
                });
            }
            if old.is_none_or(|old| old.generation != p.generation) {
                let _ = self
                    .applied
                    .send((self.index, key.clone(), p.generation, now));
            }
            next.insert(key, p);
        }
        *mine = next;
        self.changes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    fn report_version(&self) -> Option<u64> {
        let changes = self.changes.load(std::sync::atomic::Ordering::Relaxed);
        Some(self.period() << 32 | changes)
    }

    fn report(&self) -> Vec<pb::PoolReport> {
        let period = self.period() as i64;
        let mine = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        mine.iter()
            .map(|(key, pool)| {
                let (namespace, name) = key.split_once('/').unwrap_or_default();
                pb::PoolReport {
                    namespace: namespace.into(),
                    name: name.into(),
                    uid: pool.uid.clone(),
                    generation: pool.generation,
                    addresses: pool
                        .addresses
                        .iter()
                        .enumerate()
                        .map(|(i, a)| {
                            let streams = (period + self.index as i64 + i as i64) % 5;
                            pb::AddressReport {
                                address: a.clone(),
                                connections: 1,
                                busy: 0,
                                idle: i64::from(streams == 0),
                                streams,
                                overflow: 0,
                                observed: None,
                            }
                        })
                        .collect(),
                }
            })
            .collect()
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// CPU seconds (user + system) a process has used, from `/proc/<pid>/stat`.
fn cpu_seconds(pid: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which ends with the last ')').
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 (1-based), 11 and 12 after ')'.
    (ticks(11) + ticks(12)) / 100.0
}

/// Metric `name` in a Prometheus text body (0 when absent).
fn metric(body: &str, name: &str) -> f64 {
    tidepool_e2e::procs::metric_in(body, name).unwrap_or(0.0)
}

/// The mean of histogram `name` over what was observed between two
/// scrapes, in milliseconds.
fn mean_ms(before: &str, after: &str, name: &str) -> f64 {
    let delta = |suffix: &str| {
        let n = format!("{name}_{suffix}");
        metric(after, &n) - metric(before, &n)
    };
    let count = delta("count");
    if count == 0.0 {
        return 0.0;
    }
    delta("sum") / count * 1000.0
}

fn proc_status(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
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
    eprintln!("bench: starting the local control plane");
    ensure_crd().await?;
    let client = cluster()?.client().await?;
    let ns = TestNamespace::new("bench").await?.name;
    let selector = format!("tidepool.dev/bench={ns}");

    eprintln!(
        "bench: creating {} nodes and {} pools",
        args.agents, args.pools
    );
    let t = Instant::now();
    let nodes: Vec<String> = (0..args.agents)
        .map(|i| format!("{ns}-node-{i:04}"))
        .collect();
    let results: Vec<Result<()>> = futures::stream::iter(nodes.iter())
        .map(|n| {
            let client = client.clone();
            let ns = ns.clone();
            async move { apply_node(&client, n, &[("tidepool.dev/bench", &ns)]).await }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    results.into_iter().collect::<Result<Vec<()>>>()?;
    let pools_api: Api<ConnectionPool> = Api::namespaced(client.clone(), &ns);
    let ssa = PatchParams::apply("operator-bench").force();
    let pool_names: Vec<String> = (0..args.pools).map(|i| format!("pool-{i:03}")).collect();
    let results: Vec<Result<()>> = futures::stream::iter(pool_names.iter().enumerate())
        .map(|(i, name)| {
            let api = pools_api.clone();
            let ssa = ssa.clone();
            async move {
                let body = serde_json::json!({
                    "apiVersion": "tidepool.dev/v1alpha1", "kind": "ConnectionPool",
                    "metadata": {"name": name},
                    "spec": {"target": {"addresses": [
                        format!("10.{}.{}.1:50051", i / 250, i % 250),
                        format!("10.{}.{}.2:50051", i / 250, i % 250),
                        format!("10.{}.{}.3:50051", i / 250, i % 250),
                    ]}, "size": 10}
                });
                api.patch(name, &ssa, &Patch::Apply(&body))
                    .await
                    .map(|_| ())
                    .with_context(|| format!("applying pool {name}"))
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    results.into_iter().collect::<Result<Vec<()>>>()?;
    eprintln!("bench: objects created in {:?}", t.elapsed());

    // The operator.
    let control = format!("127.0.0.1:{}", free_port("127.0.0.1")?);
    let admin: std::net::SocketAddr = format!("127.0.0.1:{}", free_port("127.0.0.1")?).parse()?;
    let operator = Proc::spawn(
        "operator",
        operator_bin,
        vec![
            format!("--control-listen={control}"),
            format!("--admin-listen={admin}"),
            format!("--watch-namespace={ns}"),
            format!("--node-selector={selector}"),
            format!("--lease-namespace={ns}"),
            "--identity=bench".into(),
            // This benchmark measures pushes and status; authentication's
            // cost is `failover-bench`'s.
            "--insecure-control=true".into(),
        ],
        vec![(
            "KUBECONFIG".into(),
            cluster()?.kubeconfig().display().to_string(),
        )],
    )?;
    eventually(
        Duration::from_secs(60),
        "the operator becoming ready",
        || async { matches!(http_get(admin, "/readyz").await, Ok((200, _))).then_some(()) },
    )
    .await
    .with_context(|| operator.log())?;
    let pid = operator.pid().context("the operator exited")?;

    // The agents.
    eprintln!("bench: connecting {} simulated agents", args.agents);
    let stop = CancellationToken::new();
    let (tx, mut applied) = mpsc::unbounded_channel::<Applied>();
    let started = Instant::now();
    for (i, node) in nodes.iter().enumerate() {
        let agent = SimAgent {
            index: i,
            started,
            pools: Mutex::default(),
            changes: Default::default(),
            applied: tx.clone(),
        };
        let options = ControlOptions::new(
            format!("http://{control}"),
            node.clone(),
            format!("sim-{i}"),
        );
        tokio::spawn(control::run(options, agent, stop.clone()));
    }
    // Wait until every agent has every pool.
    let mut have: HashMap<usize, usize> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while have.values().filter(|n| **n >= args.pools).count() < args.agents {
        let Ok(Some((agent, _, _, _))) =
            tokio::time::timeout_at(deadline.into(), applied.recv()).await
        else {
            bail!(
                "not every agent got every pool within 120s:\n{}",
                operator.log()
            );
        };
        *have.entry(agent).or_default() += 1;
    }
    let initial = started.elapsed();
    eprintln!("bench: every agent has every pool after {initial:?}");
    let rss_connected = proc_status(pid, "VmRSS:").unwrap_or(0);

    // Convergence: spec changes, one pool at a time.
    let (_, metrics0) = http_get(admin, "/metrics").await?;
    let (op_cpu0, bench_cpu0, rounds_start) = (
        cpu_seconds(&pid.to_string()),
        cpu_seconds("self"),
        Instant::now(),
    );
    let mut per_agent = Vec::new();
    let mut to_all = Vec::new();
    for round in 0..args.rounds {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        while applied.try_recv().is_ok() {}
        let name = &pool_names[round % pool_names.len()];
        let key = format!("{ns}/{name}");
        let t0 = Instant::now();
        let patched = pools_api
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"spec": {"size": 20 + round}})),
            )
            .await?;
        let generation = patched.metadata.generation.unwrap_or_default();
        let mut seen = 0;
        let mut last = Duration::ZERO;
        let deadline = t0 + Duration::from_secs(30);
        while seen < args.agents {
            let Ok(Some((_, k, g, at))) =
                tokio::time::timeout_at(deadline.into(), applied.recv()).await
            else {
                bail!(
                    "round {round}: only {seen} of {} agents applied {key} generation {generation} within 30s",
                    args.agents
                );
            };
            if k == key && g == generation {
                let d = at.saturating_duration_since(t0);
                per_agent.push(d);
                last = last.max(d);
                seen += 1;
            }
        }
        to_all.push(last);
        // Agents' occupancy, and so their reports, change together every
        // 5 s (see `SimAgent::report`): where the round fell in that cycle.
        let phase = t0.duration_since(started).as_secs_f64() % 5.0;
        eprintln!(
            "bench: round {round}: every agent applied {key} generation {generation} after {last:?} (report cycle phase {phase:.1}s)"
        );
    }
    let rounds_wall = rounds_start.elapsed().as_secs_f64();
    let (_, metrics1) = http_get(admin, "/metrics").await?;
    let op_change_to_ack = mean_ms(
        &metrics0,
        &metrics1,
        "tidepool_operator_change_to_ack_seconds",
    );
    let op_push_to_ack = mean_ms(
        &metrics0,
        &metrics1,
        "tidepool_operator_push_to_ack_seconds",
    );
    let deltas = metric(&metrics1, "tidepool_operator_deltas_sent_total")
        - metric(&metrics0, "tidepool_operator_deltas_sent_total");
    let sends = metric(&metrics1, "tidepool_operator_snapshots_sent_total")
        - metric(&metrics0, "tidepool_operator_snapshots_sent_total");
    let op_cpu = (cpu_seconds(&pid.to_string()) - op_cpu0) / rounds_wall;
    let bench_cpu = (cpu_seconds("self") - bench_cpu0) / rounds_wall;
    per_agent.sort();
    to_all.sort();

    // Status writes while every agent reports changing occupancy.
    eprintln!("bench: counting status writes for {:?}", args.status_window);
    let (_, before) = http_get(admin, "/metrics").await?;
    tokio::time::sleep(args.status_window).await;
    let (_, after) = http_get(admin, "/metrics").await?;
    let writes = metric(&after, "tidepool_operator_status_writes_total")
        - metric(&before, "tidepool_operator_status_writes_total");
    let reports = metric(&after, "tidepool_operator_reports_total")
        - metric(&before, "tidepool_operator_reports_total");
    let per_minute = writes * 60.0 / args.status_window.as_secs_f64();
    let cap = args.pools as f64 * 60.0 / 5.0;
    let rss = proc_status(pid, "VmRSS:").unwrap_or(0);
    let hwm = proc_status(pid, "VmHWM:").unwrap_or(0);
    let connected = metric(&after, "tidepool_operator_connected_agents");
    stop.cancel();

    let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1000.0);
    println!(
        "\n| {} agents × {} pools | figure |",
        args.agents, args.pools
    );
    println!("| --- | --- |");
    println!(
        "| initial sync (connect → every agent has every pool) | {} |",
        ms(initial)
    );
    println!(
        "| spec change → agent applied/ACKed, p50 (n = {}) | {} |",
        per_agent.len(),
        ms(percentile(&per_agent, 0.5))
    );
    println!(
        "| spec change → agent applied/ACKed, p99 | {} |",
        ms(percentile(&per_agent, 0.99))
    );
    println!(
        "| spec change → every agent, p50 / p99 / max over {} rounds | {} / {} / {} |",
        to_all.len(),
        ms(percentile(&to_all, 0.5)),
        ms(percentile(&to_all, 0.99)),
        ms(to_all.last().copied().unwrap_or_default())
    );
    println!(
        "| operator's view, mean: desired change → ACK / send → ACK | {op_change_to_ack:.0} ms / {op_push_to_ack:.0} ms |"
    );
    println!("| snapshots sent during the rounds (of which deltas) | {sends:.0} ({deltas:.0}) |");
    println!(
        "| CPU during the rounds: operator / simulated agents (cores) | {op_cpu:.2} / {bench_cpu:.2} |"
    );
    println!(
        "| operator RSS with every agent connected (VmRSS) | {:.1} MiB |",
        rss_connected as f64 / 1024.0
    );
    println!(
        "| operator RSS at the end / peak (VmHWM) | {:.1} MiB / {:.1} MiB |",
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0
    );
    println!(
        "| status writes per minute (cap: {} pools / 5 s = {cap:.0}) | {per_minute:.0} |",
        args.pools
    );
    println!(
        "| agent reports received per minute | {:.0} |",
        reports * 60.0 / args.status_window.as_secs_f64()
    );
    println!("| agents connected at the end | {connected:.0} |");
    drop(operator);
    Ok(())
}
