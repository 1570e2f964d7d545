//! The agent's data-path benchmark: one run drives unary and streaming RPCs
//! at a tonic backend directly, through a `tidepool-agent` process and
//! through a byte relay (the floor for any user-space proxy: see [`relay`]),
//! and prints
//! - the throughput ratios (through the proxy / direct) at 64 concurrent
//!   streams, closed loop;
//! - the latency each proxy adds (p50, p99) at half of the agent's
//!   saturation rate, open loop, against the direct figures at that rate;
//! - the agent's and the relay's CPU seconds per 1000 RPCs, from each
//!   process's own accounting (`/proc/<pid>/stat` utime + stime), and their
//!   ratio.
//!
//! It measures and prints; it asserts nothing about time. Run with
//! `make bench` or `cargo bench -p tidepool-agent --bench proxy`;
//! `BENCH_SECONDS` sets each phase's length (default 3),
//! `BENCH_AGENT_THREADS` the agent's (and relay's) worker threads
//! (default 1).
//!
//! By default the load generator, the backend and the proxy share every
//! core, so the proxy's CPU is taken from the other two: the throughput
//! ratio is then bounded by CPU sharing, not by the proxy. With
//! `BENCH_LOAD_CPUS` and `BENCH_AGENT_CPUS` (taskset CPU lists, e.g. `0`
//! and `1`) the load generator and backend run on one set of cores and the
//! proxies on another, in every phase — the proxy on cores of its own, as
//! on a node whose clients and backends run elsewhere.
#![allow(clippy::disallowed_types)] // std::time::Instant: wall-clock timing of whole processes.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tidepool_testkit::{Backend, Client};
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

/// A proxy process under test (the agent, or the byte relay), killed when
/// dropped.
struct Proxy {
    child: Child,
    addr: SocketAddr,
    _dir: Option<tempfile::TempDir>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `program`, run on `BENCH_AGENT_CPUS` when that is set.
fn on_agent_cpus(program: &std::path::Path) -> Command {
    match std::env::var("BENCH_AGENT_CPUS") {
        Ok(cpus) => {
            let mut taskset = Command::new("taskset");
            taskset.arg("-c").arg(cpus).arg(program);
            taskset
        }
        Err(_) => Command::new(program),
    }
}

impl Proxy {
    /// The agent in standalone mode with one pool for `backend`.
    async fn agent(backend: &Backend) -> Proxy {
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
        let port = tidepool_testkit::free_port();
        let mut command = on_agent_cpus(env!("CARGO_BIN_EXE_tidepool-agent").as_ref());
        command
            .arg("--standalone")
            .arg(&file)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args([
                "--admin-listen",
                &format!("127.0.0.1:{}", tidepool_testkit::free_port()),
            ])
            .env("TIDEPOOL_LOG", "warn")
            .env("TIDEPOOL_WORKER_THREADS", agent_threads().to_string());
        Self::start(command, port, Some(dir)).await
    }

    /// This bench binary as a byte relay to `backend` (see [`relay`]).
    async fn relay(backend: &Backend) -> Proxy {
        let port = tidepool_testkit::free_port();
        let mut command = on_agent_cpus(&std::env::current_exe().expect("the bench binary"));
        command.env(RELAY_ENV, format!("127.0.0.1:{port}>{}", backend.addr));
        Self::start(command, port, None).await
    }

    async fn start(mut command: Command, port: u16, dir: Option<tempfile::TempDir>) -> Proxy {
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the proxy process");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        for _ in 0..400 {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Proxy {
            child,
            addr,
            _dir: dir,
        }
    }

    /// CPU seconds (user + system) the process has used.
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

/// Set in the environment of this binary re-run as the relay:
/// `<listen>><backend>`.
const RELAY_ENV: &str = "TIDEPOOL_BENCH_RELAY";

/// The floor for any user-space proxy on this machine: every client
/// connection gets its own backend connection and bytes are copied both
/// ways, with no HTTP/2 parsing, no routing and no pool. It runs on the
/// agent's runtime ([`runtime_builder`](tidepool_agent::app::runtime_builder),
/// `BENCH_AGENT_THREADS` threads) and on the same cores, so the agent's cost over the relay's is what
/// its HTTP/2 work costs.
fn relay(spec: &str) {
    let (listen, backend) = spec.split_once('>').expect("<listen>><backend>");
    let backend: SocketAddr = backend.parse().expect("a backend socket address");
    let runtime = tidepool_agent::app::runtime_builder(Some(agent_threads()))
        .build()
        .unwrap();
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .expect("relay listen");
        loop {
            let Ok((mut client, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let Ok(mut upstream) = tokio::net::TcpStream::connect(backend).await else {
                    return;
                };
                let _ = client.set_nodelay(true);
                let _ = upstream.set_nodelay(true);
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            });
        }
    });
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
    if let Ok(spec) = std::env::var(RELAY_ENV) {
        relay(&spec);
        return;
    }
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

/// One proxy's figures for one kind of load, beside the direct run's.
struct Measured {
    run: Run,
    /// CPU seconds per 1000 RPCs.
    cpu: f64,
}

/// Runs `load` through `proxy`, charging it the CPU the proxy used meanwhile.
async fn through<F: std::future::Future<Output = Run>>(
    proxy: &Proxy,
    load: impl FnOnce(SocketAddr) -> F,
) -> Measured {
    let before = proxy.cpu_seconds();
    let run = load(proxy.addr).await;
    // Includes warm-up and wind-down RPCs, counted over the same span.
    let cpu = (proxy.cpu_seconds() - before) / (run.latencies.len() as f64 / 1000.0);
    Measured { run, cpu }
}

async fn bench() {
    let length = phase_length();
    let backend = Backend::start("bench").await;
    let agent = Proxy::agent(&backend).await;
    let relay = Proxy::relay(&backend).await;
    let direct = backend.addr;
    println!(
        "agent data-path benchmark: {MESSAGE}-byte messages, {CONCURRENCY} concurrent streams, {length:?} per phase, \
         agent and relay with {} worker thread(s); CPUs: load generator and backend {}, agent and relay {}",
        agent_threads(),
        std::env::var("BENCH_LOAD_CPUS").unwrap_or_else(|_| "all".into()),
        std::env::var("BENCH_AGENT_CPUS").unwrap_or_else(|_| "all".into()),
    );

    let mut rows = Vec::new();
    for kind in [Kind::Unary, Kind::Streaming] {
        let base = saturate(direct, kind, length).await;
        let via_agent = through(&agent, |addr| saturate(addr, kind, length)).await;
        let via_relay = through(&relay, |addr| saturate(addr, kind, length)).await;
        println!(
            "{kind:?}: direct {:.0}/s; agent {:.0}/s, ratio {:.2}, CPU {:.4} s per 1000 RPCs; \
             relay {:.0}/s, ratio {:.2}, CPU {:.4}; agent CPU / relay CPU {:.2}",
            base.rate(),
            via_agent.run.rate(),
            via_agent.run.rate() / base.rate(),
            via_agent.cpu,
            via_relay.run.rate(),
            via_relay.run.rate() / base.rate(),
            via_relay.cpu,
            via_agent.cpu / via_relay.cpu,
        );
        rows.push((kind, base, via_agent, via_relay));
    }

    // Latency at half of the agent's unary saturation rate, for all three.
    let rate = rows[0].2.run.rate() / 2.0;
    let base = paced(direct, rate, length).await;
    let paced_agent = through(&agent, |addr| paced(addr, rate, length)).await;
    let paced_relay = through(&relay, |addr| paced(addr, rate, length)).await;
    // At a steady rate below saturation fewer RPCs share each wake-up: this
    // is the higher, more typical figure per RPC ("cores per 1000 RPS").
    println!(
        "unary at {rate:.0}/s: CPU s per 1000 RPCs: agent {:.4}, relay {:.4}, agent / relay {:.2}",
        paced_agent.cpu,
        paced_relay.cpu,
        paced_agent.cpu / paced_relay.cpu
    );

    println!();
    println!(
        "| RPC | direct RPC/s | agent RPC/s | agent ratio | relay RPC/s | relay ratio | agent CPU s / 1000 RPCs | relay CPU s / 1000 RPCs | agent / relay CPU |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for (kind, base, agent, relay) in &rows {
        println!(
            "| {kind:?} | {:.0} | {:.0} | {:.2} | {:.0} | {:.2} | {:.4} | {:.4} | {:.2} |",
            base.rate(),
            agent.run.rate(),
            agent.run.rate() / base.rate(),
            relay.run.rate(),
            relay.run.rate() / base.rate(),
            agent.cpu,
            relay.cpu,
            agent.cpu / relay.cpu,
        );
    }
    println!(
        "| Unary at {rate:.0}/s | | | | | | {:.4} | {:.4} | {:.2} |",
        paced_agent.cpu,
        paced_relay.cpu,
        paced_agent.cpu / paced_relay.cpu
    );
    println!();
    println!("| unary at {rate:.0}/s | p50 ms | p99 ms | added p50 ms | added p99 ms |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    println!(
        "| direct | {:.3} | {:.3} | | |",
        ms(base.percentile(0.5)),
        ms(base.percentile(0.99))
    );
    for (name, measured) in [("agent", &paced_agent), ("relay", &paced_relay)] {
        let run = &measured.run;
        println!(
            "| through the {name} | {:.3} | {:.3} | {:.3} | {:.3} |",
            ms(run.percentile(0.5)),
            ms(run.percentile(0.99)),
            ms(run.percentile(0.5)) - ms(base.percentile(0.5)),
            ms(run.percentile(0.99)) - ms(base.percentile(0.99)),
        );
    }
}
