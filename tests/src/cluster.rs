//! The cluster the e2e tests run against.
//!
//! By default, a real etcd and kube-apiserver on loopback, built from their
//! Go modules by `tests/cluster/build.sh` and run by `tpcluster`; one per
//! test process, shared by its tests, each test in its own namespace. With
//! `TIDEPOOL_E2E_KUBECONFIG` set, an existing cluster instead (kind, for
//! `make e2e-kind`).
//!
//! The local control plane's lifetime is tied to this process: `tpcluster`
//! watches its standard input, which only we hold, so it stops and removes
//! its files when the test process exits, however it exits.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};

/// A cluster the tests may use.
pub struct Cluster {
    kubeconfig: PathBuf,
    /// Whether this process started the control plane (as opposed to a
    /// cluster given by `TIDEPOOL_E2E_KUBECONFIG`).
    local: bool,
    // Held, never read: closing tpcluster's stdin is what stops it.
    _child: Option<Mutex<Child>>,
}

static CLUSTER: OnceLock<Result<Cluster, String>> = OnceLock::new();

/// The shared cluster, started on first use. Fails every caller with the
/// same message if it could not start.
pub fn cluster() -> Result<&'static Cluster> {
    CLUSTER
        .get_or_init(|| start().map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow!("the e2e cluster is not available: {e}"))
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn start() -> Result<Cluster> {
    if let Ok(kc) = std::env::var("TIDEPOOL_E2E_KUBECONFIG") {
        let kubeconfig = PathBuf::from(kc);
        if !kubeconfig.exists() {
            bail!(
                "TIDEPOOL_E2E_KUBECONFIG names {}, which does not exist",
                kubeconfig.display()
            );
        }
        return Ok(Cluster {
            kubeconfig,
            local: false,
            _child: None,
        });
    }
    let bin_dir = match std::env::var("TIDEPOOL_CLUSTER_BIN") {
        Ok(d) => PathBuf::from(d),
        Err(_) => build_binaries()?,
    };
    let tpcluster = bin_dir.join("tpcluster");
    let mut child = Command::new(&tpcluster)
        .args(["run", "--watch-stdin", "--bin-dir"])
        .arg(&bin_dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {} failed", tpcluster.display()))?;

    // Read tpcluster's first line on a thread so a hang cannot block us
    // past the deadline.
    let stdout = child.stdout.take().expect("stdout is piped");
    let stderr = child.stderr.take().expect("stderr is piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let errors = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut BufReader::new(stderr), &mut s);
        s
    });
    let line = rx
        .recv_timeout(Duration::from_secs(150))
        .unwrap_or_default();
    let Some(kubeconfig) = line
        .strip_prefix("ready kubeconfig=")
        .and_then(|rest| rest.split_whitespace().next())
    else {
        let _ = child.kill();
        let _ = child.wait();
        let why = errors.join().unwrap_or_default();
        bail!(
            "the local control plane did not start within 150s: {}",
            if why.trim().is_empty() {
                "tpcluster printed nothing"
            } else {
                why.trim()
            }
        );
    };
    Ok(Cluster {
        kubeconfig: PathBuf::from(kubeconfig),
        local: true,
        _child: Some(Mutex::new(child)),
    })
}

/// Runs `tests/cluster/build.sh`, which builds (or finds in its cache) the
/// control plane's binaries, and returns their directory.
pub fn build_binaries() -> Result<PathBuf> {
    let script = repo_root().join("tests/cluster/build.sh");
    let out = Command::new("bash")
        .arg(&script)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {} failed", script.display()))?;
    if !out.status.success() {
        bail!("{} failed (its messages are above)", script.display());
    }
    let dir = String::from_utf8(out.stdout)?
        .lines()
        .last()
        .unwrap_or_default()
        .to_string();
    Ok(PathBuf::from(dir))
}

impl Cluster {
    /// The kubeconfig file for the admin user.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// Whether this is the local control plane (no nodes, no controllers:
    /// tests create Node and EndpointSlice objects themselves).
    pub fn is_local(&self) -> bool {
        self.local
    }

    /// A client for the admin user.
    pub async fn client(&self) -> Result<kube::Client> {
        let kc = kube::config::Kubeconfig::read_from(&self.kubeconfig)?;
        let config = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
        Ok(kube::Client::try_from(config)?)
    }
}
