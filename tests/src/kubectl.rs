//! The real kubectl, run against the test cluster with a bounded time.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use crate::cluster;

/// What kubectl printed and whether it succeeded.
#[derive(Debug)]
pub struct Output {
    /// Exit status was zero.
    pub success: bool,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Output {
    /// Standard output, or an error carrying standard error when kubectl failed.
    pub fn ok(self) -> Result<String> {
        if self.success {
            Ok(self.stdout)
        } else {
            bail!("kubectl failed: {}", self.stderr.trim())
        }
    }
}

/// The kubectl binary: `TIDEPOOL_KUBECTL`, else `kubectl` from `PATH`.
pub fn kubectl_path() -> String {
    std::env::var("TIDEPOOL_KUBECTL").unwrap_or_else(|_| "kubectl".into())
}

/// Runs kubectl with `args` against the test cluster.
pub async fn kubectl(args: &[&str]) -> Result<Output> {
    kubectl_stdin(args, None).await
}

/// Runs kubectl with `args`, feeding `stdin` (for `-f -`).
pub async fn kubectl_stdin(args: &[&str], stdin: Option<&str>) -> Result<Output> {
    let cluster = cluster()?;
    let mut cmd = Command::new(kubectl_path());
    cmd.arg("--kubeconfig")
        .arg(cluster.kubeconfig())
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().with_context(|| {
        format!(
            "running {} failed; is kubectl installed? (make tools)",
            kubectl_path()
        )
    })?;
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin is piped");
        pipe.write_all(input.as_bytes()).await?;
        drop(pipe);
    }
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .with_context(|| format!("kubectl {} did not finish within 60s", args.join(" ")))??;
    Ok(Output {
        success: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}
