//! The real helm, run with a bounded time, against the test cluster when it
//! needs one.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, Result};
use tokio::process::Command;

use crate::{Output, cluster, repo_root};

/// The helm binary: `TIDEPOOL_HELM`, else `helm` from `PATH`.
pub fn helm_path() -> String {
    std::env::var("TIDEPOOL_HELM").unwrap_or_else(|_| "helm".into())
}

/// The chart's directory.
pub fn chart_dir() -> String {
    repo_root()
        .join("charts/tidepool")
        .to_string_lossy()
        .into_owned()
}

/// Runs helm with `args`; with `kubeconfig`, against the test cluster.
pub async fn helm(args: &[&str], kubeconfig: bool) -> Result<Output> {
    let mut cmd = Command::new(helm_path());
    if kubeconfig {
        cmd.arg("--kubeconfig").arg(cluster()?.kubeconfig());
    }
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = cmd.spawn().with_context(|| {
        format!(
            "running {} failed; is helm installed? (make tools)",
            helm_path()
        )
    })?;
    let out = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
        .await
        .with_context(|| format!("helm {} did not finish within 120s", args.join(" ")))??;
    Ok(Output {
        success: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}
