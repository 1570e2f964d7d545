//! The agent's data-path benchmark: one run drives unary and streaming RPCs
//! at a tonic backend directly and through a `tidepool-agent` process, and
//! prints
//! - the throughput ratio (through the agent / direct) at 64 concurrent
//!   streams, closed loop;
//! - the latency the agent adds (p50, p99) at half of the agent's
//!   saturation rate, open loop, against the direct figures at that rate;
//! - the agent's CPU seconds per 1000 RPCs, from the agent process's own
//!   accounting (`/proc/<pid>/stat` utime + stime).
//!
//! It measures and prints; it asserts nothing about time. Run with
//! `make bench` or `cargo bench -p tidepool-agent --bench proxy`;
//! `BENCH_SECONDS` sets each phase's length (default 3),
//! `BENCH_AGENT_THREADS` the agent's worker threads (default 1).
//!
//! By default the load generator, the backend and the agent share every
//! core, so the agent's CPU is taken from the other two: the throughput
//! ratio is then bounded by CPU sharing, not by the agent. With
//! `BENCH_LOAD_CPUS` and `BENCH_AGENT_CPUS` (taskset CPU lists, e.g. `0`
//! and `1`) the load generator and backend run on one set of cores and the
//! agent on another, in both phases — the agent on cores of its own, as on
//! a node whose clients and backends run elsewhere.

#[path = "../tests/support/mod.rs"]
#[allow(unused_imports)]
mod support;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use support::{Backend, Client};
use tokio::sync::mpsc;

/// Concurrent streams in the saturation runs.
const CONCURRENCY: usize = 64;
/// Bytes per message.
const MESSAGE: usize = 128;

fn phase_length() -> Duration {
    let seconds = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    Duration::from_secs_f64(seconds)
}

/// The agent process, killed when dropped.
struct Agent {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Agent {
    async fn start(backend: &Backend) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pools.yaml");
        std::fs::write(
            &file,
            format!(
                "apiVersion: tidepool.dev/v1alpha1\nkind: ConnectionPool\nmetadata: {{name: bench}}\n\
                 spec: {{target: {{addresses: ['{}']}}, size: 8, maxIdle: 8, maxStreams: 100}}\n",
                backend.address()
            ),
        )
        .unwrap();
        let port = support::free_port();
        let agent = env!("CARGO_BIN_EXE_tidepool-agent");
        let mut command = match std::env::var("BENCH_AGENT_CPUS") {
            Ok(cpus) => {
                let mut taskset = Command::new("taskset");
                taskset.args(["-c", &cpus, agent]);
                taskset
            }
            Err(_) => Command::new(agent),
        };
        let child = command
            .arg("--standalone")
            .arg(&file)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args([
                "--admin-listen",
                &format!("127.0.0.1:{}", support::free_port()),
            ])
            .env("TIDEPOOL_LOG", "warn")
            .env("TIDEPOOL_WORKER_THREADS", agent_threads().to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start tidepool-agent");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        for _ in 0..400 {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Agent {
            child,
            addr,
            _dir: dir,
        }
    }

    /// CPU seconds (user + system) the agent process has used.
    fn cpu_seconds(&self) -> f64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        // Fields after the command name, which is in parentheses.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of the whole line, 12 and 13
        // after the name.
        let ticks: f64 = fields.get(11..13).map_or(0.0, |f| {
            f.iter().filter_map(|v| v.parse::<f64>().ok()).sum()
        });
        ticks / clock_ticks()
    }
}

/// The agent's worker threads: `BENCH_AGENT_THREADS`, default 1 (the load
/// generator and the backend share the same cores).
fn agent_threads() -> usize {
    std::env::var("BENCH_AGENT_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// What one phase measured.
#[derive(Debug, Default, Clone)]
struct Run {
    rpcs: u64,
    seconds: f64,
    latencies: Vec<Duration>,
}

impl Run {
    fn rate(&self) -> f64 {
        self.rpcs as f64 / self.seconds
    }

    fn percentile(&self, p: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let mut sorted = self.latencies.clone();
        sorted.sort_unstable();
        let index = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
        sorted[index]
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Unary,
    /// Ping-pong messages on long-lived bidirectional streams; one message
    /// round trip counts as one RPC.
    Streaming,
}

/// Closed loop: `CONCURRENCY` workers call back to back for `length`.
async fn saturate(addr: SocketAddr, kind: Kind, length: Duration) -> Run {
    let clients = connect(addr, 4).await;
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let message = Bytes::from(vec![42u8; MESSAGE]);
    let mut workers = Vec::new();
    for i in 0..CONCURRENCY {
        let mut client = clients[i % clients.len()].clone();
        let (stop, count, message) = (stop.clone(), count.clone(), message.clone());
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            match kind {
                Kind::Unary => {
                    while !stop.load(Ordering::Relaxed) {
                        let started = Instant::now();
                        client
                            .unary(tonic::Request::new(message.clone()))
                            .await
                            .expect("unary call");
                        latencies.push(started.elapsed());
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Kind::Streaming => {
                    let (tx, rx) = mpsc::channel::<Bytes>(1);
                    let response = client
                        .bidi(tonic::Request::new(
                            tokio_stream::wrappers::ReceiverStream::new(rx),
                        ))
                        .await
                        .expect("open stream");
                    let mut stream = response.into_inner();
                    while !stop.load(Ordering::Relaxed) {
                        let started = Instant::now();
                        tx.send(message.clone()).await.expect("send");
                        stream.message().await.expect("receive").expect("a reply");
                        latencies.push(started.elapsed());
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            latencies
        }));
    }
    // Warm up, then measure.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = count.load(Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(length).await;
    let rpcs = count.load(Ordering::Relaxed) - before;
    let seconds = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    for worker in workers {
        latencies.extend(worker.await.unwrap());
    }
    Run {
        rpcs,
        seconds,
        latencies,
    }
}

/// Open loop: unary calls started at `rate` per second for `length`,
/// whatever the answers do.
async fn paced(addr: SocketAddr, rate: f64, length: Duration) -> Run {
    let clients = connect(addr, 4).await;
    let message = Bytes::from(vec![42u8; MESSAGE]);
    let interval = Duration::from_secs_f64(1.0 / rate);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let started = Instant::now();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut sent = 0u64;
    while started.elapsed() < length {
        ticker.tick().await;
        let mut client = clients[(sent as usize) % clients.len()].clone();
        let (tx, message) = (tx.clone(), message.clone());
        tokio::spawn(async move {
            let begun = Instant::now();
            client
                .unary(tonic::Request::new(message))
                .await
                .expect("unary call");
            let _ = tx.send(begun.elapsed());
        });
        sent += 1;
    }
    drop(tx);
    let mut latencies = Vec::with_capacity(sent as usize);
    while let Some(latency) = rx.recv().await {
        latencies.push(latency);
    }
    Run {
        rpcs: latencies.len() as u64,
        seconds: started.elapsed().as_secs_f64(),
        latencies,
    }
}

async fn connect(addr: SocketAddr, n: usize) -> Vec<Client> {
    let mut clients = Vec::new();
    for _ in 0..n {
        clients.push(Client::connect(addr, "bench.default:50051").await);
    }
    clients
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() {
    // `cargo bench` passes `--bench`; a filter that excludes us is honoured.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    if !args.is_empty() && !args.iter().any(|a| "proxy".contains(a.as_str())) {
        return;
    }
    if let Ok(cpus) = std::env::var("BENCH_LOAD_CPUS") {
        // Before the runtime starts: its threads inherit the affinity.
        let pinned = Command::new("taskset")
            .args(["-p", "-c", &cpus, &std::process::id().to_string()])
            .stdout(Stdio::null())
            .status()
            .expect("run taskset");
        assert!(pinned.success(), "taskset -c {cpus} failed");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(bench());
}

async fn bench() {
    let length = phase_length();
    let backend = Backend::start("bench").await;
    let agent = Agent::start(&backend).await;
    let direct = backend.addr;
    println!(
        "agent data-path benchmark: {MESSAGE}-byte messages, {CONCURRENCY} concurrent streams, {length:?} per phase, \
         agent with {} worker thread(s); CPUs: load generator and backend {}, agent {}",
        agent_threads(),
        std::env::var("BENCH_LOAD_CPUS").unwrap_or_else(|_| "all".into()),
        std::env::var("BENCH_AGENT_CPUS").unwrap_or_else(|_| "all".into()),
    );

    let mut rows = Vec::new();
    for kind in [Kind::Unary, Kind::Streaming] {
        let base = saturate(direct, kind, length).await;
        let cpu_before = agent.cpu_seconds();
        let through = saturate(agent.addr, kind, length).await;
        // Includes the warm-up and wind-down RPCs; counted over the same span.
        let cpu = agent.cpu_seconds() - cpu_before;
        let total_rpcs = through.latencies.len() as f64;
        println!(
            "{kind:?}: direct {:.0}/s, through agent {:.0}/s, ratio {:.2}; agent CPU {:.4} s per 1000 RPCs",
            base.rate(),
            through.rate(),
            through.rate() / base.rate(),
            cpu / (total_rpcs / 1000.0)
        );
        rows.push((kind, base, through, cpu / (total_rpcs / 1000.0)));
    }

    // Latency at half of the agent's unary saturation rate.
    let saturation = rows[0].2.rate();
    let rate = saturation / 2.0;
    let base = paced(direct, rate, length).await;
    let cpu_before = agent.cpu_seconds();
    let through = paced(agent.addr, rate, length).await;
    // At a steady rate below saturation fewer RPCs share each wake-up, so
    // this is the higher, more typical figure per RPC.
    let paced_cpu = (agent.cpu_seconds() - cpu_before) / (through.rpcs as f64 / 1000.0);
    println!("unary at {rate:.0}/s: agent CPU {paced_cpu:.4} s per 1000 RPCs (cores per 1000 RPS)");
    println!(
        "unary at {rate:.0}/s (half of the agent's saturation): direct p50 {:.3} ms p99 {:.3} ms; \
         through agent p50 {:.3} ms p99 {:.3} ms; added p50 {:.3} ms p99 {:.3} ms",
        ms(base.percentile(0.5)),
        ms(base.percentile(0.99)),
        ms(through.percentile(0.5)),
        ms(through.percentile(0.99)),
        ms(through.percentile(0.5)) - ms(base.percentile(0.5)),
        ms(through.percentile(0.99)) - ms(base.percentile(0.99)),
    );

    println!();
    println!("| RPC | direct RPC/s | through agent RPC/s | ratio | agent CPU s / 1000 RPCs |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    for (kind, base, through, cpu) in &rows {
        println!(
            "| {kind:?} | {:.0} | {:.0} | {:.2} | {:.4} |",
            base.rate(),
            through.rate(),
            through.rate() / base.rate(),
            cpu
        );
    }
    println!();
    println!("| unary at {rate:.0}/s | p50 ms | p99 ms |");
    println!("| --- | ---: | ---: |");
    println!(
        "| direct | {:.3} | {:.3} |",
        ms(base.percentile(0.5)),
        ms(base.percentile(0.99))
    );
    println!(
        "| through agent | {:.3} | {:.3} |",
        ms(through.percentile(0.5)),
        ms(through.percentile(0.99))
    );
    println!(
        "| added by the agent | {:.3} | {:.3} |",
        ms(through.percentile(0.5)) - ms(base.percentile(0.5)),
        ms(through.percentile(0.99)) - ms(base.percentile(0.99))
    );
}
