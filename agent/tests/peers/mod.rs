//! Real processes for the peer tests: the agent binary, grpc-go's servers
//! and client, and ghz (built by `tests/peers/build.sh`), each killed when
//! its handle drops.
#![allow(clippy::disallowed_types)] // std::time::Instant: deadlines in plain threads, outside any tokio runtime.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fmt;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use tidepool_testkit::free_port;

/// The folder of peer binaries `tests/peers/build.sh` prints.
pub struct Peers {
    dir: PathBuf,
}

impl Peers {
    /// Finds the peers from `TIDEPOOL_PEERS_BIN`; a missing or incomplete
    /// folder fails the test, saying how to make it.
    pub fn find() -> Peers {
        let Some(dir) = std::env::var_os("TIDEPOOL_PEERS_BIN") else {
            panic!(
                "TIDEPOOL_PEERS_BIN is not set: these tests run real gRPC peers built from Go \
                 modules. Run `make unit`, or export TIDEPOOL_PEERS_BIN=$(tests/peers/build.sh)"
            );
        };
        let dir = PathBuf::from(dir);
        for name in [
            "ghz",
            "interop-server",
            "interop-client",
            "route-guide-server",
            "peers.protoset",
        ] {
            assert!(
                dir.join(name).exists(),
                "{} has no {name}: rerun tests/peers/build.sh",
                dir.display()
            );
        }
        Peers { dir }
    }

    fn bin(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Starts a peer server and waits until it listens on `port`.
    pub fn start(&self, name: &str, args: &[&str], port: u16) -> Proc {
        let child = Command::new(self.bin(name))
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        let proc = Proc { child };
        wait_listening(port, name);
        proc
    }

    /// Runs grpc-go's interop client for one case against `port`.
    pub fn interop_client(&self, port: u16, case: &str) -> Result<(), String> {
        let output = Command::new(self.bin("interop-client"))
            .args([
                "-server_host",
                "127.0.0.1",
                "-server_port",
                &port.to_string(),
                "-test_case",
                case,
            ])
            .output()
            .unwrap_or_else(|e| panic!("running interop-client: {e}"));
        if output.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&output.stderr)
                .lines()
                .rev()
                .take(3)
                .collect::<Vec<_>>()
                .join(" | "))
        }
    }
}

/// A child process, killed when dropped.
pub struct Proc {
    child: Child,
}

impl Proc {
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_listening(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} did not listen on {port} within 15 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The agent binary in standalone mode.
pub struct Agent {
    proc: Proc,
    /// The shared listener's port.
    pub port: u16,
    /// The admin port.
    pub admin: u16,
    _dir: tempfile::TempDir,
}

impl Agent {
    /// Starts the agent on `pools` (ConnectionPool YAML) and waits until it
    /// listens on its ports and the pools' `listen_ports`.
    pub fn start(pools: &str, listen_ports: &[u16]) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pools.yaml");
        std::fs::write(&file, pools).unwrap();
        let (port, admin) = (free_port(), free_port());
        let log = std::fs::File::create(dir.path().join("agent.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_tidepool-agent"))
            .arg("--standalone")
            .arg(&file)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
            .env("TIDEPOOL_LOG", "warn")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting tidepool-agent");
        let proc = Proc { child };
        for p in [port, admin].iter().chain(listen_ports) {
            wait_listening(*p, "tidepool-agent");
        }
        Agent {
            proc,
            port,
            admin,
            _dir: dir,
        }
    }

    /// The admin server's `/metrics` text.
    pub fn metrics(&self) -> String {
        http_get(self.admin, "/metrics")
    }

    /// What the agent logged so far (stdout and stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("agent.log")).unwrap_or_default()
    }

    /// The agent's resident memory in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.proc.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/PID/status")
    }

    /// Whether the agent process is still running.
    pub fn running(&mut self) -> bool {
        self.proc.running()
    }
}

/// GET over HTTP/1.0; the body.
pub fn http_get(port: u16, path: &str) -> String {
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(tcp, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
    let mut response = String::new();
    tcp.read_to_string(&mut response).unwrap();
    match response.split_once("\r\n\r\n") {
        Some((_, body)) => body.to_owned(),
        None => response,
    }
}

/// The sum of the samples of `name` whose labels contain every one of
/// `filters` (each a substring of the label set, such as `"default/rg"`).
pub fn metric(text: &str, name: &str, filters: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let labels = series.strip_prefix(name)?;
            (labels.is_empty() || labels.starts_with('{')).then_some((labels, value))
        })
        .filter(|(labels, _)| filters.iter().all(|f| labels.contains(f)))
        .filter_map(|(_, value)| value.parse::<f64>().ok())
        .sum()
}

/// Standard base64 (RFC 4648, padded), for protobuf `bytes` in ghz's JSON.
pub fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// One ghz load: a method, its JSON data, streams and a fixed call count.
#[derive(Debug, Clone)]
pub struct Ghz {
    call: String,
    data: String,
    streams: usize,
    calls: usize,
    timeout: Duration,
}

/// What one ghz run reported.
#[derive(Debug, Clone)]
pub struct Run {
    /// Calls made.
    pub count: u64,
    /// Calls that ended OK.
    pub ok: u64,
    /// Calls by status code name.
    pub codes: BTreeMap<String, u64>,
    /// Calls by error message.
    pub errors: BTreeMap<String, u64>,
    /// Requests per second.
    pub rps: f64,
}

impl fmt::Display for Run {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} calls, {:.0}/s, {:?}",
            self.count, self.rps, self.codes
        )?;
        if !self.errors.is_empty() {
            let first: Vec<_> = self.errors.iter().take(3).collect();
            write!(f, ", errors {first:?}")?;
        }
        Ok(())
    }
}

impl Ghz {
    /// `call` is `package.Service.Method`; `data` is ghz's JSON (an array for
    /// client and bidirectional streams).
    pub fn new(call: &str, data: &str) -> Ghz {
        Ghz {
            call: call.to_owned(),
            data: data.to_owned(),
            streams: 1,
            calls: 100,
            timeout: Duration::from_secs(30),
        }
    }

    /// Concurrent streams (`-c`), on one connection.
    pub fn streams(mut self, streams: usize) -> Ghz {
        self.streams = streams;
        self
    }

    /// Total calls (`-n`).
    pub fn calls(mut self, calls: usize) -> Ghz {
        self.calls = calls;
        self
    }

    /// Per-call timeout (`-t`).
    pub fn timeout(mut self, timeout: Duration) -> Ghz {
        self.timeout = timeout;
        self
    }

    /// Runs against `127.0.0.1:port`.
    pub fn run(&self, peers: &Peers, port: u16) -> Run {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data.json");
        std::fs::write(&data, &self.data).unwrap();
        let output = Command::new(peers.bin("ghz"))
            .args(["--insecure", "--connections", "1", "-O", "json"])
            .arg("--protoset")
            .arg(peers.bin("peers.protoset"))
            .args(["--call", &self.call])
            .arg("-D")
            .arg(&data)
            .args(["-c", &self.streams.to_string()])
            .args(["-n", &self.calls.to_string()])
            .args(["-t", &format!("{}s", self.timeout.as_secs())])
            .arg(format!("127.0.0.1:{port}"))
            .output()
            .expect("running ghz");
        let report: serde_json::Value =
            serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
                panic!(
                    "ghz printed no JSON report ({e}): {}",
                    String::from_utf8_lossy(&output.stderr)
                )
            });
        let counts = |key: &str| -> BTreeMap<String, u64> {
            report[key]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                        .collect()
                })
                .unwrap_or_default()
        };
        let codes = counts("statusCodeDistribution");
        Run {
            count: report["count"].as_u64().unwrap_or(0),
            ok: codes.get("OK").copied().unwrap_or(0),
            codes,
            errors: counts("errorDistribution"),
            rps: report["rps"].as_f64().unwrap_or(0.0),
        }
    }
}

#[test]
fn base64_matches_rfc_4648_examples() {
    assert_eq!(base64(b""), "");
    assert_eq!(base64(b"f"), "Zg==");
    assert_eq!(base64(b"fo"), "Zm8=");
    assert_eq!(base64(b"foo"), "Zm9v");
    assert_eq!(base64(b"foobar"), "Zm9vYmFy");
}
