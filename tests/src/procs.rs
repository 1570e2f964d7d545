//! The operator and agents as real processes, as they run in a cluster:
//! built once per test process, started on free loopback ports, logging to
//! files that a failing test prints, killed when dropped.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::process::{Child, Command};
use tokio::sync::OnceCell;

use crate::{cluster, repo_root};

static BINS: OnceCell<PathBuf> = OnceCell::const_new();

/// The directory holding `tidepool-operator` and `tidepool-agent`, built
/// (once per process) in the profile the tests run in.
pub async fn bin_dir() -> Result<PathBuf> {
    BINS.get_or_try_init(|| async {
        // target/<profile>/deps/<test binary> → target/<profile>
        let exe = std::env::current_exe()?;
        let dir = exe
            .parent()
            .and_then(Path::parent)
            .context("the test binary has no target directory")?
            .to_path_buf();
        let release = dir.file_name().is_some_and(|n| n == "release");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        // Built as `make unit` builds them (`cargo test --workspace
        // --exclude tidepool-e2e`), so the same features unify and, after
        // it, this is a no-op; a narrower `cargo build` would rebuild shared
        // dependencies with other features.
        let mut cmd = Command::new(cargo);
        cmd.current_dir(repo_root()).args([
            "test",
            "-q",
            "--workspace",
            "--exclude",
            "tidepool-e2e",
            "--no-run",
        ]);
        if release {
            cmd.arg("--release");
        }
        let out = tokio::time::timeout(Duration::from_secs(900), cmd.output())
            .await
            .context("building the operator and agent took over 15 minutes")??;
        if !out.status.success() {
            bail!(
                "building the operator and agent failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(dir)
    })
    .await
    .cloned()
}

/// A free TCP port on `ip` (bound, then released).
pub fn free_port(ip: &str) -> Result<u16> {
    Ok(TcpListener::bind(format!("{ip}:0"))?.local_addr()?.port())
}

/// A child process whose output goes to a log file.
pub struct Proc {
    name: String,
    program: PathBuf,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    child: Option<Child>,
    log: PathBuf,
    _dir: std::sync::Arc<tempfile::TempDir>,
}

impl std::fmt::Debug for Proc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proc")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Proc {
    /// Starts `program` with `args`.
    pub fn spawn(
        name: &str,
        program: PathBuf,
        args: Vec<String>,
        envs: Vec<(String, String)>,
    ) -> Result<Self> {
        let dir = std::sync::Arc::new(tempfile::tempdir()?);
        let log = dir.path().join(format!("{name}.log"));
        let mut p = Self {
            name: name.into(),
            program,
            args,
            envs,
            child: None,
            log,
            _dir: dir,
        };
        p.start()?;
        Ok(p)
    }

    fn start(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(&self.program)
            .args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .env(
                "TIDEPOOL_LOG",
                std::env::var("TIDEPOOL_E2E_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| {
                format!("starting {} ({}) failed", self.name, self.program.display())
            })?;
        self.child = Some(child);
        Ok(())
    }

    /// Kills the process (SIGKILL) and waits for it.
    pub async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
        }
    }

    /// Asks the process to stop (SIGTERM) and waits up to 10 s, then kills it.
    pub async fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            if let Some(pid) = c.id() {
                let _ = Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status()
                    .await;
            }
            if tokio::time::timeout(Duration::from_secs(10), c.wait())
                .await
                .is_err()
            {
                let _ = c.kill().await;
            }
        }
    }

    /// Starts the process again with the same arguments.
    pub fn restart(&mut self) -> Result<()> {
        self.start()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Its pid, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// A GET on a local HTTP/1 server: (status code, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let code = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        anyhow::Ok((code, body))
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .with_context(|| format!("GET http://{addr}{path} timed out"))?
}

/// Polls `f` every 50 ms until it returns `Some`, for at most `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("{what} did not happen within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The operator's `--endpoint-address-map` in tests and the demo.
pub const LOOPBACK_MAP: &str = "192.0.2.0/24=127.0.0.0/24";

/// The address an EndpointSlice publishes for a backend on loopback
/// `127.0.0.x` ([`LOOPBACK_MAP`] maps it back).
pub fn published(loopback_ip: &str) -> String {
    loopback_ip.replacen("127.0.0.", "192.0.2.", 1)
}

/// How a test's operator runs.
#[derive(Debug, Clone)]
pub struct OperatorOptions {
    /// The namespace it watches and keeps its Lease in.
    pub namespace: String,
    /// The label selector of its nodes.
    pub node_selector: String,
    /// The least time between status writes of a pool.
    pub status_interval: String,
    /// The name of the CA Secret and ConfigMap (in `namespace`).
    pub ca_name: String,
    /// The agents' ServiceAccount (in `namespace`).
    pub agent_sa: String,
    /// Its name in the Lease.
    pub identity: String,
    /// More flags.
    pub extra: Vec<String>,
}

impl OperatorOptions {
    /// An operator for `namespace`'s nodes (those labelled
    /// `tidepool.dev/e2e-group=<namespace>`), with TLS and TokenReview as
    /// in a cluster, status written every second.
    pub fn new(namespace: &str) -> Self {
        Self {
            namespace: namespace.into(),
            node_selector: format!("tidepool.dev/e2e-group={namespace}"),
            status_interval: "1s".into(),
            ca_name: "tidepool-control-ca".into(),
            agent_sa: crate::identity::AGENT_SA.into(),
            identity: format!("operator-{namespace}"),
            extra: Vec::new(),
        }
    }

    /// The name the operator's certificate carries.
    pub fn server_name(&self) -> String {
        format!("tidepool-operator.{}.svc", self.namespace)
    }
}

/// What an agent needs to join an operator: where it is, and for TLS the
/// CA bundle file and the certificate's name.
#[derive(Debug, Clone)]
pub struct Join {
    /// The control URL.
    pub url: String,
    /// The CA bundle file and the server name; `None` for plain text.
    pub tls: Option<(PathBuf, String)>,
}

/// A running operator process.
#[derive(Debug)]
pub struct Operator {
    /// The process.
    pub proc: Proc,
    /// Its control service.
    pub control: SocketAddr,
    /// Its admin server.
    pub admin: SocketAddr,
    /// What it was started with.
    pub options: OperatorOptions,
    /// Where agents find its CA bundle (filled by [`Operator::refresh_ca`],
    /// as the kubelet fills a ConfigMap volume).
    pub ca_file: PathBuf,
    _files: std::sync::Arc<tempfile::TempDir>,
}

impl Operator {
    /// Starts an operator as the cluster's admin and waits until it is
    /// ready (leads, knows every pool).
    pub async fn start(options: &OperatorOptions) -> Result<Self> {
        let op = Self::spawn_as(options, cluster()?.kubeconfig()).await?;
        op.wait_ready().await?;
        Ok(op)
    }

    /// Starts an operator that authenticates with `kubeconfig` (for example
    /// a ServiceAccount token), without waiting for it to become ready.
    ///
    /// Its two ports are picked free just before it starts; another process
    /// may take one in between (any test's ephemeral port). A start that
    /// fails on "Address already in use" is retried on new ports, twice.
    pub async fn spawn_as(options: &OperatorOptions, kubeconfig: &Path) -> Result<Self> {
        let mut tries = 0;
        loop {
            tries += 1;
            let mut op = Self::spawn_once(options, kubeconfig).await?;
            // Bound (it logs "listening" right after binding), or exited.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while op.proc.is_running()
                && !op.proc.log().contains("listening")
                && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if tries < 3
                && !op.proc.is_running()
                && op.proc.log().contains("Address already in use")
            {
                continue;
            }
            return Ok(op);
        }
    }

    async fn spawn_once(options: &OperatorOptions, kubeconfig: &Path) -> Result<Self> {
        let bin = bin_dir().await?.join("tidepool-operator");
        let control: SocketAddr = format!("127.0.0.1:{}", free_port("127.0.0.1")?).parse()?;
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port("127.0.0.1")?).parse()?;
        let kubeconfig = kubeconfig.display().to_string();
        let mut args = vec![
            format!("--control-listen={control}"),
            format!("--admin-listen={admin}"),
            format!("--watch-namespace={}", options.namespace),
            format!("--node-selector={}", options.node_selector),
            format!("--lease-namespace={}", options.namespace),
            format!("--identity={}", options.identity),
            "--lease-duration=3s".into(),
            format!("--status-interval={}", options.status_interval),
            // EndpointSlices cannot hold loopback addresses: tests publish
            // backends on 127.0.0.x as 192.0.2.x (RFC 5737).
            format!("--endpoint-address-map={LOOPBACK_MAP}"),
            format!(
                "--agent-service-account={}/{}",
                options.namespace, options.agent_sa
            ),
            format!("--control-dns-names={}", options.server_name()),
            format!("--ca-secret={}", options.ca_name),
            format!("--ca-configmap={}", options.ca_name),
        ];
        args.extend(options.extra.iter().cloned());
        let proc = Proc::spawn(
            "operator",
            bin,
            args,
            vec![("KUBECONFIG".into(), kubeconfig)],
        )?;
        let files = std::sync::Arc::new(tempfile::tempdir()?);
        Ok(Self {
            proc,
            control,
            admin,
            ca_file: files.path().join("ca.crt"),
            options: options.clone(),
            _files: files,
        })
    }

    /// Whether the operator serves TLS (not `--insecure-control`).
    pub fn secure(&self) -> bool {
        !self
            .options
            .extra
            .iter()
            .any(|a| a == "--insecure-control=true" || a == "--insecure-control")
    }

    /// Copies the CA ConfigMap's bundle to [`Operator::ca_file`]; returns it.
    pub async fn refresh_ca(&self) -> Result<String> {
        let client = cluster()?.client().await?;
        let cm = kube::api::Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(
            client,
            &self.options.namespace,
        )
        .get(&self.options.ca_name)
        .await
        .with_context(|| format!("reading ConfigMap {}", self.options.ca_name))?;
        let bundle = cm
            .data
            .and_then(|d| d.get("ca.crt").cloned())
            .context("the CA ConfigMap has no ca.crt")?;
        std::fs::write(&self.ca_file, &bundle)?;
        Ok(bundle)
    }

    /// How agents join it.
    pub fn join(&self) -> Join {
        if self.secure() {
            Join {
                url: format!("https://{}", self.control),
                tls: Some((self.ca_file.clone(), self.options.server_name())),
            }
        } else {
            Join {
                url: self.url(),
                tls: None,
            }
        }
    }

    /// Waits until `/readyz` answers 200 as the leader (a warm standby is
    /// ready too, but serves no agent), and copies its CA bundle for agents.
    pub async fn wait_ready(&self) -> Result<()> {
        self.wait_leading().await?;
        if self.secure() {
            self.refresh_ca().await?;
        }
        Ok(())
    }

    /// Whether `/readyz` says it leads, now.
    pub async fn wait_leading_once(&self) -> bool {
        matches!(http_get(self.admin, "/readyz").await, Ok((200, body)) if body.contains("leader") && !body.contains("standby"))
    }

    /// Waits until `/readyz` answers 200 as the leader.
    pub async fn wait_leading(&self) -> Result<()> {
        eventually(
            Duration::from_secs(30),
            "the operator becoming ready as the leader",
            || async {
                matches!(http_get(self.admin, "/readyz").await, Ok((200, body)) if body.contains("leader") && !body.contains("standby"))
                    .then_some(())
            },
        )
        .await
        .with_context(|| format!("operator log:\n{}", self.proc.log()))
    }

    /// The control URL agents dial in plain text.
    pub fn url(&self) -> String {
        format!("http://{}", self.control)
    }

    /// The value of metric `name` (the sum of its samples; with labels in
    /// `name`, that sample's).
    pub async fn metric(&self, name: &str) -> Result<f64> {
        metric(self.admin, name).await
    }

    /// Agents with an open control stream now
    /// (`tidepool_operator_connected_agents`); `None` when the metric
    /// cannot be read.
    pub async fn connected_agents(&self) -> Option<f64> {
        self.metric("tidepool_operator_connected_agents").await.ok()
    }

    /// Waits at most `limit` until exactly `n` agents have an open control
    /// stream; the error carries the operator's log.
    pub async fn wait_connected(&self, n: usize, limit: Duration) -> Result<()> {
        eventually(limit, &format!("{n} agents connected"), || async {
            (self.connected_agents().await? == n as f64).then_some(())
        })
        .await
        .with_context(|| format!("operator log:\n{}", self.proc.log()))
    }
}

/// Metric `name` on `admin`'s `/metrics` ([`metric_in`]).
async fn metric(admin: SocketAddr, name: &str) -> Result<f64> {
    let (_, body) = http_get(admin, "/metrics").await?;
    metric_in(&body, name).with_context(|| format!("no metric {name} in:\n{body}"))
}

/// The sum of the samples of metric `name` in a Prometheus text body;
/// `name` may carry labels, whole (`name{reason="x"}`) or their start
/// (`name{pool="a"`), to pick samples. `None` when it has none.
pub fn metric_in(body: &str, name: &str) -> Option<f64> {
    let samples: Vec<f64> = body
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{', ',', '}']))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    (!samples.is_empty()).then(|| samples.iter().sum())
}

/// The 1-minute load average, for benchmark tables.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

/// A running agent process.
#[derive(Debug)]
pub struct Agent {
    /// The process.
    pub proc: Proc,
    /// Its node.
    pub node: String,
    /// Its shared proxy listener.
    pub proxy: SocketAddr,
    /// Its admin server.
    pub admin: SocketAddr,
    /// The token file it reads at every dial (rewrite it to rotate).
    pub token_file: PathBuf,
    _files: std::sync::Arc<tempfile::TempDir>,
}

impl Agent {
    /// Starts an agent for `node` joining `operator`, listening on loopback
    /// address `ip` (its own, as a node's IP is: dedicated pool ports of
    /// different agents do not clash). Against a secure operator it has
    /// what the chart gives it: a token of the agent ServiceAccount bound
    /// to a Pod on `node`, and the CA bundle.
    pub async fn start(operator: &Operator, node: &str, ip: &str) -> Result<Self> {
        let token = if operator.secure() {
            let client = cluster()?.client().await?;
            let (ns, sa) = (&operator.options.namespace, &operator.options.agent_sa);
            crate::identity::apply_service_account(&client, ns, sa).await?;
            Some(crate::identity::agent_token(&client, ns, sa, node).await?)
        } else {
            None
        };
        Self::start_with(&operator.join(), node, ip, token.as_deref(), &[]).await
    }

    /// Starts an agent for `node` joining by `join` with `token` (none: no
    /// token file at all) and more flags.
    pub async fn start_with(
        join: &Join,
        node: &str,
        ip: &str,
        token: Option<&str>,
        extra: &[String],
    ) -> Result<Self> {
        let bin = bin_dir().await?.join("tidepool-agent");
        let proxy: SocketAddr = format!("{ip}:{}", free_port(ip)?).parse()?;
        let admin: SocketAddr = format!("{ip}:{}", free_port(ip)?).parse()?;
        let files = std::sync::Arc::new(tempfile::tempdir()?);
        let token_file = files.path().join("token");
        if let Some(token) = token {
            std::fs::write(&token_file, token)?;
        }
        let mut args = vec![
            format!("--operator={}", join.url),
            format!("--node-name={node}"),
            format!("--pod-name=agent-{node}"),
            format!("--listen={proxy}"),
            format!("--admin-listen={admin}"),
            "--drain-timeout=2s".into(),
        ];
        match &join.tls {
            Some((ca, name)) => args.extend([
                format!("--ca-file={}", ca.display()),
                format!("--operator-server-name={name}"),
                format!("--token-file={}", token_file.display()),
            ]),
            None => args.push("--insecure-control=true".into()),
        }
        args.extend(extra.iter().cloned());
        let proc = Proc::spawn(&format!("agent-{node}"), bin, args, vec![])?;
        Ok(Self {
            proc,
            node: node.into(),
            proxy,
            admin,
            token_file,
            _files: files,
        })
    }

    /// The agent's `/pools`, parsed (empty when it cannot be read).
    pub async fn pools(&self) -> Vec<serde_json::Value> {
        match http_get(self.admin, "/pools").await {
            Ok((200, body)) => match serde_json::from_str::<serde_json::Value>(&body) {
                Ok(serde_json::Value::Array(a)) => a,
                Ok(serde_json::Value::Object(o)) => o
                    .get("pools")
                    .and_then(|p| p.as_array())
                    .cloned()
                    .unwrap_or_default(),
                _ => vec![],
            },
            _ => vec![],
        }
    }

    /// The agent's `/clients` (its node's pod map), parsed; `Null` when it
    /// cannot be read.
    pub async fn clients(&self) -> serde_json::Value {
        match http_get(self.admin, "/clients").await {
            Ok((200, body)) => serde_json::from_str(&body).unwrap_or_default(),
            _ => serde_json::Value::Null,
        }
    }

    /// The value of a metric line starting with `name` (first match).
    pub async fn metric(&self, name: &str) -> Result<f64> {
        metric(self.admin, name).await
    }

    /// The pool `namespace/name` as `/pools` shows it.
    pub async fn pool(&self, namespace: &str, name: &str) -> Option<serde_json::Value> {
        self.pools()
            .await
            .into_iter()
            .find(|p| p["namespace"] == namespace && p["name"] == name)
    }
}
